"""Call-next policy: boundaries, every permutation of small ticket sets, every pair
of tickets from a grid against a comparator written from the spec, hypothesis
properties of `pick_next` and `order`, and a simulated day of arrivals and calls
checked against the no-starvation guarantee of `selfserve.queueing.policy`.

The guarantee checker (`overtaken_aged`) reads only the log of a simulation, so
it is run against policies without aging too, to show that it catches them."""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import HealthCheck, event, find, given, settings
from hypothesis import strategies as st

from selfserve.queueing.policy import (
    DEFAULT_POLICY,
    SQL_ORDER_BY,
    PolicyConfig,
    Tier,
    WaitingTicket,
    cutoffs,
    eligible,
    order,
    pick_next,
    sort_key,
    sql_order_by,
    tier,
)

NOW = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
CFG = PolicyConfig()
BOUND = CFG.aging_bound
EARLY = CFG.appointment_early
MIN = timedelta(minutes=1)
US = timedelta(microseconds=1)


def ago(delta: timedelta) -> datetime:
    return NOW - delta


def ticket(
    tid: int,
    waited: timedelta,
    *,
    service: int = 1,
    priority: int = 0,
    appointment_in: timedelta | None = None,
) -> WaitingTicket:
    """A ticket issued `waited` before NOW, booked for NOW + `appointment_in`."""
    return WaitingTicket(
        id=tid,
        service_id=service,
        issued_at=NOW - waited,
        priority=priority,
        appointment_at=None if appointment_in is None else NOW + appointment_in,
    )


def ids(tickets: Sequence[WaitingTicket]) -> list[int]:
    return [t.id for t in tickets]


# --- the spec, written as a comparator ------------------------------------------


def model_first(a: WaitingTicket, b: WaitingTicket, now: datetime, cfg: PolicyConfig) -> bool:
    """Whether `a` is called before `b`, read off the tiers one rule at a time."""

    def aged(t: WaitingTicket) -> bool:
        return now - t.issued_at >= cfg.aging_bound

    def due(t: WaitingTicket) -> bool:
        return t.appointment_at is not None and t.appointment_at - now <= cfg.appointment_early

    fifo = (a.issued_at, a.id) < (b.issued_at, b.id)
    if aged(a) or aged(b):
        return fifo if aged(a) and aged(b) else aged(a)
    if due(a) or due(b):
        if not (due(a) and due(b)):
            return due(a)
        assert a.appointment_at is not None
        assert b.appointment_at is not None
        if a.appointment_at != b.appointment_at:
            return a.appointment_at < b.appointment_at
        return fifo
    if a.priority != b.priority:
        return a.priority > b.priority
    return fifo


def model_order(
    tickets: Sequence[WaitingTicket], now: datetime, cfg: PolicyConfig
) -> list[WaitingTicket]:
    def cmp(a: WaitingTicket, b: WaitingTicket) -> int:
        if a.id == b.id:
            return 0
        return -1 if model_first(a, b, now, cfg) else 1

    return sorted(tickets, key=functools.cmp_to_key(cmp))


# --- configuration, validation, boundaries ----------------------------------------


def test_defaults() -> None:
    assert PolicyConfig(timedelta(minutes=20), timedelta(minutes=5)) == DEFAULT_POLICY


def test_rejects_bad_values() -> None:
    naive = datetime(2026, 6, 1, 10, 0)
    with pytest.raises(ValueError, match="issued_at must be timezone-aware"):
        WaitingTicket(1, 1, naive)
    with pytest.raises(ValueError, match="appointment_at must be timezone-aware"):
        WaitingTicket(1, 1, NOW, appointment_at=naive)
    with pytest.raises(ValueError, match="priority"):
        WaitingTicket(1, 1, NOW, priority=-1)
    with pytest.raises(ValueError, match="priority"):
        WaitingTicket(1, 1, NOW, priority=2**31)
    with pytest.raises(ValueError, match="now must be timezone-aware"):
        pick_next([], {1}, naive)
    with pytest.raises(ValueError, match="aging_bound"):
        PolicyConfig(aging_bound=timedelta(0))
    with pytest.raises(ValueError, match="appointment_early"):
        PolicyConfig(appointment_early=-US)
    assert PolicyConfig(appointment_early=timedelta(0)).appointment_early == timedelta(0)


