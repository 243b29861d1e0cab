-- Message deadlines, one text per ticket call, and the turn-near sweep. Safe to run twice.

-- A time-critical message ("go to counter 3 now", "your turn is near", a sign-in
-- code, a waitlist offer) is worth nothing after its moment: `expires_at` is set
-- when the row is written, and a row still unsent then is never sent. It becomes
-- 'expired' (error_code 'deadline_passed'), a final state like 'canceled'.
ALTER TABLE messages ADD COLUMN IF NOT EXISTS expires_at timestamptz;
ALTER TABLE messages DROP CONSTRAINT IF EXISTS messages_status_check;
ALTER TABLE messages ADD CONSTRAINT messages_status_check CHECK (status IN (
    'pending', 'sending', 'sent', 'delivered', 'undelivered',
    'failed', 'canceled', 'skipped', 'expired'));
-- The sweep expires pending rows whose deadline passed.
CREATE INDEX IF NOT EXISTS messages_pending_expiry_idx ON messages (expires_at)
    WHERE status = 'pending' AND expires_at IS NOT NULL;

-- Every call of a ticket (call-next and each recall, at whatever counter) counts
-- here and never goes back (a transfer resets `recalls`, not this): the call's
-- text is keyed by it, so each call is texted once.
ALTER TABLE tickets ADD COLUMN IF NOT EXISTS calls integer NOT NULL DEFAULT 0;
ALTER TABLE tickets DROP CONSTRAINT IF EXISTS tickets_calls_check;
ALTER TABLE tickets ADD CONSTRAINT tickets_calls_check CHECK (calls >= 0);
UPDATE tickets SET calls = recalls + 1 WHERE called_at IS NOT NULL AND calls = 0;

-- The turn-near sweep looks for waiting tickets with a phone not yet texted.
CREATE INDEX IF NOT EXISTS tickets_turn_near_due_idx ON tickets (branch_id)
    WHERE status = 'waiting' AND phone IS NOT NULL AND NOT turn_near_sent;
