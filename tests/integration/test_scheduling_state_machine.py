"""A hypothesis state machine over the capacity ledger and the availability engine.

One branch (Asia/Shanghai, open 09:00-12:00 on one Tuesday), two services with
different durations, buffers, slot intervals and lead times, and four resources of
three kinds: two counters (one on a shorter shift) under a 30% walk-in reserve, a
room and one member of staff on a late shift. A controlled clock starts at 08:30.

Rules call the real ledger against real PostgreSQL, each in its own transaction:
hold, book (on a chosen resource, or on the one `pick_resource` picks from the
engine's slot), convert a hold, reschedule, cancel, move the clock, and move the
clock and sweep expired holds. The machine keeps its own model of the live
commitments (holds not released, bookings not cancelled) and predicts every
outcome: success, or `SlotFull` / `HoldExpired` / `BookingNotActive`.

After every step:

1. the live commitments stored in the database are exactly the model's;
2. for every service, party size and candidate start, `available_slots` (fed with
   those stored commitments) offers exactly the slots the model offers, with the
   model's `remaining` (capacity minus live commitments, walk-in reserve applied)
   and free seats per resource;
3. `ledger.overbooked` is empty;

and after every refused operation (the refusal is caught inside the transaction,
which then commits) the ledger and the hold and booking rows are unchanged.

Every duration, buffer, interval and shift boundary is a multiple of 5 minutes, so
the ledger's 5-minute units lose nothing and the model can count in units.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import math
import time
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from fractions import Fraction
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import asyncpg
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    invariant,
    multiple,
    rule,
    run_state_machine_as_test,
)

from selfserve import db
from selfserve.errors import BookingNotActive, DomainError, HoldExpired, SlotFull
from selfserve.scheduling import ledger
from selfserve.scheduling.availability import (
    BranchCalendar,
    Commitment,
    ResourceSchedule,
    ServiceRules,
    Slot,
    available_slots,
    pick_resource,
)
from tests.conftest import ModuleEnv

T = TypeVar("T")

TZ = "Asia/Shanghai"
DAY = date(2030, 3, 5)  # a Tuesday
WEEKDAY = DAY.isoweekday()
OPENS, CLOSES = 9 * 60, 12 * 60
RESERVE = "0.3"
UNIT_MIN = 5
_names = itertools.count(1)


@functools.cache
def local(minute: int) -> datetime:
    """The UTC instant of `minute` past midnight of DAY, branch time (no DST in Shanghai)."""
    wall = datetime(DAY.year, DAY.month, DAY.day, tzinfo=ZoneInfo(TZ))
    return (wall + timedelta(minutes=minute)).astimezone(UTC)


START_CLOCK = local(8 * 60 + 30)
WINDOW = (local(0), local(24 * 60))


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    duration: int
    before: int
    after: int
    interval: int
    lead: int
    max_party: int


@dataclass(frozen=True)
class ResourceSpec:
    name: str
    kind: str
    capacity: int
    shift: tuple[int, int]  # branch minutes
    skills: tuple[str, ...]


SERVICES = (
    ServiceSpec("A", duration=20, before=0, after=5, interval=15, lead=0, max_party=2),
    ServiceSpec("B", duration=30, before=5, after=10, interval=30, lead=30, max_party=3),
)
RESOURCES = (
    ResourceSpec("counter-1", "counter", 3, (8 * 60, 14 * 60), ("A", "B")),
    ResourceSpec("counter-2", "counter", 2, (9 * 60, 11 * 60 + 30), ("A",)),
    ResourceSpec("room", "room", 4, (8 * 60, 14 * 60), ("B",)),
    ResourceSpec("staff", "staff", 1, (9 * 60 + 30, 12 * 60), ("A", "B")),
)


@dataclass
class Catalogue:
    """The rows created once per test; every example starts from empty scheduling tables."""

    branch_id: int
    service_ids: dict[str, int]
    resource_ids: dict[str, int]

    def skilled(self, service: str) -> list[ResourceSpec]:
        return [r for r in RESOURCES if service in r.skills]

    def rid(self, spec: ResourceSpec) -> int:
        return self.resource_ids[spec.name]

    def candidates(self, service: ServiceSpec) -> list[datetime]:
        """Every wall start the opening window yields (some end after closing)."""
        return [local(m) for m in range(OPENS, CLOSES, service.interval)]


class Env:
    """One private event loop and pool: hypothesis drives the machine synchronously."""

    def __init__(self, database_url: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.outcomes: Counter[str] = Counter()
        self.pool: asyncpg.Pool = self.run(db.create_pool(database_url, min_size=1, max_size=2))

    def run(self, aw: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await aw

        return self.loop.run_until_complete(wrap())

    def close(self) -> None:
        try:
            self.run(self.pool.close())
        finally:
            self.loop.close()


async def seed(pool: asyncpg.Pool) -> Catalogue:
    n = next(_names)
    async with pool.acquire() as conn, conn.transaction():
        branch_id = await conn.fetchval(
            "INSERT INTO branches (name, timezone, opening_hours, walk_in_reserve) "
            "VALUES ($1, $2, $3, $4::numeric) RETURNING id",
            f"State machine branch {n}",
            TZ,
            [{"weekday": WEEKDAY, "opens": OPENS, "closes": CLOSES}],
            RESERVE,
        )
        service_ids = {}
        for s in SERVICES:
            service_ids[s.name] = await conn.fetchval(
                "INSERT INTO services (branch_id, name, duration_min, buffer_before_min, "
                "buffer_after_min, slot_interval_min, lead_time_min, min_party, max_party) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8) RETURNING id",
                branch_id,
                f"Service {s.name} {n}",
                s.duration,
                s.before,
                s.after,
                s.interval,
                s.lead,
                s.max_party,
            )
        resource_ids = {}
        for r in RESOURCES:  # inserted in order, so ids ascend in RESOURCES order
            rid = await conn.fetchval(
                "INSERT INTO resources (branch_id, kind, name, capacity) "
                "VALUES ($1, $2, $3, $4) RETURNING id",
                branch_id,
                r.kind,
                f"{r.name} {n}",
                r.capacity,
            )
            resource_ids[r.name] = rid
            # The shift the engine is given, stored too: the ledger reads it to hold
            # the walk-in reserve.
            await conn.execute(
                "INSERT INTO schedules (resource_id, kind, weekday, start_minute, end_minute) "
                "VALUES ($1, 'shift', $2, $3, $4)",
                rid,
                WEEKDAY,
                *r.shift,
            )
            for skill in r.skills:
                await conn.execute(
                    "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)",
                    rid,
                    service_ids[skill],
                )
    return Catalogue(branch_id, service_ids, resource_ids)


# --- the model -------------------------------------------------------------------


@functools.cache
def unit(t: datetime) -> int:
    minutes, rest = divmod(int((t - datetime(1970, 1, 1, tzinfo=UTC)).total_seconds()), 60)
    assert rest == 0, "the fixture keeps everything on whole minutes"
    assert minutes % UNIT_MIN == 0, "the fixture keeps everything on 5-minute units"
    return minutes // UNIT_MIN


def units(lo: datetime, hi: datetime) -> range:
    return range(unit(lo), unit(hi))


@dataclass
class Held:
    """A hold or a booking as the model sees it."""

    id: int
    service: str
    resource_id: int
    start: datetime
    lo: datetime  # occupied span, buffers included
    hi: datetime
    party: int
    live: bool = True
    expires_at: datetime | None = None  # holds only


@dataclass
class Model:
    cat: Catalogue
    now: datetime = START_CLOCK
    holds: dict[int, Held] = field(default_factory=dict)
    bookings: dict[int, Held] = field(default_factory=dict)

    def live(self) -> list[Held]:
        return [c for c in [*self.holds.values(), *self.bookings.values()] if c.live]

    def usage(self) -> dict[tuple[int, int], int]:
        used: dict[tuple[int, int], int] = defaultdict(int)
        for c in self.live():
            for u in units(c.lo, c.hi):
                used[c.resource_id, u] += c.party
        return used

    def capacity(self, resource_id: int) -> int:
        return next(r.capacity for r in RESOURCES if self.cat.rid(r) == resource_id)

    def fits(self, deltas: dict[tuple[int, int], int], service: str, taker: int) -> bool:
        """What the ledger must answer: every growing unit stays within capacity, and
        when a counter takes seats, the counters offering the service hold at most
        floor(C * (1 - reserve)) seats at once over every unit where one of them grows
        (C: the capacity of those on shift over the unit)."""
        used = self.usage()
        if not all(used[k] + d <= self.capacity(k[0]) for k, d in deltas.items() if d > 0):
            return False
        if next(r for r in RESOURCES if self.cat.rid(r) == taker).kind != "counter":
            return True
        counters = [self.cat.rid(r) for r in self.cat.skilled(service) if r.kind == "counter"]
        share = 1 - Fraction(RESERVE)
        for u in sorted({u for (rid, u), d in deltas.items() if d > 0 and rid in counters}):
            net = sum(deltas.get((rid, u), 0) for rid in counters)
            if net <= 0:
                continue
            on = sum(
                r.capacity
                for r in self.cat.skilled(service)
                if r.kind == "counter"
                and unit(local(r.shift[0])) <= u
                and u + 1 <= unit(local(r.shift[1]))
            )
            if sum(used[rid, u] for rid in counters) + net > math.floor(on * share):
                return False
        return True

    @staticmethod
    def span(service: ServiceSpec, start: datetime) -> tuple[datetime, datetime]:
        end = start + timedelta(minutes=service.duration)
        return start - timedelta(minutes=service.before), end + timedelta(minutes=service.after)

    def take(self, service: str, resource_id: int, lo: datetime, hi: datetime, party: int) -> bool:
        return self.fits({(resource_id, u): party for u in units(lo, hi)}, service, resource_id)

    def offer(
        self,
        service: ServiceSpec,
        start: datetime,
        party: int,
        used: dict[tuple[int, int], int] | None = None,
    ) -> tuple[int, tuple[tuple[int, int], ...]] | None:
        """(remaining, free seats by resource) for a slot the engine must offer, else None."""
        end = start + timedelta(minutes=service.duration)
        if start < self.now + timedelta(minutes=service.lead):
            return None
        if not (local(OPENS) <= start and end <= local(CLOSES)):
            return None
        lo, hi = self.span(service, start)
        span = units(lo, hi)
        used = self.usage() if used is None else used
        skilled = self.cat.skilled(service.name)
        counters = [r for r in skilled if r.kind == "counter"]
        share = 1 - Fraction(RESERVE)

        def on_shift(r: ResourceSpec, a: int, b: int) -> bool:
            return unit(local(r.shift[0])) <= a and b <= unit(local(r.shift[1]))

        pool = max(
            0,
            min(
                math.floor(sum(r.capacity for r in counters if on_shift(r, u, u + 1)) * share)
                - sum(used[self.cat.rid(r), u] for r in counters)
                for u in span
            ),
        )
        counter_free = other_free = 0
        by_resource = []
        for r in sorted(skilled, key=self.cat.rid):
            if not on_shift(r, span.start, span.stop):
                continue
            free = max(0, r.capacity - max(used[self.cat.rid(r), u] for u in span))
            if r.kind == "counter":
                counter_free += free
                effective = min(free, pool)
            else:
                other_free += free
                effective = free
            if effective > 0:
                by_resource.append((self.cat.rid(r), effective))
        if not any(free >= party for _, free in by_resource):
            return None
        return other_free + min(counter_free, pool), tuple(by_resource)

    def pick(self, service: ServiceSpec, start: datetime, party: int) -> int | None:
        offered = self.offer(service, start, party)
        if offered is None:
            return None
        best = max((free, -rid) for rid, free in offered[1] if free >= party)
        return -best[1]


# --- database side -----------------------------------------------------------------

LIVE_COMMITMENTS = """
SELECT 'hold' AS kind, id, resource_id, party_size, lower(occupied) AS lo, upper(occupied) AS hi
FROM holds WHERE branch_id = $1 AND released_at IS NULL
UNION ALL
SELECT 'booking', id, resource_id, party_size, lower(occupied), upper(occupied)
FROM bookings WHERE branch_id = $1 AND status IN ('pending_payment', 'confirmed', 'completed')
"""


async def snapshot(conn: db.Conn) -> tuple[list[Any], ...]:
    """Everything a refused operation must leave alone (unit rows at 0 seats are no seats)."""
    return (
        [
            tuple(r)
            for r in await conn.fetch(
                "SELECT * FROM resource_capacity_units WHERE used <> 0 ORDER BY 1, 2"
            )
        ],
        [tuple(r) for r in await conn.fetch("SELECT * FROM holds ORDER BY id")],
        [tuple(r) for r in await conn.fetch("SELECT * FROM bookings ORDER BY id")],
    )


Op = Callable[[db.Conn], Awaitable[Any]]
REFUSALS = (SlotFull, HoldExpired, BookingNotActive)


class SchedulingMachine(RuleBasedStateMachine):
    holds = Bundle("holds")
    bookings = Bundle("bookings")

    def __init__(self, env: Env, cat: Catalogue) -> None:
        super().__init__()
        self.env = env
        self.cat = cat
        self.model = Model(cat)
        self.env.run(
            self.env.pool.execute(
                "TRUNCATE holds, bookings, resource_capacity_units RESTART IDENTITY CASCADE"
            )
        )

    # -- plumbing

    def seen(self, outcome: str) -> None:
        self.env.outcomes[outcome] += 1

    def attempt(self, op: Op) -> tuple[Any, DomainError | None]:
        """Run `op` in one transaction; a refusal is caught inside it and the
        transaction commits anyway, so whatever the ledger did before refusing stays."""

        async def go() -> tuple[Any, DomainError | None]:
            async with self.env.pool.acquire() as conn:
                before = await snapshot(conn)
                async with conn.transaction():
                    try:
                        return await op(conn), None
                    except REFUSALS as exc:
                        refused = exc
                assert await snapshot(conn) == before, f"{refused!r} changed the database"
                return None, refused

        return self.env.run(go())

    def stored(self) -> list[asyncpg.Record]:
        return self.env.run(self.env.pool.fetch(LIVE_COMMITMENTS, self.cat.branch_id))

    def engine_slots(
        self, service: ServiceSpec, party: int, rows: list[asyncpg.Record] | None = None
    ) -> dict[datetime, Slot]:
        """What the engine offers, fed with the commitments stored in the database."""
        rows = self.stored() if rows is None else rows
        commitments = [
            Commitment(r["resource_id"], r["lo"], r["hi"], r["party_size"]) for r in rows
        ]
        slots = available_slots(
            BranchCalendar(
                timezone=TZ,
                opening_hours=((WEEKDAY, OPENS, CLOSES),),
                walk_in_reserve=float(RESERVE),
            ),
            ServiceRules(
                duration_min=service.duration,
                buffer_before_min=service.before,
                buffer_after_min=service.after,
                slot_interval_min=service.interval,
                lead_time_min=service.lead,
                max_party=service.max_party,
            ),
            [
                ResourceSchedule(
                    self.cat.rid(r), r.kind, r.capacity, ((WEEKDAY, r.shift[0], r.shift[1]),)
                )
                for r in self.cat.skilled(service.name)
            ],
            commitments,
            party_size=party,
            window_from=WINDOW[0],
            window_to=WINDOW[1],
            now=self.model.now,
        )
        return {s.start: s for s in slots}

    def draw_target(
        self, data: st.DataObject, service: ServiceSpec, start: datetime, party: int
    ) -> int | None:
        """A skilled resource, or the one the engine picks (None: the engine offers none)."""
        choice = data.draw(
            st.sampled_from(["engine", *(r.name for r in self.cat.skilled(service.name))]),
            label="resource",
        )
        if choice != "engine":
            return self.cat.resource_ids[choice]
        slot = self.engine_slots(service, party).get(start)
        picked = None if slot is None else pick_resource(slot, party)
        assert picked == self.model.pick(service, start, party)
        return picked

    def draw_slot(self, data: st.DataObject) -> tuple[ServiceSpec, datetime, int]:
        service = data.draw(st.sampled_from(SERVICES), label="service")
        start = data.draw(st.sampled_from(self.cat.candidates(service)), label="start")
        party = data.draw(st.integers(1, service.max_party), label="party")
        return service, start, party

    def new(
        self, kind: str, data: st.DataObject
    ) -> tuple[ServiceSpec, datetime, int, int, Any] | None:
        service, start, party = self.draw_slot(data)
        rid = self.draw_target(data, service, start, party)
        if rid is None:
            self.seen(f"{kind}: engine offers no seat")
            return None
        lo, hi = Model.span(service, start)
        expect = self.model.take(service.name, rid, lo, hi, party)
        if not expect:  # the engine never offers what the ledger would refuse
            assert self.model.pick(service, start, party) != rid
        sid = self.cat.service_ids[service.name]
        now = self.model.now
        ttl = timedelta(minutes=data.draw(st.sampled_from([1, 5, 10]), label="ttl"))

        async def op(conn: db.Conn) -> Any:
            if kind == "hold":
                return await ledger.create_hold(
                    conn,
                    service_id=sid,
                    resource_id=rid,
                    starts_at=start,
                    party_size=party,
                    channel="kiosk",
                    now=now,
                    ttl=ttl,
                )
            return await ledger.create_booking(
                conn,
                service_id=sid,
                resource_id=rid,
                starts_at=start,
                party_size=party,
                channel="app",
                now=now,
            )

        result, refused = self.attempt(op)
        self.seen(f"{kind}: {'granted' if refused is None else type(refused).__name__}")
        if expect:
            assert refused is None, f"{kind} refused but the model has room: {refused!r}"
        else:
            assert isinstance(refused, SlotFull), f"{kind} granted over capacity"
            return None
        assert (result.resource_id, result.starts_at, result.party_size) == (rid, start, party)
        return service, start, party, rid, result

    # -- rules

    @rule(target=holds, data=st.data())
    def hold(self, data: st.DataObject) -> Any:
        made = self.new("hold", data)
        if made is None:
            return multiple()
        service, start, party, rid, h = made
        lo, hi = Model.span(service, start)
        assert h.expires_at > self.model.now
        self.model.holds[h.id] = Held(
            h.id, service.name, rid, start, lo, hi, party, expires_at=h.expires_at
        )
        return h.id

    @rule(target=bookings, data=st.data())
    def book(self, data: st.DataObject) -> Any:
        made = self.new("booking", data)
        if made is None:
            return multiple()
        service, start, party, rid, b = made
        lo, hi = Model.span(service, start)
        self.model.bookings[b.id] = Held(b.id, service.name, rid, start, lo, hi, party)
        return b.id

    @rule(target=bookings, hold_id=holds)
    def convert(self, hold_id: int) -> Any:
        h = self.model.holds[hold_id]
        assert h.expires_at is not None
        now = self.model.now
        expect = h.live and h.expires_at > now

        async def op(conn: db.Conn) -> ledger.Booking:
            return await ledger.create_booking_from_hold(conn, hold_id, now=now)

        b, refused = self.attempt(op)
        self.seen(f"convert: {'granted' if refused is None else type(refused).__name__}")
        if not expect:
            assert isinstance(refused, HoldExpired)
            return multiple()
        assert refused is None, f"live hold refused: {refused!r}"
        assert (b.resource_id, b.starts_at, b.party_size) == (h.resource_id, h.start, h.party)
        h.live = False
        self.model.bookings[b.id] = Held(
            b.id, h.service, h.resource_id, h.start, h.lo, h.hi, h.party
        )
        return b.id

    @rule(booking_id=bookings, data=st.data())
    def reschedule(self, booking_id: int, data: st.DataObject) -> None:
        old = self.model.bookings[booking_id]
        service = next(s for s in SERVICES if s.name == old.service)
        # Often a step or two away, so the new span overlaps the old one.
        starts = self.cat.candidates(service)
        here = starts.index(old.start)
        near = [starts[i] for i in range(here - 2, here + 3) if 0 <= i < len(starts)]
        start = data.draw(st.sampled_from(near) | st.sampled_from(starts), label="new start")
        choice = data.draw(
            st.sampled_from(["same", *(r.name for r in self.cat.skilled(service.name))]),
            label="new resource",
        )
        new_rid = None if choice == "same" else self.cat.resource_ids[choice]
        rid = old.resource_id if new_rid is None else new_rid
        lo, hi = Model.span(service, start)
        deltas: dict[tuple[int, int], int] = defaultdict(int)
        for u in units(lo, hi):
            deltas[rid, u] += old.party
        for u in units(old.lo, old.hi):
            deltas[old.resource_id, u] -= old.party
        now = self.model.now

        async def op(conn: db.Conn) -> ledger.Booking:
            return await ledger.reschedule_booking(
                conn, booking_id, new_starts_at=start, now=now, new_resource_id=new_rid
            )

        b, refused = self.attempt(op)
        self.seen(f"reschedule: {'granted' if refused is None else type(refused).__name__}")
        if not old.live:
            assert isinstance(refused, BookingNotActive)
        elif not self.model.fits(deltas, service.name, rid):
            assert isinstance(refused, SlotFull), "moved into a full slot"
        else:
            assert refused is None, f"move refused but the model has room: {refused!r}"
            assert (b.id, b.resource_id, b.starts_at) == (booking_id, rid, start)
            old.resource_id, old.start, old.lo, old.hi = rid, start, lo, hi

    @rule(booking_id=bookings)
    def cancel(self, booking_id: int) -> None:
        b = self.model.bookings[booking_id]
        now = self.model.now

        async def op(conn: db.Conn) -> bool:
            return await ledger.cancel_booking(conn, booking_id, now)

        done, refused = self.attempt(op)
        self.seen(f"cancel: {'cancelled' if done else 'not active'}")
        assert refused is None
        assert done is b.live
        b.live = False

    @rule(minutes=st.integers(1, 10))
    def tick(self, minutes: int) -> None:
        """Time passes; no sweep runs, so expired holds still hold their seats."""
        self.seen("tick")
        self.model.now += timedelta(minutes=minutes)

    @rule(minutes=st.integers(0, 10))
    def expire(self, minutes: int) -> None:
        self.model.now += timedelta(minutes=minutes)
        now = self.model.now
        due = [
            h for h in self.model.holds.values() if h.live and h.expires_at and h.expires_at <= now
        ]

        async def op(conn: db.Conn) -> int:
            return await ledger.expire_holds(conn, now)

        n, refused = self.attempt(op)
        assert refused is None
        assert n == len(due)
        self.seen(f"expire: {min(n, 2)}{'+' if n >= 2 else ''} released")
        for h in due:
            h.live = False

    # -- invariants

    @invariant()
    def database_holds_the_model_commitments(self) -> None:
        stored = {
            (r["kind"], r["id"], r["resource_id"], r["party_size"], r["lo"], r["hi"])
            for r in self.stored()
        }
        expected = {
            ("hold" if c.expires_at else "booking", c.id, c.resource_id, c.party, c.lo, c.hi)
            for c in self.model.live()
        }
        assert stored == expected

    @invariant()
    def availability_is_capacity_minus_live_commitments(self) -> None:
        rows = self.stored()
        used = self.model.usage()
        for service in SERVICES:
            for party in range(1, service.max_party + 1):
                engine = {
                    start: (s.remaining, s.free_by_resource)
                    for start, s in self.engine_slots(service, party, rows).items()
                }
                model = {}
                for start in self.cat.candidates(service):
                    offered = self.model.offer(service, start, party, used)
                    if offered is not None:
                        model[start] = offered
                assert engine == model, f"service {service.name}, party {party}"

    @invariant()
    def nothing_overbooked(self) -> None:
        async def check() -> list[ledger.Violation]:
            async with self.env.pool.acquire() as conn:
                return await ledger.overbooked(conn)

        assert self.env.run(check()) == []


OUTCOMES: dict[str, Callable[[str], bool]] = {
    "granted": lambda o: o in ("hold: granted", "booking: granted"),
    "full": lambda o: o.endswith(": SlotFull"),
    "expired": lambda o: o == "convert: HoldExpired",
    "not active": lambda o: o in ("cancel: not active", "reschedule: BookingNotActive"),
    "converted": lambda o: o == "convert: granted",
    "rescheduled": lambda o: o == "reschedule: granted",
    "cancelled": lambda o: o == "cancel: cancelled",
    "released by expiry": lambda o: o.startswith("expire: ") and not o.startswith("expire: 0"),
}


def test_scheduling_state_machine(module_env: ModuleEnv) -> None:
    env = Env(module_env.database_url)
    try:
        cat = env.run(seed(env.pool))

        class Machine(SchedulingMachine):
            def __init__(self) -> None:
                super().__init__(env, cat)

        started = time.perf_counter()
        run_state_machine_as_test(
            Machine,
            settings=settings(
                max_examples=30,
                stateful_step_count=25,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
        print(f"\nstate machine: {time.perf_counter() - started:.1f} s")
        for outcome, n in sorted(env.outcomes.items()):
            print(f"  {outcome}: {n}")
        # Every path must have been walked in this run, or a regression that stops one
        # (say, a reschedule that always answers full) would pass unnoticed.
        missing = [name for name, seen in OUTCOMES.items() if not any(map(seen, env.outcomes))]
        assert not missing, f"outcomes never reached: {missing}; seen: {dict(env.outcomes)}"
    finally:
        env.close()
