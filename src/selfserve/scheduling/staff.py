"""Staff and bookings: the day sheet and search of a branch, and changes made by staff.

Staff, managers and admins see and change any booking of their branches (admins:
every branch); a booking of another branch answers 404 exactly like a missing one.
A cancel or a reschedule runs the same code as the customer's own
(`service.cancel_in_transaction`, `service.reschedule_in_transaction`): seats freed
at once and offered to the waitlist, pending reminders cancelled or moved, a new
slot taken atomically (409 `slot_full` keeps the old one). On top of that, in the
same transaction, the change is recorded in `booking_changes` (which staff account,
when, the reason, the start before and after) and the booking's phone, if it has
one, is texted what the branch did.

Choices worth knowing
- A cancel by staff is the branch's decision, not the customer's: the late
  cancellation policy (fee, no refund) is not applied to it.
- A reschedule by staff obeys the same slot rules as a customer's (opening hours,
  shifts, capacity, walk-in reserve, lead time and horizon): staff move bookings to
  bookable slots.
- The reason is kept for staff; the customer's text does not carry it.
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
from arq.connections import ArqRedis

from selfserve import db
from selfserve.auth.guards import ensure_visible
from selfserve.auth.tokens import Principal
from selfserve.db import Conn, Record
from selfserve.errors import FieldError, InvalidInput
from selfserve.messaging.service import queue_template
from selfserve.messaging.templates import DEFAULT_LOCALE, pick_locale
from selfserve.scheduling import queries as q
from selfserve.scheduling import service as svc
from selfserve.scheduling.models import (
    AdminBookingDetail,
    AdminBookingOut,
    BookingChangeOut,
)
from selfserve.scheduling.policy import DEFAULT_POLICY, BookingPolicy
from selfserve.scheduling.slots import Outbox

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_CURSOR = re.compile(r"(-?[0-9]{1,18})\.([0-9]{1,19})")
MAX_BIGINT = 2**63 - 1
NOTICES = {"cancel": "booking_cancelled_by_branch", "reschedule": "booking_moved_by_branch"}


def admin_out(row: Record) -> AdminBookingOut:
    """The customer's view of the booking (`service.booking_out`) and what staff see too."""
    return AdminBookingOut(
        **msgspec.structs.asdict(svc.booking_out(row)),
        resource_id=row["resource_id"],
        customer_id=row["customer_id"],
        phone=row["phone"],
        checked_in_at=row["checked_in_at"],
        created_at=row["created_at"],
    )


async def _detail(conn: Conn, booking_id: int) -> AdminBookingDetail:
    row = await conn.fetchrow(q.ADMIN_BOOKING_BY_ID, booking_id)
    assert row is not None
    changes = [
        BookingChangeOut(
            id=c["id"],
            action=c["action"],
            staff_id=c["staff_id"],
            staff_name=c["staff_name"],
            reason=c["reason"],
            old_start=c["old_starts_at"],
            new_start=c["new_starts_at"],
            created_at=c["created_at"],
        )
        for c in await conn.fetch(q.BOOKING_CHANGES, booking_id)
    ]
    base = admin_out(row)
    fields = {f: getattr(base, f) for f in base.__struct_fields__}
    return AdminBookingDetail(**fields, changes=changes)


async def _visible_row(
    conn: Conn, principal: Principal, booking_id: int, *, lock: bool = False
) -> Record:
    """The booking, if it is of one of the caller's branches; else 404 as if missing.
    `lock`: the row is locked as a change needs it (against a concurrent check-in)."""
    row = await svc._booking_row(conn, booking_id, lock=lock)
    ensure_visible(principal, row["branch_id"])
    return row


async def get_booking(
    pool: asyncpg.Pool, principal: Principal, booking_id: int
) -> AdminBookingDetail:
    async with pool.acquire() as conn:
        await _visible_row(conn, principal, booking_id)
        return await _detail(conn, booking_id)


# --- the day sheet and search ----------------------------------------------------


