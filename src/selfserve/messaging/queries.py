"""Outbox SQL: `$n` constants. Every write after a claim is fenced by the claim's
`attempts` value, so a worker whose claim was taken over can no longer change the row."""

from __future__ import annotations

MESSAGE_COLUMNS = (
    "id, dedupe_key, customer_id, phone, branch_id, template, locale, body, segments, "
    "encoding, time_critical, send_at, status, attempts, provider_sid, error_code, "
    "error_message, created_at, updated_at, sent_at, expires_at"
)

INSERT_MESSAGE = """
INSERT INTO messages (dedupe_key, customer_id, phone, branch_id, template, locale, body,
    segments, encoding, time_critical, send_at, expires_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
ON CONFLICT (dedupe_key) DO NOTHING
RETURNING id
"""

# `LIKE $1` with the prefix's own % _ \ escaped by the caller; served by the partial
# text_pattern_ops index on pending rows.
CANCEL_PENDING = """
UPDATE messages SET status = 'canceled', updated_at = now()
WHERE dedupe_key LIKE $1 AND status = 'pending'
RETURNING id
"""
RESCHEDULE_PENDING = """
UPDATE messages SET send_at = $2, expires_at = coalesce($3, expires_at), updated_at = now()
WHERE dedupe_key LIKE $1 AND status = 'pending'
RETURNING id
"""
# The pending rows under a prefix, locked (a send job's claim waits for the caller's
# transaction and then sends what it wrote), and a new text for one of them.
PENDING_FOR_UPDATE = """
SELECT id, template, locale FROM messages
WHERE dedupe_key LIKE $1 AND status = 'pending'
ORDER BY id
FOR UPDATE
"""
REWRITE_PENDING = """
UPDATE messages SET body = $2, segments = $3, encoding = $4, updated_at = now()
WHERE id = $1 AND status = 'pending'
"""

# Take the row for one send: a due pending row, or a 'sending' row whose claim is
# older than the lease (its worker died). Reclaiming such a row sets `maybe_sent`:
# nobody knows whether its request reached the provider. In SET, `status` is still
# the old value. `past_deadline`: its `expires_at` has passed (the job then sends
# nothing; see MARK_EXPIRED).
CLAIM = """
UPDATE messages m
SET status = 'sending',
    attempts = m.attempts + 1,
    claimed_at = now(),
    maybe_sent = m.maybe_sent OR m.status = 'sending',
    updated_at = now()
WHERE m.id = $1
  AND m.send_at <= now()
  AND (m.status = 'pending'
       OR (m.status = 'sending' AND m.claimed_at < now() - make_interval(secs => $2)))
RETURNING m.id, m.phone, m.body, m.branch_id, m.time_critical, m.attempts, m.maybe_sent,
    m.created_at, m.expires_at, coalesce(m.expires_at <= now(), false) AS past_deadline,
    m.template,
    (SELECT b.timezone FROM branches b WHERE b.id = m.branch_id) AS branch_timezone
"""
# Why a job found nothing to claim.
PEEK = """
SELECT status, extract(epoch FROM send_at - now())::float8 AS due_in_s
FROM messages WHERE id = $1
"""
IS_OPTED_OUT = "SELECT EXISTS (SELECT 1 FROM sms_opt_outs WHERE phone = $1)"
OPT_OUT = """
INSERT INTO sms_opt_outs (phone, opted_out_at, source) VALUES ($1, now(), $2)
ON CONFLICT (phone) DO NOTHING
"""
SIDS_IN_USE = "SELECT provider_sid FROM messages WHERE provider_sid = ANY($1::text[])"

# $5: the body with its secret masked, once the provider holds it (sign-in codes);
# NULL keeps the body.
MARK_SENT = """
UPDATE messages
SET status = 'sent', provider_sid = $3, sent_at = coalesce($4, now()), maybe_sent = false,
    body = coalesce($5, body),
    claimed_at = NULL, error_code = NULL, error_message = NULL, updated_at = now()
WHERE id = $1 AND status = 'sending' AND attempts = $2
"""
# Not sent and never will be (opted out): the claim did not count as an attempt.
MARK_SKIPPED = """
UPDATE messages
SET status = 'skipped', attempts = attempts - 1, claimed_at = NULL, error_message = $3,
    body = coalesce($4, body), updated_at = now()
WHERE id = $1 AND status = 'sending' AND attempts = $2
"""
MARK_FAILED = """
UPDATE messages
SET status = 'failed', claimed_at = NULL, maybe_sent = false, error_code = $3,
    error_message = $4, body = coalesce($5, body), updated_at = now()
WHERE id = $1 AND status = 'sending' AND attempts = $2
RETURNING phone
"""
# Its deadline passed before it went out: final, never sent; the claim did not count.
MARK_EXPIRED = """
UPDATE messages
SET status = 'expired', attempts = attempts - 1, claimed_at = NULL, maybe_sent = false,
    error_code = 'deadline_passed', error_message = $3, updated_at = now(),
    body = coalesce($4, body)
WHERE id = $1 AND status = 'sending' AND attempts = $2
"""
# Pending rows whose deadline passed, expired in pages by the sweep (the send job
# expires its own row when it claims it).
EXPIRE_PENDING = """
UPDATE messages
SET status = 'expired', claimed_at = NULL, error_code = 'deadline_passed',
    error_message = 'not sent by its deadline ' || to_char(expires_at AT TIME ZONE 'UTC',
        'YYYY-MM-DD"T"HH24:MI:SS"Z"'),
    updated_at = now()
WHERE id IN (
    SELECT id FROM messages
    WHERE status = 'pending' AND expires_at <= now()
    ORDER BY expires_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
RETURNING id, template, body
"""
SET_BODY = "UPDATE messages SET body = $2 WHERE id = $1"
# Back to pending until `send_at`, after a retryable error ($3 seconds of backoff).
RETRY_LATER = """
UPDATE messages
SET status = 'pending', send_at = now() + make_interval(secs => $3), claimed_at = NULL,
    error_code = $4, error_message = $5, maybe_sent = $6, updated_at = now()
WHERE id = $1 AND status = 'sending' AND attempts = $2
"""
# Quiet hours: back to pending until the morning; the claim did not count.
DEFER = """
UPDATE messages
SET status = 'pending', send_at = $3, attempts = attempts - 1, claimed_at = NULL,
    updated_at = now()
WHERE id = $1 AND status = 'sending' AND attempts = $2
"""

# The sweep: pending rows due now or within the look-ahead, in (send_at, id) pages,
# and 'sending' rows whose claim outlived the lease.
DUE_PENDING = """
SELECT id, send_at FROM messages
WHERE status = 'pending' AND send_at <= now() + make_interval(secs => $1)
  AND (send_at, id) > ($2, $3)
ORDER BY send_at, id
LIMIT $4
"""
STALE_SENDING = """
SELECT id FROM messages
WHERE status = 'sending' AND claimed_at < now() - make_interval(secs => $1)
ORDER BY claimed_at
LIMIT $2
"""
