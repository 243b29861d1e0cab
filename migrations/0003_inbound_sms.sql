-- Inbound SMS, each Twilio MessageSid applied once, and the inbox of messages no
-- keyword handler claimed (read by staff; the inquiry desk builds on it).

CREATE TABLE IF NOT EXISTS inbound_sms (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    message_sid text NOT NULL UNIQUE,
    from_phone  text NOT NULL,
    to_phone    text NOT NULL DEFAULT '',
    body        text NOT NULL,
    intent      text,
    locale      text,
    reply       text,
    handled     boolean NOT NULL DEFAULT false,
    received_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS inbound_sms_phone_idx ON inbound_sms (from_phone, received_at);

CREATE TABLE IF NOT EXISTS sms_inbox (
    id         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    inbound_id bigint NOT NULL UNIQUE REFERENCES inbound_sms (id),
    phone      text NOT NULL,
    body       text NOT NULL,
    locale     text NOT NULL,
    status     text NOT NULL DEFAULT 'open' CHECK (status IN ('open', 'answered', 'closed')),
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS sms_inbox_open_idx ON sms_inbox (created_at) WHERE status = 'open';
