"""Walk-in queue use cases: tickets, check-in, counters, call-next and the ticket's
life (recall, start, finish, no-show, transfer, cancel), positions and ETAs.

Every write is one transaction. Display numbers come from `queue_day_numbers`
(one row per queue and branch-local day, incremented in the issuing transaction),
so concurrent issues get distinct numbers with no gaps. Call-next is one
`UPDATE ... FROM (SELECT ... ORDER BY <policy> FOR UPDATE SKIP LOCKED LIMIT 1)`:
two counters calling at once never get the same ticket (`policy.py`).

Positions and ETAs are computed from the branch's rows at read time: the policy
order of the waiting tickets at `now`, and `eta.estimate_wait` replaying it over
the open counters with expected service times (an EWMA per service, seeded from
the service's duration, updated in the transaction that finishes a ticket).

Writes return the branch id whose board changed; the routes publish the live
events after commit (`live.py`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import cached_property
from typing import Any, Literal
from zoneinfo import ZoneInfo

import asyncpg
import structlog

from selfserve import db, idempotency, limits
from selfserve.auth.tokens import Principal
from selfserve.db import Conn, Record
from selfserve.errors import Conflict, Forbidden, InvalidInput, NotFound
from selfserve.limits import quotas_of
from selfserve.messaging import inbound
from selfserve.messaging.service import cancel_messages, enqueue_after_commit, queue_template
from selfserve.messaging.templates import DEFAULT_LOCALE, pick_locale, render
from selfserve.phones import normalise_phone
from selfserve.queueing import eta as eta_model
from selfserve.queueing import policy as call_policy
from selfserve.queueing.models import (
    CheckIn,
    CounterOut,
    Eta,
    QueueStatus,
    TicketCreate,
    TicketOut,
    Transfer,
)
from selfserve.scheduling.availability import BranchCalendar, open_until
from selfserve.settings import Settings

log = structlog.get_logger("selfserve.queue")

STAFF = ("staff", "manager", "admin")
LIVE = ("waiting", "called", "serving")
Outbox = list[tuple[int | None, datetime]]


def utcnow() -> datetime:
    return datetime.now(UTC)


def local_date(instant: datetime, timezone: str) -> date:
    return instant.astimezone(ZoneInfo(timezone)).date()


def display_code(prefix: str, number: int) -> str:
    return f"{prefix}{number:03d}"


def config_of(settings: Settings) -> call_policy.PolicyConfig:
    return call_policy.PolicyConfig(aging_bound=timedelta(minutes=settings.queue_aging_bound_min))


# --- reading a branch ---------------------------------------------------------------

QUEUE = """
SELECT q.id, q.branch_id, q.name, q.prefix, q.active,
       b.timezone, b.opening_hours, b.closures, b.active AS branch_active,
       ARRAY(SELECT service_id FROM queue_services s WHERE s.queue_id = q.id
             ORDER BY service_id) AS service_ids
FROM queues q JOIN branches b ON b.id = q.branch_id
WHERE q.id = $1
"""

BRANCH_QUEUES = """
SELECT q.id, q.name, q.prefix,
       ARRAY(SELECT service_id FROM queue_services s WHERE s.queue_id = q.id
             ORDER BY service_id) AS service_ids
FROM queues q WHERE q.branch_id = $1 AND q.active ORDER BY q.prefix, q.id
"""

WAITING = """
SELECT id, queue_id, service_id, issued_at, priority, appointment_at
FROM tickets WHERE branch_id = $1 AND status = 'waiting'
"""

OPEN_COUNTERS = """
SELECT r.id, r.name,
       ARRAY(SELECT service_id FROM resource_skills k WHERE k.resource_id = r.id) AS services,
       t.service_id AS busy_service, t.status AS busy_status,
       t.called_at, t.started_at
