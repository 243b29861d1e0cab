"""Booking use cases: availability, holds, bookings, cancel, reschedule, SMS replies.

Each write runs in one transaction (`db.in_transaction_with_retry`): it computes the
slot afresh from the rows, picks the least-loaded qualified resource, and lets the
ledger take the seats with its guarded update (`SlotFull` when they are gone; the
next candidate resource is tried in the same transaction, the ledger being unchanged
after a refusal). The outbox rows and the idempotency record are written in that
same transaction; send jobs are enqueued after commit.

Choices worth knowing
- A start that is not a slot of the service even on an empty calendar (off the
  interval grid, outside opening hours, nobody on shift, outside lead time or
  horizon) is a 409 `slot_unavailable`; a real slot with no seats left is a 409
  `slot_full`.
- Holds past their expiry that the sweep has not released yet are not shown as
  taken. A write refused by the ledger releases expired holds (one sweep pass in its
  own transaction) and, when that freed anything, runs once more.
- Idempotency: only successful responses are recorded (a refused request changed
  nothing, so running it again is safe). Keys are per caller; the record is the
  response body and status, replayed as they were.
- Outbox dedupe keys: `booking:<id>:confirmation`, and reminders
  `booking:<id>:reminder_24h:<start, unix seconds>` / `...:reminder_2h:<...>`. The
  start in the key lets a reschedule move a pending reminder (by prefix
  `booking:<id>:reminder_24h:`) or, when the old one is already sent, queue a new one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
import structlog
from arq.connections import ArqRedis

from selfserve import db
from selfserve.auth.tokens import Principal
from selfserve.db import Conn, Record
from selfserve.errors import (
    BookingNotActive,
    FieldError,
    Forbidden,
    IdempotencyKeyReused,
    InvalidInput,
    NotFound,
    SlotFull,
    SlotUnavailable,
)
from selfserve.messaging import inbound
from selfserve.messaging.service import (
    cancel_messages,
    enqueue_after_commit,
    queue_template,
    reschedule_messages,
)
from selfserve.messaging.templates import DEFAULT_LOCALE, pick_locale, render
from selfserve.phones import normalise_phone
from selfserve.scheduling import ledger
from selfserve.scheduling import queries as q
from selfserve.scheduling.availability import (
    BranchCalendar,
    Commitment,
    ResourceSchedule,
    ServiceRules,
    Slot,
    available_slots,
)
from selfserve.scheduling.models import (
    BookingCreate,
    BookingOut,
    HoldCreate,
    HoldOut,
    SlotOut,
)

log = structlog.get_logger("selfserve.booking")

MAX_RANGE = timedelta(days=31)
REMINDERS: tuple[tuple[str, timedelta], ...] = (
    ("reminder_24h", timedelta(hours=24)),
    ("reminder_2h", timedelta(hours=2)),
)
_TINY = timedelta(microseconds=1)
S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- context -------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    branch_id: int
    service_id: int
    timezone: str
    branch_name: str
    service_name: str
    deposit_minor: int
    cancellation_window_min: int
    calendar: BranchCalendar
    rules: ServiceRules


def _minute(clock: str) -> int:
    hours, _, minutes = clock.partition(":")
    return int(hours) * 60 + int(minutes)


async def load_context(conn: Conn, branch_id: int, service_id: int) -> Context:
    """The branch calendar and the service rules; a missing or inactive one is a 404."""
    row = await conn.fetchrow(q.BRANCH_SERVICE, service_id, branch_id)
    if row is None or not row["branch_active"] or not row["service_active"]:
        raise NotFound()
    hours = tuple(
        (int(h["weekday"]), _minute(h["opens"]), _minute(h["closes"])) for h in row["opening_hours"]
    )
    closures = frozenset(date.fromisoformat(c["date"]) for c in row["closures"])
    return Context(
        branch_id=branch_id,
        service_id=service_id,
        timezone=row["timezone"],
        branch_name=row["branch_name"],
        service_name=row["service_name"],
        deposit_minor=row["deposit_minor"],
        cancellation_window_min=row["cancellation_window_min"],
        calendar=BranchCalendar(
            timezone=row["timezone"],
            opening_hours=hours,
            closures=closures,
            walk_in_reserve=float(row["walk_in_reserve"]),
        ),
        rules=ServiceRules(
            duration_min=row["duration_min"],
            buffer_before_min=row["buffer_before_min"],
            buffer_after_min=row["buffer_after_min"],
            slot_interval_min=row["slot_interval_min"],
            lead_time_min=row["lead_time_min"],
            horizon_days=row["horizon_days"],
            min_party=row["min_party"],
            max_party=row["max_party"],
        ),
    )


def _check_party(ctx: Context, party_size: int) -> None:
    if not ctx.rules.min_party <= party_size <= ctx.rules.max_party:
        raise InvalidInput.field(
            "party_size",
            f"must lie between {ctx.rules.min_party} and {ctx.rules.max_party} for this service",
        )


async def compute_slots(
    conn: Conn,
    ctx: Context,
    *,
    party_size: int,
    window_from: datetime,
    window_to: datetime,
    now: datetime,
    ignore_booking: int = 0,
    with_commitments: bool = True,
) -> list[Slot]:
    """Slots in [window_from, window_to), reading only what overlaps that range."""
    rules = ctx.rules
    lo = max(window_from, now + timedelta(minutes=rules.lead_time_min))
    hi = min(window_to, now + timedelta(days=rules.horizon_days))
    if lo >= hi:
        return []
    resources = await conn.fetch(q.RESOURCES, ctx.service_id, ctx.branch_id)
    if not resources:
        return []
    ids = [r["id"] for r in resources]
    span_lo = lo - timedelta(minutes=rules.buffer_before_min)
    span_hi = hi + timedelta(minutes=rules.duration_min + rules.buffer_after_min)
    shifts: dict[int, list[tuple[int, int, int]]] = {i: [] for i in ids}
    exceptions: dict[int, list[tuple[datetime, datetime, bool]]] = {i: [] for i in ids}
    for s in await conn.fetch(q.SCHEDULES, ids, span_lo, span_hi):
        if s["kind"] == "shift":
            shifts[s["resource_id"]].append((s["weekday"], s["start_minute"], s["end_minute"]))
        else:
            exceptions[s["resource_id"]].append((s["starts_at"], s["ends_at"], s["available"]))
    commitments: list[Commitment] = []
    if with_commitments:
        commitments = [
            Commitment(c["resource_id"], c["starts_at"], c["ends_at"], c["seats"])
            for c in await conn.fetch(q.COMMITMENTS, ids, span_lo, span_hi, now, ignore_booking)
        ]
    schedules = [
        ResourceSchedule(
            resource_id=r["id"],
            kind=r["kind"],
            capacity=r["capacity"],
            shifts=tuple(shifts[r["id"]]),
            exceptions=tuple(exceptions[r["id"]]),
        )
        for r in resources
    ]
    return available_slots(
        ctx.calendar,
        rules,
        schedules,
        commitments,
        party_size=party_size,
        window_from=lo,
        window_to=hi,
        now=now,
    )


def _local(instant: datetime, timezone: str) -> str:
    return instant.astimezone(ZoneInfo(timezone)).isoformat()


async def availability(
    pool: asyncpg.Pool,
    *,
    branch_id: int,
    service_id: int,
    window_from: datetime,
    window_to: datetime,
    party_size: int,
    now: datetime,
) -> list[SlotOut]:
    errors: list[FieldError] = []
    for name, value in (("from", window_from), ("to", window_to)):
        if value.tzinfo is None or value.utcoffset() is None:
            errors.append(FieldError(name, "must carry a UTC offset (RFC 3339)"))
    if errors:
        raise InvalidInput(errors=errors)
    if window_to <= window_from:
        raise InvalidInput.field("to", "must be after from")
    if window_to - window_from > MAX_RANGE:
        raise InvalidInput.field("to", "the range may span at most 31 days")
    async with pool.acquire() as conn:
        ctx = await load_context(conn, branch_id, service_id)
        _check_party(ctx, party_size)
        slots = await compute_slots(
            conn,
            ctx,
            party_size=party_size,
            window_from=window_from,
            window_to=window_to,
            now=now,
        )
    return [
        SlotOut(
            start=s.start,
            end=s.end,
            local_start=s.local_start.isoformat(),
            timezone=ctx.timezone,
            remaining=s.remaining,
        )
        for s in slots
    ]


async def _candidates(
    conn: Conn,
    ctx: Context,
    start: datetime,
    party_size: int,
    now: datetime,
    *,
    ignore_booking: int = 0,
) -> list[int]:
    """Resources that can take the party at `start`, least loaded first.

    `SlotUnavailable` when `start` is no slot at all, `SlotFull` when no seats are left."""
    start = start.astimezone(UTC)
    end = start + _TINY
    slots = await compute_slots(
        conn,
        ctx,
        party_size=party_size,
        window_from=start,
        window_to=end,
        now=now,
        ignore_booking=ignore_booking,
    )
    slot = next((s for s in slots if s.start == start), None)
    if slot is None:
        empty = await compute_slots(
            conn,
            ctx,
            party_size=party_size,
            window_from=start,
            window_to=end,
            now=now,
            with_commitments=False,
        )
        if any(s.start == start for s in empty):
            raise SlotFull()
        raise SlotUnavailable()
    fits = [(free, rid) for rid, free in slot.free_by_resource if free >= party_size]
    # The first is what `pick_resource` picks: most free seats, then lowest id.
    return [rid for _, rid in sorted(fits, key=lambda f: (-f[0], f[1]))]


async def _first_that_fits(candidates: Sequence[int], attempt: Callable[[int], Awaitable[T]]) -> T:
    """Try each candidate resource; the ledger is unchanged after a refusal."""
    for rid in candidates:
        try:
            return await attempt(rid)
        except SlotFull:
            continue
    raise SlotFull()


async def _expire_due(pool: asyncpg.Pool, now: datetime) -> int:
    async def run(conn: Conn) -> int:
        return await ledger.expire_holds(conn, now)

    return await db.in_transaction_with_retry(pool, run)


async def _write(pool: asyncpg.Pool, fn: Callable[[Conn], Awaitable[T]], now: datetime) -> T:
    """Run `fn` in a transaction; when the ledger refuses, release expired holds and,
    if that freed anything, run it once more."""
    try:
        return await db.in_transaction_with_retry(pool, fn)
    except SlotFull:
        if not await _expire_due(pool, now):
            raise
    return await db.in_transaction_with_retry(pool, fn)


# --- idempotency ---------------------------------------------------------------


class _Replay(Exception):
    """Another request with the same key committed first: roll back, replay it."""


def request_hash(operation: str, data: msgspec.Struct) -> bytes:
    return hashlib.sha256(operation.encode() + b"\0" + msgspec.json.encode(data)).digest()


async def _stored(
    conn: Conn | asyncpg.Pool, subject: str, key: str, digest: bytes
) -> dict[str, Any] | None:
    row = await conn.fetchrow(q.IDEMPOTENCY_LOOKUP, subject, key)
    if row is None:
        return None
    if bytes(row["request_hash"]) != digest:
        raise IdempotencyKeyReused(
            errors=[FieldError("Idempotency-Key", "already used with a different request")]
        )
    response: dict[str, Any] = row["response"]
    return response


@dataclass
class Outcome:
    """What a creating POST answers, and whether it is a replay."""

    body: Any
    replayed: bool


Outbox = list[tuple[int | None, datetime]]


async def _once(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    *,
    subject: str,
    key: str | None,
    operation: str,
    data: msgspec.Struct,
    out_type: type[S],
    work: Callable[[Conn, Outbox], Awaitable[S]],
    now: datetime,
) -> tuple[S, bool]:
    digest = request_hash(operation, data)
    if key is not None:
        stored = await _stored(pool, subject, key, digest)
        if stored is not None:
            return msgspec.convert(stored, out_type), True

    async def tx(conn: Conn) -> tuple[S, Outbox]:
        outbox: Outbox = []
        out = await work(conn, outbox)
        if key is not None:
            body = msgspec.to_builtins(out)
            if await conn.fetchval(q.IDEMPOTENCY_STORE, subject, key, digest, 201, body) is None:
                raise _Replay()
        return out, outbox

    try:
        out, outbox = await _write(pool, tx, now)
    except _Replay:
        assert key is not None
        stored = await _stored(pool, subject, key, digest)
        assert stored is not None
        return msgspec.convert(stored, out_type), True
    if redis is not None:
        for message_id, send_at in outbox:
            await enqueue_after_commit(redis, [message_id], send_at)
    return out, False


# --- holds ---------------------------------------------------------------------


def _require_booker(principal: Principal, branch_id: int) -> None:
    if principal.role == "kiosk" and not principal.in_scope(branch_id):
        raise Forbidden(code="branch_forbidden")


async def create_hold(
    pool: asyncpg.Pool,
    principal: Principal,
    data: HoldCreate,
    *,
    idempotency_key: str | None,
    now: datetime,
) -> tuple[HoldOut, bool]:
    _require_booker(principal, data.branch_id)
    customer_id = principal.id if principal.kind == "customer" else None

    async def work(conn: Conn, outbox: Outbox) -> HoldOut:
        ctx = await load_context(conn, data.branch_id, data.service_id)
        _check_party(ctx, data.party_size)
        candidates = await _candidates(conn, ctx, data.start, data.party_size, now)

        async def attempt(rid: int) -> ledger.Hold:
            return await ledger.create_hold(
                conn,
                service_id=data.service_id,
                resource_id=rid,
                starts_at=data.start.astimezone(UTC),
                party_size=data.party_size,
                channel=principal.channel,
                now=now,
                customer_id=customer_id,
            )

        hold = await _first_that_fits(candidates, attempt)
        return HoldOut(
            id=hold.id,
            branch_id=hold.branch_id,
            service_id=hold.service_id,
            party_size=hold.party_size,
            start=hold.starts_at,
            end=hold.ends_at,
            local_start=_local(hold.starts_at, ctx.timezone),
            timezone=ctx.timezone,
            expires_at=hold.expires_at,
        )

    return await _once(
        pool,
        None,
        subject=principal.subject,
        key=idempotency_key,
        operation="createHold",
        data=data,
        out_type=HoldOut,
        work=work,
        now=now,
    )


# --- bookings ------------------------------------------------------------------


def booking_out(row: Record) -> BookingOut:
    return BookingOut(
        id=row["id"],
        code=row["code"],
        status=row["status"],
        start=row["starts_at"],
        end=row["ends_at"],
        local_start=_local(row["starts_at"], row["timezone"]),
        timezone=row["timezone"],
        branch_id=row["branch_id"],
        service_id=row["service_id"],
        party_size=row["party_size"],
        channel=row["channel"],
        cancelled_at=row["cancelled_at"],
        confirmed_by_sms_at=row["confirmed_by_sms_at"],
        late_cancellation=row["late_cancellation"],
    )


async def _booking_row(conn: Conn, booking_id: int) -> Record:
    row = await conn.fetchrow(q.BOOKING_BY_ID, booking_id)
    if row is None:
        raise NotFound()
    return row


def _wall(instant: datetime, timezone: str) -> str:
    return instant.astimezone(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M")


async def _queue_reminder(
    conn: Conn,
    outbox: Outbox,
    *,
    booking: Record,
    phone: str,
    locale: str,
    kind: str,
    send_at: datetime,
) -> None:
    start_key = int(booking["starts_at"].timestamp())
    message_id = await queue_template(
        conn,
        "reminder",
        locale,
        _booking_sms_params(booking),
        phone=phone,
        send_at=send_at,
        dedupe_key=f"booking:{booking['id']}:{kind}:{start_key}",
        branch_id=booking["branch_id"],
        customer_id=booking["customer_id"],
    )
    outbox.append((message_id, send_at))


def _booking_sms_params(booking: Record) -> dict[str, object]:
    return {
        "service": booking["service_name"],
        "branch": booking["branch_name"],
        "local_time": _wall(booking["starts_at"], booking["timezone"]),
        "code": booking["code"],
    }


async def _queue_booking_messages(
    conn: Conn, outbox: Outbox, booking: Record, phone: str, locale: str, now: datetime
) -> None:
    """Confirmation now; reminders 24 h and 2 h before the start instant, if still ahead."""
    message_id = await queue_template(
        conn,
        "booking_confirmation",
        locale,
        _booking_sms_params(booking),
        phone=phone,
        send_at=now,
        dedupe_key=f"booking:{booking['id']}:confirmation",
        branch_id=booking["branch_id"],
        customer_id=booking["customer_id"],
    )
    outbox.append((message_id, now))
    for kind, before in REMINDERS:
        send_at = booking["starts_at"] - before
        if send_at > now:
            await _queue_reminder(
                conn,
                outbox,
                booking=booking,
                phone=phone,
                locale=locale,
                kind=kind,
                send_at=send_at,
            )


async def _contact(
    conn: Conn, principal: Principal, body_phone: str | None
) -> tuple[str | None, str]:
    """The phone to text and its locale: a customer's from their account, a kiosk's
    walk-in from the body."""
    if principal.kind == "customer":
        if body_phone is not None:
            raise InvalidInput.field("phone", "only a kiosk sends a phone; yours is on file")
        row = await conn.fetchrow(q.CUSTOMER, principal.id)
        if row is None:
            raise NotFound()
        return row["phone"], pick_locale(row["locale"])
    if body_phone is None:
        return None, DEFAULT_LOCALE
    phone = normalise_phone(body_phone)
    known = await conn.fetchval("SELECT locale FROM customers WHERE phone = $1", phone)
    return phone, pick_locale(known) if known else DEFAULT_LOCALE


def _check_booking_body(data: BookingCreate) -> None:
    if data.hold_id is not None:
        extra = [
            f
            for f in ("branch_id", "service_id", "start", "party_size")
            if getattr(data, f) is not None
        ]
        if extra:
            raise InvalidInput(
                errors=[FieldError(f, "not allowed together with hold_id") for f in extra]
            )
        return
    missing = [f for f in ("branch_id", "service_id", "start") if getattr(data, f) is None]
    if missing:
        raise InvalidInput(
            errors=[FieldError(f, "required unless hold_id is given") for f in missing]
        )


async def create_booking(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    principal: Principal,
    data: BookingCreate,
    *,
    idempotency_key: str | None,
    now: datetime,
) -> tuple[BookingOut, bool]:
    _check_booking_body(data)
    if data.branch_id is not None:
        _require_booker(principal, data.branch_id)
    customer_id = principal.id if principal.kind == "customer" else None

    async def work(conn: Conn, outbox: Outbox) -> BookingOut:
        phone, locale = await _contact(conn, principal, data.phone)
        if data.hold_id is not None:
            hold = await conn.fetchrow(q.HOLD_FOR_BOOKING, data.hold_id)
            mine = hold is not None and (
                hold["customer_id"] == customer_id
                if customer_id is not None
                else hold["customer_id"] is None and principal.in_scope(hold["branch_id"])
            )
            if hold is None or not mine:
                raise NotFound()
            ctx = await load_context(conn, hold["branch_id"], hold["service_id"])
            status: ledger.BookingStatus = (
                "pending_payment" if ctx.deposit_minor > 0 else "confirmed"
            )
            booking = await ledger.create_booking_from_hold(
                conn, data.hold_id, now=now, phone=phone, customer_id=customer_id, status=status
            )
        else:
            assert data.branch_id is not None
            assert data.service_id is not None
            assert data.start is not None
            party = data.party_size or 1
            ctx = await load_context(conn, data.branch_id, data.service_id)
            _check_party(ctx, party)
            status = "pending_payment" if ctx.deposit_minor > 0 else "confirmed"
            candidates = await _candidates(conn, ctx, data.start, party, now)
            start = data.start.astimezone(UTC)

            async def attempt(rid: int) -> ledger.Booking:
                return await ledger.create_booking(
                    conn,
                    service_id=ctx.service_id,
                    resource_id=rid,
                    starts_at=start,
                    party_size=party,
                    channel=principal.channel,
                    now=now,
                    customer_id=customer_id,
                    phone=phone,
                    status=status,
                )

            booking = await _first_that_fits(candidates, attempt)
        row = await _booking_row(conn, booking.id)
        if phone is not None:
            await _queue_booking_messages(conn, outbox, row, phone, locale, now)
        return booking_out(row)

    return await _once(
        pool,
        redis,
        subject=principal.subject,
        key=idempotency_key,
        operation="createBooking",
        data=data,
        out_type=BookingOut,
        work=work,
        now=now,
    )


def _own(row: Record, principal: Principal) -> None:
    """A customer's own booking; anyone else's answers exactly like a missing one."""
    if principal.kind != "customer" or row["customer_id"] != principal.id:
        raise NotFound()


async def get_booking(pool: asyncpg.Pool, principal: Principal, booking_id: int) -> BookingOut:
    async with pool.acquire() as conn:
        row = await _booking_row(conn, booking_id)
    _own(row, principal)
    return booking_out(row)


async def list_bookings(
    pool: asyncpg.Pool, principal: Principal, *, limit: int, cursor: str | None
) -> tuple[list[BookingOut], str | None]:
    after: int | None = None
    if cursor is not None:
        if not cursor.isdigit() or not 0 < int(cursor) < 2**63:
            raise InvalidInput.field("cursor", "not a cursor from a previous page")
        after = int(cursor)
    rows = await pool.fetch(q.BOOKINGS_OF_CUSTOMER, principal.id, after, limit + 1)
    items = [booking_out(r) for r in rows[:limit]]
    nxt = str(items[-1].id) if len(rows) > limit and items else None
    return items, nxt


async def cancel_in_transaction(conn: Conn, row: Record, now: datetime) -> Record:
    """Cancel an active booking (seats freed at once, pending messages cancelled);
    inside the service's cancellation window the late-cancellation policy is recorded."""
    if not await ledger.cancel_booking(conn, row["id"], now):
        raise BookingNotActive()
    window = timedelta(minutes=row["cancellation_window_min"])
    if window and now > row["starts_at"] - window:
        await conn.execute(q.MARK_LATE_CANCELLATION, row["id"])
    await cancel_messages(conn, f"booking:{row['id']}:")
    return await _booking_row(conn, row["id"])


