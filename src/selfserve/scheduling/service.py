"""Booking use cases: holds, bookings, cancel, reschedule, waitlist, no-shows, SMS replies.

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
  own transaction, which also offers the seats to the waitlist first) and, when
  that freed anything, runs once more.
- Seats freed by a cancel, a reschedule or an expiry are offered to the waitlist in
  the same transaction (`waitlist.py`).
- Idempotency (`idempotency.py`): the key is reserved before the work starts, so a
  duplicate arriving meanwhile gets 409 `idempotency_key_in_progress`, not a second
  run; only successful responses are recorded (a refused request releases the key:
  it changed nothing, so running it again is safe). Keys are per caller; the record
  is the response body and status, replayed as they were.
- Outbox dedupe keys: `booking:<id>:confirmation`, and reminders
  `booking:<id>:<kind>:<start, unix seconds>` with kinds `reminder_24h`,
  `reminder_2h` (from `SELFSERVE_REMINDERS`). The start in the key lets a reschedule
  move a pending reminder (by prefix `booking:<id>:reminder_24h:`) or, when the old
  one is already sent, queue a new one. Every pending message of a moved booking is
  rendered again with the new time (`rewrite_messages`).
- A checked-in booking is a queue ticket: cancel and reschedule (and SMS `N`) refuse
  it with 409 `booking_checked_in`; the booking row is locked first, as check-in
  locks it, so the two never interleave.
- SMS `Y`/`N` act on the booking whose message asked (see "SMS replies" below) and
  ask back when that is unclear.
- Repeated no-shows: a customer (or a walk-in phone at a kiosk) with
  `SELFSERVE_NO_SHOW_LIMIT` no-shows in the window gets 403
  `staff_booking_required` for holds, bookings and the waitlist; staff book for them.
  A customer account counts only the bookings it made itself: bookings made at a
  kiosk under its phone (an unverified number anyone can type) count against that
  phone at kiosks, never against the account.
- Abuse limits (`limits.py`): live holds, upcoming bookings per branch, service and
  day, and waitlist entries per customer (bookings also per walk-in phone), counted
  after the write under a per-owner advisory lock in the same transaction (so a
  refusal for the slot itself comes first); a booking with a phone
  typed by a kiosk or staff counts against the SMS limits before it commits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, time, timedelta
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
import msgspec
import structlog
from arq.connections import ArqRedis

from selfserve import db, idempotency, limits
from selfserve.auth.tokens import Principal
from selfserve.catalog.queries import decode_cursor, encode_cursor
from selfserve.db import Conn, Record
from selfserve.errors import (
    BookingCheckedIn,
    BookingNotActive,
    Conflict,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    SlotFull,
)
from selfserve.messaging import inbound
from selfserve.messaging.service import (
    cancel_messages,
    enqueue_after_commit,
    queue_template,
    reschedule_messages,
    rewrite_messages,
)
from selfserve.messaging.templates import DEFAULT_LOCALE, PLACEHOLDERS, pick_locale, render
from selfserve.phones import normalise_phone
from selfserve.scheduling import ledger, waitlist
from selfserve.scheduling import queries as q
from selfserve.scheduling.models import (
    BookingCreate,
    BookingOut,
    HoldCreate,
    HoldOut,
    WaitlistCreate,
    WaitlistOut,
)
from selfserve.scheduling.policy import DEFAULT_POLICY, BookingPolicy, Reminder, policy_of
from selfserve.scheduling.slots import (
    Outbox,
    check_party,
    find_resources,
    first_that_fits,
    load_context,
    local_iso,
    utcnow,
)

log = structlog.get_logger("selfserve.booking")

S = TypeVar("S", bound=msgspec.Struct)
T = TypeVar("T")
STAFF_ROLES = ("staff", "manager", "admin")


async def _enqueue(redis: ArqRedis | None, outbox: Outbox) -> None:
    if redis is not None:
        for message_id, send_at in outbox:
            await enqueue_after_commit(redis, [message_id], send_at)


async def expire_and_offer(conn: Conn, policy: BookingPolicy, now: datetime, outbox: Outbox) -> int:
    """Release expired holds, lapse the offers among them, and offer the freed seats to
    the waitlist, in the caller's transaction; returns how many holds were released."""
    released = await ledger.expire_due_holds(conn, now)
    if released:
        await waitlist.lapse_offers(conn, [r["id"] for r in released])
        await waitlist.offer_freed(conn, policy, now, {r["branch_id"] for r in released}, outbox)
    return len(released)