FROM counter_states c
JOIN resources r ON r.id = c.resource_id AND r.active
LEFT JOIN LATERAL (
    SELECT service_id, status, called_at, started_at FROM tickets
    WHERE counter_id = r.id AND status IN ('called', 'serving')
    ORDER BY called_at DESC LIMIT 1
) t ON true
WHERE c.branch_id = $1 AND c.open
ORDER BY r.id
"""

EXPECTED = """
SELECT s.id, coalesce(st.ewma_s, s.duration_min * 60.0) AS expected_s
FROM services s LEFT JOIN service_time_stats st ON st.service_id = s.id
WHERE s.branch_id = $1
"""


@dataclass
class BranchState:
    """What positions and ETAs are computed from: one consistent read of a branch."""

    now: datetime
    config: call_policy.PolicyConfig
    waiting: list[call_policy.WaitingTicket]
    queue_of: dict[int, int]
    expected_s: dict[int, float]
    counters: list[eta_model.CounterState]
    counter_names: dict[int, str] = field(default_factory=dict)

    @cached_property
    def ordered(self) -> list[call_policy.WaitingTicket]:
        return call_policy.order(self.waiting, None, self.now, self.config)

    def newcomer_waits(self, services: Iterable[int]) -> dict[int, float | None]:
        """The wait of a normal walk-in taken now, per service: it goes behind
        everyone waiting (`policy.py`), so one replay answers for all services."""
        wanted = list(services)
        ordered = self.ordered
        expected = _expected_for(self, ordered) | {s: self.expected(s) for s in wanted}
        return eta_model.newcomer_waits(
            [t.service_id for t in ordered], expected, self.counters, wanted
        )

    def expected(self, service_id: int) -> float:
        return self.expected_s.get(service_id, 600.0)


async def branch_state(
    conn: Conn, branch_id: int, now: datetime, config: call_policy.PolicyConfig
) -> BranchState:
    waiting_rows = await conn.fetch(WAITING, branch_id)
    expected = {r["id"]: float(r["expected_s"]) for r in await conn.fetch(EXPECTED, branch_id)}
    counters: list[eta_model.CounterState] = []
    names: dict[int, str] = {}
    for c in await conn.fetch(OPEN_COUNTERS, branch_id):
        names[c["id"]] = c["name"]
        busy = 0.0
        if c["busy_service"] is not None:
            exp = expected.get(c["busy_service"], 600.0)
            if c["busy_status"] == "serving" and c["started_at"] is not None:
                busy = eta_model.remaining_service_s(exp, (now - c["started_at"]).total_seconds())
            else:
                busy = exp
        counters.append(eta_model.CounterState(frozenset(c["services"]), busy_remaining_s=busy))
    return BranchState(
        now=now,
        config=config,
        waiting=[
            call_policy.WaitingTicket(
                id=r["id"],
                service_id=r["service_id"],
                issued_at=r["issued_at"],
                priority=r["priority"],
                appointment_at=r["appointment_at"],
            )
            for r in waiting_rows
        ],
        queue_of={r["id"]: r["queue_id"] for r in waiting_rows},
        expected_s=expected,
        counters=counters,
        counter_names=names,
    )


def _eta(seconds: float | None, locale: str) -> Eta | None:
    if seconds is None:
        return None
    lo, hi = eta_model.eta_band(seconds)
    return Eta(low_min=lo, high_min=hi, text=eta_model.format_band(lo, hi, locale))


def _wait_seconds(
    state: BranchState, ordered: list[call_policy.WaitingTicket], index: int, service_id: int
) -> float | None:
    ahead = [eta_model.AheadTicket(t.service_id) for t in ordered[:index]]
    expected = _expected_for(state, ordered)
    return eta_model.estimate_wait(ahead, expected, state.counters, service_id)


@dataclass(frozen=True)
class Place:
    position: int
    wait_s: float | None
    ahead_in_queue: int


def places(state: BranchState) -> dict[int, Place]:
    """Position in its queue (1 = next) and expected wait of every waiting ticket."""
    ordered = state.ordered
    waits = eta_model.estimate_waits(
        [t.service_id for t in ordered], _expected_for(state, ordered), state.counters
    )
    seen_in_queue: dict[int, int] = {}
    out: dict[int, Place] = {}
    for ticket, wait in zip(ordered, waits, strict=True):
        queue_id = state.queue_of[ticket.id]
        ahead = seen_in_queue.get(queue_id, 0)
        seen_in_queue[queue_id] = ahead + 1
        out[ticket.id] = Place(position=ahead + 1, wait_s=wait, ahead_in_queue=ahead)
    return out


def _expected_for(state: BranchState, tickets: list[call_policy.WaitingTicket]) -> dict[int, float]:
    return {t.service_id: state.expected(t.service_id) for t in tickets} | state.expected_s


def wait_for_new(state: BranchState, service_id: int, priority: int) -> float | None:
    """The expected wait of a ticket issued now."""
    if priority == 0:
        return state.newcomer_waits([service_id])[service_id]
    new = call_policy.WaitingTicket(
        id=2**62, service_id=service_id, issued_at=state.now, priority=priority
    )
    ordered = call_policy.order([*state.waiting, new], None, state.now, state.config)
    index = next(i for i, t in enumerate(ordered) if t.id == new.id)
    return _wait_seconds(state, ordered, index, service_id)


async def queue_statuses(
    conn: Conn, state: BranchState, branch_id: int, locale: str
) -> list[QueueStatus]:
    waiting_by_queue: dict[int, int] = {}
    for queue_id in state.queue_of.values():
        waiting_by_queue[queue_id] = waiting_by_queue.get(queue_id, 0) + 1
    queues = await conn.fetch(BRANCH_QUEUES, branch_id)
    newcomer = state.newcomer_waits({s for q in queues for s in q["service_ids"]})
    out = []
    for q in queues:
        services = list(q["service_ids"])
        able = [c for c in state.counters if not c.services.isdisjoint(services)]
        waits = [w for s in services if (w := newcomer[s]) is not None]
        out.append(
            QueueStatus(
                id=q["id"],
                name=q["name"],
                prefix=q["prefix"],
                service_ids=services,
                waiting=waiting_by_queue.get(q["id"], 0),
                open_counters=len(able),
                estimated_wait=_eta(min(waits), locale) if waits else None,
            )
        )
    return out


async def list_queue_statuses(
    pool: asyncpg.Pool, branch_id: int, *, now: datetime, settings: Settings, locale: str
) -> list[QueueStatus]:
    async with pool.acquire() as conn:
        if not await conn.fetchval("SELECT active FROM branches WHERE id = $1", branch_id):
            raise NotFound()
        state = await branch_state(conn, branch_id, now, config_of(settings))
        return await queue_statuses(conn, state, branch_id, locale)


# --- tickets -----------------------------------------------------------------------

TICKET = """
SELECT t.*, b.timezone, q.prefix, r.name AS counter_name
FROM tickets t
JOIN branches b ON b.id = t.branch_id
JOIN queues q ON q.id = t.queue_id
LEFT JOIN resources r ON r.id = t.counter_id
WHERE t.id = $1
"""

NEXT_NUMBER = """
INSERT INTO queue_day_numbers (branch_id, prefix, local_date, last_number)
VALUES ($1, $2, $3, 1)
ON CONFLICT (branch_id, prefix, local_date)
DO UPDATE SET last_number = queue_day_numbers.last_number + 1
RETURNING last_number
"""

INSERT_TICKET = """
INSERT INTO tickets (branch_id, queue_id, service_id, local_date, number, display_code, kind,
                     booking_id, appointment_at, priority, channel, customer_id, phone,
                     issued_at, eta_s)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
