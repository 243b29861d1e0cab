-- Delivery callbacks that arrive before the send that caused them is recorded (the
-- provider can answer the callback URL before our worker stores the message sid).
-- They wait here and are applied when the sid is recorded.

CREATE TABLE IF NOT EXISTS sms_status_early (
    provider_sid text PRIMARY KEY,
    status       text NOT NULL,
    rank         smallint NOT NULL,
    error_code   text,
    received_at  timestamptz NOT NULL DEFAULT now()
);