async def _expire_due(
    pool: asyncpg.Pool, redis: ArqRedis | None, policy: BookingPolicy, now: datetime
) -> int:
    async def run(conn: Conn) -> tuple[int, Outbox]:
        outbox: Outbox = []
        return await expire_and_offer(conn, policy, now, outbox), outbox

    released, outbox = await db.in_transaction_with_retry(pool, run)
    await _enqueue(redis, outbox)
    return released


async def _write(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    policy: BookingPolicy,
    fn: Callable[[Conn], Awaitable[T]],
    now: datetime,
) -> T:
    """Run `fn` in a transaction; when the ledger refuses, release expired holds and,
    if that freed anything, run it once more."""
    try:
        return await db.in_transaction_with_retry(pool, fn)
    except SlotFull:
        if not await _expire_due(pool, redis, policy, now):
            raise
    return await db.in_transaction_with_retry(pool, fn)


async def _check_no_show_rule(
    conn: Conn,
    principal: Principal,
    policy: BookingPolicy,
    now: datetime,
    *,
    phone: str | None,
) -> None:
    """Customers (and kiosk walk-ins by phone) with too many recent no-shows must be
    booked by staff."""
    if policy.no_show_limit <= 0 or principal.role in STAFF_ROLES:
        return
    customer_id = principal.id if principal.kind == "customer" else None
    if customer_id is not None:
        phone = None  # an account answers only for the bookings it made itself
    elif phone is None:
        return
    count = await conn.fetchval(
        q.RECENT_NO_SHOWS, customer_id, phone, now - policy.no_show_window, policy.no_show_limit
    )
    if count >= policy.no_show_limit:
        raise Forbidden(code="staff_booking_required")


# --- idempotency ---------------------------------------------------------------


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
    policy: BookingPolicy,
) -> tuple[S, bool]:
    async def with_outbox(conn: Conn) -> tuple[S, Outbox]:
        outbox: Outbox = []
        return await work(conn, outbox), outbox

    async def run(fn: Callable[[Conn], Awaitable[tuple[S, Outbox]]]) -> tuple[S, Outbox]:
        return await _write(pool, redis, policy, fn, now)

    nothing: Outbox = []
    out, outbox, replayed = await idempotency.once(
        pool,
        subject=subject,
        key=key,
        operation=operation,
        data=data,
        out_type=out_type,
        work=with_outbox,
        run=run,
        on_replay=nothing,
    )
    await _enqueue(redis, outbox)
    return out, replayed


# --- holds ---------------------------------------------------------------------


def _require_booker(principal: Principal, branch_id: int) -> None:
    """Kiosks and staff act only for their own branches; another branch is answered
    as a missing one (404)."""
    if principal.kind != "customer" and not principal.in_scope(branch_id):
        raise NotFound()