RETURNING id
"""


async def ticket_row(conn: Conn, ticket_id: int, *, lock: bool = False) -> Record:
    row = await conn.fetchrow(TICKET + (" FOR UPDATE OF t" if lock else ""), ticket_id)
    if row is None:
        raise NotFound()
    return row


def ticket_out(row: Record, place: Place | None, locale: str) -> TicketOut:
    waiting = row["status"] == "waiting"
    return TicketOut(
        id=row["id"],
        display_code=row["display_code"],
        status=row["status"],
        kind=row["kind"],
        branch_id=row["branch_id"],
        queue_id=row["queue_id"],
        service_id=row["service_id"],
        priority=row["priority"],
        channel=row["channel"],
        issued_at=row["issued_at"],
        position=place.position if waiting and place else None,
        eta=_eta(place.wait_s, locale) if waiting and place else None,
        booking_id=row["booking_id"],
        counter_id=row["counter_id"],
        called_at=row["called_at"],
        recalls=row["recalls"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
    )


async def view_ticket(
    conn: Conn, ticket_id: int, now: datetime, config: call_policy.PolicyConfig, locale: str
) -> TicketOut:
    row = await ticket_row(conn, ticket_id)
    place = None
    if row["status"] == "waiting":
        place = places(await branch_state(conn, row["branch_id"], now, config)).get(row["id"])
    return ticket_out(row, place, locale)


def _require_in_branch(principal: Principal, branch_id: int) -> None:
    """Outside the caller's branches is answered as missing (404), never 403."""
    if not principal.in_scope(branch_id):
        raise NotFound()


def _may_see(principal: Principal, row: Record) -> None:
    """A customer sees their own tickets (others answer 404); kiosks and staff those of
    their branches."""
    if principal.kind == "customer":
        if row["customer_id"] != principal.id:
            raise NotFound()
        return
    if principal.role not in ("kiosk", *STAFF):
        raise NotFound()
    _require_in_branch(principal, row["branch_id"])


async def _contact(
    conn: Conn, principal: Principal, phone: str | None
) -> tuple[int | None, str | None]:
    if principal.kind == "customer":
        if phone is not None:
            raise InvalidInput.field(
                "phone", "only a kiosk or staff sends a phone; yours is on file"
            )
        found = await conn.fetchval("SELECT phone FROM customers WHERE id = $1", principal.id)
        return principal.id, found
    return None, normalise_phone(phone) if phone is not None else None


async def _issue(
    conn: Conn,
    *,
    queue: Record,
    service_id: int,
    now: datetime,
    config: call_policy.PolicyConfig,
    priority: int,
    channel: str,
    customer_id: int | None,
    phone: str | None,
    booking_id: int | None = None,
    appointment_at: datetime | None = None,
    enforce_closing: bool = True,
) -> int:
    """Number and insert a ticket; a walk-in is refused (409 `queue_closed`) when the
    branch is closed or its expected wait runs past closing time."""
    calendar = BranchCalendar(
        timezone=queue["timezone"],
        opening_hours=tuple(
            (int(h["weekday"]), _minute(h["opens"]), _minute(h["closes"]))
            for h in queue["opening_hours"]
        ),
        closures=frozenset(date.fromisoformat(c["date"]) for c in queue["closures"]),
    )
    closes = open_until(calendar, now)
    state = await branch_state(conn, queue["branch_id"], now, config)
    wait = wait_for_new(state, service_id, priority)
    if enforce_closing:
        if closes is None:
            raise Conflict(code="queue_closed", extra={"reason": "branch_closed"})
        if wait is not None and now + timedelta(seconds=wait) > closes:
            raise Conflict(
                code="queue_closed",
                extra={"reason": "wait_past_closing", "closes_at": closes.isoformat()},
            )
    day = local_date(now, queue["timezone"])
    number = await conn.fetchval(NEXT_NUMBER, queue["branch_id"], queue["prefix"], day)
    ticket_id: int = await conn.fetchval(
        INSERT_TICKET,
        queue["branch_id"],
        queue["id"],
        service_id,
        day,
        number,
        display_code(queue["prefix"], number),
        "appointment" if booking_id is not None else "walk_in",
        booking_id,
        appointment_at,
        priority,
        channel,
        customer_id,
        phone,
        now,
        round(wait) if wait is not None else None,
    )
    return ticket_id


def _minute(clock: str) -> int:
    hours, _, minutes = clock.partition(":")
    return int(hours) * 60 + int(minutes)


@dataclass
class Changed:
    """What a write answers with, and the branch whose live board changed."""

    ticket: TicketOut
    branch_id: int
    called: bool = False
    outbox: Outbox = field(default_factory=list)