async def cancel_booking(
    pool: asyncpg.Pool, principal: Principal, booking_id: int, *, now: datetime
) -> BookingOut:
    async def tx(conn: Conn) -> BookingOut:
        row = await _booking_row(conn, booking_id)
        _own(row, principal)
        return booking_out(await cancel_in_transaction(conn, row, now))

    return await db.in_transaction_with_retry(pool, tx)


async def reschedule_booking(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    principal: Principal,
    booking_id: int,
    start: datetime,
    *,
    now: datetime,
) -> BookingOut:
    """Move the booking in one step; on 409 it keeps its old slot and resource."""

    async def tx(conn: Conn) -> tuple[BookingOut, Outbox]:
        row = await _booking_row(conn, booking_id)
        _own(row, principal)
        if row["status"] not in ledger.ACTIVE_STATUSES:
            raise BookingNotActive()
        ctx = await load_context(conn, row["branch_id"], row["service_id"])
        candidates = await _candidates(
            conn, ctx, start, row["party_size"], now, ignore_booking=booking_id
        )

        async def attempt(rid: int) -> ledger.Booking:
            return await ledger.reschedule_booking(
                conn, booking_id, new_starts_at=start.astimezone(UTC), now=now, new_resource_id=rid
            )

        await _first_that_fits(candidates, attempt)
        moved = await _booking_row(conn, booking_id)
        outbox: Outbox = []
        for kind, before in REMINDERS:
            send_at = moved["starts_at"] - before
            prefix = f"booking:{booking_id}:{kind}:"
            if send_at <= now:
                await cancel_messages(conn, prefix)
                continue
            ids = await reschedule_messages(conn, prefix, send_at)
            outbox.extend((i, send_at) for i in ids)
            if not ids and moved["phone"] is not None:
                locale = DEFAULT_LOCALE
                if moved["customer_id"] is not None:
                    found = await conn.fetchrow(q.CUSTOMER, moved["customer_id"])
                    locale = pick_locale(found["locale"]) if found else DEFAULT_LOCALE
                await _queue_reminder(
                    conn,
                    outbox,
                    booking=moved,
                    phone=moved["phone"],
                    locale=locale,
                    kind=kind,
                    send_at=send_at,
                )
        return booking_out(moved), outbox

    out, outbox = await _write(pool, tx, now)
    if redis is not None:
        for message_id, send_at in outbox:
            await enqueue_after_commit(redis, [message_id], send_at)
    return out


