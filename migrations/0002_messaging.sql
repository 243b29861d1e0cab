-- Customers, the SMS opt-out list and the outbound message outbox.
-- Written to be safe to run twice.

CREATE TABLE IF NOT EXISTS customers (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    phone      text NOT NULL UNIQUE CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    locale     text NOT NULL DEFAULT 'zh-CN' CHECK (locale IN ('zh-CN', 'en')),
    name       text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Every send checks this list. `source` says who asked: 'sms' (a STOP reply),
-- 'carrier' (Twilio reported the recipient unsubscribed, error 21610), 'staff'.
CREATE TABLE IF NOT EXISTS sms_opt_outs (
    phone        text PRIMARY KEY,
    opted_out_at timestamptz NOT NULL DEFAULT now(),
    source       text NOT NULL
);

-- The outbox. A row is written in the same transaction as the change that causes
-- it; the body is rendered then and never again. Life of a row:
--   pending -> sending (claimed by one job; `attempts` counts claims and fences
--   every later write) -> sent -> delivered | undelivered | failed (callbacks)
--   pending -> canceled (its cause went away) | skipped (opted out)
--   sending -> pending (retryable provider error, `send_at` moved by the backoff;
--   or quiet hours, `send_at` moved to the morning) | failed (rejected)
-- `maybe_sent`: an earlier attempt may have reached the provider without us
-- learning the outcome (crash mid-request, 5xx, network error); the next attempt
-- asks the provider before sending again.
CREATE TABLE IF NOT EXISTS messages (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    dedupe_key    text NOT NULL UNIQUE CHECK (length(dedupe_key) BETWEEN 1 AND 200),
    customer_id   bigint REFERENCES customers (id),
    phone         text NOT NULL CHECK (phone ~ '^\+[1-9][0-9]{6,14}$'),
    branch_id     bigint REFERENCES branches (id),
    template      text NOT NULL,
    locale        text NOT NULL CHECK (locale IN ('zh-CN', 'en')),
    body          text NOT NULL CHECK (length(body) BETWEEN 1 AND 1600),
    segments      integer NOT NULL CHECK (segments >= 1),
    encoding      text NOT NULL CHECK (encoding IN ('GSM-7', 'UCS-2')),
    time_critical boolean NOT NULL DEFAULT false,
    send_at       timestamptz NOT NULL DEFAULT now(),
    status        text NOT NULL DEFAULT 'pending' CHECK (status IN (
                      'pending', 'sending', 'sent', 'delivered', 'undelivered',
                      'failed', 'canceled', 'skipped')),
    attempts      integer NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    claimed_at    timestamptz,
    maybe_sent    boolean NOT NULL DEFAULT false,
    provider_sid  text UNIQUE,
    error_code    text,
    error_message text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    sent_at       timestamptz,
    CONSTRAINT messages_sending_is_claimed CHECK (status <> 'sending' OR claimed_at IS NOT NULL),
    CONSTRAINT messages_sent_has_sid CHECK (
        status NOT IN ('sent', 'delivered', 'undelivered') OR provider_sid IS NOT NULL
    )
);
-- The sweep: pending rows due now, and 'sending' rows whose claim went stale.
CREATE INDEX IF NOT EXISTS messages_status_send_at_idx ON messages (status, send_at);
-- The message log by recipient, newest first.
CREATE INDEX IF NOT EXISTS messages_phone_idx ON messages (phone, id);
-- Cancel or move the pending messages of one cause by dedupe-key prefix.
CREATE INDEX IF NOT EXISTS messages_pending_dedupe_idx
    ON messages (dedupe_key text_pattern_ops) WHERE status = 'pending';