def _instant(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidInput.field(name, "needs a time and an offset, e.g. 2030-03-04T09:00:00+08:00")
    try:
        return value.astimezone(UTC)
    except (OverflowError, ValueError):
        raise InvalidInput.field(
            name, "must lie between 0001-01-02 and 9999-12-30 (RFC 3339 with an offset)"
        ) from None


def encode_cursor(starts_at: datetime, booking_id: int) -> str:
    us = (starts_at - _EPOCH) // _US
    return base64.urlsafe_b64encode(f"{us}.{booking_id}".encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, int] | tuple[None, None]:
    if not cursor:
        return None, None
    bad = InvalidInput.field("cursor", "not a cursor this API issued")
    if len(cursor) > 64 or not cursor.isascii():
        raise bad
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        raise bad from None
    found = _CURSOR.fullmatch(text)
    if found is None:
        raise bad
    us, booking_id = int(found.group(1)), int(found.group(2))
    if not 0 < booking_id <= MAX_BIGINT:
        raise bad
    try:
        return _EPOCH + us * _US, booking_id
    except OverflowError:
        raise bad from None


async def list_bookings(
    pool: asyncpg.Pool,
    principal: Principal,
    *,
    branch_id: int | None,
    resource_id: int | None,
    service_id: int | None,
    window_from: datetime | None,
    window_to: datetime | None,
    status: str | None,
    phone: str | None,
    code: str | None,
    limit: int,
    cursor: str | None,
) -> tuple[list[AdminBookingOut], str | None]:
    """Bookings of the caller's branches whose start lies in [from, to), matching every
    filter given, by start then id. A branch outside the caller's scope lists nothing."""
    lo, hi = _instant(window_from, "from"), _instant(window_to, "to")
    if lo is not None and hi is not None and hi <= lo:
        raise InvalidInput(errors=[FieldError("to", "must be after from")])
    after_start, after_id = decode_cursor(cursor)
    scope = list(principal.branches) if principal.branches is not None else None
    rows = await pool.fetch(
        q.ADMIN_BOOKINGS,
        scope,
        branch_id,
        resource_id,
        service_id,
        lo,
        hi,
        status,
        phone,
        code.upper() if code is not None else None,
        after_start,
        after_id,
        limit + 1,
    )
    items = [admin_out(r) for r in rows[:limit]]
    nxt = encode_cursor(items[-1].start, items[-1].id) if len(rows) > limit and items else None
    return items, nxt


# --- changes ---------------------------------------------------------------------


def _reason(text: str) -> str:
    reason = text.strip()
    if not reason:
        raise InvalidInput.field("reason", "say why (it is kept with the booking)")
    return reason


async def _record_and_notify(
    conn: Conn,
    principal: Principal,
    action: str,
    reason: str,
    old: Record,
    new: Record,
    now: datetime,
    outbox: Outbox,
) -> None:
    """Write the change record and text the booking's phone what the branch did."""
    change_id = await conn.fetchval(
        q.INSERT_BOOKING_CHANGE,
        old["id"],
        action,
        principal.id,
        reason,
        old["starts_at"],
        new["starts_at"] if action == "reschedule" else None,
    )
    phone = new["phone"]
    if phone is None:
        return
    locale: str | None = None
    if new["customer_id"] is not None:
        found = await conn.fetchrow(q.CUSTOMER, new["customer_id"])
        locale = found["locale"] if found else None
    else:
        locale = await conn.fetchval(q.LOCALE_OF_PHONE, phone)
    message_id = await queue_template(
        conn,
        NOTICES[action],
        pick_locale(locale) if locale else DEFAULT_LOCALE,
        svc._booking_sms_params(new),
        phone=phone,
        send_at=now,
        dedupe_key=f"booking:{new['id']}:staff_{action}:{change_id}",
        branch_id=new["branch_id"],
        customer_id=new["customer_id"],
    )
    outbox.append((message_id, now))


async def cancel_booking(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    principal: Principal,
    booking_id: int,
    reason: str,
    *,
    now: datetime,
    policy: BookingPolicy = DEFAULT_POLICY,
) -> AdminBookingDetail:
    """Cancel any booking of the caller's branches, as the customer's cancel does, without
    the late-cancellation policy; recorded and texted."""
    why = _reason(reason)

    async def tx(conn: Conn) -> tuple[AdminBookingDetail, Outbox]:
        row = await _visible_row(conn, principal, booking_id, lock=True)
        outbox: Outbox = []
        cancelled = await svc.cancel_in_transaction(
            conn, row, now, policy, outbox, late_policy=False
        )
        await _record_and_notify(conn, principal, "cancel", why, row, cancelled, now, outbox)
        return await _detail(conn, booking_id), outbox

    out, outbox = await db.in_transaction_with_retry(pool, tx)
    await svc._enqueue(redis, outbox)
    return out


async def reschedule_booking(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    principal: Principal,
    booking_id: int,
    start: datetime,
    reason: str,
    *,
    now: datetime,
    policy: BookingPolicy = DEFAULT_POLICY,
) -> AdminBookingDetail:
    """Move any booking of the caller's branches atomically, as the customer's reschedule
    does (409 keeps the old slot); recorded and texted."""
    why = _reason(reason)
    new_start = _instant(start, "start")
    assert new_start is not None

    async def tx(conn: Conn) -> tuple[AdminBookingDetail, Outbox]:
        row = await _visible_row(conn, principal, booking_id, lock=True)
        outbox: Outbox = []
        moved = await svc.reschedule_in_transaction(conn, row, new_start, now, policy, outbox)
        await _record_and_notify(conn, principal, "reschedule", why, row, moved, now, outbox)
        return await _detail(conn, booking_id), outbox

    out, outbox = await svc._write(pool, redis, policy, tx, now)
    await svc._enqueue(redis, outbox)
    return out