async def issue_ticket(
    pool: asyncpg.Pool,
    principal: Principal,
    data: TicketCreate,
    *,
    idempotency_key: str | None,
    now: datetime,
    settings: Settings,
    locale: str,
    redis: Any = None,
) -> tuple[TicketOut, int, bool]:
    """Returns (ticket, branch id, replayed).

    Abuse limits (`limits.py`): open tickets per customer or walk-in phone, counted
    after the insert under a per-owner advisory lock; a phone typed by a kiosk or staff counts against
    the SMS limits (429 `sms_limit_reached`) before the ticket commits."""
    config = config_of(settings)
    quotas = quotas_of(settings)
    if principal.kind == "customer" and data.priority:
        raise InvalidInput.field("priority", "priority classes are granted at the kiosk or desk")

    async def work(conn: Conn) -> tuple[TicketOut, int]:
        queue = await conn.fetchrow(QUEUE, data.queue_id)
        if queue is None or not queue["active"] or not queue["branch_active"]:
            raise NotFound()
        if principal.kind != "customer":
            _require_in_branch(principal, queue["branch_id"])
        services = list(queue["service_ids"])
        service_id = data.service_id if data.service_id is not None else services[0]
        if service_id not in services:
            raise InvalidInput.field("service_id", "not a service of this queue")
        customer_id, phone = await _contact(conn, principal, data.phone)
        ticket_id = await _issue(
            conn,
            queue=queue,
            service_id=service_id,
            now=now,
            config=config,
            priority=data.priority,
            channel=principal.channel,
            customer_id=customer_id,
            phone=phone,
        )
        await limits.check_tickets(conn, limits.owner_of(principal, phone), quotas.open_tickets)
        await limits.count_text(redis, quotas, principal, phone, now)
        return await view_ticket(conn, ticket_id, now, config, locale), queue["branch_id"]

    async def run(fn: Any) -> tuple[TicketOut, int]:
        result: tuple[TicketOut, int] = await db.in_transaction_with_retry(pool, fn)
        return result

    out, branch_id, replayed = await idempotency.once(
        pool,
        subject=principal.subject,
        key=idempotency_key,
        operation="createTicket",
        data=data,
        out_type=TicketOut,
        work=work,
        run=run,
        on_replay=0,
    )
    return out, branch_id or out.branch_id, replayed


async def get_ticket(
    pool: asyncpg.Pool,
    principal: Principal,
    ticket_id: int,
    *,
    now: datetime,
    settings: Settings,
    locale: str,
) -> TicketOut:
    async with pool.acquire() as conn:
        row = await ticket_row(conn, ticket_id)
        _may_see(principal, row)
        return await view_ticket(conn, ticket_id, now, config_of(settings), locale)


async def cancel_ticket(
    pool: asyncpg.Pool,
    principal: Principal,
    ticket_id: int,
    *,
    now: datetime,
    settings: Settings,
    locale: str,
) -> Changed:
    """The customer leaves the queue (or a kiosk / staff member takes them off it)."""

    async def tx(conn: Conn) -> Changed:
        row = await ticket_row(conn, ticket_id, lock=True)
        _may_see(principal, row)
        if row["status"] not in ("waiting", "called"):
            raise Conflict(code="ticket_not_active")
        await conn.execute(
            "UPDATE tickets SET status = 'cancelled', ended_at = $2, updated_at = now() "
            "WHERE id = $1",
            ticket_id,
            now,
        )
        out = await view_ticket(conn, ticket_id, now, config_of(settings), locale)
        return Changed(out, row["branch_id"])

    return await db.in_transaction_with_retry(pool, tx)


# --- check-in ----------------------------------------------------------------------

BOOKING_FOR_CHECK_IN = """
SELECT bk.id, bk.branch_id, bk.service_id, bk.status, bk.starts_at, bk.customer_id,
       bk.phone, bk.checked_in_at
FROM bookings bk
"""

QUEUE_FOR_SERVICE = """
SELECT q.id FROM queues q JOIN queue_services s ON s.queue_id = q.id
WHERE q.branch_id = $1 AND s.service_id = $2 AND q.active
ORDER BY q.id LIMIT 1
"""


async def check_in(
    pool: asyncpg.Pool,
    principal: Principal,
    data: CheckIn,
    *,
    now: datetime,
    settings: Settings,
    locale: str,
) -> Changed:
    """A booking joins its branch queue as an appointment ticket, inside its window."""
    if (data.code is None) == (data.booking_id is None):
        raise InvalidInput.field("code", "send exactly one of code and booking_id")
    config = config_of(settings)

    async def tx(conn: Conn) -> Changed:
        if data.code is not None:
            code = data.code.strip().upper()
            booking = await conn.fetchrow(
                BOOKING_FOR_CHECK_IN
                + " WHERE bk.code = $1 AND bk.status IN ('pending_payment', 'confirmed')"
                " FOR UPDATE",
                code,
            )
        else:
            booking = await conn.fetchrow(
                BOOKING_FOR_CHECK_IN + " WHERE bk.id = $1 FOR UPDATE", data.booking_id
            )
        if booking is None:
            raise NotFound()
        if principal.kind == "customer":
            if booking["customer_id"] != principal.id:
                raise NotFound()
        elif not principal.in_scope(booking["branch_id"]):
            raise NotFound()  # a kiosk of another branch: as if the code did not exist
        if booking["checked_in_at"] is not None:
            raise Conflict(code="already_checked_in")
        if booking["status"] == "pending_payment":
            raise Conflict(code="payment_required")
        if booking["status"] != "confirmed":
            raise Conflict(code="booking_not_active")
        opens = booking["starts_at"] - timedelta(minutes=settings.check_in_early_min)
        closes = booking["starts_at"] + timedelta(minutes=settings.check_in_late_min)
        if not opens <= now <= closes:
            raise Conflict(
                code="check_in_too_early" if now < opens else "check_in_too_late",
                extra={
                    "window_opens_at": opens.isoformat(),
                    "window_closes_at": closes.isoformat(),
                },
            )
        queue_id = await conn.fetchval(
            QUEUE_FOR_SERVICE, booking["branch_id"], booking["service_id"]
        )
        if queue_id is None:
            raise Conflict(code="no_queue_for_service")
        queue = await conn.fetchrow(QUEUE, queue_id)
        assert queue is not None
        ticket_id = await _issue(
            conn,
            queue=queue,
            service_id=booking["service_id"],
            now=now,
            config=config,
            priority=0,
            channel=principal.channel,
            customer_id=booking["customer_id"],
            phone=booking["phone"],
            booking_id=booking["id"],
            appointment_at=booking["starts_at"],
            enforce_closing=False,  # the booking was accepted for this time
        )
        await conn.execute(
            "UPDATE bookings SET checked_in_at = $2, updated_at = now() WHERE id = $1",
            booking["id"],
            now,
        )
        out = await view_ticket(conn, ticket_id, now, config, locale)
        return Changed(out, booking["branch_id"])

    return await db.in_transaction_with_retry(pool, tx)


