-- Walk-in queues, tickets, counters and service-time statistics. Safe to run twice.

-- A queue of a branch: a letter prefix for its display codes and the services it
-- covers (a ticket is for one of them).
CREATE TABLE IF NOT EXISTS queues (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    branch_id  bigint NOT NULL REFERENCES branches (id),
    name       text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    prefix     text NOT NULL CHECK (prefix ~ '^[A-Z]{1,2}$'),
    active     boolean NOT NULL DEFAULT true,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
-- Two active queues of a branch never share a prefix (codes must not collide).
CREATE UNIQUE INDEX IF NOT EXISTS queues_branch_prefix_key ON queues (branch_id, prefix)
    WHERE active;
CREATE INDEX IF NOT EXISTS queues_branch_idx ON queues (branch_id, id);

CREATE TABLE IF NOT EXISTS queue_services (
    queue_id   bigint NOT NULL REFERENCES queues (id),
    service_id bigint NOT NULL REFERENCES services (id),
    PRIMARY KEY (queue_id, service_id)
);
CREATE INDEX IF NOT EXISTS queue_services_service_idx ON queue_services (service_id);

-- The last display number handed out per branch, letter prefix and branch-local day
-- (by prefix, not by queue: a queue that replaces a deactivated one with the same
-- letters goes on counting, so codes never repeat within a day). Issuing a ticket
-- increments it in the issuing transaction (the row lock serialises concurrent
-- issues), so numbers never repeat and a rolled-back issue leaves no gap.
CREATE TABLE IF NOT EXISTS queue_day_numbers (
    branch_id   bigint NOT NULL REFERENCES branches (id),
    prefix      text NOT NULL,
    local_date  date NOT NULL,
    last_number integer NOT NULL CHECK (last_number >= 1),
    PRIMARY KEY (branch_id, prefix, local_date)
);

-- Counters are resources of kind 'counter'; their skills are resource_skills. This
-- is their live state: open or closed, who opened them, what they serve now.
CREATE TABLE IF NOT EXISTS counter_states (
    resource_id bigint PRIMARY KEY REFERENCES resources (id),
    branch_id   bigint NOT NULL REFERENCES branches (id),
    open        boolean NOT NULL DEFAULT false,
    opened_at   timestamptz,
    opened_by   bigint REFERENCES staff (id),
    updated_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS counter_states_branch_idx ON counter_states (branch_id)
    WHERE open;

--   waiting -> called -> serving -> done
--   called -> waiting (recall is a re-announce; it stays called), called -> no_show
--   waiting -> cancelled (the customer left)
CREATE TABLE IF NOT EXISTS tickets (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    branch_id      bigint NOT NULL REFERENCES branches (id),
    queue_id       bigint NOT NULL REFERENCES queues (id),
    service_id     bigint NOT NULL REFERENCES services (id),
    local_date     date NOT NULL,
    number         integer NOT NULL CHECK (number >= 1),
    display_code   text NOT NULL,
    kind           text NOT NULL DEFAULT 'walk_in' CHECK (kind IN ('walk_in', 'appointment')),
    booking_id     bigint UNIQUE REFERENCES bookings (id),
    appointment_at timestamptz,
    priority       integer NOT NULL DEFAULT 0 CHECK (priority >= 0),
    channel        text NOT NULL
                   CHECK (channel IN ('app', 'mini_program', 'kiosk', 'sms', 'web', 'staff')),
    customer_id    bigint REFERENCES customers (id),
    phone          text,
    status         text NOT NULL DEFAULT 'waiting' CHECK (
        status IN ('waiting', 'called', 'serving', 'done', 'no_show', 'cancelled')
    ),
    -- When it joined the queue; a transfer keeps it (its place by issue time).
    issued_at      timestamptz NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now(),
    -- The wait promised at issue, in seconds (null: unknown), for accuracy reports.
    eta_s          integer,
    counter_id     bigint REFERENCES resources (id),
    called_at      timestamptz,
    recalls        integer NOT NULL DEFAULT 0 CHECK (recalls >= 0),
    started_at     timestamptz,
    finished_at    timestamptz,
    ended_at       timestamptz,
    turn_near_sent boolean NOT NULL DEFAULT false,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    -- A code names one ticket of a branch per day; a transfer keeps it.
    CONSTRAINT tickets_code_once UNIQUE (branch_id, local_date, display_code),
    CONSTRAINT tickets_appointment_shape CHECK (
        (kind = 'appointment') = (booking_id IS NOT NULL AND appointment_at IS NOT NULL)
    ),
    CONSTRAINT tickets_called_shape CHECK (
        status NOT IN ('called', 'serving', 'done') OR (counter_id IS NOT NULL AND called_at IS NOT NULL)
    )
);
-- Call-next reads a branch's waiting tickets; positions read a queue's.
CREATE INDEX IF NOT EXISTS tickets_waiting_branch_idx ON tickets (branch_id, service_id, issued_at)
    WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS tickets_waiting_queue_idx ON tickets (queue_id, issued_at, id)
    WHERE status = 'waiting';
CREATE INDEX IF NOT EXISTS tickets_counter_idx ON tickets (counter_id, called_at)
    WHERE status IN ('called', 'serving');
CREATE INDEX IF NOT EXISTS tickets_customer_idx ON tickets (customer_id, id)
    WHERE customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tickets_branch_day_idx ON tickets (branch_id, local_date);

-- Exponentially weighted average of actual service times per service.
CREATE TABLE IF NOT EXISTS service_time_stats (
    service_id bigint PRIMARY KEY REFERENCES services (id),
    ewma_s     double precision NOT NULL CHECK (ewma_s > 0),
    samples    integer NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- A feedback survey texted after a finished service (once per phone per branch-local
-- day) and the 1-5 rating the customer replied, kept against the visit and counter.
CREATE TABLE IF NOT EXISTS surveys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    ticket_id   bigint NOT NULL UNIQUE REFERENCES tickets (id),
    branch_id   bigint NOT NULL REFERENCES branches (id),
    counter_id  bigint REFERENCES resources (id),
    phone       text NOT NULL,
    local_date  date NOT NULL,
    message_id  bigint REFERENCES messages (id),
    send_at     timestamptz NOT NULL,
    rating      integer CHECK (rating BETWEEN 1 AND 5),
    answered_at timestamptz,
    created_at  timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT surveys_once_a_day UNIQUE (phone, local_date)
);
CREATE INDEX IF NOT EXISTS surveys_phone_idx ON surveys (phone, send_at DESC);
CREATE INDEX IF NOT EXISTS surveys_branch_idx ON surveys (branch_id, answered_at)
    WHERE rating IS NOT NULL;