def test_aged_from_exactly_the_bound() -> None:
    assert tier(ticket(1, BOUND), NOW) == Tier.AGED
    assert tier(ticket(1, BOUND - US), NOW) == Tier.NORMAL
    assert tier(ticket(1, BOUND - US, priority=3), NOW) == Tier.PRIORITY
    # the bound beats an appointment and a class
    assert tier(ticket(1, BOUND, priority=3, appointment_in=-MIN), NOW) == Tier.AGED


def test_due_from_exactly_the_early_window() -> None:
    assert tier(ticket(1, MIN, appointment_in=EARLY), NOW) == Tier.APPOINTMENT
    assert tier(ticket(1, MIN, appointment_in=EARLY + US), NOW) == Tier.NORMAL
    assert tier(ticket(1, MIN, appointment_in=EARLY + US, priority=2), NOW) == Tier.PRIORITY
    assert tier(ticket(1, MIN, appointment_in=-timedelta(hours=1)), NOW) == Tier.APPOINTMENT


def test_times_compare_as_instants_in_any_zone() -> None:
    shanghai = timezone(timedelta(hours=8))
    a = WaitingTicket(1, 1, (NOW - BOUND).astimezone(shanghai))
    assert tier(a, NOW) == Tier.AGED
    assert sort_key(a, NOW.astimezone(shanghai)) == sort_key(a, NOW)


def test_key_shape() -> None:
    assert sort_key(ticket(7, BOUND + MIN, priority=2), NOW) == (
        0,
        0,
        ago(BOUND + MIN),
        ago(BOUND + MIN),
        7,
    )
    assert sort_key(ticket(7, MIN, appointment_in=MIN), NOW) == (1, 0, NOW + MIN, ago(MIN), 7)
    assert sort_key(ticket(7, MIN, priority=2), NOW) == (2, -2, ago(MIN), ago(MIN), 7)
    assert sort_key(ticket(7, MIN), NOW) == (3, 0, ago(MIN), ago(MIN), 7)


def test_empty_and_ineligible() -> None:
    assert pick_next([], {1}, NOW) is None
    assert pick_next([ticket(1, MIN, service=2)], {1}, NOW) is None
    assert pick_next([ticket(1, MIN, service=2)], set(), NOW) is None
    assert order([ticket(1, MIN, service=2)], {1}, NOW) == []
    assert eligible(ticket(1, MIN, service=2), {1, 2})
    assert not eligible(ticket(1, MIN, service=2), frozenset({1}))


# --- every permutation of a set spanning the tiers ---------------------------------

# (ticket, position in the call order at NOW with the default config)
SPANNING = [
    ticket(10, MIN * 2, service=1),  # normal, recent
    ticket(11, MIN * 9, service=2),  # normal, earlier
    ticket(12, MIN * 3, service=3, priority=1),  # class 1
    ticket(13, MIN * 1, service=1, priority=2),  # class 2, the most recent of all
    ticket(14, MIN * 4, service=2, appointment_in=MIN * 30),  # booked later: normal for now
    ticket(15, MIN * 1, service=3, appointment_in=MIN * 4),  # due
    ticket(16, MIN * 6, service=1, appointment_in=-MIN * 2),  # due, booked earlier (late)
    ticket(17, BOUND + MIN, service=2),  # aged normal
    ticket(18, BOUND, service=3, priority=2),  # aged class 2, issued after 17
]
SPANNING_ORDER = [17, 18, 16, 15, 13, 12, 11, 14, 10]


def test_order_spanning_the_tiers() -> None:
    assert ids(order(SPANNING, None, NOW)) == SPANNING_ORDER
    assert ids(model_order(SPANNING, NOW, CFG)) == SPANNING_ORDER


