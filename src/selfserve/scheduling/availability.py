"""Bookable slots, computed without I/O.

The service layer loads the branch, the service, the resources that have the
service as a skill (with their schedules) and the commitments that overlap the
range asked for, then calls `available_slots`. Everything here is deterministic
and works on UTC instants; wall-clock rules (opening hours, weekly shifts) are
turned into UTC intervals day by day with `zoneinfo`.

Exact semantics
---------------
Wall time to instants. A branch-local wall time ``D + m minutes`` (``m`` in
0..1440, 1440 = 24:00 = next day 00:00) becomes an instant as follows: an
unambiguous time maps to its single instant; a time repeated by a fall-back
change resolves to the *earlier* instant when it starts an interval and to the
*later* one when it ends an interval (so a shift 00:00-03:00 on a fall-back day
covers four real hours); a time skipped by a spring-forward change resolves to
the first instant after the gap (so a shift 00:00-03:00 on a spring-forward day
covers two real hours). Overnight windows (closes <= opens) are empty.

Candidates. For every branch-local day that is not a closure and every opening
window ``(weekday, opens, closes)`` of that weekday, candidate starts are the wall
times ``opens, opens + interval, ...`` strictly before ``closes``. A wall time in
a spring-forward gap yields no candidate; a wall time repeated by a fall-back
change yields two candidates (fold 0 and fold 1), distinct instants. Duplicate
instants (overlapping windows) are offered once.

A candidate ``start`` becomes a slot when all of these hold:

* ``window_from <= start < window_to``;
* ``start >= now + lead_time_min`` and ``start < now + horizon_days`` (days of 24 h);
* the service span ``[start, end)``, ``end = start + duration_min``, lies inside
  one contiguous stretch of the union of the opening intervals of open days (so
  a span may cross midnight when the next day opens at 00:00);
* the occupied span ``[start - buffer_before_min, end + buffer_after_min)`` lies
  inside one contiguous stretch of the on-shift time of some resource, where
  on-shift time = (weekly shifts - ``available=false`` exceptions)
  ∪ ``available=true`` exceptions (extra time wins over time off);
* some resource ``r`` on shift over the whole occupied span has
  ``effective_free(r) >= party_size`` (a party is served by one resource).

Seats. For a resource ``r`` on shift over the occupied span ``S``:
``free(r) = capacity(r) - max over t in S of (sum of seats of r's commitments
covering t)`` (peak overlap, not the sum of all overlapping commitments),
floored at 0. Commitments are half-open ``[starts_at, ends_at)`` and already
include their own buffers, so two back-to-back ones never overlap.

Walk-in reserve. Let ``C(t)`` be the summed capacity of the counters (kind
``counter``, among the resources passed in) on shift at instant ``t`` and
``B(t)`` the summed seats of commitments on those counters covering ``t``. At
most ``floor(C(t) * (1 - walk_in_reserve))`` counter seats may be committed at
once, so the counter pool left for a span is
``pool(S) = max(0, min over t in S of (floor(C(t) * (1 - walk_in_reserve)) - B(t)))``
(the reserve is read exactly as a decimal fraction: 0.2 means 1/5). Then
``effective_free(r) = min(free(r), pool(S))`` for a counter and ``free(r)`` for
any other kind.

``remaining = sum of free(r) over non-counter resources on shift
+ min(sum of free(r) over counters on shift, pool(S))``: the total number of seats
still bookable for that slot across all qualified resources.
``free_by_resource`` lists ``(resource_id, effective_free(r))`` for every resource
on shift over the occupied span with at least one effective seat, by id.

Cost. Commitments must overlap the range asked for: the database layer passes
only commitments whose ``during`` overlaps ``[window start - buffers, window end
+ duration + buffers)`` (a GiST index query), so the input does not grow with the
history of the branch. Anything outside that range is dropped in one pass here
anyway; per slot the work is a binary search into per-resource usage profiles,
so it grows with the slots and commitments in range only.
"""

from __future__ import annotations

import math
from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from zoneinfo import ZoneInfo

__all__ = [
    "BranchCalendar",
    "Commitment",
    "ResourceSchedule",
    "ServiceRules",
    "Slot",
    "available_slots",
    "pick_resource",
]

MINUTES_PER_DAY = 1440
_MINUTE = timedelta(minutes=1)

Interval = tuple[datetime, datetime]


