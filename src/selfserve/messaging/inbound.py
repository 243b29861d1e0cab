"""Inbound SMS: handled once per MessageSid, routed by keyword, answered in TwiML.

Other domains register handlers for the intents they own (confirm and cancel a
booking, a survey rating, queue status). Opt-out, opt-in and help are handled here.
A message nobody handles is kept in the SMS inbox for staff.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg
import structlog
from twilio.twiml.messaging_response import MessagingResponse

from selfserve.db import Conn, in_transaction_with_retry, transaction
from selfserve.logs import mask_phone
from selfserve.messaging.keywords import Classified, Intent, classify, guess_locale
from selfserve.messaging.templates import pick_locale, render
from selfserve.settings import Settings

log = structlog.get_logger("selfserve.sms.inbound")


@dataclass(frozen=True)
class InboundSms:
    message_sid: str
    phone: str  # E.164, as Twilio sends it
    to: str
    body: str
    locale: str
    classified: Classified
    settings: Settings = field(default_factory=Settings)
    # Outbox rows a handler wrote: (message id, send_at), enqueued after commit.
    outbox: list[tuple[int | None, datetime]] = field(default_factory=list)


# A handler answers with the reply text, or None to leave the message for staff.
Handler = Callable[[Conn, InboundSms], Awaitable[str | None]]
_HANDLERS: dict[Intent, Handler] = {}


def register(intent: Intent, handler: Handler) -> None:
    """Domains claim an intent (e.g. bookings claim confirm and cancel)."""
    _HANDLERS[intent] = handler


def registered(intent: Intent) -> Handler | None:
    return _HANDLERS.get(intent)


OPT_OUT_SQL = """
INSERT INTO sms_opt_outs (phone, opted_out_at, source) VALUES ($1, now(), 'sms')
ON CONFLICT (phone) DO NOTHING
"""
OPT_IN_SQL = "DELETE FROM sms_opt_outs WHERE phone = $1"
CUSTOMER_LOCALE_SQL = "SELECT locale FROM customers WHERE phone = $1"
CLAIM_SQL = """
INSERT INTO inbound_sms (message_sid, from_phone, to_phone, body)
VALUES ($1, $2, $3, $4)
ON CONFLICT (message_sid) DO NOTHING
RETURNING id
"""
REPLAYED_SQL = "SELECT reply FROM inbound_sms WHERE message_sid = $1"
RECORD_SQL = """
UPDATE inbound_sms SET intent = $2, locale = $3, reply = $4, handled = $5 WHERE id = $1
"""
INBOX_SQL = "INSERT INTO sms_inbox (inbound_id, phone, body, locale) VALUES ($1, $2, $3, $4)"


async def _opt_out(conn: Conn, sms: InboundSms) -> str:
    await conn.execute(OPT_OUT_SQL, sms.phone)
    return render("opt_out_reply", sms.locale).body


async def _opt_in(conn: Conn, sms: InboundSms) -> str:
    await conn.execute(OPT_IN_SQL, sms.phone)
    return render("opt_in_reply", sms.locale).body


async def _help(conn: Conn, sms: InboundSms) -> str:
    return render("help_reply", sms.locale).body


register("opt_out", _opt_out)
register("opt_in", _opt_in)
register("help", _help)


def twiml(reply: str | None) -> str:
    response = MessagingResponse()
    if reply:
        response.message(reply)
    return str(response)


async def handle_inbound(
    pool: asyncpg.Pool,
    *,
    message_sid: str,
    phone: str,
    to: str,
    body: str,
    settings: Settings | None = None,
    redis: Any = None,
) -> str:
    """Apply an inbound SMS once and return the TwiML answer.

    The MessageSid row is claimed in the same transaction as every effect, so a
    replayed webhook (Twilio retries on timeouts) changes nothing and gets the
    answer the first delivery got. A deadlock or serialization failure (a cancel
    it triggers meets a concurrent writer) rolls all of it back, the claim included,
    and the whole transaction runs again: the message is applied once, and Twilio
    gets its answer rather than a 500.
    """

    async def apply(conn: Conn) -> tuple[str | None, InboundSms | None, bool]:
        inbound_id = await conn.fetchval(CLAIM_SQL, message_sid, phone, to, body)
        if inbound_id is None:
            replayed: str | None = await conn.fetchval(REPLAYED_SQL, message_sid)
            return replayed, None, False
        known_locale = await conn.fetchval(CUSTOMER_LOCALE_SQL, phone)
        locale = pick_locale(known_locale or guess_locale(body))
        # Built afresh on each attempt: outbox rows of a rolled-back try are gone.
        sms = InboundSms(
            message_sid, phone, to, body, locale, classify(body), settings or Settings()
        )
        handler = registered(sms.classified.intent)
        reply = await handler(conn, sms) if handler is not None else None
        handled = reply is not None
        if not handled:
            await conn.execute(INBOX_SQL, inbound_id, phone, body, locale)
            reply = render("received_reply", locale).body
        await conn.execute(RECORD_SQL, inbound_id, sms.classified.intent, locale, reply, handled)
        return reply, sms, handled

    reply, sms, handled = await in_transaction_with_retry(pool, apply)
    if sms is None:
        log.info("sms_replayed", message_sid=message_sid)
        return twiml(reply)
    if redis is not None and sms.outbox:
        from selfserve.messaging.service import enqueue_after_commit  # imports this module

        for message_id, send_at in sms.outbox:
            await enqueue_after_commit(redis, [message_id], send_at)
    log.info(
        "sms_received",
        message_sid=message_sid,
        phone=mask_phone(phone),
        intent=sms.classified.intent,
        handled=handled,
    )
    return twiml(reply)


# Twilio's delivery states, ranked: a callback may only move a message forward.
STATUS_RANK = {
    "pending": 0,
    "sending": 0,
    "queued": 1,
    "accepted": 1,
    "scheduled": 1,
    "sent": 1,
    "undelivered": 2,
    "failed": 2,
    "delivered": 3,
    "read": 3,
}
# What our message log records for each Twilio state.
STATUS_MAP = {
    "queued": "sent",
    "accepted": "sent",
    "scheduled": "sent",
    "sending": "sent",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
}

APPLY_STATUS_SQL = """
UPDATE messages
SET status = $2,
    error_code = coalesce($3, error_code),
    updated_at = now()