def test_every_permutation_gives_one_order_and_respects_skills() -> None:
    subset = [t for t in SPANNING if t.id != 14 and t.id != 11]  # 7 tickets: 5040 orders
    expected = [i for i in SPANNING_ORDER if i in ids(subset)]
    service = {t.id: t.service_id for t in subset}
    skill_sets = [set(c) for n in range(4) for c in itertools.combinations((1, 2, 3), n)]
    for perm in itertools.permutations(subset):
        assert ids(order(perm, None, NOW)) == expected
        for skills in skill_sets:
            want = [i for i in expected if service[i] in skills]
            got = pick_next(perm, skills, NOW)
            assert (got.id if got else None) == (want[0] if want else None)
    for skills in skill_sets:
        for perm in itertools.permutations(subset[:5]):
            assert {t.service_id for t in order(perm, skills, NOW)} <= skills


def test_a_later_clock_moves_tickets_up_the_tiers() -> None:
    # Eleven minutes later ticket 11 has waited 20 minutes: it moves to the head,
    # behind the two aged tickets issued before it.
    later = NOW + timedelta(minutes=11)
    assert ids(order(SPANNING, None, later)) == [17, 18, 11, 16, 15, 13, 12, 14, 10]
    assert ids(model_order(SPANNING, later, CFG)) == [17, 18, 11, 16, 15, 13, 12, 14, 10]
    # Half an hour later everyone has aged: pure issue order, ids breaking the tie.
    fifo = [17, 18, 11, 16, 14, 12, 10, 13, 15]
    assert ids(order(SPANNING, None, NOW + timedelta(minutes=30))) == fifo


# --- every pair from a grid against the comparator ----------------------------------

WAITS = [BOUND + MIN, BOUND, BOUND - US, MIN * 10, MIN, timedelta(0)]
APPOINTMENTS = [None, -MIN * 10, EARLY, EARLY + US, MIN * 30]
GRID = [
    ticket(i, wait, priority=prio, appointment_in=appt)
    for i, (wait, prio, appt) in enumerate(itertools.product(WAITS, (0, 1, 2), APPOINTMENTS))
]


def test_every_pair_of_the_grid_agrees_with_the_comparator() -> None:
    for a, b in itertools.product(GRID, GRID):
        if a.id == b.id:
            continue
        first = model_first(a, b, NOW, CFG)
        assert (sort_key(a, NOW) < sort_key(b, NOW)) == first, (a, b)
        assert pick_next([a, b], {1}, NOW) == (a if first else b)
        # the same two tickets issued at one instant: the lower id goes first
        twin = replace(b, issued_at=a.issued_at)
        assert model_first(a, twin, NOW, CFG) == (sort_key(a, NOW) < sort_key(twin, NOW))
    assert order(GRID, None, NOW) == model_order(GRID, NOW, CFG)


# --- hypothesis: pick_next, order ---------------------------------------------------

OFFSETS = st.sampled_from(
    [BOUND + MIN, BOUND, BOUND - US, EARLY, EARLY + US, MIN, timedelta(0), -EARLY]
) | st.integers(-3_600_000_000, 3_600_000_000).map(lambda us: timedelta(microseconds=us))


@st.composite
def ticket_sets(draw: st.DrawFn, max_size: int = 12) -> list[WaitingTicket]:
    n = draw(st.integers(0, max_size))
    tids = draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n, unique=True))
    out = []
    for tid in tids:
        waited = abs(draw(OFFSETS))
        booked = draw(st.none() | OFFSETS)
        out.append(
            ticket(
                tid,
                waited,
                service=draw(st.integers(1, 3)),
                priority=draw(st.sampled_from([0, 0, 0, 1, 2, 3])),
                appointment_in=booked,
            )
        )
    return out


SKILLS = st.frozensets(st.integers(1, 3))
CONFIGS = st.builds(
    PolicyConfig,
    st.sampled_from([US, MIN, BOUND, timedelta(hours=1)]),
    st.sampled_from([timedelta(0), EARLY, timedelta(minutes=15)]),
)