async def create_hold(
    pool: asyncpg.Pool,
    principal: Principal,
    data: HoldCreate,
    *,
    idempotency_key: str | None,
    now: datetime,
    policy: BookingPolicy = DEFAULT_POLICY,
) -> tuple[HoldOut, bool]:
    _require_booker(principal, data.branch_id)
    customer_id = principal.id if principal.kind == "customer" else None

    async def work(conn: Conn, outbox: Outbox) -> HoldOut:
        await _check_no_show_rule(conn, principal, policy, now, phone=None)
        ctx = await load_context(conn, data.branch_id, data.service_id)
        check_party(ctx, data.party_size)
        candidates = await find_resources(conn, ctx, data.start, data.party_size, now)

        async def attempt(rid: int) -> ledger.Hold:
            return await ledger.create_hold(
                conn,
                service_id=data.service_id,
                resource_id=rid,
                starts_at=data.start.astimezone(UTC),
                party_size=data.party_size,
                channel=principal.channel,
                now=now,
                ttl=policy.hold_ttl,
                customer_id=customer_id,
                check_shift=True,
            )

        hold = await first_that_fits(candidates, attempt)
        await limits.check_holds(conn, principal, policy.quotas.active_holds, now)
        return HoldOut(
            id=hold.id,
            branch_id=hold.branch_id,
            service_id=hold.service_id,
            party_size=hold.party_size,
            start=hold.starts_at,
            end=hold.ends_at,
            local_start=local_iso(hold.starts_at, ctx.timezone),
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
        policy=policy,
    )


# --- bookings ------------------------------------------------------------------


def booking_out(row: Record) -> BookingOut:
    return BookingOut(
        id=row["id"],
        code=row["code"],
        status=row["status"],
        start=row["starts_at"],
        end=row["ends_at"],
        local_start=local_iso(row["starts_at"], row["timezone"]),
        timezone=row["timezone"],
        branch_id=row["branch_id"],
        service_id=row["service_id"],
        party_size=row["party_size"],
        channel=row["channel"],
        cancelled_at=row["cancelled_at"],
        confirmed_by_sms_at=row["confirmed_by_sms_at"],
        late_cancellation=row["late_cancellation"],
    )


async def _booking_row(conn: Conn, booking_id: int, *, lock: bool = False) -> Record:
    row = await conn.fetchrow(q.BOOKING_FOR_UPDATE if lock else q.BOOKING_BY_ID, booking_id)
    if row is None:
        raise NotFound()
    return row


def _check_changeable(row: Record) -> None:
    """Only an active booking that has not checked in may be cancelled or moved: once
    checked in it lives on as a queue ticket (leaving the queue is the ticket's
    cancel), and its seats and time stay as they are."""
    if row["status"] not in ledger.ACTIVE_STATUSES:
        raise BookingNotActive()
    if row["checked_in_at"] is not None:
        raise BookingCheckedIn()


def _wall(instant: datetime, timezone: str) -> str:
    return instant.astimezone(ZoneInfo(timezone)).strftime("%Y-%m-%d %H:%M")


async def _queue_reminder(
    conn: Conn,
    outbox: Outbox,
    *,
    booking: Record,
    phone: str,
    locale: str,
    reminder: Reminder,
    send_at: datetime,
) -> None:
    start_key = int(booking["starts_at"].timestamp())
    params = _booking_sms_params(booking)
    message_id = await queue_template(
        conn,
        reminder.template,
        locale,
        {k: v for k, v in params.items() if k in PLACEHOLDERS[reminder.template]},
        phone=phone,
        send_at=send_at,
        dedupe_key=f"booking:{booking['id']}:{reminder.kind}:{start_key}",
        branch_id=booking["branch_id"],
        customer_id=booking["customer_id"],
        # a reminder that could not go out before the appointment began is dropped
        expires_at=booking["starts_at"],
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
    conn: Conn,
    outbox: Outbox,
    booking: Record,
    phone: str,
    locale: str,
    now: datetime,
    policy: BookingPolicy,
    *,
    confirmation: bool = True,
) -> None:
    """Confirmation now (unless the caller answers with it); reminders at the policy's
    leads before the start instant, if still ahead."""
    if confirmation:
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
    for reminder in policy.reminders:
        send_at = booking["starts_at"] - reminder.lead
        if send_at > now:
            await _queue_reminder(
                conn,
                outbox,
                booking=booking,
                phone=phone,
                locale=locale,
                reminder=reminder,
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
    policy: BookingPolicy = DEFAULT_POLICY,
) -> tuple[BookingOut, bool]:
    _check_booking_body(data)
    if data.branch_id is not None:
        _require_booker(principal, data.branch_id)
    customer_id = principal.id if principal.kind == "customer" else None

    async def work(conn: Conn, outbox: Outbox) -> BookingOut:
        phone, locale = await _contact(conn, principal, data.phone)
        await _check_no_show_rule(conn, principal, policy, now, phone=phone)
        owner = limits.owner_of(principal, phone)
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
            await waitlist.mark_booked(conn, data.hold_id, booking.id)
        else:
            assert data.branch_id is not None
            assert data.service_id is not None
            assert data.start is not None
            party = data.party_size or 1
            ctx = await load_context(conn, data.branch_id, data.service_id)
            check_party(ctx, party)
            status = "pending_payment" if ctx.deposit_minor > 0 else "confirmed"
            candidates = await find_resources(conn, ctx, data.start, party, now)
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
                    check_shift=True,
                )

            booking = await first_that_fits(candidates, attempt)
        row = await _booking_row(conn, booking.id)
        await limits.check_bookings(
            conn,
            owner,
            policy.quotas.bookings_per_day,
            branch_id=row["branch_id"],
            service_id=row["service_id"],
            start=row["starts_at"],
            timezone=row["timezone"],
            now=now,
        )
        if phone is not None:
            # A number typed at a kiosk or desk: refused here (429) rolls it all back.
            await limits.count_text(redis, policy.quotas, principal, phone, now)
            await _queue_booking_messages(conn, outbox, row, phone, locale, now, policy)
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
        policy=policy,
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


