"""ETA accuracy: a deterministic discrete-event simulation of one branch day.

Poisson arrivals with a daily profile (quiet morning, lunch peak), three services
with log-normal service times whose real means differ from the configured
durations, six counters with different skills opening and closing through the
day by a roster (3 to 6 open at once) that staff keep only roughly (up to 10
minutes late in, 5 early to 10 late out), and the call-next policy "a free
counter takes the oldest waiting ticket it can serve". At every issue the
estimator sees only what the server would know then: the waiting tickets, the
open counters, what each serves and for how long, the roster, and the EWMA of
the service times finished so far. The ETA and its band are recorded and
compared with the actual wait (issue -> call).

Run by hand for the README figures, several seeds, every estimator compared:
``python -m tests.unit.test_eta_simulation`` (``--seeds 1 2 3``)."""

from __future__ import annotations

import argparse
import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import pytest

from selfserve.queueing.eta import (
    AheadTicket,
    CounterState,
    ServiceTimeModel,
    estimate_wait,
    eta_band,
    remaining_service_s,
)

# --- the branch ------------------------------------------------------------------


def hm(text: str) -> float:
    hours, minutes = text.split(":")
    return (int(hours) * 60 + int(minutes)) * 60.0


@dataclass(frozen=True, slots=True)
class Service:
    service_id: int
    name: str
    duration_min: float  # configured: the EWMA seed and the naive estimate
    mean_min: float  # what it really takes on average
    cv: float  # coefficient of variation of the log-normal
    share: float  # of arrivals


@dataclass(frozen=True, slots=True)
class Counter:
    counter_id: int
    services: frozenset[int]
    shifts: tuple[tuple[float, float], ...]  # (open, close) seconds since midnight


SERVICES = (
    Service(1, "cash and cards", duration_min=5, mean_min=3.5, cv=0.7, share=0.60),
    Service(2, "accounts", duration_min=10, mean_min=9.0, cv=0.6, share=0.30),
    Service(3, "business", duration_min=20, mean_min=16.0, cv=0.8, share=0.10),
)
BRANCH_OPENS, LAST_ISSUE, BRANCH_CLOSES = hm("08:30"), hm("17:00"), hm("17:30")
COUNTERS = (
    Counter(1, frozenset({1, 2}), ((hm("08:30"), hm("12:30")), (hm("13:30"), hm("17:30")))),
    Counter(2, frozenset({1}), ((hm("08:30"), hm("14:30")), (hm("15:00"), hm("17:30")))),
    Counter(3, frozenset({2, 3}), ((hm("08:30"), hm("17:30")),)),
    Counter(4, frozenset({1, 2, 3}), ((hm("09:30"), hm("13:00")), (hm("14:00"), hm("17:30")))),
    Counter(5, frozenset({1}), ((hm("11:00"), hm("14:30")),)),
    Counter(6, frozenset({2, 3}), ((hm("10:00"), hm("16:00")),)),
)
# Arrivals per minute, piecewise constant: quiet start, lunch peak, steady afternoon.
ARRIVAL_PROFILE = (
    (hm("08:30"), 0.45),
    (hm("10:00"), 0.70),
    (hm("11:30"), 1.05),
    (hm("13:30"), 0.70),
    (hm("16:00"), 0.55),
)


def arrival_rate_per_s(t: float) -> float:
    rate = 0.0
    for start, per_minute in ARRIVAL_PROFILE:
        if t >= start:
            rate = per_minute / 60
    return rate


# --- what the estimator sees at an issue ------------------------------------------


