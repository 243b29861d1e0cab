"""The message log for staff: what was sent to whom, and what became of it."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import asyncpg
import msgspec
from litestar import Controller, get
from litestar.params import QueryParameter

from selfserve.auth.guards import ADMIN_READERS, Caller, require
from selfserve.auth.tokens import Principal
from selfserve.catalog.queries import decode_cursor, encode_cursor
from selfserve.context import DbPool
from selfserve.openapi_util import problems
from selfserve.phones import normalise_phone

MessageStatus = Literal[
    "pending",
    "sending",
    "sent",
    "delivered",
    "undelivered",
    "failed",
    "canceled",
    "skipped",
    "expired",
]
# Templates whose body carries a secret; the log never shows it.
SECRET_TEMPLATES = frozenset({"sign_in_code"})
_DIGITS = re.compile(r"\d{4,8}")


class MessageEntry(msgspec.Struct, kw_only=True):
    id: int
    phone: str
    branch_id: int | None
    template: str
    locale: str
    body: str
    segments: int
    encoding: str
    time_critical: bool
    status: str
    attempts: int
    error_code: str | None
    error_message: str | None
    send_at: datetime
    sent_at: datetime | None
    created_at: datetime
    # Not sent after this instant ('expired' then); null: no deadline.
    expires_at: datetime | None = None


class MessagePage(msgspec.Struct):
    items: list[MessageEntry]
    next_cursor: str | None


def masked_body(template: str, body: str) -> str:
    if template in SECRET_TEMPLATES:
        return _DIGITS.sub(lambda m: "*" * len(m.group(0)), body)
    return body


LOG_SQL = """
SELECT id, phone, branch_id, template, locale, body, segments, encoding, time_critical, status,
       attempts, error_code, error_message, send_at, sent_at, created_at, expires_at
FROM messages
WHERE ($1::text IS NULL OR phone = $1)
  AND ($2::text IS NULL OR status = $2)
  AND ($3::bigint[] IS NULL OR branch_id = ANY($3))
  AND ($4::bigint = 0 OR id < $4)
ORDER BY id DESC
LIMIT $5
"""


async def message_log(
    pool: asyncpg.Pool,
    principal: Principal,
    *,
    phone: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
) -> MessagePage:
    """Newest first. Staff and managers see only their branches' messages; messages
    tied to no branch (sign-in codes, always masked) only admins see."""
    before = decode_cursor(cursor)
    scope = list(principal.branches) if principal.branches is not None else None
    rows: list[Any] = await pool.fetch(LOG_SQL, phone, status, scope, before, limit + 1)
    more = len(rows) > limit
    items = [
        MessageEntry(**{**dict(r), "body": masked_body(r["template"], r["body"])})
        for r in rows[:limit]
    ]
    return MessagePage(
        items=items, next_cursor=encode_cursor(items[-1].id) if more and items else None
    )


class MessageLogController(Controller):
    path = "/v1/admin/messages"
    tags = ["SMS (Twilio)"]
    guards = [require(*ADMIN_READERS)]
    security = [{"BearerToken": []}]

    @get(
        "/",
        operation_id="adminListMessages",
        summary="Message log: did the customer get the reminder?",
        description="Newest first; one-time codes are masked. Staff and managers see "
        "the messages of their branches; messages tied to no branch (sign-in codes) "
        "only admins see.",
        responses=problems(401, 403, 422),
    )
    async def list_messages(
        self,
        pool: DbPool,
        principal: Caller,
        phone: Annotated[
            str | None,
            QueryParameter(description="E.164 phone, e.g. +8613800138000 or +447911123456"),
        ] = None,
        status: Annotated[MessageStatus | None, QueryParameter()] = None,
        limit: Annotated[int, QueryParameter(ge=1, le=200)] = 50,
        cursor: Annotated[str | None, QueryParameter()] = None,
    ) -> MessagePage:
        wanted = normalise_phone(phone, mobile=False) if phone else None
        return await message_log(
            pool, principal, phone=wanted, status=status, limit=limit, cursor=cursor
        )