@settings(max_examples=300)
@given(ticket_sets(), SKILLS, CONFIGS, st.data())
def test_pick_next_is_the_least_key_among_eligible_in_any_input_order(
    tickets: list[WaitingTicket], skills: frozenset[int], cfg: PolicyConfig, data: st.DataObject
) -> None:
    chosen = [t for t in tickets if t.service_id in skills]
    got = pick_next(tickets, skills, NOW, cfg)
    if not chosen:
        assert got is None
    else:
        assert got == min(chosen, key=lambda t: sort_key(t, NOW, cfg))
    shuffled = data.draw(st.permutations(tickets))
    assert pick_next(shuffled, skills, NOW, cfg) == got
    ordered = order(shuffled, skills, NOW, cfg)
    assert ordered == order(tickets, skills, NOW, cfg)
    assert ordered == model_order(chosen, NOW, cfg)
    assert ordered[:1] == ([got] if got else [])
    keys = [sort_key(t, NOW, cfg) for t in ordered]
    assert keys == sorted(keys)
    assert len(set(keys)) == len(keys)  # a total order: no two tickets tie


@settings(max_examples=300)
@given(ticket_sets(max_size=16))
def test_when_nobody_has_aged_due_then_classes_then_normal_each_in_its_order(
    tickets: list[WaitingTicket],
) -> None:
    fresh = [t for t in tickets if t.issued_at > NOW - BOUND]
    ordered = order(fresh, None, NOW)
    tiers = [tier(t, NOW) for t in ordered]
    assert Tier.AGED not in tiers
    assert tiers == sorted(tiers)
    due = [t for t in ordered if tier(t, NOW) == Tier.APPOINTMENT]
    assert due == sorted(due, key=lambda t: (t.appointment_at, t.issued_at, t.id))
    classes = [t for t in ordered if tier(t, NOW) == Tier.PRIORITY]
    assert classes == sorted(classes, key=lambda t: (-t.priority, t.issued_at, t.id))
    normal = [t for t in ordered if tier(t, NOW) == Tier.NORMAL]
    assert normal == sorted(normal, key=lambda t: (t.issued_at, t.id))
    # FIFO within a class: same rank, neither due -> issue order
    for a, b in itertools.combinations(ordered, 2):
        if a.priority == b.priority and tier(a, NOW) == tier(b, NOW) != Tier.APPOINTMENT:
            assert (a.issued_at, a.id) < (b.issued_at, b.id)


@settings(max_examples=300)
@given(ticket_sets(max_size=16))
def test_aged_tickets_lead_in_issue_order(tickets: list[WaitingTicket]) -> None:
    ordered = order(tickets, None, NOW)
    aged = [t for t in ordered if t.issued_at <= NOW - BOUND]
    assert ordered[: len(aged)] == aged
    assert aged == sorted(aged, key=lambda t: (t.issued_at, t.id))


# --- a simulated day: the no-starvation guarantee ------------------------------------

Picker = Callable[[list[WaitingTicket], frozenset[int], datetime], WaitingTicket | None]
DAY = datetime(2026, 6, 1, 1, 0, tzinfo=UTC)


def at_minute(m: int) -> datetime:
    return DAY + timedelta(minutes=m)


@dataclass(frozen=True)
class Scenario:
    arrivals: tuple[tuple[int, int, int, int | None], ...]
    """(minute, service, priority, appointment minute or None), by minute."""
    counters: tuple[tuple[frozenset[int], int, tuple[int, ...]], ...]
    """(services, first call minute, gaps between calls, cycled); the first call
    comes before the longest gap has passed."""
    config: PolicyConfig

    @property
    def max_gap(self) -> int:
        return max(max(gaps) for _, _, gaps in self.counters)


@dataclass(frozen=True)
class Call:
    minute: int
    services: frozenset[int]
    waiting: tuple[WaitingTicket, ...]  # all waiting tickets just before the call
    called: WaitingTicket | None