@dataclass(frozen=True, slots=True)
class SeenCounter:
    """One counter shift as the server sees it at an issue: open now, or planned
    later today by the roster (times relative to the issue)."""

    services: frozenset[int]
    open_now: bool
    serving: int | None  # service id of the ticket at the counter
    elapsed_s: float
    opens_in_s: float
    closes_in_s: float | None  # planned end of this shift; None at the end of the day


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The state at the moment a ticket is issued, before anyone calls it."""

    service_id: int
    ahead: tuple[int, ...]  # service ids of waiting tickets, oldest first
    counters: tuple[SeenCounter, ...]
    model: ServiceTimeModel


@dataclass(slots=True)
class Ticket:
    ticket_id: int
    service_id: int
    issued_at: float
    service_s: float
    snapshot: Snapshot
    called_at: float | None = None

    @property
    def wait_s(self) -> float:
        assert self.called_at is not None, "never called"
        return self.called_at - self.issued_at


@dataclass(slots=True)
class _CounterRun:
    spec: Counter
    actual: tuple[tuple[float, float], ...]  # the roster as it really happened
    on_shift: bool = False
    span: int = -1  # index of the current (or last) shift
    draining: bool = False  # past closing: serves what is left, then goes home
    serving: Ticket | None = None
    started_at: float = 0.0

    def open_at(self, t: float) -> bool:
        return self.on_shift and (self.draining or self.actual[self.span][0] <= t)

    def taking_tickets(self, t: float) -> bool:
        lo, hi = self.actual[self.span]
        return self.on_shift and (self.draining or lo <= t < hi)


@dataclass(slots=True)
class Day:
    seed: int
    tickets: list[Ticket] = field(default_factory=list)
    open_at_issue: list[tuple[float, int]] = field(default_factory=list)


def lognormal_s(rng: random.Random, mean_min: float, cv: float) -> float:
    sigma2 = math.log(1 + cv * cv)
    return rng.lognormvariate(math.log(mean_min * 60) - sigma2 / 2, math.sqrt(sigma2))


def _actual_shifts(rng: random.Random, counter: Counter) -> tuple[tuple[float, float], ...]:
    """Staff open up to 10 minutes late and close between 5 minutes early and 10
    minutes late; the last shift of the day ends at closing and serves the rest."""
    spans = []
    for opens, closes in counter.shifts:
        late_close = closes if closes >= BRANCH_CLOSES else closes + rng.uniform(-5, 10) * 60
        spans.append((opens + rng.uniform(0, 10) * 60, late_close))
    return tuple(spans)


def _seen(run: _CounterRun, now: float) -> list[SeenCounter]:
    def planned_close(span: int) -> float | None:
        closes = run.spec.shifts[span][1]
        return None if closes >= BRANCH_CLOSES else closes - now

    seen = []
    if run.taking_tickets(now):
        seen.append(
            SeenCounter(
                run.spec.services,
                open_now=True,
                serving=None if run.serving is None else run.serving.service_id,
                elapsed_s=now - run.started_at,
                opens_in_s=0.0,
                closes_in_s=planned_close(run.span),
            )
        )
    for span in range(run.span + 1, len(run.spec.shifts)):
        opens = run.spec.shifts[span][0]
        seen.append(
            SeenCounter(
                run.spec.services,
                open_now=False,
                serving=None,
                elapsed_s=0.0,
                opens_in_s=max(0.0, opens - now),
                closes_in_s=planned_close(span),
            )
        )
    return seen


def simulate_day(seed: int, *, alpha: float | None = None) -> Day:
    """One branch day with `random.Random(seed)`; every ticket ends up called."""
    rng = random.Random(seed)
    seeds = {s.service_id: s.duration_min * 60 for s in SERVICES}
    model = ServiceTimeModel(seeds) if alpha is None else ServiceTimeModel(seeds, alpha)
    day = Day(seed)

    # Events: (time, order, sequence, kind, payload). At one instant finished
    # services come first, then shift changes, then arrivals.
    events: list[tuple[float, int, int, str, int, int]] = []
    sequence = 0

    def push(at: float, order: int, kind: str, payload: int, span: int = 0) -> None:
        nonlocal sequence
        sequence += 1
        heapq.heappush(events, (at, order, sequence, kind, payload, span))

    # Arrivals: a non-homogeneous Poisson process by thinning; the service and
    # its service time are drawn at arrival so the day does not depend on policy.
    peak = max(rate for _, rate in ARRIVAL_PROFILE) / 60
    t = BRANCH_OPENS
    arrivals: list[tuple[float, int, float]] = []
    while True:
        t += rng.expovariate(peak)
        if t >= LAST_ISSUE:
            break
        if rng.random() * peak < arrival_rate_per_s(t):
            service = rng.choices(SERVICES, weights=[s.share for s in SERVICES])[0]
            arrivals.append((t, service.service_id, lognormal_s(rng, service.mean_min, service.cv)))
    for n, (at, _, _) in enumerate(arrivals):
        push(at, 3, "arrive", n)
    runs = [_CounterRun(c, _actual_shifts(rng, c)) for c in COUNTERS]
    for n, run in enumerate(runs):
        for span, (opens, closes) in enumerate(run.actual):
            push(opens, 2, "open", n, span)
            push(closes, 1, "close", n, span)

    waiting: dict[int, deque[Ticket]] = {s.service_id: deque() for s in SERVICES}

    def dispatch(now: float) -> None:
        for n, run in enumerate(runs):
            if not run.taking_tickets(now) or run.serving is not None:
                continue
            heads = [waiting[s][0] for s in run.spec.services if waiting[s]]
            if not heads:
                if run.draining:
                    run.on_shift = False
                continue
            ticket = min(heads, key=lambda tk: tk.ticket_id)
            waiting[ticket.service_id].popleft()
            ticket.called_at = now
            run.serving, run.started_at = ticket, now
            push(now + ticket.service_s, 0, "done", n)

    while events:
        now, _, _, kind, payload, span = heapq.heappop(events)
        if kind == "done":
            run = runs[payload]
            assert run.serving is not None
            model = model.observe(run.serving.service_id, now - run.started_at)
            run.serving = None
            if not run.taking_tickets(now):
                run.on_shift = False  # its shift ended while it was busy
        elif kind == "open":
            run = runs[payload]
            run.on_shift, run.span = True, span
        elif kind == "close":
            run = runs[payload]
            if now >= BRANCH_CLOSES:
                run.draining = True
            elif run.serving is None:
                run.on_shift = False
        else:
            at, service_id, service_s = arrivals[payload]
            seen = tuple(c for run in runs for c in _seen(run, now))
            day.open_at_issue.append((now, sum(c.open_now for c in seen)))
            snapshot = Snapshot(
                service_id=service_id,
                ahead=tuple(
                    tk.service_id
                    for tk in sorted(
                        (tk for queue in waiting.values() for tk in queue),
                        key=lambda tk: tk.ticket_id,
                    )
                ),
                counters=seen,
                model=model,
            )
            ticket = Ticket(payload, service_id, at, service_s, snapshot)
            day.tickets.append(ticket)
            waiting[service_id].append(ticket)
        dispatch(now)
    return day


# --- estimators compared on the same snapshots --------------------------------------

Estimator = Callable[[Snapshot], float | None]


def naive(snapshot: Snapshot) -> float | None:
    """Position in its own queue x configured duration / open counters able."""
    able = sum(1 for c in snapshot.counters if c.open_now and snapshot.service_id in c.services)
    if not able:
        return None
    position = sum(1 for s in snapshot.ahead if s == snapshot.service_id)
    return position * snapshot.model.seed_s[snapshot.service_id] / able


def counter_states(
    snapshot: Snapshot, expected: dict[int, float], *, roster: bool
) -> list[CounterState]:
    """What the service layer would pass: open counters only, or with the roster."""
    return [
        CounterState(
            c.services,
            busy_remaining_s=(
                0.0 if c.serving is None else remaining_service_s(expected[c.serving], c.elapsed_s)
            ),
            opens_in_s=c.opens_in_s if roster else 0.0,
            closes_in_s=c.closes_in_s if roster else None,
        )
        for c in snapshot.counters
        if roster or c.open_now
    ]


def fluid(snapshot: Snapshot) -> float | None:
    """Expected work ahead over the counters able to serve ours: each ticket ahead
    counts for the share of the counters that can serve it which can also serve
    ours; plus those counters' residuals."""
    expected = snapshot.model.expected_all()
    states = counter_states(snapshot, expected, roster=False)
    able = [c for c in states if snapshot.service_id in c.services]
    if not able:
        return None
    work = 0.0
    for s in snapshot.ahead:
        serving = [c for c in states if s in c.services]
        if serving:
            work += expected[s] * sum(c in able for c in serving) / len(serving)
    return (work + sum(c.busy_remaining_s for c in able)) / len(able)