WHERE provider_sid = $1
  AND (CASE status WHEN 'delivered' THEN 3 WHEN 'undelivered' THEN 2 WHEN 'failed' THEN 2
                   WHEN 'sent' THEN 1 ELSE 0 END) < $4
RETURNING phone
"""
KNOWN_SID_SQL = "SELECT 1 FROM messages WHERE provider_sid = $1"
KEEP_EARLY_SQL = """
INSERT INTO sms_status_early (provider_sid, status, rank, error_code) VALUES ($1, $2, $3, $4)
ON CONFLICT (provider_sid) DO UPDATE
SET status = excluded.status, rank = excluded.rank,
    error_code = coalesce(excluded.error_code, sms_status_early.error_code)
WHERE sms_status_early.rank < excluded.rank
"""
TAKE_EARLY_SQL = """
DELETE FROM sms_status_early WHERE provider_sid = $1 RETURNING status, rank, error_code
"""
OPT_OUT_CARRIER_SQL = """
INSERT INTO sms_opt_outs (phone, opted_out_at, source) VALUES ($1, now(), 'carrier')
ON CONFLICT (phone) DO NOTHING
"""

UNSUBSCRIBED_ERROR = "21610"


async def _apply(
    conn: Conn, message_sid: str, status: str, rank: int, error_code: str | None
) -> str | None:
    phone: str | None = await conn.fetchval(APPLY_STATUS_SQL, message_sid, status, error_code, rank)
    if phone is not None and error_code == UNSUBSCRIBED_ERROR:
        await conn.execute(OPT_OUT_CARRIER_SQL, phone)
    return phone


async def apply_status(
    pool: asyncpg.Pool, *, message_sid: str, twilio_status: str, error_code: str | None
) -> bool:
    """Record a delivery callback; a late or repeated one never moves a message back.

    A callback for a sid no message carries yet is kept and applied when the send is
    recorded (see `apply_early_status`)."""
    status = STATUS_MAP.get(twilio_status)
    if status is None:
        return False
    rank = STATUS_RANK[status]
    async with transaction(pool) as conn:
        phone = await _apply(conn, message_sid, status, rank, error_code or None)
        if phone is None and not await conn.fetchval(KNOWN_SID_SQL, message_sid):
            await conn.execute(KEEP_EARLY_SQL, message_sid, status, rank, error_code or None)
    return phone is not None


async def apply_early_status(conn: Conn, message_sid: str) -> None:
    """Apply a callback that arrived before `message_sid` was recorded, if any."""
    early = await conn.fetchrow(TAKE_EARLY_SQL, message_sid)
    if early is not None:
        await _apply(conn, message_sid, early["status"], early["rank"], early["error_code"])