@dataclass(frozen=True, slots=True)
class BranchCalendar:
    timezone: str
    opening_hours: tuple[tuple[int, int, int], ...]
    """(ISO weekday 1-7, opens minute, closes minute 0..1440), branch wall time."""
    closures: frozenset[date] = frozenset()
    walk_in_reserve: float = 0.0


@dataclass(frozen=True, slots=True)
class ServiceRules:
    duration_min: int
    buffer_before_min: int = 0
    buffer_after_min: int = 0
    slot_interval_min: int = 15
    lead_time_min: int = 0
    horizon_days: int = 30
    min_party: int = 1
    max_party: int = 1


@dataclass(frozen=True, slots=True)
class ResourceSchedule:
    resource_id: int
    kind: str
    capacity: int
    shifts: tuple[tuple[int, int, int], ...]
    """(ISO weekday 1-7, start minute, end minute 0..1440), branch wall time."""
    exceptions: tuple[tuple[datetime, datetime, bool], ...] = ()
    """(starts_at, ends_at, available): False = off, True = extra time on."""


@dataclass(frozen=True, slots=True)
class Commitment:
    """A booking or live hold; the interval already includes its buffers."""

    resource_id: int
    starts_at: datetime
    ends_at: datetime
    seats: int


@dataclass(frozen=True, slots=True)
class Slot:
    start: datetime
    end: datetime
    local_start: datetime
    remaining: int
    free_by_resource: tuple[tuple[int, int], ...]


# --- wall time ---------------------------------------------------------------


def _exists(wall: datetime, tz: ZoneInfo, fold: int) -> datetime | None:
    """The UTC instant of a naive wall time with `fold`, or None if it is skipped."""
    instant = wall.replace(tzinfo=tz, fold=fold).astimezone(UTC)
    back = instant.astimezone(tz).replace(tzinfo=None)
    return instant if back == wall else None


def _wall_instants(wall: datetime, tz: ZoneInfo) -> list[datetime]:
    """Every instant that shows `wall` on the branch clock: 0, 1 or 2 of them."""
    first, second = _exists(wall, tz, 0), _exists(wall, tz, 1)
    found = {i for i in (first, second) if i is not None}
    return sorted(found)


def _boundary(day: date, minute: int, tz: ZoneInfo, *, is_end: bool) -> datetime:
    """The instant of an interval boundary at `minute` of branch-local `day`."""
    wall = datetime.combine(day, time()) + timedelta(minutes=minute)
    instants = _wall_instants(wall, tz)
    while not instants:  # inside a spring-forward gap: the first instant after it
        wall += _MINUTE
        instants = _wall_instants(wall, tz)
    return instants[-1] if is_end else instants[0]


# --- interval sets (sorted, disjoint, non-adjacent, half-open) ----------------


def _union(intervals: Iterable[Interval]) -> list[Interval]:
    merged: list[Interval] = []
    for lo, hi in sorted(i for i in intervals if i[0] < i[1]):
        if merged and lo <= merged[-1][1]:
            if hi > merged[-1][1]:
                merged[-1] = (merged[-1][0], hi)
        else:
            merged.append((lo, hi))
    return merged


def _subtract(base: list[Interval], cuts: list[Interval]) -> list[Interval]:
    out: list[Interval] = []
    for lo, hi in base:
        cur = lo
        for c_lo, c_hi in cuts:
            if c_hi <= cur or c_lo >= hi:
                continue
            if c_lo > cur:
                out.append((cur, c_lo))
            cur = max(cur, c_hi)
            if cur >= hi:
                break
        if cur < hi:
            out.append((cur, hi))
    return out


def _covers(intervals: list[Interval], lo: datetime, hi: datetime) -> bool:
    """True when [lo, hi) lies inside one interval of the set."""
    i = bisect_right(intervals, (lo, datetime.max.replace(tzinfo=UTC))) - 1
    return i >= 0 and intervals[i][0] <= lo and hi <= intervals[i][1]


def _weekly(
    rules: Iterable[tuple[int, int, int]], days: Sequence[date], tz: ZoneInfo
) -> list[Interval]:
    by_weekday: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for weekday, start, end in rules:
        if start < end:
            by_weekday[weekday].append((start, end))
    out: list[Interval] = []
    for day in days:
        for start, end in by_weekday.get(day.isoweekday(), ()):
            out.append(
                (_boundary(day, start, tz, is_end=False), _boundary(day, end, tz, is_end=True))
            )
    return _union(out)