def replay_with(expected_of: Callable[[Snapshot], dict[int, float]], *, roster: bool) -> Estimator:
    def estimate(snapshot: Snapshot) -> float | None:
        expected = expected_of(snapshot)
        return estimate_wait(
            [AheadTicket(s) for s in snapshot.ahead],
            expected,
            counter_states(snapshot, expected, roster=roster),
            snapshot.service_id,
        )

    return estimate


def _seeded(snapshot: Snapshot) -> dict[int, float]:
    return dict(snapshot.model.seed_s)


def _ewma(snapshot: Snapshot) -> dict[int, float]:
    return snapshot.model.expected_all()


replay_seeded = replay_with(_seeded, roster=False)
replay_open = replay_with(_ewma, roster=False)
replay = replay_with(_ewma, roster=True)  # the production estimator

ESTIMATORS: dict[str, Estimator] = {
    "naive position x duration / counters": naive,
    "work ahead / counters (fluid)": fluid,
    "replay, configured durations, open only": replay_seeded,
    "replay, EWMA, open counters only": replay_open,
    "replay, EWMA, with roster (shipped)": replay,
}


@dataclass(frozen=True, slots=True)
class Accuracy:
    tickets: int
    unknown: int
    mean_wait_min: float
    mae_min: float
    band_hit_rate: float


def accuracy(day: Day, estimator: Estimator) -> Accuracy:
    errors: list[float] = []
    hits = unknown = 0
    waits: list[float] = []
    for ticket in day.tickets:
        wait = ticket.wait_s
        waits.append(wait)
        eta = estimator(ticket.snapshot)
        if eta is None:
            unknown += 1
            continue
        errors.append(abs(eta - wait))
        lo, hi = eta_band(eta)
        hits += lo * 60 <= wait <= hi * 60
    known = len(errors)
    return Accuracy(
        tickets=len(day.tickets),
        unknown=unknown,
        mean_wait_min=sum(waits) / len(waits) / 60,
        mae_min=sum(errors) / known / 60 if known else math.nan,
        band_hit_rate=hits / known if known else math.nan,
    )