@st.composite
def scenarios(draw: st.DrawFn) -> Scenario:
    services = draw(st.integers(1, 3))
    counters = []
    for _ in range(draw(st.integers(1, 3))):
        skills = draw(st.frozensets(st.integers(1, services), min_size=1))
        gaps = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=8)))
        counters.append((skills, draw(st.integers(0, max(gaps) - 1)), gaps))
    for s in range(1, services + 1):  # every service has a counter that serves it
        if not any(s in skills for skills, _, _ in counters):
            i = draw(st.integers(0, len(counters) - 1))
            skills, first, gaps = counters[i]
            counters[i] = (skills | {s}, first, gaps)
    arrivals = []
    minute = 0
    for _ in range(draw(st.integers(1, 60))):
        minute += draw(st.sampled_from([0, 0, 1, 1, 2, 3, 5, 10]))  # bursts and lulls
        booked = draw(st.none() | st.none() | st.integers(minute - 15, minute + 40))
        arrivals.append(
            (
                minute,
                draw(st.integers(1, services)),
                draw(st.sampled_from([0, 0, 0, 1, 2, 3])),
                booked,
            )
        )
    cfg = PolicyConfig(
        timedelta(minutes=draw(st.sampled_from([3, 5, 10, 20]))),
        timedelta(minutes=draw(st.sampled_from([0, 5]))),
    )
    return Scenario(tuple(arrivals), tuple(counters), cfg)


def simulate(sc: Scenario, pick: Picker) -> list[Call]:
    """Minute by minute: the minute's arrivals join, then each counter due to call
    calls (in counter order, as row locks would serialise them), until every
    ticket has been called."""
    tickets = [
        WaitingTicket(
            i + 1,
            service,
            at_minute(minute),
            priority,
            None if booked is None else at_minute(booked),
        )
        for i, (minute, service, priority, booked) in enumerate(sc.arrivals)
    ]
    next_call = [first for _, first, _ in sc.counters]
    gap_index = [0] * len(sc.counters)
    waiting: list[WaitingTicket] = []
    calls: list[Call] = []
    pending = list(tickets)
    minute = 0
    while pending or waiting:
        while pending and pending[0].issued_at == at_minute(minute):
            waiting.append(pending.pop(0))
        for c, (skills, _, gaps) in enumerate(sc.counters):
            if next_call[c] != minute:
                continue
            called = pick(list(waiting), skills, at_minute(minute))
            calls.append(Call(minute, skills, tuple(waiting), called))
            if called is not None:
                assert called in waiting
                assert called.service_id in skills
                waiting.remove(called)
            next_call[c] += gaps[gap_index[c] % len(gaps)]
            gap_index[c] += 1
        minute += 1
        assert minute < 10_000
    return calls


def overtaken_aged(calls: list[Call], bound: timedelta) -> list[tuple[Call, WaitingTicket]]:
    """The guarantee, checked on a log: every (call, T) where T was waiting, aged
    (waited >= bound), eligible at the calling counter, and issued before the
    ticket the call returned (or the call returned nothing)."""
    found = []
    for call in calls:
        now = at_minute(call.minute)
        for t in call.waiting:
            if t.service_id not in call.services or now - t.issued_at < bound:
                continue
            u = call.called
            if u is None or (t.issued_at, t.id) < (u.issued_at, u.id):
                found.append((call, t))
    return found


def over_call_budget(calls: list[Call], bound: timedelta) -> list[WaitingTicket]:
    """Tickets not called within n + 1 calls from a counter that can serve them,
    counted from the instant they aged, n being the tickets issued before them
    still waiting at that instant."""
    late = []
    everyone = {t.id: t for call in calls for t in call.waiting}
    called_at = {c.called.id: c.minute for c in calls if c.called is not None}
    called_by = {c.called.id: i for i, c in enumerate(calls) if c.called is not None}
    for t in everyone.values():
        aged_at = t.issued_at + bound
        n = sum(
            1
            for u in everyone.values()
            if (u.issued_at, u.id) < (t.issued_at, t.id) and at_minute(called_at[u.id]) >= aged_at
        )
        used = [
            c
            for c in calls[: called_by[t.id] + 1]
            if at_minute(c.minute) >= aged_at and t.service_id in c.services
        ]
        if len(used) > n + 1:
            late.append(t)
    return late


def policy(cfg: PolicyConfig) -> Picker:
    return lambda waiting, skills, now: pick_next(waiting, skills, now, cfg)


Key = Callable[[WaitingTicket, datetime], tuple[Any, ...]]


def by_key(key: Key) -> Picker:
    def pick(
        waiting: list[WaitingTicket], skills: frozenset[int], now: datetime
    ) -> WaitingTicket | None:
        chosen = [t for t in waiting if t.service_id in skills]
        return min(chosen, key=lambda t: key(t, now)) if chosen else None

    return pick