def _cursor(cursor: str | None) -> int | None:
    """Newest-first pages: the opaque cursor carries the last id seen (catalogue format)."""
    if not cursor:
        return None
    after = decode_cursor(cursor)
    if after < 1:
        raise InvalidInput.field("cursor", "not a cursor this API issued")
    return after


async def list_bookings(
    pool: asyncpg.Pool, principal: Principal, *, limit: int, cursor: str | None
) -> tuple[list[BookingOut], str | None]:
    after = _cursor(cursor)
    rows = await pool.fetch(q.BOOKINGS_OF_CUSTOMER, principal.id, after, limit + 1)
    items = [booking_out(r) for r in rows[:limit]]
    nxt = encode_cursor(items[-1].id) if len(rows) > limit and items else None
    return items, nxt


async def cancel_in_transaction(
    conn: Conn,
    row: Record,
    now: datetime,
    policy: BookingPolicy,
    outbox: Outbox,
    *,
    late_policy: bool = True,
) -> Record:
    """Cancel an active booking (seats freed at once and offered to the waitlist,
    pending messages cancelled); inside the service's cancellation window the
    late-cancellation policy is recorded (unless `late_policy` is off: the branch
    cancelled, not the customer). `row` is locked (`_booking_row(lock=True)`); a
    checked-in booking is refused (`BookingCheckedIn`)."""
    _check_changeable(row)
    if not await ledger.cancel_booking(conn, row["id"], now):
        raise BookingNotActive()
    window = timedelta(minutes=row["cancellation_window_min"])
    if late_policy and window and now > row["starts_at"] - window:
        await conn.execute(q.MARK_LATE_CANCELLATION, row["id"])
    await cancel_messages(conn, f"booking:{row['id']}:")
    await waitlist.offer_freed(conn, policy, now, {row["branch_id"]}, outbox)
    return await _booking_row(conn, row["id"])


async def cancel_booking(
    pool: asyncpg.Pool,
    principal: Principal,
    booking_id: int,
    *,
    now: datetime,
    redis: ArqRedis | None = None,
    policy: BookingPolicy = DEFAULT_POLICY,
) -> BookingOut:
    async def tx(conn: Conn) -> tuple[BookingOut, Outbox]:
        row = await _booking_row(conn, booking_id, lock=True)
        _own(row, principal)
        outbox: Outbox = []
        return booking_out(await cancel_in_transaction(conn, row, now, policy, outbox)), outbox

    out, outbox = await db.in_transaction_with_retry(pool, tx)
    await _enqueue(redis, outbox)
    return out