# --- counters ----------------------------------------------------------------------

COUNTER = """
SELECT r.id, r.branch_id, r.name, r.kind, r.active, coalesce(c.open, false) AS open,
       ARRAY(SELECT service_id FROM resource_skills k WHERE k.resource_id = r.id
             ORDER BY service_id) AS services
FROM resources r LEFT JOIN counter_states c ON c.resource_id = r.id
WHERE r.id = $1
"""


async def _counter(conn: Conn, principal: Principal, counter_id: int) -> Record:
    row = await conn.fetchrow(COUNTER, counter_id)
    if row is None or row["kind"] != "counter" or not row["active"]:
        raise NotFound()
    _require_in_branch(principal, row["branch_id"])
    return row


def counter_out(row: Record, is_open: bool) -> CounterOut:
    return CounterOut(
        id=row["id"],
        branch_id=row["branch_id"],
        name=row["name"],
        open=is_open,
        service_ids=list(row["services"]),
    )


async def set_counter_open(
    pool: asyncpg.Pool, principal: Principal, counter_id: int, is_open: bool, *, now: datetime
) -> tuple[CounterOut, int]:
    async def tx(conn: Conn) -> tuple[CounterOut, int]:
        row = await _counter(conn, principal, counter_id)
        await conn.execute(
            """
            INSERT INTO counter_states (resource_id, branch_id, open, opened_at, opened_by)
            VALUES ($1, $2, $3, CASE WHEN $3 THEN $4::timestamptz END,
                    CASE WHEN $3 THEN $5::bigint END)
            ON CONFLICT (resource_id) DO UPDATE
            SET open = $3, updated_at = now(),
                opened_at = CASE WHEN $3 THEN $4::timestamptz ELSE counter_states.opened_at END,
                opened_by = CASE WHEN $3 THEN $5::bigint ELSE counter_states.opened_by END
            """,
            counter_id,
            row["branch_id"],
            is_open,
            now,
            principal.id if principal.kind == "staff" else None,
        )
        return counter_out(row, is_open), row["branch_id"]

    return await db.in_transaction_with_retry(pool, tx)


def call_next_sql() -> str:
    order = call_policy.sql_order_by("$3", "$4")
    return f"""
UPDATE tickets SET status = 'called', counter_id = $5, called_at = $6, calls = calls + 1,
    updated_at = now()
WHERE id = (
    SELECT id FROM tickets
    WHERE branch_id = $1 AND status = 'waiting' AND service_id = ANY($2::bigint[])
    ORDER BY {order}
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
RETURNING id
"""


CALL_NEXT = call_next_sql()


async def call_next(
    pool: asyncpg.Pool,
    principal: Principal,
    counter_id: int,
    *,
    now: datetime,
    settings: Settings,
    locale: str,
) -> Changed:
    """The counter's next ticket by the policy (`policy.py`), among the services its
    staff can serve; 409 `counter_closed`, `counter_busy` (a ticket is still called or
    being served there) or `no_ticket_waiting`."""
    config = config_of(settings)

    async def tx(conn: Conn) -> Changed:
        counter = await _counter(conn, principal, counter_id)
        # Serialise calls of one counter (double clicks); other counters run in parallel.
        await conn.execute(
            "SELECT 1 FROM counter_states WHERE resource_id = $1 FOR UPDATE", counter_id
        )
        if not counter["open"]:
            raise Conflict(code="counter_closed")
        busy = await conn.fetchval(
            "SELECT display_code FROM tickets WHERE counter_id = $1 "
            "AND status IN ('called', 'serving') LIMIT 1",
            counter_id,
        )
        if busy is not None:
            raise Conflict(code="counter_busy", extra={"ticket": busy})
        aged, due = call_policy.cutoffs(now, config)
        ticket_id = await conn.fetchval(
            CALL_NEXT, counter["branch_id"], list(counter["services"]), aged, due, counter_id, now
        )
        if ticket_id is None:
            raise Conflict(code="no_ticket_waiting")
        row = await ticket_row(conn, ticket_id)
        outbox: Outbox = []
        await _text_called(conn, row, counter["name"], now, settings, outbox)
        log.info("ticket_called", ticket_id=ticket_id, counter_id=counter_id)
        return Changed(ticket_out(row, None, locale), row["branch_id"], called=True, outbox=outbox)

    return await db.in_transaction_with_retry(pool, tx)


