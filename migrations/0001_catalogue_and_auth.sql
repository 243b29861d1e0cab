-- Catalogue (branches, services, resources, schedules), staff accounts, kiosk devices
-- and refresh-token families. Written to be safe to run twice.

CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE IF NOT EXISTS branches (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    timezone        text NOT NULL,
    address         text NOT NULL DEFAULT '',
    phone           text,
    opening_hours   jsonb NOT NULL DEFAULT '[]'::jsonb,
    closures        jsonb NOT NULL DEFAULT '[]'::jsonb,
    walk_in_reserve numeric(4, 3) NOT NULL DEFAULT 0
                    CHECK (walk_in_reserve >= 0 AND walk_in_reserve <= 1),
    active          boolean NOT NULL DEFAULT true,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS services (
    id                      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    branch_id               bigint NOT NULL REFERENCES branches (id),
    name                    text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    description             text NOT NULL DEFAULT '',
    duration_min            integer NOT NULL CHECK (duration_min > 0 AND duration_min <= 1440),
    buffer_before_min       integer NOT NULL DEFAULT 0 CHECK (buffer_before_min >= 0),
    buffer_after_min        integer NOT NULL DEFAULT 0 CHECK (buffer_after_min >= 0),
    price_minor             bigint NOT NULL DEFAULT 0 CHECK (price_minor >= 0),
    deposit_minor           bigint NOT NULL DEFAULT 0 CHECK (deposit_minor >= 0),
    currency                char(3) NOT NULL DEFAULT 'CNY',
    min_party               integer NOT NULL DEFAULT 1 CHECK (min_party >= 1),
    max_party               integer NOT NULL DEFAULT 1,
    lead_time_min           integer NOT NULL DEFAULT 0 CHECK (lead_time_min >= 0),
    horizon_days            integer NOT NULL DEFAULT 30 CHECK (horizon_days >= 1),
    cancellation_window_min integer NOT NULL DEFAULT 0 CHECK (cancellation_window_min >= 0),
    slot_interval_min       integer NOT NULL DEFAULT 15 CHECK (slot_interval_min > 0),
    active                  boolean NOT NULL DEFAULT true,
    created_at              timestamptz NOT NULL DEFAULT now(),
    updated_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT services_party_range CHECK (max_party >= min_party),
    CONSTRAINT services_deposit_le_price CHECK (deposit_minor <= price_minor)
);
CREATE INDEX IF NOT EXISTS services_branch_idx ON services (branch_id, id);

CREATE TABLE IF NOT EXISTS resources (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    branch_id  bigint NOT NULL REFERENCES branches (id),
    kind       text NOT NULL CHECK (kind IN ('counter', 'staff', 'room')),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    capacity   integer NOT NULL DEFAULT 1 CHECK (capacity >= 1),
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS resources_branch_idx ON resources (branch_id, id);

-- Skills: the services a resource can serve.
CREATE TABLE IF NOT EXISTS resource_skills (
    resource_id bigint NOT NULL REFERENCES resources (id),
    service_id  bigint NOT NULL REFERENCES services (id),
    PRIMARY KEY (resource_id, service_id)
);
CREATE INDEX IF NOT EXISTS resource_skills_service_idx ON resource_skills (service_id);

-- A schedule entry is a weekly shift (weekday + minutes of the branch-local day)
-- or a dated exception (an instant range when the resource is off, or on extra).
CREATE TABLE IF NOT EXISTS schedules (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    resource_id  bigint NOT NULL REFERENCES resources (id),
    kind         text NOT NULL CHECK (kind IN ('shift', 'exception')),
    weekday      smallint CHECK (weekday BETWEEN 1 AND 7),
    start_minute smallint CHECK (start_minute BETWEEN 0 AND 1439),
    end_minute   smallint CHECK (end_minute BETWEEN 1 AND 1440),
    starts_at    timestamptz,
    ends_at      timestamptz,
    available    boolean NOT NULL DEFAULT false,
    note         text NOT NULL DEFAULT '',
    active       boolean NOT NULL DEFAULT true,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT schedules_shift_shape CHECK (
        kind <> 'shift' OR (
            weekday IS NOT NULL AND start_minute IS NOT NULL AND end_minute IS NOT NULL
            AND end_minute > start_minute AND starts_at IS NULL AND ends_at IS NULL
        )
    ),
    CONSTRAINT schedules_exception_shape CHECK (
        kind <> 'exception' OR (
            starts_at IS NOT NULL AND ends_at IS NOT NULL AND ends_at > starts_at
            AND weekday IS NULL AND start_minute IS NULL AND end_minute IS NULL
        )
    ),
    CONSTRAINT schedules_no_overlapping_shifts EXCLUDE USING gist (
        resource_id WITH =,
        weekday WITH =,
        int4range(start_minute, end_minute) WITH &&
    ) WHERE (kind = 'shift' AND active),
    CONSTRAINT schedules_no_overlapping_exceptions EXCLUDE USING gist (
        resource_id WITH =,
        tstzrange(starts_at, ends_at) WITH &&
    ) WHERE (kind = 'exception' AND active)
);
CREATE INDEX IF NOT EXISTS schedules_resource_idx ON schedules (resource_id, id);

CREATE TABLE IF NOT EXISTS staff (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    email         text NOT NULL,
    name          text NOT NULL DEFAULT '',
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'manager', 'staff')),
    active        boolean NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX IF NOT EXISTS staff_email_key ON staff (lower(email));

CREATE TABLE IF NOT EXISTS staff_branches (
    staff_id  bigint NOT NULL REFERENCES staff (id),
    branch_id bigint NOT NULL REFERENCES branches (id),
    PRIMARY KEY (staff_id, branch_id)
);
CREATE INDEX IF NOT EXISTS staff_branches_branch_idx ON staff_branches (branch_id);

CREATE TABLE IF NOT EXISTS devices (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    branch_id    bigint NOT NULL REFERENCES branches (id),
    name         text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    kind         text NOT NULL DEFAULT 'kiosk' CHECK (kind IN ('kiosk', 'display')),
    secret_hash  bytea NOT NULL,
    active       boolean NOT NULL DEFAULT true,
    revoked_at   timestamptz,
    last_seen_at timestamptz,
    created_at   timestamptz NOT NULL DEFAULT now(),
    updated_at   timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS devices_branch_idx ON devices (branch_id, id);

-- Rotating refresh tokens. Spending one marks it used and issues the next in the
-- same family; presenting a used one again revokes the whole family.
CREATE TABLE IF NOT EXISTS refresh_tokens (
    id             uuid PRIMARY KEY DEFAULT gen_random_uuid(),
    family_id      uuid NOT NULL,
    token_hash     bytea NOT NULL UNIQUE,
    principal_kind text NOT NULL CHECK (principal_kind IN ('staff', 'device', 'customer')),
    principal_id   bigint NOT NULL,
    channel        text NOT NULL,
    expires_at     timestamptz NOT NULL,
    used_at        timestamptz,
    revoked_at     timestamptz,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS refresh_tokens_family_idx ON refresh_tokens (family_id);
CREATE INDEX IF NOT EXISTS refresh_tokens_expiry_idx ON refresh_tokens (expires_at);