def report_line(seed: int, shipped: Accuracy, baseline: Accuracy) -> str:
    return (
        f"ETA simulation seed={seed}: tickets={shipped.tickets} "
        f"mean_wait={shipped.mean_wait_min:.1f}min MAE={shipped.mae_min:.2f}min "
        f"naive_MAE={baseline.mae_min:.2f}min band_hit={shipped.band_hit_rate:.0%} "
        f"unknown={shipped.unknown}"
    )


# --- the tests ---------------------------------------------------------------------

SEEDS = (1, 2, 3, 4, 5)


@pytest.fixture(scope="module")
def days() -> dict[int, Day]:
    return {seed: simulate_day(seed) for seed in SEEDS}


def test_the_day_is_realistic_and_every_ticket_is_called(days: dict[int, Day]) -> None:
    for day in days.values():
        assert 300 <= len(day.tickets) <= 500
        assert all(tk.called_at is not None for tk in day.tickets)
        assert all(tk.wait_s >= 0 for tk in day.tickets)
        open_counts = [n for t, n in day.open_at_issue if hm("09:00") <= t]
        assert min(open_counts) >= 3
        assert max(open_counts) == 6
        waits = [tk.wait_s for tk in day.tickets]
        assert max(waits) > 15 * 60  # the lunch peak builds a real queue
        assert sum(w == 0 for w in waits) > 20  # and quiet hours call some at once
    assert max(tk.wait_s for d in days.values() for tk in d.tickets) > 3600


def test_calls_follow_the_policy_oldest_first_per_service(days: dict[int, Day]) -> None:
    for day in days.values():
        for service in SERVICES:
            called = [
                tk.issued_at + tk.wait_s
                for tk in day.tickets
                if tk.service_id == service.service_id
            ]
            assert called == sorted(called)


def test_the_simulation_is_deterministic() -> None:
    first, second = simulate_day(7), simulate_day(7)
    assert [(tk.issued_at, tk.called_at) for tk in first.tickets] == [
        (tk.issued_at, tk.called_at) for tk in second.tickets
    ]


@pytest.mark.parametrize("seed", SEEDS)
def test_the_estimator_beats_the_naive_baseline(days: dict[int, Day], seed: int) -> None:
    day = days[seed]
    shipped, baseline = accuracy(day, replay), accuracy(day, naive)
    print(report_line(seed, shipped, baseline))
    assert shipped.unknown == 0  # the roster covers the minutes before staff open up
    assert shipped.mae_min < 0.85 * baseline.mae_min
    assert shipped.mae_min < 0.4 * shipped.mean_wait_min
    assert shipped.band_hit_rate > 0.5


@pytest.mark.parametrize("seed", SEEDS)
def test_the_ewma_and_the_replay_each_earn_their_place(days: dict[int, Day], seed: int) -> None:
    day = days[seed]
    shipped = accuracy(day, replay).mae_min
    assert shipped < 0.85 * accuracy(day, replay_seeded).mae_min  # learning the real pace
    assert shipped < 0.7 * accuracy(day, fluid).mae_min  # skills handled exactly


def test_the_roster_helps_over_the_day(days: dict[int, Day]) -> None:
    def pooled(estimator: Estimator) -> float:
        results = [accuracy(day, estimator) for day in days.values()]
        return sum(r.mae_min * r.tickets for r in results) / sum(r.tickets for r in results)

    assert pooled(replay) < 0.8 * pooled(replay_open)


# --- by hand ------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args(argv)
    days = [simulate_day(seed) for seed in args.seeds]
    for day in days:
        print(report_line(day.seed, accuracy(day, replay), accuracy(day, naive)))
    print()
    count = sum(len(d.tickets) for d in days)
    print(f"all seeds {list(args.seeds)}, {count} tickets:")
    for name, estimator in ESTIMATORS.items():
        results = [accuracy(day, estimator) for day in days]
        weights = [r.tickets - r.unknown for r in results]
        total = sum(weights)
        mae = sum(r.mae_min * w for r, w in zip(results, weights, strict=True)) / total
        hit = sum(r.band_hit_rate * w for r, w in zip(results, weights, strict=True)) / total
        wait = sum(r.mean_wait_min * r.tickets for r in results) / count
        print(f"  {name:40s} MAE {mae:5.2f} min  band hit {hit:4.0%}  (mean wait {wait:.1f} min)")


if __name__ == "__main__":
    main()