async def reschedule_booking(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    principal: Principal,
    booking_id: int,
    start: datetime,
    *,
    now: datetime,
    policy: BookingPolicy = DEFAULT_POLICY,
) -> BookingOut:
    """Move the booking in one step; on 409 it keeps its old slot and resource. The
    seats it leaves are offered to the waitlist. Every message of the booking still
    to be sent is written again for the new time; reminders move with the start."""

    async def tx(conn: Conn) -> tuple[BookingOut, Outbox]:
        row = await _booking_row(conn, booking_id, lock=True)
        _own(row, principal)
        outbox: Outbox = []
        moved = await reschedule_in_transaction(conn, row, start, now, policy, outbox)
        return booking_out(moved), outbox

    out, outbox = await _write(pool, redis, policy, tx, now)
    await _enqueue(redis, outbox)
    return out


async def reschedule_in_transaction(
    conn: Conn,
    row: Record,
    start: datetime,
    now: datetime,
    policy: BookingPolicy,
    outbox: Outbox,
) -> Record:
    """Move an active booking to `start` (a slot of its service with room for its
    party) in the caller's transaction: pending reminders follow it, and the seats it
    leaves are offered to the waitlist. Raises `SlotFull` (nothing changed) when the
    new slot has no room."""
    booking_id = row["id"]
    if row["status"] not in ledger.ACTIVE_STATUSES:
        raise BookingNotActive()
    _check_changeable(row)
    ctx = await load_context(conn, row["branch_id"], row["service_id"])
    candidates = await find_resources(
        conn, ctx, start, row["party_size"], now, ignore_booking=booking_id
    )

    async def attempt(rid: int) -> ledger.Booking:
        return await ledger.reschedule_booking(
            conn,
            booking_id,
            new_starts_at=start.astimezone(UTC),
            now=now,
            new_resource_id=rid,
            check_shift=True,
        )

    await first_that_fits(candidates, attempt)
    moved = await _booking_row(conn, booking_id)
    await rewrite_messages(conn, f"booking:{booking_id}:", _booking_sms_params(moved))
    for reminder in policy.reminders:
        send_at = moved["starts_at"] - reminder.lead
        prefix = f"booking:{booking_id}:{reminder.kind}:"
        if send_at <= now:
            await cancel_messages(conn, prefix)
            continue
        ids = await reschedule_messages(conn, prefix, send_at, new_expires_at=moved["starts_at"])
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
                reminder=reminder,
                send_at=send_at,
            )
    await waitlist.offer_freed(conn, policy, now, {row["branch_id"]}, outbox)
    return moved


# --- waitlist -------------------------------------------------------------------


async def join_waitlist(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    principal: Principal,
    data: WaitlistCreate,
    *,
    idempotency_key: str | None,
    now: datetime,
    policy: BookingPolicy = DEFAULT_POLICY,
) -> tuple[WaitlistOut, bool]:
    """Join the waitlist; when a fitting seat is free already, the offer comes at once."""
    if data.latest < data.earliest:
        raise InvalidInput.field("latest", "must not be before earliest")

    async def work(conn: Conn, outbox: Outbox) -> WaitlistOut:
        await _check_no_show_rule(conn, principal, policy, now, phone=None)
        ctx = await load_context(conn, data.branch_id, data.service_id)
        check_party(ctx, data.party_size)
        earliest_at, latest_at = waitlist.window_instants(
            ctx.timezone, data.date, data.earliest, data.latest
        )
        if latest_at < now + timedelta(minutes=ctx.rules.lead_time_min):
            raise InvalidInput.field("latest", "the window has passed or is too close to book")
        if earliest_at >= now + timedelta(days=ctx.rules.horizon_days):
            raise InvalidInput.field(
                "date", f"bookings open {ctx.rules.horizon_days} days ahead; choose an earlier day"
            )
        entry_id = await conn.fetchval(
            q.INSERT_WAITLIST_ENTRY,
            data.branch_id,
            data.service_id,
            principal.id,
            data.party_size,
            data.date,
            _clock(data.earliest),
            _clock(data.latest),
            earliest_at,
            latest_at,
            principal.channel,
        )
        if entry_id is None:
            raise Conflict(code="already_waitlisted")
        await waitlist.offer_freed(conn, policy, now, {data.branch_id}, outbox)
        # Last: the owner's lock is taken after every row lock (offers take seats).
        await limits.check_waitlist(conn, principal, policy.quotas.waitlist_entries)
        return waitlist.entry_out(await waitlist.entry_row(conn, entry_id))

    return await _once(
        pool,
        redis,
        subject=principal.subject,
        key=idempotency_key,
        operation="joinWaitlist",
        data=data,
        out_type=WaitlistOut,
        work=work,
        now=now,
        policy=policy,
    )


