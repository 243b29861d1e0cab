-- Idempotency keys reserved while their first request runs, and inbound SMS replies
-- tied to the booking they acted on. Written to be safe to run twice.

-- A key is reserved (no response yet, `reserved_until` set, `owner` naming the
-- request that holds it) before its request does anything; the request completes the
-- row with its response in its own transaction, or deletes the reservation when it is
-- refused. A duplicate arriving meanwhile is told "in progress"; a reservation whose
-- request died is taken over once `reserved_until` has passed.
ALTER TABLE idempotency_keys ALTER COLUMN status_code DROP NOT NULL;
ALTER TABLE idempotency_keys ALTER COLUMN response DROP NOT NULL;
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS reserved_until timestamptz;
ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS owner uuid;
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_constraint WHERE conname = 'idempotency_keys_reserved_or_done'
    ) THEN
        ALTER TABLE idempotency_keys ADD CONSTRAINT idempotency_keys_reserved_or_done CHECK (
            (response IS NOT NULL AND status_code IS NOT NULL)
            OR (response IS NULL AND status_code IS NULL
                AND reserved_until IS NOT NULL AND owner IS NOT NULL)
        );
    END IF;
END
$$;

-- The booking a Y or N reply was applied to: the phone's last applied reply marks
-- which of the messages asking for a reply it has answered already.
ALTER TABLE inbound_sms ADD COLUMN IF NOT EXISTS booking_id bigint REFERENCES bookings (id);
CREATE INDEX IF NOT EXISTS inbound_sms_applied_idx ON inbound_sms (from_phone, received_at)
    WHERE booking_id IS NOT NULL;
