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
change yields two candidates (fold 0 and fold 1), distinct instants. When
``opens`` itself lies inside the repeated hour, the window opens at its earlier
reading and the clock then goes back past ``opens``: the grid also runs backwards
from ``opens`` (``opens - interval, ...``, not before the day's midnight) over the
wall times read a second time, each giving its later instant (so London opening
at 01:30 on the last Sunday of October with a 15-minute grid offers 01:30 BST,
01:45 BST, 01:00 GMT, 01:15 GMT, 01:30 GMT, ...). Every candidate is an instant
at or after the opening instant. Duplicate instants (overlapping windows) are
offered once.

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
history of the branch. The candidates are computed first; every other step works
on candidate index ranges. Since all occupied spans have the same length, the
candidates a commitment touches, and those an on-shift or opening interval covers,
form one index range each, found by binary search. One pass over the commitments
keeps those that touch a span and adds up, per resource and span, the seats of the
commitments touching it while they all share one interval; only a resource where
a span meets two different intervals is worked out again (largest group when the
intervals are disjoint, else the exact step function). Free seats, the counter
pool and the slots are then built column by column, per resource rather than per
(slot, resource) pair. Wall-clock conversions (candidate starts of a day, shift
boundaries) are pure and cached across calls. `available_slots_from_rows` takes
the commitments as plain rows with integer microsecond times, so that the database
layer builds neither datetimes nor `Commitment` objects for them.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from functools import lru_cache
from itertools import islice, repeat
from operator import itemgetter, sub
from typing import Any
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
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_NEVER = object()
_TABLE_LIMIT = 4096  # largest capacity whose free seats are looked up in a table

Interval = tuple[datetime, datetime]
Range = tuple[int, int]
"""Candidates first <= k < stop."""
_Time = Any
"""An instant as commitments give it: a UTC datetime, or integer microseconds since
the Unix epoch (database rows); one or the other throughout a computation."""
_Item = tuple[int, int, _Time, _Time, int]
"""A commitment that touches candidate spans: (first, stop, starts_at, ends_at, seats)."""


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


@lru_cache(maxsize=8192)
def _boundary(day: date, minute: int, tz: ZoneInfo, *, is_end: bool) -> datetime:
    """The instant of an interval boundary at `minute` of branch-local `day` (a pure
    function, cached: resources and requests share their shift boundaries)."""
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

    def __init__(self, times: list[_Time], levels: list[int], outside: int) -> None:
        self.times = times
        self.levels = levels
        self.outside = outside

    def _range(self, lo: _Time, hi: _Time) -> list[int]:
        i = bisect_right(self.times, lo) - 1
        j = bisect_left(self.times, hi)
        values = self.levels[max(i, 0) : j]
        if i < 0:
            values.append(self.outside)
        return values

    def peak(self, lo: _Time, hi: _Time) -> int:
        return max(self._range(lo, hi))

    def low(self, lo: _Time, hi: _Time) -> int:
        return min(self._range(lo, hi))


def _add(deltas: dict[_Time, int], lo: _Time, hi: _Time, amount: int) -> None:
    if lo < hi and amount:
        deltas[lo] += amount
        deltas[hi] -= amount


def _counter_pool(
    shifts: dict[int, list[Interval]],
    counters: Sequence[ResourceSchedule],
    items: dict[int, list[Any]],
    reserve: float,
    key: Callable[[datetime], _Time] | None,
) -> _Profile:
    """floor(C(t) * (1 - reserve)) - B(t) as a step function, in the time of `items`
    (`key` turns a datetime into it)."""
    capacity: dict[_Time, int] = defaultdict(int)
    booked: dict[_Time, int] = defaultdict(int)
    for counter in counters:
        for lo, hi in shifts[counter.resource_id]:
            if key is None:
                _add(capacity, lo, hi, counter.capacity)
            else:
                _add(capacity, key(lo), key(hi), counter.capacity)
        fields = iter(items.get(counter.resource_id, ()))  # flat (first, stop, start, end, seats)
        for _, _, start, end, seats in zip(fields, fields, fields, fields, fields, strict=True):
            booked[start] += seats
            booked[end] -= seats
    share = 1 - Fraction(repr(reserve))
    num, den = share.numerator, share.denominator  # floor(cap * share) == cap * num // den
    times = sorted(set(capacity) | set(booked))
    levels: list[int] = []
    cap = used = 0
    for t in times:
        cap += capacity.get(t, 0)
        used += booked.get(t, 0)
        levels.append(cap * num // den - used)
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


def _day_starts(
    day: date, windows: tuple[tuple[int, int], ...], interval_min: int, tz: ZoneInfo
) -> tuple[tuple[datetime, ...], tuple[datetime, ...]]:
    """Every candidate start of the opening `windows` of one branch-local day, sorted,
    each instant once, and the same instants on the branch clock. A pure function:
    cached, so that requests share their days, unless the day has many starts."""
    walls = sum(-((opens - closes) // interval_min) for opens, closes in windows if opens < closes)
    if walls <= _CACHED_WALLS:
        return _cached_day_starts(day, windows, interval_min, tz)
    return _compute_day_starts(day, windows, interval_min, tz)


def _compute_day_starts(
    day: date, windows: tuple[tuple[int, int], ...], interval_min: int, tz: ZoneInfo
) -> tuple[tuple[datetime, ...], tuple[datetime, ...]]:
    midnight = datetime.combine(day, time())
    interval = timedelta(minutes=interval_min)
    found: set[datetime] = set()
    for opens, closes in windows:
        wall, end_wall = midnight + timedelta(minutes=opens), midnight + timedelta(minutes=closes)
        if wall >= end_wall:
            continue
        readings = _wall_instants(wall, tz)
        if len(readings) == 2:
            # Opening inside a repeated hour: the clock goes back past `opens` after
            # the window opened; the grid's earlier wall times read a second time
            # (their later instant) are inside the window too.
            opened, again = readings
            back = wall - interval
            while back >= max(midnight, wall - (again - opened)):
                found.update(i for i in _wall_instants(back, tz) if i >= opened)
                back -= interval
        while wall < end_wall:
            found.update(_wall_instants(wall, tz))
            wall += interval
    instants = tuple(sorted(found))
    return instants, tuple(i.astimezone(tz) for i in instants)


_cached_day_starts = lru_cache(maxsize=1024)(_compute_day_starts)
_CACHED_WALLS = 192  # bounds the cache to some 20 MB even with a 1-minute grid


def _candidates(
    opening_hours: Iterable[tuple[int, int, int]],
    open_days: Sequence[date],
    tz: ZoneInfo,
    interval_min: int,
    first_start: datetime,
    last_start: datetime,
) -> list[tuple[datetime, datetime]]:
    """Candidate starts in [first_start, last_start) with their branch-local reading,
    sorted. A wall time belongs to one day and an instant shows one wall time, so no
    instant comes from two days."""
    by_weekday: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for weekday, opens, closes in opening_hours:
        by_weekday[weekday].append((opens, closes))
    windows = {weekday: tuple(w) for weekday, w in by_weekday.items()}
    starts: list[tuple[datetime, datetime]] = []
    for day in open_days:
        found = windows.get(day.isoweekday())
        if found:
            instants, local = _day_starts(day, found, interval_min, tz)
            first, stop = bisect_left(instants, first_start), bisect_left(instants, last_start)
            starts += zip(instants[first:stop], local[first:stop], strict=True)
    starts.sort(key=_instant)
    return starts


_instant = itemgetter(0)


def _ranges(intervals: Iterable[Interval], los: list[datetime], his: list[datetime]) -> list[Range]:
    """The candidates whose span [los[k], his[k]) lies inside one of the disjoint,
    sorted `intervals`, as index ranges (adjacent ones joined); `los` and `his` are
    both sorted."""
    out: list[Range] = []
    for lo, hi in intervals:
        first, stop = bisect_left(los, lo), bisect_right(his, hi)
        if first < stop:
            if out and out[-1][1] == first:
                out[-1] = (out[-1][0], stop)
            else:
                out.append((first, stop))
    return out


def _peaks(items: list[_Item], los: list[_Time], his: list[_Time], positive: bool) -> list[int]:
    """Peak usage over each candidate span, from the commitments of one resource that
    touch at least one span, for a resource where a span is touched by commitments
    with different intervals (or `positive` is False: some seats are negative)."""
    peaks = [0] * len(los)
    ordered = sorted(items, key=_start)
    if positive:
        # By start, identical intervals add up to a group. If each group starts where
        # the one before ends or later, the groups are pairwise disjoint and the peak
        # over a span is the largest group touching it.
        first, stop, lo, hi, total = ordered[0]
        for item in islice(ordered, 1, None):
            if item[2] == lo and item[3] == hi:
                total += item[4]
                continue
            if item[2] < hi:
                break
            for k in range(first, stop):
                if total > peaks[k]:
                    peaks[k] = total
            first, stop, lo, hi, total = item
        else:
            for k in range(first, stop):
                if total > peaks[k]:
                    peaks[k] = total
            return peaks
        peaks = [0] * len(los)
    # Overlapping intervals: the step function of the usage, read per span touched.
    ends = sorted(items, key=_end)
    times: list[_Time] = []
    levels: list[int] = []
    level = i = j = 0
    n = len(items)
    while j < n:
        t = ends[j][3] if i == n or ends[j][3] < ordered[i][2] else ordered[i][2]
        while i < n and ordered[i][2] == t:
            level += ordered[i][4]
            i += 1
        while j < n and ends[j][3] == t:
            level -= ends[j][4]
            j += 1
        times.append(t)
        levels.append(level)
    profile = _Profile(times, levels, 0)
    done = bytearray(len(los))
    for first, stop, _, _, _ in items:
        for k in range(first, stop):
            if not done[k]:
                peaks[k] = profile.peak(los[k], his[k])
                done[k] = 1
    return peaks


_start = itemgetter(2)
_end = itemgetter(3)
_seats = itemgetter(1)


def _resource_id(resource: ResourceSchedule) -> int:
    return resource.resource_id


def _unflatten(flat: list[Any]) -> list[_Item]:
    """(first, stop, starts_at, ends_at, seats) items from a flat list of them."""
    fields = iter(flat)
    return list(zip(fields, fields, fields, fields, fields, strict=True))


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
    known = {res.resource_id for res in resources}
    return _slots(
        calendar,
        rules,
        resources,
        _utc_rows(commitments, known),
        None,
        party_size=party_size,
        window_from=window_from,
        window_to=window_to,
        now=now,
    )


def available_slots_from_rows(
    calendar: BranchCalendar,
    rules: ServiceRules,
    resources: Sequence[ResourceSchedule],
    rows: Iterable[Iterable[Any]],
    *,
    party_size: int,
    window_from: datetime,
    window_to: datetime,
    now: datetime,
    epoch: datetime = _EPOCH,
) -> list[Slot]:
    """`available_slots` with the commitments as rows of (resource_id, starts_at,
    ends_at, seats) whose times are integer microseconds since `epoch` (default
    1970-01-01 00:00 UTC), as the database can hand them out: no datetime nor
    `Commitment` is built per row."""
    epoch = _aware(epoch, "epoch")

    def key(instant: datetime) -> int:
        return (instant - epoch) // _MICROSECOND

    return _slots(
        calendar,
        rules,
        resources,
        rows,
        key,
        party_size=party_size,
        window_from=window_from,
        window_to=window_to,
        now=now,
    )


def _utc_rows(
    commitments: Iterable[Commitment], known: set[int]
) -> Iterator[tuple[int, datetime, datetime, int]]:
    """(resource_id, starts_at, ends_at, seats) in UTC, for the resources passed in."""
    for c in commitments:
        if c.resource_id in known:
            lo, hi = c.starts_at, c.ends_at
            if lo.tzinfo is not UTC:
                lo = _aware(lo, "starts_at")
            if hi.tzinfo is not UTC:
                hi = _aware(hi, "ends_at")
            yield c.resource_id, lo, hi, c.seats


def _slots(
    calendar: BranchCalendar,
    rules: ServiceRules,
    resources: Sequence[ResourceSchedule],
    rows: Iterable[Iterable[Any]],
    key: Callable[[datetime], _Time] | None,
    *,
    party_size: int,
    window_from: datetime,
    window_to: datetime,
    now: datetime,
) -> list[Slot]:
    """The slots, from commitment rows whose times are UTC datetimes (`key` None) or
    `key(datetime)`: the candidate spans are put in the same time."""
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

    # On-shift time per resource; resources with the same rules share the work.
    weekly_by_rules: dict[object, list[Interval]] = {}
    on_shift_by_rules: dict[object, list[Interval]] = {}
    shifts: dict[int, list[Interval]] = {}
    for res in resources:
        same: object = (res.shifts, res.exceptions)
        try:
            on_shift = on_shift_by_rules.get(same)
        except TypeError:  # unhashable (lists instead of tuples): no sharing
            on_shift, same = None, object()
        if on_shift is None:
            try:
                weekly = weekly_by_rules.get(res.shifts)
            except TypeError:
                weekly = None
            if weekly is None:
                weekly = _weekly(res.shifts, days, tz)
                with suppress(TypeError):
                    weekly_by_rules[res.shifts] = weekly
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
            on_shift = on_shift_by_rules[same] = _union([*_subtract(weekly, off), *extra])
        shifts[res.resource_id] = on_shift

    # Candidates whose service span lies inside the opening hours, and their
    # occupied spans [los[k], his[k]): both lists sorted, since all spans have the
    # same length.
    grid = _candidates(
        calendar.opening_hours, open_days, tz, rules.slot_interval_min, first_start, last_start
    )
    grid_starts = [s for s, _ in grid]
    grid_ends = [s + duration for s in grid_starts]
    starts: list[datetime] = []
    local_starts: list[datetime] = []
    for first, stop in _ranges(opening, grid_starts, grid_ends):
        starts += grid_starts[first:stop]
        local_starts += [local for _, local in grid[first:stop]]
    los = [s - before for s in starts]
    occupied = duration + after
    his = [s + occupied for s in starts]
    if key is None:
        klos, khis = los, his
    else:
        klos, khis = list(map(key, los)), list(map(key, his))

    # Commitments, kept per resource only when they touch some span (nothing else
    # can change a slot), as (first, stop, starts_at, ends_at, seats), flat: they
    # touch the candidates first <= k < stop. Alongside, the usage of each span,
    # exact while every commitment touching a span has the same interval (that of
    # the first one, `owner_lo[k]` to `owner_hi[k]`) and seats are positive;
    # `clashes` are the resources where that fails, worked out again by `_peaks`.
    # Nothing kept is a new container per commitment: the garbage collector runs
    # on their count, and a request would set off dozens of collections.
    count = len(starts)
    state: dict[int, tuple[list[Any], list[int], list[Any], list[Any]]] = {
        res.resource_id: ([], [0] * count, [None] * count, [None] * count) for res in resources
    }
    clashes: set[int] = set()
    negative: set[int] = set()
    last_lo: object = _NEVER
    last_hi: object = _NEVER
    first = stop = 0
    for rid, lo, hi, seats in rows:
        found = state.get(rid)
        if found is None:
            continue
        if lo >= hi or seats <= 0:
            if lo >= hi or not seats:
                continue
            clashes.add(rid)
            negative.add(rid)
        if lo != last_lo or hi != last_hi:  # rows come roughly by time: often the same
            last_lo, last_hi = lo, hi
            first = stop = bisect_right(khis, lo)
            if first < count and klos[first] < hi:
                stop = first + 1
                if stop < count and klos[stop] < hi:
                    stop = bisect_left(klos, hi, stop + 1)
        if stop - first == 1:  # one span, the usual case
            found[0].extend((first, stop, lo, hi, seats))
            owner_lo = found[2]
            if owner_lo[first] is None:
                owner_lo[first] = lo
                found[3][first] = hi
                found[1][first] = seats
            elif owner_lo[first] == lo and found[3][first] == hi:
                found[1][first] += seats
            else:
                clashes.add(rid)
            continue
        if first == stop:
            continue
        found[0].extend((first, stop, lo, hi, seats))
        usage, owner_lo, owner_hi = found[1], found[2], found[3]
        for k in range(first, stop):
            if owner_lo[k] is None:
                owner_lo[k] = lo
                owner_hi[k] = hi
                usage[k] = seats
            elif owner_lo[k] == lo and owner_hi[k] == hi:
                usage[k] += seats
            else:
                clashes.add(rid)
    if not starts or not resources:
        return []
    items = {rid: found[0] for rid, found in state.items()}
    peaks = {
        rid: _peaks(_unflatten(flat), klos, khis, rid not in negative) if rid in clashes else usage
        for rid, (flat, usage, _, _) in state.items()
        if flat
    }

    counters = [r for r in resources if r.kind == "counter"]
    if counters:
        pool = _counter_pool(shifts, counters, items, calendar.walk_in_reserve, key)
        pool_free = [max(0, pool.low(lo, hi)) for lo, hi in zip(klos, khis, strict=True)]
    else:
        pool_free = [0] * len(starts)

    # Free seats per resource and candidate (0 when off shift), by resource id; the
    # (resource id, effective seats) pairs, None for no seat.
    zeros = [0] * count
    coverage: dict[int, list[Range]] = {}
    other_columns: list[list[int]] = []
    counter_columns: list[list[int]] = []
    pair_columns: list[list[tuple[int, int] | None]] = []
    for res in sorted(resources, key=_resource_id):
        rid, capacity = res.resource_id, res.capacity
        on_shift = shifts[rid]
        ranges = coverage.get(id(on_shift))
        if ranges is None:
            ranges = coverage[id(on_shift)] = _ranges(on_shift, los, his)
        peak = peaks.get(rid)
        free = zeros.copy()
        if peak is None:
            for first, stop in ranges:
                free[first:stop] = [max(0, capacity)] * (stop - first)
        elif rid not in negative and capacity <= _TABLE_LIMIT:  # peaks are not negative
            table = {p: capacity - p for p in range(capacity)}  # else no seat free
            for first, stop in ranges:
                free[first:stop] = map(table.get, peak[first:stop], repeat(0))
        else:
            for first, stop in ranges:
                free[first:stop] = map(max, repeat(0), map(sub, repeat(capacity), peak[first:stop]))
        if res.kind == "counter":
            counter_columns.append(free)
            effective = list(map(min, free, pool_free))
        else:
            other_columns.append(free)
            effective = free
        pairs = {v: (rid, v) if v else None for v in set(effective)}
        pair_columns.append(list(map(pairs.__getitem__, effective)))
    others = list(map(sum, zip(*other_columns, strict=True))) if other_columns else zeros
    counted = list(map(sum, zip(*counter_columns, strict=True))) if counter_columns else zeros

    slots: list[Slot] = []
    for k, row in enumerate(zip(*pair_columns, strict=True)):
        listed = tuple(filter(None, row))
        if not listed or (party_size > 1 and max(map(_seats, listed)) < party_size):
            continue
        start = starts[k]
        slots.append(
            Slot(
                start,
                start + duration,
                local_starts[k],
                others[k] + min(counted[k], pool_free[k]),
                listed,
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


def on_shift(
    timezone: str, resource: ResourceSchedule, lo: datetime, hi: datetime
) -> list[Interval]:
    """The on-shift time of `resource` around [lo, hi), as `available_slots` reads it:
    (weekly shifts - `available=false` exceptions) ∪ `available=true` exceptions,
    sorted, disjoint and non-adjacent (the ledger checks the walk-in reserve with it)."""
    tz = ZoneInfo(timezone)
    weekly = _weekly(resource.shifts, _days(_aware(lo, "lo"), _aware(hi, "hi"), tz), tz)
    off = _union(
        (_aware(s, "starts_at"), _aware(e, "ends_at"))
        for s, e, avail in resource.exceptions
        if not avail
    )
    extra = [
        (_aware(s, "starts_at"), _aware(e, "ends_at"))
        for s, e, avail in resource.exceptions
        if avail
    ]
    return _union([*_subtract(weekly, off), *extra])


def reserve_share(reserve: float) -> Fraction:
    """1 - walk_in_reserve, read exactly as a decimal fraction (0.2 means 1/5)."""
    return 1 - Fraction(repr(reserve))