def _clock(text: str) -> time:
    hours, minutes = (int(p) for p in text.split(":"))
    return time(hours, minutes)


def _own_entry(row: Record, principal: Principal) -> None:
    if principal.kind != "customer" or row["customer_id"] != principal.id:
        raise NotFound()


async def get_waitlist_entry(
    pool: asyncpg.Pool, principal: Principal, entry_id: int
) -> WaitlistOut:
    async with pool.acquire() as conn:
        row = await waitlist.entry_row(conn, entry_id)
    _own_entry(row, principal)
    return waitlist.entry_out(row)


async def list_waitlist(
    pool: asyncpg.Pool, principal: Principal, *, limit: int, cursor: str | None
) -> tuple[list[WaitlistOut], str | None]:
    after = _cursor(cursor)
    rows = await pool.fetch(q.WAITLIST_OF_CUSTOMER, principal.id, after, limit + 1)
    items = [waitlist.entry_out(r) for r in rows[:limit]]
    nxt = encode_cursor(items[-1].id) if len(rows) > limit and items else None
    return items, nxt


async def leave_waitlist(
    pool: asyncpg.Pool,
    redis: ArqRedis | None,
    principal: Principal,
    entry_id: int,
    *,
    now: datetime,
    policy: BookingPolicy = DEFAULT_POLICY,
) -> WaitlistOut:
    """Leave the waitlist; a seat held for an open offer goes to the next entry."""

    async def tx(conn: Conn) -> tuple[WaitlistOut, Outbox]:
        row = await waitlist.entry_row(conn, entry_id)
        _own_entry(row, principal)
        outbox: Outbox = []
        if not await waitlist.close_entry(conn, entry_id, "cancelled", now, policy, outbox):
            raise Conflict(code="waitlist_entry_closed")
        return waitlist.entry_out(await waitlist.entry_row(conn, entry_id)), outbox

    out, outbox = await db.in_transaction_with_retry(pool, tx)
    await _enqueue(redis, outbox)
    return out


# --- sweeps (arq cron) -----------------------------------------------------------

IDEMPOTENCY_TTL = timedelta(days=1)
SWEEP_PAGE = 1000


def _policy(ctx: dict[str, Any]) -> BookingPolicy:
    settings = ctx.get("settings")
    return policy_of(settings) if settings is not None else DEFAULT_POLICY


async def sweep_holds(ctx: dict[str, Any]) -> int:
    """Give back the seats of expired holds (offering them to the waitlist), a page per
    transaction; returns how many."""
    pool: asyncpg.Pool = ctx["pool"]
    total = 0
    while True:
        released = await _expire_due(pool, ctx.get("redis"), _policy(ctx), utcnow())
        total += released
        if released < SWEEP_PAGE:
            return total


async def sweep_no_shows(ctx: dict[str, Any]) -> int:
    """Bookings nobody checked in for by start + grace become no-shows and give their
    seats back; returns how many."""
    pool: asyncpg.Pool = ctx["pool"]
    policy = _policy(ctx)
    total = 0
    while True:
        now = utcnow()

        async def run(conn: Conn, now: datetime = now) -> int:
            rows = await ledger.mark_no_shows(
                conn, now - policy.no_show_grace, now, limit=SWEEP_PAGE
            )
            for r in rows:
                await cancel_messages(conn, f"booking:{r['id']}:")
            return len(rows)

        marked = await db.in_transaction_with_retry(pool, run)
        if marked:
            log.info("no_shows_marked", count=marked)
        total += marked
        if marked < SWEEP_PAGE:
            return total


