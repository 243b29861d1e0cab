-- Waitlist entries and their offers; check-in time and the no-show rule on bookings.
-- Written to be safe to run twice.

-- A customer waiting for a seat of a service on one local date, starting between two
-- local wall times. When capacity frees, the oldest matching entry gets a hold on the
-- earliest fitting slot (its expiry is the claim deadline) and an SMS offer; claiming
-- books the hold, and an offer nobody claims lapses, which frees the seat for the
-- next entry.
--
--   waiting -> offered -> booked | lapsed | declined
--   waiting -> cancelled | expired (the window passed without an offer)
CREATE TABLE IF NOT EXISTS waitlist_entries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    branch_id        bigint NOT NULL REFERENCES branches (id),
    service_id       bigint NOT NULL REFERENCES services (id),
    customer_id      bigint NOT NULL REFERENCES customers (id),
    party_size       integer NOT NULL CHECK (party_size >= 1),
    local_date       date NOT NULL,
    earliest_local   time NOT NULL,
    latest_local     time NOT NULL,
    -- The same window as instants in the branch zone: slots starting in
    -- [earliest_at, latest_at] match.
    earliest_at      timestamptz NOT NULL,
    latest_at        timestamptz NOT NULL,
    channel          text NOT NULL
                     CHECK (channel IN ('app', 'mini_program', 'kiosk', 'sms', 'web', 'staff')),
    status           text NOT NULL DEFAULT 'waiting' CHECK (
        status IN ('waiting', 'offered', 'booked', 'lapsed', 'declined', 'cancelled', 'expired')
    ),
    hold_id          bigint REFERENCES holds (id),
    booking_id       bigint REFERENCES bookings (id),
    offered_at       timestamptz,
    offer_expires_at timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now(),
    updated_at       timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT waitlist_window CHECK (latest_at >= earliest_at),
    CONSTRAINT waitlist_offer_shape CHECK (
        status <> 'offered' OR (hold_id IS NOT NULL AND offer_expires_at IS NOT NULL)
    )
);
-- Matching takes the oldest waiting entries of a branch first.
CREATE INDEX IF NOT EXISTS waitlist_waiting_idx ON waitlist_entries (branch_id, created_at, id)
    WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS waitlist_offered_hold_idx ON waitlist_entries (hold_id)
    WHERE status = 'offered';
CREATE INDEX IF NOT EXISTS waitlist_customer_idx ON waitlist_entries (customer_id, id);
-- One live entry per customer, service and day.
CREATE UNIQUE INDEX IF NOT EXISTS waitlist_one_live_key
    ON waitlist_entries (customer_id, branch_id, service_id, local_date)
    WHERE status IN ('waiting', 'offered');

-- Set by check-in; a booking checked in is never marked a no-show.
ALTER TABLE bookings ADD COLUMN IF NOT EXISTS checked_in_at timestamptz;
ALTER TABLE bookings ADD COLUMN IF NOT EXISTS no_show_at timestamptz;
-- The no-show sweep reads the active bookings by start.
CREATE INDEX IF NOT EXISTS bookings_active_start_idx ON bookings (starts_at)
    WHERE status IN ('pending_payment', 'confirmed') AND checked_in_at IS NULL;
-- The repeated no-show rule counts a customer's (or a walk-in phone's) no-shows.
CREATE INDEX IF NOT EXISTS bookings_no_show_customer_idx ON bookings (customer_id, starts_at)
    WHERE status = 'no_show';
CREATE INDEX IF NOT EXISTS bookings_no_show_phone_idx ON bookings (phone, starts_at)
    WHERE status = 'no_show';
