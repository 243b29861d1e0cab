-- Idempotency keys for creating POSTs, booking confirmations by SMS, the
-- cancellation policy outcome, and range indexes for availability reads.
-- Written to be safe to run twice.

-- One row per (caller, key): written in the same transaction as what the request
-- created, so a replay finds exactly the first response or nothing at all.
CREATE TABLE IF NOT EXISTS idempotency_keys (
    principal    text NOT NULL,           -- 'customer:12', 'device:3'
    key          text NOT NULL CHECK (length(key) BETWEEN 1 AND 200),
    request_hash bytea NOT NULL,          -- sha256 of operation + canonical body
    status_code  integer NOT NULL,
    response     jsonb NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (principal, key)
);
CREATE INDEX IF NOT EXISTS idempotency_keys_created_idx ON idempotency_keys (created_at);

ALTER TABLE bookings ADD COLUMN IF NOT EXISTS confirmed_by_sms_at timestamptz;
ALTER TABLE bookings ADD COLUMN IF NOT EXISTS late_cancellation boolean NOT NULL DEFAULT false;

-- Availability reads only the commitments overlapping the range asked for.
CREATE INDEX IF NOT EXISTS bookings_counting_occupied_idx ON bookings
    USING gist (resource_id, occupied)
    WHERE status IN ('pending_payment', 'confirmed', 'completed');
CREATE INDEX IF NOT EXISTS holds_live_occupied_idx ON holds
    USING gist (resource_id, occupied)
    WHERE released_at IS NULL;
-- An SMS reply finds the phone's next active booking.
CREATE INDEX IF NOT EXISTS bookings_active_phone_idx ON bookings (phone, starts_at)
    WHERE status IN ('pending_payment', 'confirmed') AND phone IS NOT NULL;
