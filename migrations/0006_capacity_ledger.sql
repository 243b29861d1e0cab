-- Holds, bookings and the capacity ledger that keeps them within each resource's
-- capacity. Written to be safe to run twice.
--
-- The ledger cuts time into fixed 5-minute units aligned to the UTC epoch
-- (00:00, 00:05, ... UTC). One row per (resource, unit) that anything ever touched
-- says how many seats are used and how many exist. Taking capacity is one guarded
-- `UPDATE ... SET used = used + n WHERE used + n <= capacity` over the units of the
-- occupied span (service plus buffers), in the writing transaction; the CHECK
-- (used <= capacity) is the last line of defence behind it.
--
-- Spans that are not multiples of 5 minutes (durations, buffers and intervals are
-- whole minutes) are rounded OUTWARD to whole units: a commitment occupying
-- 10:03-10:11 takes the units 10:00, 10:05 and 10:10. This is conservative: it can
-- refuse a booking that would fit by the minute (a 7-minute service at 10:00 on a
-- capacity-1 resource also blocks a booking starting at 10:07), but it can never
-- admit one that does not fit. Services whose duration, buffers and slot interval
-- are multiples of 5 minutes lose nothing.
--
-- Which rows count. Holds count while released_at IS NULL (the expiry sweep sets
-- released_at and gives the seats back; a hold turned into a booking is released
-- and its seats pass to the booking in the same transaction). Bookings count while
-- status is pending_payment, confirmed or completed; cancelled and no_show give
-- their seats back.

CREATE TABLE IF NOT EXISTS resource_capacity_units (
    resource_id bigint NOT NULL REFERENCES resources (id),
    unit_start  timestamptz NOT NULL,
    used        integer NOT NULL DEFAULT 0,
    -- Copied from resources.capacity when the row is created; a capacity change
    -- updates the future rows in the same transaction as the resource itself.
    capacity    integer NOT NULL,
    PRIMARY KEY (resource_id, unit_start),
    CONSTRAINT resource_capacity_units_used_nonnegative CHECK (used >= 0),
    CONSTRAINT resource_capacity_units_within_capacity CHECK (used <= capacity),
    CONSTRAINT resource_capacity_units_aligned CHECK (extract(epoch FROM unit_start) % 300 = 0)
);

CREATE TABLE IF NOT EXISTS holds (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    branch_id      bigint NOT NULL REFERENCES branches (id),
    service_id     bigint NOT NULL REFERENCES services (id),
    resource_id    bigint NOT NULL REFERENCES resources (id),
    party_size     integer NOT NULL CHECK (party_size >= 1),
    starts_at      timestamptz NOT NULL,
    ends_at        timestamptz NOT NULL,
    occupied       tstzrange NOT NULL,
    expires_at     timestamptz NOT NULL,
    channel        text NOT NULL
                   CHECK (channel IN ('app', 'mini_program', 'kiosk', 'sms', 'web', 'staff')),
    customer_id    bigint REFERENCES customers (id),
    created_at     timestamptz NOT NULL DEFAULT now(),
    released_at    timestamptz,
    release_reason text CHECK (release_reason IN ('expired', 'converted', 'released')),
    CONSTRAINT holds_span CHECK (ends_at > starts_at),
    CONSTRAINT holds_occupied_covers_span CHECK (
        NOT isempty(occupied) AND occupied @> tstzrange(starts_at, ends_at)
    ),
    CONSTRAINT holds_release_shape CHECK ((released_at IS NULL) = (release_reason IS NULL))
);
CREATE INDEX IF NOT EXISTS holds_live_expiry_idx ON holds (expires_at) WHERE released_at IS NULL;
CREATE INDEX IF NOT EXISTS holds_live_resource_idx ON holds (resource_id, starts_at)
    WHERE released_at IS NULL;

CREATE TABLE IF NOT EXISTS bookings (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- 6 characters from an alphabet without 0/O/1/I/L.
    code         text NOT NULL CHECK (code ~ '^[A-HJKMNP-Z2-9]{6}$'),
    branch_id    bigint NOT NULL REFERENCES branches (id),
    service_id   bigint NOT NULL REFERENCES services (id),
    resource_id  bigint NOT NULL REFERENCES resources (id),
    hold_id      bigint REFERENCES holds (id),
    party_size   integer NOT NULL CHECK (party_size >= 1),
    starts_at    timestamptz NOT NULL,
    ends_at      timestamptz NOT NULL,
    occupied     tstzrange NOT NULL,
    status       text NOT NULL DEFAULT 'confirmed' CHECK (
        status IN ('pending_payment', 'confirmed', 'cancelled', 'no_show', 'completed')
    ),
    channel      text NOT NULL
                 CHECK (channel IN ('app', 'mini_program', 'kiosk', 'sms', 'web', 'staff')),
    customer_id  bigint REFERENCES customers (id),
    phone        text,
    cancelled_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT bookings_span CHECK (ends_at > starts_at),
    CONSTRAINT bookings_occupied_covers_span CHECK (
        NOT isempty(occupied) AND occupied @> tstzrange(starts_at, ends_at)
    )
);
-- A code names one booking among those still ahead; finished ones free their code.
CREATE UNIQUE INDEX IF NOT EXISTS bookings_active_code_key ON bookings (code)
    WHERE status IN ('pending_payment', 'confirmed');
-- A hold becomes at most one booking.
CREATE UNIQUE INDEX IF NOT EXISTS bookings_hold_key ON bookings (hold_id) WHERE hold_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS bookings_resource_start_idx ON bookings (resource_id, starts_at);
CREATE INDEX IF NOT EXISTS bookings_branch_start_idx ON bookings (branch_id, starts_at);
CREATE INDEX IF NOT EXISTS bookings_customer_idx ON bookings (customer_id)
    WHERE customer_id IS NOT NULL;