# --- a called ticket's life ---------------------------------------------------------

Action = Literal["recall", "start", "finish", "no_show"]


async def act(
    pool: asyncpg.Pool,
    principal: Principal,
    ticket_id: int,
    action: Action,
    *,
    now: datetime,
    settings: Settings,
    locale: str,
) -> Changed:
    """recall (called: announce again), start (called -> serving), finish (serving ->
    done; updates the service's EWMA and schedules the survey), no_show (called, after
    `SELFSERVE_RECALLS_BEFORE_NO_SHOW` recalls)."""

    async def tx(conn: Conn) -> Changed:
        row = await ticket_row(conn, ticket_id, lock=True)
        if principal.role not in STAFF:
            raise Forbidden()
        _require_in_branch(principal, row["branch_id"])
        status = row["status"]
        outbox: Outbox = []
        called = False
        if action == "recall":
            _expect(status, "called")
            await conn.execute(
                "UPDATE tickets SET recalls = recalls + 1, calls = calls + 1, called_at = $2, "
                "updated_at = now() WHERE id = $1",
                ticket_id,
                now,
            )
            called = True
            await _text_called(conn, row, row["counter_name"], now, settings, outbox)
        elif action == "start":
            _expect(status, "called")
            await conn.execute(
                "UPDATE tickets SET status = 'serving', started_at = $2, updated_at = now() "
                "WHERE id = $1",
                ticket_id,
                now,
            )
        elif action == "finish":
            _expect(status, "serving")
            await conn.execute(
                "UPDATE tickets SET status = 'done', finished_at = $2, ended_at = $2, "
                "updated_at = now() WHERE id = $1",
                ticket_id,
                now,
            )
            await _learn_service_time(conn, row, now)
            await _schedule_survey(conn, row, now, settings, outbox)
            if row["booking_id"] is not None:
                await conn.execute(
                    "UPDATE bookings SET status = 'completed', updated_at = now() "
                    "WHERE id = $1 AND status = 'confirmed'",
                    row["booking_id"],
                )
        else:
            _expect(status, "called")
            needed = settings.recalls_before_no_show
            if row["recalls"] < needed:
                raise Conflict(
                    code="recall_first", extra={"recalls": row["recalls"], "needed": needed}
                )
            await conn.execute(
                "UPDATE tickets SET status = 'no_show', ended_at = $2, updated_at = now() "
                "WHERE id = $1",
                ticket_id,
                now,
            )
        out = await view_ticket(conn, ticket_id, now, config_of(settings), locale)
        return Changed(out, row["branch_id"], called=called, outbox=outbox)

    return await db.in_transaction_with_retry(pool, tx)


def _expect(status: str, wanted: str) -> None:
    if status != wanted:
        raise Conflict(code="ticket_state", extra={"status": status, "expected": wanted})


async def transfer(
    pool: asyncpg.Pool,
    principal: Principal,
    ticket_id: int,
    data: Transfer,
    *,
    now: datetime,
    settings: Settings,
    locale: str,
) -> Changed:
    """Move a waiting or called ticket to another queue of the branch; it keeps its
    issue time (its place) and its display code, and waits again."""

    async def tx(conn: Conn) -> Changed:
        row = await ticket_row(conn, ticket_id, lock=True)
        if principal.role not in STAFF:
            raise Forbidden()
        _require_in_branch(principal, row["branch_id"])
        if row["status"] not in ("waiting", "called"):
            raise Conflict(code="ticket_not_active")
        queue = await conn.fetchrow(QUEUE, data.queue_id)
        if queue is None or not queue["active"] or queue["branch_id"] != row["branch_id"]:
            raise InvalidInput.field("queue_id", "not an active queue of this ticket's branch")
        services = list(queue["service_ids"])
        service_id = data.service_id if data.service_id is not None else services[0]
        if service_id not in services:
            raise InvalidInput.field("service_id", "not a service of that queue")
        await conn.execute(
            "UPDATE tickets SET queue_id = $2, service_id = $3, status = 'waiting', "
            "counter_id = NULL, called_at = NULL, recalls = 0, updated_at = now() WHERE id = $1",
            ticket_id,
            data.queue_id,
            service_id,
        )
        # A "go to counter" text not yet out names a counter the ticket has left.
        await cancel_messages(conn, _call_texts(ticket_id))
        out = await view_ticket(conn, ticket_id, now, config_of(settings), locale)
        return Changed(out, row["branch_id"])

    return await db.in_transaction_with_retry(pool, tx)


# --- learning, texting ---------------------------------------------------------------

EWMA_ALPHA = 0.1


async def _learn_service_time(conn: Conn, row: Record, now: datetime) -> None:
    if row["started_at"] is None:
        return
    observed = (now - row["started_at"]).total_seconds()
    if observed <= 0:
        return
    seed = await conn.fetchval(
        "SELECT duration_min * 60.0 FROM services WHERE id = $1", row["service_id"]
    )
    previous = await conn.fetchval(
        "SELECT ewma_s FROM service_time_stats WHERE service_id = $1 FOR UPDATE",
        row["service_id"],
    )
    value = eta_model.update_ewma(previous, observed, float(seed), EWMA_ALPHA)
    await conn.execute(
        """
        INSERT INTO service_time_stats (service_id, ewma_s, samples) VALUES ($1, $2, 1)
        ON CONFLICT (service_id) DO UPDATE
        SET ewma_s = $2, samples = service_time_stats.samples + 1, updated_at = now()
        """,
        row["service_id"],
        value,
    )