def naive_key(t: WaitingTicket, now: datetime) -> tuple[Any, ...]:
    """Priority class, then issue order: no aging, no appointments."""
    return (-t.priority, t.issued_at, t.id)


def appointments_first(cfg: PolicyConfig) -> Key:
    """Due appointments (by appointment_at), then the real tiers: aged, class, normal."""

    def key(t: WaitingTicket, now: datetime) -> tuple[Any, ...]:
        if t.appointment_at is not None and t.appointment_at <= cutoffs(now, cfg)[1]:
            return (0, t.appointment_at, t.issued_at, t.id)
        return (1, *sort_key(t, now, cfg))

    return key


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenarios())
def test_no_ticket_is_overtaken_after_waiting_the_bound(sc: Scenario) -> None:
    calls = simulate(sc, policy(sc.config))
    bound = sc.config.aging_bound
    assert overtaken_aged(calls, bound) == []
    assert over_call_budget(calls, bound) == []
    # and in wall time: counters that can serve a ticket call at least every max_gap
    called = {c.called.id: (c.minute, c.called) for c in calls if c.called is not None}
    assert len(called) == len(sc.arrivals)  # every ticket was called
    for minute, t in called.values():
        n = sum(
            1
            for m, u in called.values()
            if (u.issued_at, u.id) < (t.issued_at, t.id) and at_minute(m) >= t.issued_at + bound
        )
        assert at_minute(minute) - t.issued_at <= bound + (n + 1) * timedelta(minutes=sc.max_gap)
    if any(at_minute(c.minute) - t.issued_at >= bound for c in calls for t in c.waiting):
        event("some ticket aged")


def stream(priority: int, booked: bool) -> Scenario:
    """One counter calling every 2 minutes; a normal walk-in at minute 0, then a
    ticket of class `priority` (booked for its arrival minute when `booked`)
    every 2 minutes for an hour: the later tickets alone keep the counter busy."""
    arrivals = [(0, 1, 0, None)] + [
        (m, 1, priority, m if booked else None) for m in range(1, 61, 2)
    ]
    return Scenario(tuple(arrivals), ((frozenset({1}), 1, (2,)),), CFG)


def called_minute(calls: list[Call], tid: int) -> int:
    return next(c.minute for c in calls if c.called is not None and c.called.id == tid)


def test_without_aging_a_walk_in_starves_behind_a_priority_stream() -> None:
    sc = stream(priority=2, booked=False)
    naive = simulate(sc, by_key(naive_key))
    assert overtaken_aged(naive, BOUND)  # the checker catches it
    assert [t.id for t in over_call_budget(naive, BOUND)] == [1]
    assert called_minute(naive, 1) == 61  # after the whole stream
    ours = simulate(sc, policy(CFG))
    assert overtaken_aged(ours, BOUND) == []
    assert called_minute(ours, 1) == 21  # the first call once it has waited 20 minutes


def test_due_appointments_first_would_starve_an_aged_walk_in() -> None:
    sc = stream(priority=0, booked=True)
    rival = simulate(sc, by_key(appointments_first(CFG)))
    assert overtaken_aged(rival, BOUND)
    assert called_minute(rival, 1) == 61
    ours = simulate(sc, policy(CFG))
    assert overtaken_aged(ours, BOUND) == []
    assert called_minute(ours, 1) == 21


def test_the_generator_finds_starvation_without_aging() -> None:
    """The random days are busy enough for the property to bite: hypothesis finds a
    day on which the priority-only policy overtakes an aged ticket."""
    found = find(
        scenarios(),
        lambda sc: bool(overtaken_aged(simulate(sc, by_key(naive_key)), sc.config.aging_bound)),
        settings=settings(max_examples=2000, database=None, deadline=None, derandomize=True),
    )
    assert overtaken_aged(simulate(found, by_key(naive_key)), found.config.aging_bound)
    assert overtaken_aged(simulate(found, policy(found.config)), found.config.aging_bound) == []


# --- the SQL text -----------------------------------------------------------------


