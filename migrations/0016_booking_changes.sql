-- Changes staff make to bookings (cancel, reschedule), with who, when and why.
-- Safe to run twice.
--
-- One row per change, written in the transaction that makes it. A reschedule keeps
-- the start before and after; a cancel only the start it had.

CREATE TABLE IF NOT EXISTS booking_changes (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    booking_id      bigint NOT NULL REFERENCES bookings (id),
    action          text NOT NULL CHECK (action IN ('cancel', 'reschedule')),
    staff_id        bigint NOT NULL REFERENCES staff (id),
    reason          text NOT NULL CHECK (length(reason) BETWEEN 1 AND 500),
    old_starts_at   timestamptz NOT NULL,
    new_starts_at   timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT booking_changes_shape CHECK ((action = 'reschedule') = (new_starts_at IS NOT NULL))
);
CREATE INDEX IF NOT EXISTS booking_changes_booking_idx ON booking_changes (booking_id, id);

-- The staff search: by phone and by code (any status), newest day sheets by branch and start.
CREATE INDEX IF NOT EXISTS bookings_phone_start_idx ON bookings (phone, starts_at)
    WHERE phone IS NOT NULL;
CREATE INDEX IF NOT EXISTS bookings_code_idx ON bookings (code);