async def sweep_waitlist(ctx: dict[str, Any]) -> int:
    """Close entries whose window passed, lapse offers whose hold expired, and offer free
    seats at every branch with someone waiting (catches seats freed in ways that do
    not call the waitlist, e.g. a new shift). Returns the offers made."""
    pool: asyncpg.Pool = ctx["pool"]
    policy = _policy(ctx)
    now = utcnow()

    async def close(conn: Conn) -> list[int]:
        await waitlist.expire_windows(conn, now)
        return await waitlist.branches_waiting(conn, now)

    branches = await db.in_transaction_with_retry(pool, close)
    offered = 0
    for branch_id in branches:

        async def offer(conn: Conn, branch_id: int = branch_id) -> tuple[int, Outbox]:
            outbox: Outbox = []
            await expire_and_offer(conn, policy, now, outbox)
            return await waitlist.offer_freed(conn, policy, now, {branch_id}, outbox), outbox

        made, outbox = await db.in_transaction_with_retry(pool, offer)
        await _enqueue(ctx.get("redis"), outbox)
        offered += made
    return offered


async def purge_capacity_ledger(ctx: dict[str, Any]) -> int:
    """Delete capacity-ledger units of the past in small batches (`ledger.purge_units`)."""
    return await ledger.purge_units(ctx["pool"], utcnow())


async def purge_idempotency_keys(ctx: dict[str, Any]) -> int:
    """Forget idempotency records older than a day (clients retry within minutes)."""
    result: str = await ctx["pool"].execute(
        "DELETE FROM idempotency_keys WHERE created_at < $1", utcnow() - IDEMPOTENCY_TTL
    )
    return int(result.split()[-1])


# --- SMS replies ---------------------------------------------------------------
#
# A Y or N answers the message that asked for it. "N <code>" (or "Y <code>") names
# the booking. Otherwise the reply goes to the booking of the last message that asked
# and was actually sent to the phone (a confirm request asks Y or N; a booking
# confirmation offers N), among its bookings still open to an answer. When that
# cannot be told (no such message, or another booking's confirm request also waits
# for an answer) nothing is done and the reply asks which booking, listing them.

ASKING: dict[str, tuple[str, ...]] = {
    "confirm": ("confirm_request",),
    "cancel": ("confirm_request", "booking_confirmation"),
}
CHOICES_LISTED = 5


def _answerable(row: Record, now: datetime) -> bool:
    """Active and either still ahead or checked in (then N is answered as such)."""
    return row["status"] in ledger.ACTIVE_STATUSES and (
        row["starts_at"] > now or row["checked_in_at"] is not None
    )


async def _choices(conn: Conn, sms: inbound.InboundSms, now: datetime) -> str | None:
    """The reply asking which booking is meant (None: the phone has no open booking,
    so the message is left for staff)."""
    rows = await conn.fetch(q.OPEN_BOOKINGS_OF_PHONE, sms.phone, now, CHOICES_LISTED)
    if not rows:
        return None
    listed = "; ".join(
        f"{r['code']} {r['service_name']} {_wall(r['starts_at'], r['timezone'])}" for r in rows
    )
    return render("booking_choose_reply", sms.locale, bookings=listed, example=rows[0]["code"]).body


async def _replied_to(
    conn: Conn, sms: inbound.InboundSms, now: datetime
) -> tuple[Record | None, str | None]:
    """(the booking a Y or N is about, locked; or None and the reply to send instead)."""
    if sms.classified.code is not None:
        row = await conn.fetchrow(q.BOOKING_BY_CODE_OF_PHONE, sms.classified.code, sms.phone)
    else:
        row = None
        asks = await conn.fetch(
            q.ASKS_OF_PHONE, sms.phone, list(ASKING[sms.classified.intent]), now
        )
        if asks:
            last = asks[0]["booking_id"]
            waiting = {
                a["booking_id"]
                for a in asks
                if a["template"] == "confirm_request"
                and not a["answered"]
                and a["checked_in_at"] is None
            }
            if waiting <= {last}:
                row = await _booking_row(conn, last, lock=True)
    if row is not None and _answerable(row, now):
        return row, None
    log.info("sms_reply_ambiguous", intent=sms.classified.intent, named=sms.classified.code)
    return None, await _choices(conn, sms, now)


