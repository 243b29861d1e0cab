"""Availability against an independent minute-by-minute model, across clock changes.

The model below uses nothing from the engine: it reads every UTC minute of a few
days on the branch clock with `zoneinfo` and decides, minute by minute, what is
open, who is on shift, how many seats each resource has taken and how many counter
seats the walk-in reserve leaves. Interval boundaries follow the documented rule
(see `selfserve.scheduling.availability`), found here by scanning instants rather
than by converting wall times: an interval starting at wall time ``w`` of day
``d`` starts at the first instant of ``d`` whose wall time is ``w`` or later (the
earlier reading of a repeated time, the end of a skipped gap) and ends just after
the last instant of ``d`` whose wall time is before its end (the later reading).
Candidate starts are the wall times ``opens + k * interval`` and every instant
that shows one of them; when ``opens`` is read twice (it lies in a repeated hour),
also the second readings of ``opens - k * interval`` while they are read twice.

Zones: Europe/London and America/New_York (one hour forward and back),
Australia/Lord_Howe (half an hour forward and back), and Asia/Shanghai (none),
each on the days around its changes in 2026, with closures, buffers, shifts and
exceptions, party sizes and the walk-in reserve drawn by hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from selfserve.scheduling.availability import (
    BranchCalendar,
    Commitment,
    ResourceSchedule,
    ServiceRules,
    available_slots,
)

MINUTE = timedelta(minutes=1)

# (zone, a local date whose clock changes, or does not)
DAYS = [
    ("Europe/London", date(2026, 3, 29)),  # 01:00 -> 02:00
    ("Europe/London", date(2026, 10, 25)),  # 02:00 -> 01:00
    ("America/New_York", date(2026, 3, 8)),  # 02:00 -> 03:00
    ("America/New_York", date(2026, 11, 1)),  # 02:00 -> 01:00
    ("Australia/Lord_Howe", date(2026, 4, 5)),  # 02:00 -> 01:30
    ("Australia/Lord_Howe", date(2026, 10, 4)),  # 02:00 -> 02:30
    ("Asia/Shanghai", date(2026, 6, 1)),
]

# Wall minutes, with the hours the clocks change in drawn often.
WALL = st.integers(0, 96).map(lambda q: q * 15) | st.sampled_from(
    [60, 75, 90, 100, 105, 110, 120, 130, 135, 150, 165, 180, 1440]
)


@dataclass(frozen=True)
class Case:
    zone: str
    day: date
    calendar: BranchCalendar
    rules: ServiceRules
    resources: tuple[ResourceSchedule, ...]
    commitments: tuple[Commitment, ...]
    party: int


def midnight(day: date, tz: ZoneInfo) -> datetime:
    """The first instant of a local day (no zone here skips midnight)."""
    return datetime.combine(day, time(), tzinfo=tz).astimezone(UTC)


CHANGE = st.sampled_from([0, 30, 45, 60, 75, 90, 100, 105, 110, 120, 130, 135, 150, 165, 180, 210])


def windows(draw: st.DrawFn, focus: int) -> tuple[tuple[int, int, int], ...]:
    """0-2 windows a weekday, for every weekday; often the whole day. On `focus` (the
    weekday of the clock change) a window often starts or ends near the change."""
    if draw(st.integers(0, 2)) == 0:
        return tuple((weekday, 0, 1440) for weekday in range(1, 8))
    out: list[tuple[int, int, int]] = []
    for weekday in range(1, 8):
        if draw(st.integers(0, 3)) == 0:
            out.append((weekday, 0, 1440))
            continue
        for _ in range(draw(st.integers(0, 2))):
            near = weekday == focus and draw(st.booleans())
            a, b = draw(CHANGE if near else WALL), draw(WALL)
            out.append((weekday, min(a, b), max(a, b)))
    return tuple(out)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    zone, day = draw(st.sampled_from(DAYS))
    tz = ZoneInfo(zone)
    base = midnight(day - timedelta(days=1), tz)
    closures = frozenset(
        d for d in (day + timedelta(days=k) for k in (-1, 0, 1)) if draw(st.integers(0, 5)) == 0
    )
    reserve = draw(st.sampled_from([0.0, 0.0, 0.25, 0.34, 0.5, 1.0]))
    calendar = BranchCalendar(zone, windows(draw, day.isoweekday()), closures, reserve)
    rules = ServiceRules(
        duration_min=draw(st.sampled_from([15, 20, 30, 45, 60, 90])),
        buffer_before_min=draw(st.sampled_from([0, 0, 5, 15])),
        buffer_after_min=draw(st.sampled_from([0, 0, 10, 30])),
        slot_interval_min=draw(st.sampled_from([15, 20, 30, 45, 60])),
        horizon_days=30,
        max_party=3,
    )

    def instant(lo: int, hi: int) -> datetime:
        return base + MINUTE * draw(st.integers(lo, hi))

    resources = []
    for rid in range(1, draw(st.integers(1, 4)) + 1):
        exceptions = []
        for _ in range(draw(st.integers(0, 2))):
            start = instant(-120, 3 * 1440)
            exceptions.append(
                (start, start + MINUTE * draw(st.integers(1, 600)), draw(st.booleans()))
            )
        resources.append(
            ResourceSchedule(
                rid,
                draw(st.sampled_from(["counter", "counter", "staff", "room"])),
                draw(st.integers(1, 3)),
                windows(draw, day.isoweekday()),
                tuple(exceptions),
            )
        )
    commitments = []
    for _ in range(draw(st.integers(0, 15))):
        start = instant(-180, 3 * 1440 + 180)
        commitments.append(
            Commitment(
                draw(st.integers(1, len(resources) + 1)),  # one id not passed in
                start,
                start + MINUTE * draw(st.integers(1, 240)),
                draw(st.sampled_from([1, 1, 2, 3])),
            )
        )
    return Case(
        zone,
        day,
        calendar,
        rules,
        tuple(resources),
        tuple(commitments),
        draw(st.integers(1, 3)),
    )


class Clock:
    """Every UTC minute from two days before the first day to two days after the
    last, with its branch-local date and minute of the day."""

    def __init__(self, tz: ZoneInfo, first: date, last: date) -> None:
        self.start = midnight(first - timedelta(days=2), tz)
        stop = midnight(last + timedelta(days=3), tz)
        self.instants: list[datetime] = []
        self.local: list[tuple[date, int]] = []
        self.by_day: dict[date, list[int]] = {}
        self.by_wall: dict[tuple[date, int], list[int]] = {}
        t = self.start
        while t < stop:
            wall = t.astimezone(tz)
            reading = (wall.date(), wall.hour * 60 + wall.minute)
            self.by_day.setdefault(reading[0], []).append(len(self.instants))
            self.by_wall.setdefault(reading, []).append(len(self.instants))
            self.instants.append(t)
            self.local.append(reading)
            t += MINUTE

    def index(self, t: datetime) -> int:
        return (t - self.start) // MINUTE

    def interval(self, day: date, lo: int, hi: int) -> tuple[int, int] | None:
        """Minute indexes [first, stop) of wall time lo..hi on `day`, by the rule above."""
        if lo >= hi:
            return None
        of_day = self.by_day.get(day, [])
        first = next((i for i in of_day if self.local[i][1] >= lo), None)
        last = max((i for i in of_day if self.local[i][1] < hi), default=None)
        if first is None or last is None or last < first:
            return None
        return first, last + 1

    def showing(self, day: date, minute: int) -> list[int]:
        return self.by_wall.get((day, minute), [])


def weekly(
    clock: Clock, spans: tuple[tuple[int, int, int], ...], skip: frozenset[date]
) -> list[bool]:
    covered = [False] * len(clock.instants)
    for day in sorted(clock.by_day):
        if day in skip:
            continue
        for weekday, lo, hi in spans:
            if weekday != day.isoweekday():
                continue
            found = clock.interval(day, lo, hi)
            if found:
                for i in range(*found):
                    covered[i] = True
    return covered


def model(
    case: Case, window_from: datetime, window_to: datetime
) -> dict[datetime, tuple[int, tuple[tuple[int, int], ...]]]:
    tz = ZoneInfo(case.zone)
    cal, rules = case.calendar, case.rules
    days = [case.day + timedelta(days=k) for k in (-1, 0, 1)]
    clock = Clock(tz, days[0], days[-1])
    n = len(clock.instants)
    is_open = weekly(clock, cal.opening_hours, cal.closures)

    on_shift: dict[int, list[bool]] = {}
    used: dict[int, list[int]] = {}
    for r in case.resources:
        shift = weekly(clock, r.shifts, frozenset())
        for lo, hi, available in r.exceptions:
            if not available:
                for i in range(max(0, clock.index(lo)), min(n, clock.index(hi))):
                    shift[i] = False
        for lo, hi, available in r.exceptions:
            if available:
                for i in range(max(0, clock.index(lo)), min(n, clock.index(hi))):
                    shift[i] = True
        on_shift[r.resource_id] = shift
        seats = [0] * n
        for c in case.commitments:
            if c.resource_id == r.resource_id:
                for i in range(max(0, clock.index(c.starts_at)), min(n, clock.index(c.ends_at))):
                    seats[i] += c.seats
        used[r.resource_id] = seats

    share = 1 - Fraction(repr(cal.walk_in_reserve))
    counters = [r for r in case.resources if r.kind == "counter"]
    pool_at = []
    for i in range(n):
        cap = sum(r.capacity for r in counters if on_shift[r.resource_id][i])
        booked = sum(used[r.resource_id][i] for r in counters)
        pool_at.append(int(cap * share // 1) - booked)

    candidates: set[int] = set()
    for day in days:
        if day in cal.closures:
            continue
        for weekday, opens, closes in cal.opening_hours:
            if weekday != day.isoweekday() or opens >= closes:
                continue
            for wall in range(opens, closes, rules.slot_interval_min):
                candidates.update(clock.showing(day, wall))
            if len(clock.showing(day, opens)) == 2:
                # It opens in the repeated hour, at the first reading: the clock then
                # goes back past `opens`, and the grid's earlier wall times read a
                # second time are starts too (their later instants).
                wall = opens - rules.slot_interval_min
                while wall >= 0 and len(clock.showing(day, wall)) == 2:
                    candidates.add(clock.showing(day, wall)[1])
                    wall -= rules.slot_interval_min

    out: dict[datetime, tuple[int, tuple[tuple[int, int], ...]]] = {}
    for s in sorted(candidates):
        start = clock.instants[s]
        if not window_from <= start < window_to:
            continue
        e = s + rules.duration_min
        if not all(is_open[s:e]):
            continue
        occupied = range(s - rules.buffer_before_min, e + rules.buffer_after_min)
        pool = max(0, min(pool_at[i] for i in occupied))
        others = counter_free = 0
        free_by: list[tuple[int, int]] = []
        for r in sorted(case.resources, key=lambda r: r.resource_id):
            rid = r.resource_id
            if not all(on_shift[rid][i] for i in occupied):
                continue
            free = max(0, r.capacity - max(used[rid][i] for i in occupied))
            if r.kind == "counter":
                counter_free += free
                effective = min(free, pool)
            else:
                others += free
                effective = free
            if effective:
                free_by.append((rid, effective))
        if any(seats >= case.party for _, seats in free_by):
            out[start] = (others + min(counter_free, pool), tuple(free_by))
    return out


@settings(max_examples=200, deadline=None)
@given(cases())
def test_engine_matches_the_minute_by_minute_model(case: Case) -> None:
    tz = ZoneInfo(case.zone)
    window_from = midnight(case.day - timedelta(days=1), tz)
    window_to = midnight(case.day + timedelta(days=2), tz)
    result = available_slots(
        case.calendar,
        case.rules,
        case.resources,
        case.commitments,
        party_size=case.party,
        window_from=window_from,
        window_to=window_to,
        now=window_from - timedelta(days=1),
    )
    expected = model(case, window_from, window_to)
    got = {s.start: (s.remaining, s.free_by_resource) for s in result}
    assert got == expected
    for s in result:
        assert s.end - s.start == timedelta(minutes=case.rules.duration_min)
        # the branch-local reading of the same instant (aware comparisons across
        # zones are never equal in a repeated hour, so compare as UTC)
        assert s.local_start.tzinfo == tz
        assert s.local_start.astimezone(UTC) == s.start
        assert s.local_start.utcoffset() == s.start.astimezone(tz).utcoffset()


def test_the_model_sees_both_readings_of_a_repeated_half_hour() -> None:
    """Lord Howe's clocks go back from 02:00 to 01:30: 01:45 happens twice."""
    tz = ZoneInfo("Australia/Lord_Howe")
    day = date(2026, 4, 5)
    clock = Clock(tz, day, day)
    twice = [clock.instants[i] for i in clock.showing(day, 105)]
    assert [t.astimezone(tz).utcoffset() for t in twice] == [
        timedelta(hours=11),
        timedelta(hours=10, minutes=30),
    ]
    assert twice[1] - twice[0] == timedelta(minutes=30)
    # and a skipped wall time shows on no instant (New York, 02:30 on 8 March)
    spring = Clock(ZoneInfo("America/New_York"), date(2026, 3, 8), date(2026, 3, 8))
    assert list(spring.showing(date(2026, 3, 8), 150)) == []
