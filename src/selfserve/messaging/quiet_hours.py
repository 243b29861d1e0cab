"""Quiet hours: when an SMS may go out. Pure: no I/O, no clock of its own.

The window is given in local wall time (e.g. 21:00-08:00) and may wrap midnight.
A message that falls inside it waits for the window's end on the right local day.
Daylight-saving changes are honoured: the end is found as a wall time on a date and
then converted, so 08:00 stays 08:00 on the day the clocks move.
"""

from __future__ import annotations

import math
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo


def parse_clock(value: str) -> time:
    """'21:00' -> time(21, 0)."""
    hours, minutes = value.split(":")
    return time(int(hours), int(minutes))


def in_quiet_hours(wall: time, start: time, end: time) -> bool:
    """Whether a local wall time lies in [start, end); start == end means no window."""
    if start == end:
        return False
    if start < end:
        return start <= wall < end
    return wall >= start or wall < end


def _wall(at: datetime, tz: ZoneInfo) -> datetime:
    return at.astimezone(tz).replace(tzinfo=None)


def _offset(seconds: int, tz: ZoneInfo) -> timedelta | None:
    return datetime.fromtimestamp(seconds, UTC).astimezone(tz).utcoffset()


def _clock_change(a: datetime, b: datetime, tz: ZoneInfo) -> datetime | None:
    """The instant in (a, b] at which `tz` changes its UTC offset, if it does (once at
    most in so short a span), found to the second."""
    lo, hi = math.floor(a.timestamp()), math.ceil(b.timestamp())
    before = _offset(lo, tz)
    if _offset(hi, tz) == before:
        return None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(mid, tz) == before:
            lo = mid
        else:
            hi = mid
    return datetime.fromtimestamp(hi, UTC)


def first_instant_at(day: date, wall: time, tz: ZoneInfo, *, after: datetime) -> datetime:
    """The earliest instant later than `after` at which the clock in `tz` shows at
    least `wall` on local date `day`, in UTC.

    An ordinary wall time is one instant. One that occurs twice (clocks set back)
    gives the first occurrence later than `after`. One that never occurs (clocks set
    forward over it) gives the moment the clocks jump past it.
    """
    naive = datetime.combine(day, wall)
    for fold in (0, 1):
        candidate = naive.replace(tzinfo=tz, fold=fold).astimezone(UTC)
        if _wall(candidate, tz) == naive and candidate > after:
            return candidate
    # In a gap, fold=1 reads the wall time with the offset after the jump, landing
    # before it, and fold=0 with the offset before, landing after it.
    edges = sorted(naive.replace(tzinfo=tz, fold=f).astimezone(UTC) for f in (0, 1))
    jump = _clock_change(edges[0], edges[1], tz)
    return max(jump or edges[1], after)


def next_allowed_send_time(at: datetime, tz: ZoneInfo, start: time, end: time) -> datetime:
    """The first instant at or after `at` whose local wall time in `tz` is outside
    quiet hours: `at` itself when it already is, usually the window's end.

    `at` must be timezone-aware; a later answer is in UTC. The rule is read on the
    wall clock, moment by moment: when the clocks go back out of the window (a
    window starting inside the repeated hour) sending is allowed from that moment.
    """
    if at.tzinfo is None:
        raise ValueError("at must be timezone-aware")
    local = at.astimezone(tz)
    wall = local.time().replace(tzinfo=None)
    if not in_quiet_hours(wall, start, end):
        return at
    day = local.date()
    if start > end and wall >= start:
        day += timedelta(days=1)  # evening part of a window that wraps midnight
    at_utc = at.astimezone(UTC)
    end_at = first_instant_at(day, end, tz, after=at_utc)
    jump = _clock_change(at_utc, end_at, tz)
    if (
        jump is not None
        and jump < end_at
        and not in_quiet_hours(_wall(jump, tz).time(), start, end)
    ):
        return jump  # the clocks went back out of the window
    return end_at