def test_sql_names_the_columns_and_placeholders() -> None:
    assert sql_order_by("$1", "$2") == SQL_ORDER_BY
    for column in ("tickets.issued_at", "tickets.priority", "tickets.appointment_at", "tickets.id"):
        assert column in SQL_ORDER_BY
    assert "$1::timestamptz" in SQL_ORDER_BY
    assert "$2::timestamptz" in SQL_ORDER_BY
    assert "$3" not in SQL_ORDER_BY
    assert "now()" not in SQL_ORDER_BY.lower()
    renumbered = sql_order_by("$4", "$5")
    assert "$1" not in renumbered
    assert "$4::timestamptz" in renumbered
    assert len(SQL_ORDER_BY.split(",\n")) == len(sort_key(ticket(1, MIN), NOW))
    assert cutoffs(NOW) == (NOW - BOUND, NOW + EARLY)


# A small evaluator for the SQL that SQL_ORDER_BY is written in: column references,
# integer literals, negation, and CASE WHEN <column> <= $n / > <integer> … ELSE … END,
# with SQL's rule that a comparison with NULL is not true. Anything else fails, so
# the text and this reading of it cannot drift apart silently; the integration test
# runs the real thing on PostgreSQL.

_CONDITION = re.compile(r"tickets\.(\w+) (<=|>) (\$\d+)::timestamptz|tickets\.(\w+) (>) (\d+)")
_VALUE = re.compile(r"(-?)tickets\.(\w+)|(-?\d+)")


def _value(text: str, row: dict[str, Any]) -> Any:
    m = _VALUE.fullmatch(text)
    assert m is not None, text
    if m.group(3) is not None:
        return int(m.group(3))
    v = row[m.group(2)]
    return -v if m.group(1) and v is not None else v


def _holds(text: str, row: dict[str, Any], params: dict[str, Any]) -> bool:
    m = _CONDITION.fullmatch(text)
    assert m is not None, text
    if m.group(1) is not None:
        left, op, right = row[m.group(1)], m.group(2), params[m.group(3)]
    else:
        left, op, right = row[m.group(4)], m.group(5), int(m.group(6))
    if left is None:
        return False  # NULL compared is NULL, which CASE treats as not true
    return bool(left <= right) if op == "<=" else bool(left > right)


def evaluate_order_by(sql: str, t: WaitingTicket, params: dict[str, Any]) -> tuple[Any, ...]:
    row = {
        "id": t.id,
        "service_id": t.service_id,
        "issued_at": t.issued_at,
        "priority": t.priority,
        "appointment_at": t.appointment_at,
    }
    out = []
    for item in sql.split(",\n"):
        text = " ".join(item.split())
        if not text.startswith("CASE "):
            out.append(_value(text, row))
            continue
        assert text.endswith(" END"), text
        *whens, otherwise = text[len("CASE ") : -len(" END")].split(" ELSE ")
        assert len(whens) == 1, text
        for branch in whens[0].removeprefix("WHEN ").split(" WHEN "):
            condition, result = branch.split(" THEN ")
            if _holds(condition, row, params):
                out.append(_value(result, row))
                break
        else:
            out.append(_value(otherwise, row))
    assert None not in out  # PostgreSQL would sort NULLs last: none may occur
    return tuple(out)


def test_the_evaluator_reads_sql_null_as_not_true() -> None:
    walk_in = ticket(5, MIN, priority=2)
    params = {"$1": NOW - BOUND, "$2": NOW + EARLY}
    assert evaluate_order_by(SQL_ORDER_BY, walk_in, params) == sort_key(walk_in, NOW)
    with pytest.raises(AssertionError):
        evaluate_order_by("coalesce(tickets.appointment_at, tickets.issued_at)", walk_in, params)


@settings(max_examples=300)
@given(ticket_sets(), CONFIGS)
def test_sql_items_equal_the_sort_key_component_by_component(
    tickets: list[WaitingTicket], cfg: PolicyConfig
) -> None:
    aged, due = cutoffs(NOW, cfg)
    for t in tickets:
        key = sort_key(t, NOW, cfg)
        assert evaluate_order_by(SQL_ORDER_BY, t, {"$1": aged, "$2": due}) == key
        assert evaluate_order_by(sql_order_by("$7", "$8"), t, {"$7": aged, "$8": due}) == key