# --- step functions ----------------------------------------------------------


class _Profile:
    """A piecewise-constant function of time: `levels[i]` holds on
    [times[i], times[i+1]); the value is `outside` before times[0] and from the
    last time on (the last level equals `outside`)."""

    __slots__ = ("levels", "outside", "times")

    def __init__(self, times: list[datetime], levels: list[int], outside: int) -> None:
        self.times = times
        self.levels = levels
        self.outside = outside

    @classmethod
    def from_deltas(cls, deltas: dict[datetime, int]) -> _Profile:
        times = sorted(deltas)
        levels: list[int] = []
        level = 0
        for t in times:
            level += deltas[t]
            levels.append(level)
        return cls(times, levels, 0)

    def _range(self, lo: datetime, hi: datetime) -> list[int]:
        i = bisect_right(self.times, lo) - 1
        j = bisect_left(self.times, hi)
        values = self.levels[max(i, 0) : j]
        if i < 0:
            values.append(self.outside)
        return values

    def peak(self, lo: datetime, hi: datetime) -> int:
        return max(self._range(lo, hi))

    def low(self, lo: datetime, hi: datetime) -> int:
        return min(self._range(lo, hi))


def _add(deltas: dict[datetime, int], lo: datetime, hi: datetime, amount: int) -> None:
    if lo < hi and amount:
        deltas[lo] += amount
        deltas[hi] -= amount


def _counter_pool(
    shifts: dict[int, list[Interval]],
    counters: Sequence[ResourceSchedule],
    usage: dict[int, dict[datetime, int]],
    reserve: float,
) -> _Profile:
    """floor(C(t) * (1 - reserve)) - B(t) as a step function."""
    capacity: dict[datetime, int] = defaultdict(int)
    booked: dict[datetime, int] = defaultdict(int)
    for counter in counters:
        for lo, hi in shifts[counter.resource_id]:
            _add(capacity, lo, hi, counter.capacity)
        for t, d in usage.get(counter.resource_id, {}).items():
            booked[t] += d
    share = 1 - Fraction(repr(reserve))
    times = sorted(set(capacity) | set(booked))
    levels: list[int] = []
    cap = used = 0
    for t in times:
        cap += capacity.get(t, 0)
        used += booked.get(t, 0)
        levels.append(math.floor(cap * share) - used)
    return _Profile(times, levels, 0)


# --- the function ------------------------------------------------------------


def _aware(value: datetime, name: str) -> datetime:
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")
    return value.astimezone(UTC)


def _validate(calendar: BranchCalendar, rules: ServiceRules, party_size: int) -> None:
    if not rules.min_party <= party_size <= rules.max_party:
        raise ValueError(f"party_size {party_size} outside [{rules.min_party}, {rules.max_party}]")
    if rules.duration_min < 1 or rules.slot_interval_min < 1:
        raise ValueError("duration_min and slot_interval_min must be at least 1")
    if min(rules.buffer_before_min, rules.buffer_after_min, rules.lead_time_min) < 0:
        raise ValueError("buffers and lead time must not be negative")
    if not 0 <= calendar.walk_in_reserve <= 1:
        raise ValueError("walk_in_reserve must lie in [0, 1]")


def _days(lo: datetime, hi: datetime, tz: ZoneInfo) -> list[date]:
    """Branch-local dates from the day before `lo` to the day after `hi`."""
    first = lo.astimezone(tz).date() - timedelta(days=1)
    last = hi.astimezone(tz).date() + timedelta(days=1)
    return [first + timedelta(days=n) for n in range((last - first).days + 1)]