def _reply(key: str, locale: str, row: Record) -> str:
    return render(
        key,
        locale,
        service=row["service_name"],
        local_time=_wall(row["starts_at"], row["timezone"]),
        code=row["code"],
    ).body


async def _claim_offer(conn: Conn, sms: inbound.InboundSms, offer: Record) -> str:
    """'Y' to a waitlist offer books its held seat; the reply is the confirmation."""
    now = utcnow()
    policy = policy_of(sms.settings)
    ctx = await load_context(conn, offer["branch_id"], offer["service_id"])
    status: ledger.BookingStatus = "pending_payment" if ctx.deposit_minor > 0 else "confirmed"
    booking = await ledger.create_booking_from_hold(
        conn,
        offer["hold_id"],
        now=now,
        phone=sms.phone,
        customer_id=offer["customer_id"],
        status=status,
    )
    await waitlist.mark_booked(conn, offer["hold_id"], booking.id)
    row = await _booking_row(conn, booking.id)
    await _queue_booking_messages(
        conn, sms.outbox, row, sms.phone, sms.locale, now, policy, confirmation=False
    )
    log.info("waitlist_offer_claimed_by_sms", booking_id=booking.id, entry_id=offer["id"])
    return render("booking_confirmation", sms.locale, **_booking_sms_params(row)).body


async def sms_confirm(conn: Conn, sms: inbound.InboundSms) -> str | None:
    """'Y' claims the phone's open waitlist offer, else confirms the booking it answers
    (see above); when that is unclear, asks which."""
    now = utcnow()
    if sms.classified.code is None:
        offer = await waitlist.live_offer_of_phone(conn, sms.phone, now)
        if offer is not None:
            return await _claim_offer(conn, sms, offer)
    row, ask = await _replied_to(conn, sms, now)
    if row is None:
        return ask
    await conn.execute(q.CONFIRM_BY_SMS, row["id"], now)
    await conn.execute(q.MARK_REPLY_APPLIED, sms.message_sid, row["id"])
    log.info("booking_confirmed_by_sms", booking_id=row["id"])
    return _reply("booking_confirmed_reply", sms.locale, row)


async def sms_cancel(conn: Conn, sms: inbound.InboundSms) -> str | None:
    """'N' declines the phone's open waitlist offer (the seat goes to the next entry),
    else cancels the booking it answers as the cancel endpoint does (a checked-in
    booking is not cancelled: the reply says how to leave the queue); when that is
    unclear, asks which."""
    now = utcnow()
    policy = policy_of(sms.settings)
    if sms.classified.code is None:
        offer = await waitlist.live_offer_of_phone(conn, sms.phone, now)
        if offer is not None:
            await waitlist.close_entry(conn, offer["id"], "declined", now, policy, sms.outbox)
            ctx = await load_context(conn, offer["branch_id"], offer["service_id"])
            log.info("waitlist_offer_declined_by_sms", entry_id=offer["id"])
            return render("waitlist_declined_reply", sms.locale, service=ctx.service_name).body
    row, ask = await _replied_to(conn, sms, now)
    if row is None:
        return ask
    if row["checked_in_at"] is not None:
        return _reply("booking_checked_in_reply", sms.locale, row)
    cancelled = await cancel_in_transaction(conn, row, now, policy, sms.outbox)
    await conn.execute(q.MARK_REPLY_APPLIED, sms.message_sid, row["id"])
    log.info("booking_cancelled_by_sms", booking_id=row["id"])
    return _reply("booking_cancelled_reply", sms.locale, cancelled)


inbound.register("confirm", sms_confirm)
inbound.register("cancel", sms_cancel)