# --- sweeps (arq cron) -----------------------------------------------------------

IDEMPOTENCY_TTL = timedelta(days=1)


async def sweep_holds(ctx: dict[str, Any]) -> int:
    """Give back the seats of expired holds, a page per transaction; returns how many."""
    pool: asyncpg.Pool = ctx["pool"]
    total = 0
    while True:
        released = await _expire_due(pool, utcnow())
        total += released
        if released < 1000:
            return total


async def purge_idempotency_keys(ctx: dict[str, Any]) -> int:
    """Forget idempotency records older than a day (clients retry within minutes)."""
    result: str = await ctx["pool"].execute(
        "DELETE FROM idempotency_keys WHERE created_at < $1", utcnow() - IDEMPOTENCY_TTL
    )
    return int(result.split()[-1])


# --- SMS replies ---------------------------------------------------------------


async def _next_booking(conn: Conn, phone: str) -> Record | None:
    booking_id = await conn.fetchval(q.NEXT_BOOKING_OF_PHONE, phone, utcnow())
    return None if booking_id is None else await _booking_row(conn, booking_id)


def _reply(key: str, locale: str, row: Record) -> str:
    return render(
        key,
        locale,
        service=row["service_name"],
        local_time=_wall(row["starts_at"], row["timezone"]),
        code=row["code"],
    ).body


async def sms_confirm(conn: Conn, sms: inbound.InboundSms) -> str | None:
    """'Y' confirms the phone's next active booking; no booking: left for staff."""
    row = await _next_booking(conn, sms.phone)
    if row is None:
        return None
    await conn.execute(q.CONFIRM_BY_SMS, row["id"], utcnow())
    log.info("booking_confirmed_by_sms", booking_id=row["id"])
    return _reply("booking_confirmed_reply", sms.locale, row)


async def sms_cancel(conn: Conn, sms: inbound.InboundSms) -> str | None:
    """'N' cancels the phone's next active booking, as the cancel endpoint does."""
    row = await _next_booking(conn, sms.phone)
    if row is None:
        return None
    cancelled = await cancel_in_transaction(conn, row, utcnow())
    log.info("booking_cancelled_by_sms", booking_id=row["id"])
    return _reply("booking_cancelled_reply", sms.locale, cancelled)


inbound.register("confirm", sms_confirm)
inbound.register("cancel", sms_cancel)