async def _locale_of(conn: Conn, row: Record) -> str:
    if row["customer_id"] is not None:
        found = await conn.fetchval(
            "SELECT locale FROM customers WHERE id = $1", row["customer_id"]
        )
        return pick_locale(found)
    if row["phone"] is not None:
        found = await conn.fetchval("SELECT locale FROM customers WHERE phone = $1", row["phone"])
        return pick_locale(found) if found else DEFAULT_LOCALE
    return DEFAULT_LOCALE


# The phone's language, for texts written outside this module (the sweeps).
locale_of = _locale_of


def _call_texts(ticket_id: int) -> str:
    """The dedupe-key prefix of a ticket's call texts: one key per call, numbered by
    `tickets.calls`, which counts every call and recall and never goes back (a
    transfer resets `recalls`, not `calls`), so each call is texted exactly once."""
    return f"ticket:{ticket_id}:call:"


async def _text_called(
    conn: Conn,
    row: Record,
    counter_name: str | None,
    now: datetime,
    settings: Settings,
    outbox: Outbox,
) -> None:
    if row["phone"] is None:
        return
    # Read after this call's UPDATE (the row passed in may predate it).
    call = await conn.fetchval("SELECT calls FROM tickets WHERE id = $1", row["id"])
    await _text_ticket(
        conn,
        row,
        "ticket_called",
        {"ticket": row["display_code"], "counter": counter_name or ""},
        f"{_call_texts(row['id'])}{call}",
        now,
        outbox,
        expires_at=now + timedelta(minutes=settings.queue_text_ttl_min),
    )


async def _text_ticket(
    conn: Conn,
    row: Record,
    template: str,
    params: dict[str, object],
    dedupe_key: str,
    now: datetime,
    outbox: Outbox,
    *,
    expires_at: datetime,
) -> None:
    """A time-critical text to the ticket's phone now, through the outbox; dropped
    unsent (recorded 'expired') if it has not gone out by `expires_at`."""
    message_id = await queue_template(
        conn,
        template,
        await _locale_of(conn, row),
        params,
        phone=row["phone"],
        send_at=now,
        dedupe_key=dedupe_key,
        branch_id=row["branch_id"],
        customer_id=row["customer_id"],
        time_critical=True,
        expires_at=expires_at,
    )
    outbox.append((message_id, now))


def _turn_near_sql() -> str:
    order = call_policy.sql_order_by("$3", "$4")
    return f"""
WITH placed AS (
    SELECT id, phone, turn_near_sent,
           row_number() OVER (PARTITION BY queue_id ORDER BY {order}) - 1 AS ahead
    FROM tickets
    WHERE branch_id = $1 AND status = 'waiting'
),
due AS (
    SELECT t.id, placed.ahead FROM tickets t JOIN placed ON placed.id = t.id
    WHERE placed.ahead < $2 AND placed.phone IS NOT NULL AND NOT placed.turn_near_sent
    ORDER BY t.id
    FOR UPDATE OF t SKIP LOCKED
)
UPDATE tickets t SET turn_near_sent = true
FROM due WHERE t.id = due.id AND NOT t.turn_near_sent AND t.status = 'waiting'
RETURNING t.id, t.display_code, t.phone, t.branch_id, t.customer_id, due.ahead
"""


TURN_NEAR = _turn_near_sql()


async def text_turn_near(
    pool: asyncpg.Pool, redis: Any, branch_id: int, *, now: datetime, settings: Settings
) -> int:
    """After a change committed (a call, someone leaving or moved): tickets with a
    phone whose place is now within `turn_near_position` hear so, once. Returns how
    many were texted.

    It runs after the change's commit, in a transaction of its own, so it sees every
    committed change (inside the change's transaction, concurrent calls would each
    still see the others' tickets waiting). Places come from the policy order in
    SQL; rows are locked in id order and a row another check holds is skipped (that
    one texts it): concurrent checks neither deadlock nor text twice."""
    near = settings.turn_near_position
    if near <= 0:
        return 0
    aged, due = call_policy.cutoffs(now, config_of(settings))

    async def tx(conn: Conn) -> Outbox:
        outbox: Outbox = []
        await _text_near(conn, branch_id, near, aged, due, now, settings, outbox)
        return outbox

    outbox = await db.in_transaction_with_retry(pool, tx)
    await enqueue(redis, outbox)
    return len(outbox)


async def _text_near(
    conn: Conn,
    branch_id: int,
    near: int,
    aged: datetime,
    due: datetime,
    now: datetime,
    settings: Settings,
    outbox: Outbox,
) -> None:
    expires_at = now + timedelta(minutes=settings.queue_text_ttl_min)
    for r in await conn.fetch(TURN_NEAR, branch_id, near, aged, due):
        ahead = r["ahead"]
        await _text_ticket(
            conn,
            r,
            "turn_near" if ahead else "turn_near_next",
            {"ticket": r["display_code"], "ahead": ahead}
            if ahead
            else {"ticket": r["display_code"]},
            f"ticket:{r['id']}:turn_near",
            now,
            outbox,
            expires_at=expires_at,
        )