def available_slots(
    calendar: BranchCalendar,
    rules: ServiceRules,
    resources: Sequence[ResourceSchedule],
    commitments: Iterable[Commitment],
    *,
    party_size: int,
    window_from: datetime,
    window_to: datetime,
    now: datetime,
) -> list[Slot]:
    """Slots a party of `party_size` can book, by start; see the module docstring."""
    _validate(calendar, rules, party_size)
    tz = ZoneInfo(calendar.timezone)
    window_from = _aware(window_from, "window_from")
    window_to = _aware(window_to, "window_to")
    now = _aware(now, "now")
    first_start = max(window_from, now + timedelta(minutes=rules.lead_time_min))
    last_start = min(window_to, now + timedelta(days=rules.horizon_days))  # exclusive
    if first_start >= last_start:
        return []

    duration = timedelta(minutes=rules.duration_min)
    before = timedelta(minutes=rules.buffer_before_min)
    after = timedelta(minutes=rules.buffer_after_min)
    span_lo, span_hi = first_start - before, last_start + duration + after
    days = _days(span_lo, span_hi, tz)
    open_days = [d for d in days if d not in calendar.closures]
    opening = _weekly(calendar.opening_hours, open_days, tz)

    shifts: dict[int, list[Interval]] = {}
    for res in resources:
        weekly = _weekly(res.shifts, days, tz)
        off = _union(
            (_aware(s, "starts_at"), _aware(e, "ends_at"))
            for s, e, avail in res.exceptions
            if not avail
        )
        extra = [
            (_aware(s, "starts_at"), _aware(e, "ends_at"))
            for s, e, avail in res.exceptions
            if avail
        ]
        shifts[res.resource_id] = _union([*_subtract(weekly, off), *extra])

    known = {res.resource_id for res in resources}
    usage: dict[int, dict[datetime, int]] = {rid: defaultdict(int) for rid in known}
    for c in commitments:
        if c.resource_id not in known:
            continue
        lo, hi = _aware(c.starts_at, "starts_at"), _aware(c.ends_at, "ends_at")
        if hi <= span_lo or lo >= span_hi:
            continue
        _add(usage[c.resource_id], lo, hi, c.seats)
    profiles = {rid: _Profile.from_deltas(d) for rid, d in usage.items()}
    counters = [r for r in resources if r.kind == "counter"]
    pool = _counter_pool(shifts, counters, usage, calendar.walk_in_reserve) if counters else None
    ordered = sorted(resources, key=lambda r: r.resource_id)

    starts: set[datetime] = set()
    interval = timedelta(minutes=rules.slot_interval_min)
    for day in open_days:
        midnight = datetime.combine(day, time())
        for weekday, opens, closes in calendar.opening_hours:
            if weekday != day.isoweekday():
                continue
            wall, end_wall = (
                midnight + timedelta(minutes=opens),
                midnight + timedelta(minutes=closes),
            )
            while wall < end_wall:
                for instant in _wall_instants(wall, tz):
                    if first_start <= instant < last_start:
                        starts.add(instant)
                wall += interval

    slots: list[Slot] = []
    for start in sorted(starts):
        end = start + duration
        if not _covers(opening, start, end):
            continue
        lo, hi = start - before, end + after
        pool_free = max(0, pool.low(lo, hi)) if pool is not None else 0
        other_total = counter_total = 0
        free_by_resource: list[tuple[int, int]] = []
        for res in ordered:
            if not _covers(shifts[res.resource_id], lo, hi):
                continue
            free = max(0, res.capacity - profiles[res.resource_id].peak(lo, hi))
            if res.kind == "counter":
                counter_total += free
                effective = min(free, pool_free)
            else:
                other_total += free
                effective = free
            if effective > 0:
                free_by_resource.append((res.resource_id, effective))
        if not any(free >= party_size for _, free in free_by_resource):
            continue
        slots.append(
            Slot(
                start=start,
                end=end,
                local_start=start.astimezone(tz),
                remaining=other_total + min(counter_total, pool_free),
                free_by_resource=tuple(free_by_resource),
            )
        )
    return slots


def pick_resource(slot: Slot, party_size: int) -> int | None:
    """The least-loaded resource with room for the party: the one with the most
    free seats in `slot` (ties: lowest id); None when no single resource fits."""
    best: tuple[int, int] | None = None
    for resource_id, free in slot.free_by_resource:
        if free >= party_size and (best is None or free > best[1]):
            best = (resource_id, free)
    return None if best is None else best[0]


def open_until(calendar: BranchCalendar, now: datetime) -> datetime | None:
    """The end of the opening stretch (opening hours minus closures) that contains
    `now`, or None when the branch is closed at `now`."""
    tz = ZoneInfo(calendar.timezone)
    now = _aware(now, "now")
    days = [d for d in _days(now - timedelta(days=1), now + timedelta(days=2), tz)]
    opening = _weekly(calendar.opening_hours, [d for d in days if d not in calendar.closures], tz)
    for lo, hi in opening:
        if lo <= now < hi:
            return hi
    return None