async def _schedule_survey(
    conn: Conn, row: Record, now: datetime, settings: Settings, outbox: Outbox
) -> None:
    """One survey per phone per branch-local day, `survey_delay_min` after the visit."""
    if row["phone"] is None:
        return
    day = local_date(now, row["timezone"])
    send_at = now + timedelta(minutes=settings.survey_delay_min)
    survey_id = await conn.fetchval(
        """
        INSERT INTO surveys (ticket_id, branch_id, counter_id, phone, local_date, send_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (phone, local_date) DO NOTHING
        RETURNING id
        """,
        row["id"],
        row["branch_id"],
        row["counter_id"],
        row["phone"],
        day,
        send_at,
    )
    if survey_id is None:
        return
    branch = await conn.fetchval("SELECT name FROM branches WHERE id = $1", row["branch_id"])
    message_id = await queue_template(
        conn,
        "survey",
        await _locale_of(conn, row),
        {"branch": branch},
        phone=row["phone"],
        send_at=send_at,
        dedupe_key=f"survey:{survey_id}",
        branch_id=row["branch_id"],
        customer_id=row["customer_id"],
    )
    await conn.execute("UPDATE surveys SET message_id = $2 WHERE id = $1", survey_id, message_id)
    outbox.append((message_id, send_at))


async def enqueue(redis: Any, outbox: Outbox) -> None:
    if redis is None:
        return
    for message_id, send_at in outbox:
        await enqueue_after_commit(redis, [message_id], send_at)


# --- SMS: STATUS and survey ratings ---------------------------------------------------


async def sms_status(conn: Conn, sms: inbound.InboundSms) -> str | None:
    """'STATUS' / '查询': the phone's live ticket with its place and wait."""
    row = await conn.fetchrow(
        "SELECT id FROM tickets WHERE phone = $1 AND status IN ('waiting', 'called', 'serving') "
        "ORDER BY issued_at DESC LIMIT 1",
        sms.phone,
    )
    if row is None:
        return render("queue_status_none_reply", sms.locale).body
    now = utcnow()
    ticket = await view_ticket(conn, row["id"], now, config_of(sms.settings), sms.locale)
    if ticket.status != "waiting":
        counter = await conn.fetchval("SELECT name FROM resources WHERE id = $1", ticket.counter_id)
        return render(
            "ticket_called", sms.locale, ticket=ticket.display_code, counter=counter or ""
        ).body
    # a plain hyphen keeps an English text in the cheaper GSM-7 encoding
    eta = ticket.eta.text.replace("\u2013", "-") if ticket.eta else "?"
    ahead = (ticket.position or 1) - 1
    if not ahead:
        return render(
            "queue_status_next_reply", sms.locale, ticket=ticket.display_code, eta=eta
        ).body
    return render(
        "queue_status_reply", sms.locale, ticket=ticket.display_code, ahead=ahead, eta=eta
    ).body


async def sms_rating(conn: Conn, sms: inbound.InboundSms) -> str | None:
    """'1'-'5' answers the phone's latest unanswered survey (sent in the last 2 days)."""
    assert sms.classified.rating is not None
    now = utcnow()
    survey = await conn.fetchval(
        """
        UPDATE surveys SET rating = $2, answered_at = $3
        WHERE id = (
            SELECT id FROM surveys
            WHERE phone = $1 AND rating IS NULL AND send_at <= $3
              AND send_at > $3 - interval '2 days'
            ORDER BY send_at DESC LIMIT 1
            FOR UPDATE
        )
        RETURNING id
        """,
        sms.phone,
        sms.classified.rating,
        now,
    )
    if survey is None:
        return None
    log.info("survey_answered", survey_id=survey, rating=sms.classified.rating)
    return render("survey_thanks_reply", sms.locale).body


inbound.register("status", sms_status)
inbound.register("rating", sms_rating)


# --- the live board -----------------------------------------------------------------

RECENT_CALLS = """
SELECT t.id, t.display_code, t.status, t.counter_id, r.name AS counter_name, t.called_at,
       t.recalls
FROM tickets t JOIN resources r ON r.id = t.counter_id
WHERE t.branch_id = $1 AND t.status IN ('called', 'serving')
ORDER BY t.called_at DESC
LIMIT 20
"""


async def board_snapshot(
    conn: Conn, branch_id: int, now: datetime, settings: Settings, locale: str = DEFAULT_LOCALE
) -> dict[str, Any]:
    """What a display board shows, and every waiting ticket's place: one JSON-able
    document (`type: board`), published on each change of the branch."""
    state = await branch_state(conn, branch_id, now, config_of(settings))
    queues = await queue_statuses(conn, state, branch_id, locale)
    placed = places(state)
    calls = await conn.fetch(RECENT_CALLS, branch_id)
    return {
        "type": "board",
        "branch_id": branch_id,
        "at": now.isoformat(),
        "calls": [
            {
                "ticket_id": c["id"],
                "display_code": c["display_code"],
                "status": c["status"],
                "counter_id": c["counter_id"],
                "counter": c["counter_name"],
                "called_at": c["called_at"].isoformat(),
                "recalls": c["recalls"],
            }
            for c in calls
        ],
        "queues": [
            {
                "id": q.id,
                "name": q.name,
                "prefix": q.prefix,
                "waiting": q.waiting,
                "open_counters": q.open_counters,
                "estimated_wait": None
                if q.estimated_wait is None
                else {
                    "low_min": q.estimated_wait.low_min,
                    "high_min": q.estimated_wait.high_min,
                    "text": q.estimated_wait.text,
                },
            }
            for q in queues
        ],
        "tickets": {
            str(tid): {
                "position": p.position,
                "eta": None
                if p.wait_s is None
                else dict(zip(("low_min", "high_min"), eta_model.eta_band(p.wait_s), strict=True)),
            }
            for tid, p in placed.items()
        },
    }
