"""Availability: the pure slot generator, checked on hand-made cases (opening hours,
closures, shifts, exceptions, buffers, lead time, horizon, party limits, capacity,
skills, walk-in reserve), across daylight-saving changes, and against a brute-force
minute-by-minute model with hypothesis."""

from __future__ import annotations

import itertools
import math
import random
from bisect import bisect_right
from collections import defaultdict
from datetime import UTC, date, datetime, time, timedelta
from fractions import Fraction
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfserve.scheduling import availability as av
from selfserve.scheduling.availability import (
    BranchCalendar,
    Commitment,
    ResourceSchedule,
    ServiceRules,
    Slot,
    available_slots,
    pick_resource,
)

LONDON = ZoneInfo("Europe/London")
SHANGHAI = ZoneInfo("Asia/Shanghai")
MONDAY = date(2026, 6, 1)  # a Monday, no DST change anywhere near
EVERY_DAY = range(1, 8)


def at(day: date, hour: int, minute: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, minute, tzinfo=UTC)


def hm(text: str) -> int:
    hours, minutes = text.split(":")
    return int(hours) * 60 + int(minutes)


def hours(
    opens: str, closes: str, weekdays: range | tuple[int, ...] = EVERY_DAY
) -> tuple[tuple[int, int, int], ...]:
    return tuple((w, hm(opens), hm(closes)) for w in weekdays)


def calendar(
    opens: str = "09:00",
    closes: str = "12:00",
    *,
    tz: str = "UTC",
    closures: frozenset[date] = frozenset(),
    reserve: float = 0.0,
) -> BranchCalendar:
    return BranchCalendar(tz, hours(opens, closes), closures, reserve)


def resource(
    rid: int = 1,
    *,
    kind: str = "staff",
    capacity: int = 1,
    start: str = "00:00",
    end: str = "24:00",
    exceptions: tuple[tuple[datetime, datetime, bool], ...] = (),
    weekdays: range | tuple[int, ...] = EVERY_DAY,
) -> ResourceSchedule:
    return ResourceSchedule(rid, kind, capacity, hours(start, end, weekdays), exceptions)


def slots(
    cal: BranchCalendar,
    rules: ServiceRules,
    resources: list[ResourceSchedule],
    commitments: list[Commitment] | None = None,
    *,
    party_size: int = 1,
    day: date = MONDAY,
    window_from: datetime | None = None,
    window_to: datetime | None = None,
    now: datetime | None = None,
) -> list[Slot]:
    return available_slots(
        cal,
        rules,
        resources,
        commitments or [],
        party_size=party_size,
        window_from=window_from or at(day, 0),
        window_to=window_to or at(day, 0) + timedelta(days=1),
        now=now or at(day, 0) - timedelta(days=2),
    )


def starts(result: list[Slot], tz: ZoneInfo | None = None) -> list[str]:
    return [s.start.astimezone(tz or UTC).strftime("%H:%M") for s in result]


RULES30 = ServiceRules(duration_min=30, slot_interval_min=15)


# --- opening hours and closures ----------------------------------------------


def test_grid_starts_at_opening_and_span_stays_inside_opening_hours() -> None:
    result = slots(calendar(), RULES30, [resource()], window_to=at(MONDAY, 23))
    assert starts(result) == [f"{h:02}:{m:02}" for h in (9, 10, 11) for m in (0, 15, 30, 45)][:-1]
    first = result[0]
    assert first.start == at(MONDAY, 9)
    assert first.end == at(MONDAY, 9, 30)
    assert first.remaining == 1
    assert first.free_by_resource == ((1, 1),)
    assert first.start.tzinfo is UTC
    assert first.local_start.tzinfo == ZoneInfo("UTC")


def test_grid_is_anchored_on_opening_time_not_on_the_hour() -> None:
    result = slots(
        calendar("09:10", "10:00"),
        ServiceRules(duration_min=20, slot_interval_min=20),
        [resource()],
        window_to=at(MONDAY, 23),
    )
    assert starts(result) == ["09:10", "09:30"]


def test_two_windows_a_day_and_no_span_across_the_break() -> None:
    cal = BranchCalendar("UTC", ((1, hm("09:00"), hm("10:00")), (1, hm("11:00"), hm("12:00"))))
    rules = ServiceRules(duration_min=30, slot_interval_min=30)
    assert starts(slots(cal, rules, [resource()])) == ["09:00", "09:30", "11:00", "11:30"]


def test_overlapping_windows_offer_each_instant_once() -> None:
    cal = BranchCalendar("UTC", ((1, hm("09:00"), hm("10:00")), (1, hm("09:30"), hm("10:30"))))
    rules = ServiceRules(duration_min=30, slot_interval_min=30)
    assert starts(slots(cal, rules, [resource()])) == ["09:00", "09:30", "10:00"]


def test_days_without_opening_hours_and_overnight_windows_are_closed() -> None:
    cal = BranchCalendar("UTC", ((2, hm("09:00"), hm("10:00")), (1, hm("22:00"), hm("02:00"))))
    assert slots(cal, RULES30, [resource()]) == []  # Monday only has an overnight window


def test_closure_on_branch_local_date() -> None:
    cal = calendar(closures=frozenset({MONDAY}))
    assert slots(cal, RULES30, [resource()], window_to=at(MONDAY, 23)) == []
    tuesday = MONDAY + timedelta(days=1)
    assert len(slots(cal, RULES30, [resource()], day=tuesday, window_from=at(tuesday, 0))) == 11


def test_closure_uses_the_branch_date_not_the_utc_date() -> None:
    # Shanghai is UTC+8: Tuesday 02:00 local is Monday 18:00 UTC.
    cal = calendar(
        "02:00", "03:00", tz="Asia/Shanghai", closures=frozenset({MONDAY + timedelta(days=1)})
    )
    rules = ServiceRules(duration_min=60, slot_interval_min=60)
    result = slots(
        cal, rules, [resource()], window_from=at(MONDAY, 0), window_to=at(MONDAY, 23, 59)
    )
    assert result == []
    open_cal = calendar("02:00", "03:00", tz="Asia/Shanghai", closures=frozenset({MONDAY}))
    result = slots(
        open_cal, rules, [resource()], window_from=at(MONDAY, 0), window_to=at(MONDAY, 23, 59)
    )
    assert [s.start for s in result] == [at(MONDAY, 18)]


def test_span_may_cross_midnight_into_an_open_day_but_not_a_closed_one() -> None:
    rules = ServiceRules(duration_min=60, slot_interval_min=30)
    late = at(MONDAY, 23, 30)
    cal = calendar("00:00", "24:00")
    assert late in [s.start for s in slots(cal, rules, [resource()])]
    closed_next = calendar("00:00", "24:00", closures=frozenset({MONDAY + timedelta(days=1)}))
    assert late not in [s.start for s in slots(closed_next, rules, [resource()])]
    assert at(MONDAY, 23) in [s.start for s in slots(closed_next, rules, [resource()])]


# --- shifts, exceptions and buffers -------------------------------------------


def test_whole_occupied_span_must_lie_in_a_shift() -> None:
    rules = ServiceRules(
        duration_min=30, buffer_before_min=10, buffer_after_min=5, slot_interval_min=15
    )
    result = slots(calendar(), rules, [resource(start="09:00", end="12:00")])
    # 09:00 needs 08:50; last start s needs s + 35 <= 12:00.
    assert starts(result)[0] == "09:15"
    assert starts(result)[-1] == "11:15"


def test_buffers_may_lie_outside_opening_hours_but_the_service_may_not() -> None:
    rules = ServiceRules(
        duration_min=30, buffer_before_min=10, buffer_after_min=20, slot_interval_min=15
    )
    result = slots(calendar(), rules, [resource(start="08:00", end="13:00")])
    assert starts(result)[0] == "09:00"
    assert starts(result)[-1] == "11:30"


def test_adjacent_shifts_form_one_stretch_and_a_gap_splits_them() -> None:
    rules = ServiceRules(duration_min=30, slot_interval_min=15)
    joined = ResourceSchedule(
        1, "staff", 1, ((1, hm("09:00"), hm("10:30")), (1, hm("10:30"), hm("12:00")))
    )
    assert "10:15" in starts(slots(calendar(), rules, [joined]))
    gap = ResourceSchedule(
        1, "staff", 1, ((1, hm("09:00"), hm("10:30")), (1, hm("10:35"), hm("12:00")))
    )
    assert "10:15" not in starts(slots(calendar(), rules, [gap]))


def test_any_one_resource_on_shift_is_enough() -> None:
    morning, late = resource(1, start="09:00", end="10:00"), resource(2, start="10:00", end="12:00")
    result = slots(calendar(), RULES30, [morning, late])
    assert "09:45" not in starts(result)  # neither covers 09:45-10:15 alone
    by_start = {s.start.strftime("%H:%M"): s for s in result}
    assert by_start["09:30"].free_by_resource == ((1, 1),)
    assert by_start["10:00"].free_by_resource == ((2, 1),)


def test_time_off_exception_removes_overlapping_slots() -> None:
    off = ((at(MONDAY, 10), at(MONDAY, 11), False),)
    result = starts(slots(calendar(), RULES30, [resource(exceptions=off)]))
    assert "09:30" in result
    assert "09:45" not in result
    assert "10:45" not in result
    assert "11:00" in result


def test_extra_time_exception_adds_shift_time_but_not_opening_hours() -> None:
    extra = ((at(MONDAY, 8), at(MONDAY, 10), True),)
    result = starts(
        slots(calendar(), RULES30, [resource(start="10:00", end="12:00", exceptions=extra)])
    )
    assert result[0] == "09:00"
    assert "09:45" in result


def test_extra_time_wins_over_time_off() -> None:
    exceptions = ((at(MONDAY, 9), at(MONDAY, 12), False), (at(MONDAY, 10), at(MONDAY, 11), True))
    assert starts(slots(calendar(), RULES30, [resource(exceptions=exceptions)])) == [
        "10:00",
        "10:15",
        "10:30",
    ]


def test_exceptions_in_other_offsets_are_instants() -> None:
    plus8 = ZoneInfo("Asia/Shanghai")
    off = (
        (
            datetime(2026, 6, 1, 18, 0, tzinfo=plus8),
            datetime(2026, 6, 1, 19, 0, tzinfo=plus8),
            False,
        ),
    )
    result = starts(slots(calendar(), RULES30, [resource(exceptions=off)]))  # 10:00-11:00 UTC
    assert "09:30" in result
    assert "09:45" not in result
    assert "11:00" in result


# --- lead time, horizon, window, party -----------------------------------------


def test_lead_time_from_now() -> None:
    rules = ServiceRules(duration_min=30, slot_interval_min=15, lead_time_min=30)
    result = slots(calendar(), rules, [resource()], now=at(MONDAY, 9, 7))
    assert starts(result)[0] == "09:45"
    exact = slots(calendar(), rules, [resource()], now=at(MONDAY, 9, 15))
    assert starts(exact)[0] == "09:45"  # start == now + lead time is allowed


def test_no_slot_in_the_past_without_lead_time() -> None:
    result = slots(calendar(), RULES30, [resource()], now=at(MONDAY, 10))
    assert starts(result)[0] == "10:00"


def test_horizon_is_exclusive() -> None:
    rules = ServiceRules(duration_min=30, slot_interval_min=15, horizon_days=1)
    result = slots(
        calendar(), rules, [resource()], now=at(MONDAY, 0) - timedelta(hours=14, minutes=30)
    )
    # now + 1 day = Monday 09:30 UTC
    assert starts(result) == ["09:00", "09:15"]


def test_window_from_inclusive_to_exclusive() -> None:
    result = slots(
        calendar(), RULES30, [resource()], window_from=at(MONDAY, 10), window_to=at(MONDAY, 10, 30)
    )
    assert starts(result) == ["10:00", "10:15"]
    assert (
        slots(
            calendar(), RULES30, [resource()], window_from=at(MONDAY, 11), window_to=at(MONDAY, 10)
        )
        == []
    )


def test_party_size_limits() -> None:
    rules = ServiceRules(duration_min=30, min_party=2, max_party=4)
    for bad in (1, 5):
        with pytest.raises(ValueError, match="party_size"):
            slots(calendar(), rules, [resource(capacity=4)], party_size=bad)
    assert slots(calendar(), rules, [resource(capacity=3)], party_size=4) == []
    assert len(slots(calendar(), rules, [resource(capacity=4)], party_size=4)) == 11


def test_party_must_fit_one_resource() -> None:
    rules = ServiceRules(duration_min=30, max_party=3)
    two_pairs = [resource(1, capacity=2), resource(2, capacity=2)]
    assert slots(calendar(), rules, two_pairs, party_size=3) == []
    result = slots(calendar(), rules, two_pairs, party_size=2)
    assert result[0].remaining == 4


def test_naive_datetimes_and_bad_rules_are_rejected() -> None:
    with pytest.raises(ValueError, match="aware"):
        slots(calendar(), RULES30, [resource()], now=datetime(2026, 6, 1))
    with pytest.raises(ValueError, match="walk_in_reserve"):
        slots(calendar(reserve=1.5), RULES30, [resource()])
    with pytest.raises(ValueError, match="slot_interval_min"):
        slots(calendar(), ServiceRules(duration_min=30, slot_interval_min=0), [resource()])


# --- capacity ----------------------------------------------------------------


def booked(rid: int, start: datetime, minutes: int, seats: int = 1) -> Commitment:
    return Commitment(rid, start, start + timedelta(minutes=minutes), seats)


def slot_at(result: list[Slot], start: datetime) -> Slot | None:
    return next((s for s in result if s.start == start), None)


def test_seats_used_is_peak_overlap_not_sum() -> None:
    rules = ServiceRules(duration_min=60, slot_interval_min=60, max_party=3)
    room = [resource(kind="room", capacity=3)]
    sequential = [booked(1, at(MONDAY, 9), 30, 2), booked(1, at(MONDAY, 9, 30), 30, 1)]
    s = slot_at(slots(calendar(), rules, room, sequential), at(MONDAY, 9))
    assert s is not None
    assert s.remaining == 1
    overlapping = [booked(1, at(MONDAY, 9), 45, 2), booked(1, at(MONDAY, 9, 30), 30, 1)]
    assert slot_at(slots(calendar(), rules, room, overlapping), at(MONDAY, 9)) is None
    s = slot_at(slots(calendar(), rules, room, overlapping), at(MONDAY, 10))
    assert s is not None
    assert s.remaining == 3


def test_back_to_back_commitments_do_not_overlap_the_slot() -> None:
    result = slots(calendar(), RULES30, [resource()], [booked(1, at(MONDAY, 9), 30)])
    assert "09:15" not in starts(result)
    assert starts(result)[0] == "09:30"


def test_buffers_are_checked_against_commitments() -> None:
    rules = ServiceRules(
        duration_min=30, buffer_before_min=15, buffer_after_min=15, slot_interval_min=15
    )
    result = starts(slots(calendar(), rules, [resource()], [booked(1, at(MONDAY, 10), 30)]))
    # occupied span [s-15, s+45) must avoid [10:00, 10:30)
    assert "09:15" in result
    assert "09:30" not in result
    assert "10:15" not in result
    assert "10:45" in result


def test_party_needs_seats_over_the_whole_span() -> None:
    rules = ServiceRules(duration_min=60, slot_interval_min=60, max_party=2)
    commitments = [booked(1, at(MONDAY, 9, 50), 5)]
    result = slots(calendar(), rules, [resource(capacity=2)], commitments, party_size=2)
    assert starts(result) == ["10:00", "11:00"]
    one = slots(calendar(), rules, [resource(capacity=2)], commitments, party_size=1)
    assert [(s.start.hour, s.remaining) for s in one] == [(9, 1), (10, 2), (11, 2)]


def test_over_committed_resource_counts_as_zero_not_negative() -> None:
    commitments = [booked(1, at(MONDAY, 9), 180, 5)]
    result = slots(
        calendar(), RULES30, [resource(1, capacity=2), resource(2, capacity=1)], commitments
    )
    assert {s.remaining for s in result} == {1}
    assert {s.free_by_resource for s in result} == {((2, 1),)}


def test_only_passed_resources_count() -> None:
    # Resource 2 lacks the skill: it is not passed in, and its commitments are ignored.
    commitments = [booked(2, at(MONDAY, 9), 180, 1)]
    result = slots(calendar(), RULES30, [resource(1, capacity=2)], commitments)
    assert {s.remaining for s in result} == {2}
    assert slots(calendar(), RULES30, []) == []


def test_commitments_outside_the_range_change_nothing() -> None:
    base = slots(calendar(), RULES30, [resource(capacity=2)], [booked(1, at(MONDAY, 10), 30)])
    far = [booked(1, at(MONDAY, 0) - timedelta(days=n), 30) for n in range(3, 3000)]
    far += [booked(1, at(MONDAY, 0) + timedelta(days=n), 30) for n in range(3, 300)]
    assert (
        slots(calendar(), RULES30, [resource(capacity=2)], [booked(1, at(MONDAY, 10), 30), *far])
        == base
    )


# --- walk-in reserve ----------------------------------------------------------


def counters(n: int, capacity: int = 1, start_id: int = 1) -> list[ResourceSchedule]:
    return [resource(start_id + i, kind="counter", capacity=capacity) for i in range(n)]


def test_walk_in_reserve_caps_counter_seats() -> None:
    result = slots(calendar(reserve=0.5), RULES30, counters(2))
    assert {s.remaining for s in result} == {1}
    assert result[0].free_by_resource == ((1, 1), (2, 1))
    taken = slots(calendar(reserve=0.5), RULES30, counters(2), [booked(1, at(MONDAY, 10), 30)])
    assert slot_at(taken, at(MONDAY, 10)) is None  # counter 2 is free but kept for walk-ins
    assert slot_at(taken, at(MONDAY, 9, 30)) is not None


def test_walk_in_reserve_is_exact_for_decimal_shares() -> None:
    assert {s.remaining for s in slots(calendar(reserve=0.2), RULES30, counters(5))} == {4}
    assert {s.remaining for s in slots(calendar(reserve=0.3), RULES30, counters(10))} == {7}
    assert {s.remaining for s in slots(calendar(reserve=0.25), RULES30, counters(3))} == {2}
    assert slots(calendar(reserve=1.0), RULES30, counters(3)) == []


def test_walk_in_reserve_leaves_other_kinds_alone() -> None:
    mixed = [*counters(2), resource(3, kind="staff", capacity=2)]
    result = slots(calendar(reserve=0.5), RULES30, mixed, [booked(1, at(MONDAY, 10), 30)])
    s = slot_at(result, at(MONDAY, 10))
    assert s is not None
    assert s.remaining == 2
    assert s.free_by_resource == ((3, 2),)
    s = slot_at(result, at(MONDAY, 9))
    assert s is not None
    assert s.remaining == 3


def test_walk_in_reserve_follows_on_shift_capacity_over_the_span() -> None:
    # Counter 2 is on shift only from 10:00: before that floor(1 * 0.5) = 0 seats.
    pair = [resource(1, kind="counter"), resource(2, kind="counter", start="10:00", end="24:00")]
    result = slots(calendar(reserve=0.5), RULES30, pair)
    assert starts(result)[0] == "10:00"
    assert slot_at(result, at(MONDAY, 10)) == Slot(
        at(MONDAY, 10),
        at(MONDAY, 10, 30),
        at(MONDAY, 10).astimezone(ZoneInfo("UTC")),
        1,
        ((1, 1), (2, 1)),
    )


def test_walk_in_reserve_counts_counter_commitments_at_once() -> None:
    # 4 counters, reserve 0.5: 2 seats at once; two bookings at different times leave 1 each.
    commitments = [booked(1, at(MONDAY, 9), 30), booked(2, at(MONDAY, 9, 30), 30)]
    rules = ServiceRules(duration_min=60, slot_interval_min=60)
    s = slot_at(slots(calendar(reserve=0.5), rules, counters(4), commitments), at(MONDAY, 9))
    assert s is not None
    assert s.remaining == 1


# --- pick_resource -------------------------------------------------------------


def test_pick_resource_least_loaded_ties_by_id() -> None:
    slot = Slot(at(MONDAY, 9), at(MONDAY, 9, 30), at(MONDAY, 9), 8, ((1, 2), (2, 3), (3, 3)))
    assert pick_resource(slot, 1) == 2
    assert pick_resource(slot, 3) == 2
    assert pick_resource(slot, 4) is None
    assert pick_resource(Slot(at(MONDAY, 9), at(MONDAY, 9, 30), at(MONDAY, 9), 0, ()), 1) is None


def test_pick_resource_on_a_real_slot_skips_the_busy_one() -> None:
    rooms = [resource(1, kind="room", capacity=4), resource(2, kind="room", capacity=4)]
    s = slot_at(slots(calendar(), RULES30, rooms, [booked(1, at(MONDAY, 9), 30, 1)]), at(MONDAY, 9))
    assert s is not None
    assert s.remaining == 7
    assert pick_resource(s, 1) == 2


# --- daylight saving and zones ------------------------------------------------

SPRING = date(2027, 3, 28)  # Europe/London: 01:00 -> 02:00
FALL = date(2026, 10, 25)  # Europe/London: 02:00 -> 01:00


def local_day(day: date, tz: ZoneInfo) -> tuple[datetime, datetime]:
    start = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)
    nxt = day + timedelta(days=1)
    return start, datetime(nxt.year, nxt.month, nxt.day, tzinfo=tz).astimezone(UTC)


def london_day(
    day: date,
    rules: ServiceRules,
    res: list[ResourceSchedule],
    commitments: list[Commitment] | None = None,
) -> list[Slot]:
    lo, hi = local_day(day, LONDON)
    cal = calendar("00:00", "24:00", tz="Europe/London")
    return slots(
        cal, rules, res, commitments, window_from=lo, window_to=hi, now=lo - timedelta(days=1)
    )


HALF_HOURLY = ServiceRules(duration_min=30, slot_interval_min=30)
HOURLY = ServiceRules(duration_min=60, slot_interval_min=60)


def test_spring_forward_has_no_slot_in_the_missing_hour() -> None:
    result = london_day(SPRING, HALF_HOURLY, [resource()])
    assert len(result) == 46
    assert all(s.local_start.hour != 1 for s in result)
    assert starts(result, LONDON)[:4] == ["00:00", "00:30", "02:00", "02:30"]
    assert [s.start for s in result[1:3]] == [
        datetime(2027, 3, 28, 0, 30, tzinfo=UTC),
        datetime(2027, 3, 28, 1, 0, tzinfo=UTC),
    ]
    # the 00:30 slot ends at the changeover, 02:00 BST: a real half hour
    assert all(s.end - s.start == timedelta(minutes=30) for s in result)


def test_spring_forward_shift_covers_only_real_hours() -> None:
    result = london_day(SPRING, HOURLY, [resource(start="00:00", end="03:00")])
    assert starts(result, LONDON) == ["00:00", "02:00"]


def test_spring_forward_shift_starting_in_the_gap_starts_after_it() -> None:
    result = london_day(SPRING, HALF_HOURLY, [resource(start="01:30", end="03:00")])
    assert starts(result, LONDON) == ["02:00", "02:30"]


def test_fall_back_has_both_half_past_one_slots() -> None:
    result = london_day(FALL, HALF_HOURLY, [resource()])
    assert len(result) == 50
    repeated = [s for s in result if (s.local_start.hour, s.local_start.minute) == (1, 30)]
    assert [s.start for s in repeated] == [
        datetime(2026, 10, 25, 0, 30, tzinfo=UTC),
        datetime(2026, 10, 25, 1, 30, tzinfo=UTC),
    ]
    assert [s.local_start.fold for s in repeated] == [0, 1]
    assert [s.local_start.utcoffset() for s in repeated] == [timedelta(hours=1), timedelta(0)]


def test_fall_back_each_half_past_one_is_bookable_once_per_seat() -> None:
    first = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    second = datetime(2026, 10, 25, 1, 30, tzinfo=UTC)
    result = london_day(FALL, HALF_HOURLY, [resource()], [booked(1, first, 30)])
    assert slot_at(result, first) is None
    s = slot_at(result, second)
    assert s is not None
    assert s.remaining == 1
    both = london_day(
        FALL, HALF_HOURLY, [resource()], [booked(1, first, 30), booked(1, second, 30)]
    )
    assert all((s.local_start.hour, s.local_start.minute) != (1, 30) for s in both)


def test_fall_back_shift_covers_four_real_hours() -> None:
    result = london_day(FALL, HOURLY, [resource(start="00:00", end="03:00")])
    assert starts(result, LONDON) == ["00:00", "01:00", "01:00", "02:00"]
    assert len({s.start for s in result}) == 4


def test_fall_back_interval_boundaries_take_the_wider_reading() -> None:
    # A shift ending at 01:30 ends at the later 01:30; one starting there starts at the earlier.
    ends = london_day(FALL, HALF_HOURLY, [resource(start="00:00", end="01:30")])
    assert [s.start.strftime("%H:%M") for s in ends] == [
        "23:00",
        "23:30",
        "00:00",
        "00:30",
        "01:00",
    ]


def test_fall_back_opening_inside_the_repeated_hour_offers_both_readings() -> None:
    # Open 01:30-03:00 on the fall-back Sunday: the hall opens at 01:30 BST and stays
    # open while the clock goes back to 01:00 GMT, so 01:00 and 01:15 GMT are slots too.
    lo, hi = local_day(FALL, LONDON)
    cal = calendar("01:30", "03:00", tz="Europe/London")
    quarter = ServiceRules(duration_min=15, slot_interval_min=15)
    result = slots(
        cal, quarter, [resource()], window_from=lo, window_to=hi, now=lo - timedelta(days=1)
    )
    assert starts(result) == [f"{h:02}:{m:02}" for h in (0, 1, 2) for m in (0, 15, 30, 45)][2:]
    assert [(s.local_start.strftime("%H:%M"), s.local_start.fold) for s in result[:6]] == [
        ("01:30", 0),
        ("01:45", 0),
        ("01:00", 1),
        ("01:15", 1),
        ("01:30", 1),
        ("01:45", 1),
    ]
    # on a 30-minute grid the same holds: 01:00 GMT lies on it, 00:30 (BST only) does not
    half = ServiceRules(duration_min=30, slot_interval_min=30)
    result = slots(cal, half, [resource()], window_from=lo, window_to=hi, now=lo)
    assert starts(result) == ["00:30", "01:00", "01:30", "02:00", "02:30"]
    # an ordinary day has no such readings
    day = date(2026, 10, 18)
    lo, hi = local_day(day, LONDON)
    result = slots(cal, quarter, [resource()], window_from=lo, window_to=hi, now=lo)
    assert starts(result, LONDON) == ["01:30", "01:45", "02:00", "02:15", "02:30", "02:45"]


def test_ordinary_london_day_has_48_half_hours() -> None:
    assert len(london_day(date(2026, 7, 1), HALF_HOURLY, [resource()])) == 48


def test_shanghai_plain_day() -> None:
    day = date(2026, 3, 29)  # a Sunday that is a DST change elsewhere; Shanghai has none
    cal = calendar("09:00", "17:00", tz="Asia/Shanghai")
    lo, hi = local_day(day, SHANGHAI)
    result = slots(
        cal, HOURLY, [resource()], window_from=lo, window_to=hi, now=lo - timedelta(days=1)
    )
    assert starts(result, SHANGHAI) == [f"{h:02}:00" for h in range(9, 17)]
    assert result[0].start == datetime(2026, 3, 29, 1, 0, tzinfo=UTC)
    assert all(s.local_start.utcoffset() == timedelta(hours=8) for s in result)
    assert all(s.end - s.start == timedelta(hours=1) for s in result)


# --- properties ----------------------------------------------------------------

DAY0 = at(MONDAY, 0)
QUARTERS = st.integers(0, 96).map(lambda q: q * 15)


def pair(draw: st.DrawFn) -> tuple[int, int]:
    """A span of the day, often a long one so that slots exist."""
    if draw(st.booleans()):
        return draw(st.sampled_from([(0, 1440), (480, 1080), (420, 720)]))
    a, b = draw(QUARTERS), draw(QUARTERS)
    return min(a, b), max(a, b)


@st.composite
def scenarios(
    draw: st.DrawFn,
) -> tuple[BranchCalendar, ServiceRules, list[ResourceSchedule], list[Commitment]]:
    o1, o2 = pair(draw)
    reserve = draw(st.sampled_from([0.0, 0.25, 0.5, 0.34, 1.0]))
    cal = BranchCalendar("UTC", ((1, o1, o2),), frozenset(), reserve)
    rules = ServiceRules(
        duration_min=draw(st.sampled_from([15, 30, 45, 60, 90])),
        buffer_before_min=draw(st.sampled_from([0, 5, 15])),
        buffer_after_min=draw(st.sampled_from([0, 10, 15])),
        slot_interval_min=draw(st.sampled_from([15, 30, 20])),
        max_party=3,
    )
    resources: list[ResourceSchedule] = []
    for rid in range(1, draw(st.integers(1, 4)) + 1):
        shifts = tuple((1, *pair(draw)) for _ in range(draw(st.integers(0, 2))))
        exceptions = tuple(
            (DAY0 + timedelta(minutes=a), DAY0 + timedelta(minutes=b), draw(st.booleans()))
            for a, b in (pair(draw) for _ in range(draw(st.integers(0, 2))))
        )
        kind = draw(st.sampled_from(["counter", "staff", "room"]))
        resources.append(ResourceSchedule(rid, kind, draw(st.integers(1, 4)), shifts, exceptions))
    commitments = [
        Commitment(
            draw(st.sampled_from([1, 1, 2, len(resources) + 1])),  # + one not passed in
            start := DAY0 + timedelta(minutes=draw(st.integers(-60, 1500) | st.integers(480, 720))),
            start + timedelta(minutes=draw(st.integers(1, 180))),
            draw(st.sampled_from([1, 1, 2, 3])),
        )
        for _ in range(draw(st.integers(0, 12)))
    ]
    return cal, rules, resources, commitments


def run(
    cal: BranchCalendar,
    rules: ServiceRules,
    res: list[ResourceSchedule],
    com: list[Commitment],
    party: int = 1,
) -> list[Slot]:
    return available_slots(
        cal,
        rules,
        res,
        com,
        party_size=party,
        window_from=DAY0 - timedelta(hours=2),
        window_to=DAY0 + timedelta(days=1, hours=2),
        now=DAY0 - timedelta(days=1),
    )


def brute_force(
    cal: BranchCalendar,
    rules: ServiceRules,
    res: list[ResourceSchedule],
    com: list[Commitment],
    party: int,
) -> dict[datetime, tuple[int, tuple[tuple[int, int], ...]]]:
    """Minute-by-minute model over Monday (UTC branch; nothing else is open or on shift)."""
    span = range(-1440, 2 * 1440)
    ((_, o1, o2),) = cal.opening_hours
    share = 1 - Fraction(repr(cal.walk_in_reserve))

    def minute(t: datetime) -> int:
        return (t - DAY0) // timedelta(minutes=1)

    def on_shift(r: ResourceSchedule, m: int) -> bool:
        weekly = any(0 <= m < 1440 and a <= m < b for _, a, b in r.shifts)
        off = any(minute(a) <= m < minute(b) for a, b, avail in r.exceptions if not avail)
        extra = any(minute(a) <= m < minute(b) for a, b, avail in r.exceptions if avail)
        return (weekly and not off) or extra

    def used(rid: int, m: int) -> int:
        return sum(
            c.seats
            for c in com
            if c.resource_id == rid and minute(c.starts_at) <= m < minute(c.ends_at)
        )

    def pool_at(m: int) -> int:
        cap = sum(r.capacity for r in res if r.kind == "counter" and on_shift(r, m))
        return math.floor(cap * share) - sum(
            used(r.resource_id, m) for r in res if r.kind == "counter"
        )

    out: dict[datetime, tuple[int, tuple[tuple[int, int], ...]]] = {}
    for s in range(o1, o2, rules.slot_interval_min):
        e = s + rules.duration_min
        if e > o2:
            continue
        occ = range(s - rules.buffer_before_min, e + rules.buffer_after_min)
        assert occ[0] in span
        assert occ[-1] in span
        pool = max(0, min(pool_at(m) for m in occ))
        others = counter_sum = 0
        free_by: list[tuple[int, int]] = []
        for r in sorted(res, key=lambda r: r.resource_id):
            if not all(on_shift(r, m) for m in occ):
                continue
            free = max(0, r.capacity - max(used(r.resource_id, m) for m in occ))
            if r.kind == "counter":
                counter_sum += free
                eff = min(free, pool)
            else:
                others += free
                eff = free
            if eff:
                free_by.append((r.resource_id, eff))
        if any(f >= party for _, f in free_by):
            out[DAY0 + timedelta(minutes=s)] = (others + min(counter_sum, pool), tuple(free_by))
    return out


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.integers(1, 3))
def test_matches_brute_force_model(
    scenario: tuple[BranchCalendar, ServiceRules, list[ResourceSchedule], list[Commitment]],
    party: int,
) -> None:
    cal, rules, res, com = scenario
    got = {s.start: (s.remaining, s.free_by_resource) for s in run(cal, rules, res, com, party)}
    assert got == brute_force(cal, rules, res, com, party)


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.data())
def test_remaining_bounded_and_monotone_in_commitments(
    scenario: tuple[BranchCalendar, ServiceRules, list[ResourceSchedule], list[Commitment]],
    data: st.DataObject,
) -> None:
    cal, rules, res, com = scenario
    before = {s.start: s for s in run(cal, rules, res, com)}
    total = sum(r.capacity for r in res)
    for s in before.values():
        assert 1 <= s.remaining <= total
        assert s.remaining <= sum(f for _, f in s.free_by_resource)
        assert s.start >= DAY0
        assert s.local_start == s.start
        picked = pick_resource(s, 1)
        assert picked is not None
        assert max(f for _, f in s.free_by_resource) == dict(s.free_by_resource)[picked]
    extra = Commitment(
        data.draw(st.sampled_from([r.resource_id for r in res])),
        start := DAY0 + timedelta(minutes=data.draw(st.integers(0, 1440))),
        start + timedelta(minutes=data.draw(st.integers(1, 120))),
        data.draw(st.integers(1, 3)),
    )
    after = {s.start: s for s in run(cal, rules, res, [*com, extra])}
    assert set(after) <= set(before)
    for start, s in after.items():
        assert s.remaining <= before[start].remaining


# --- the fast path against the straightforward implementation ------------------
#
# `reference_slots` is the first, straightforward `available_slots`: for every
# candidate and resource, a binary search into the on-shift intervals and into a
# usage step function. The production code precomputes per resource and answers
# per candidate index range instead; the two must agree exactly, on any zone,
# daylight-saving change, grid, buffers, duplicates, overlaps and odd seat counts.


def _reference_covers(
    intervals: list[tuple[datetime, datetime]], lo: datetime, hi: datetime
) -> bool:
    i = bisect_right(intervals, (lo, datetime.max.replace(tzinfo=UTC))) - 1
    return i >= 0 and intervals[i][0] <= lo and hi <= intervals[i][1]


def profile_of(deltas: dict[datetime, int]) -> av._Profile:
    times = sorted(deltas)
    levels = list(itertools.accumulate(deltas[t] for t in times))
    return av._Profile(times, levels, 0)


def reference_slots(
    calendar: BranchCalendar,
    rules: ServiceRules,
    resources: list[ResourceSchedule],
    commitments: list[Commitment],
    *,
    party_size: int,
    window_from: datetime,
    window_to: datetime,
    now: datetime,
) -> list[Slot]:
    av._validate(calendar, rules, party_size)
    tz = ZoneInfo(calendar.timezone)
    window_from = av._aware(window_from, "window_from")
    window_to = av._aware(window_to, "window_to")
    now = av._aware(now, "now")
    first_start = max(window_from, now + timedelta(minutes=rules.lead_time_min))
    last_start = min(window_to, now + timedelta(days=rules.horizon_days))
    if first_start >= last_start:
        return []
    duration = timedelta(minutes=rules.duration_min)
    before = timedelta(minutes=rules.buffer_before_min)
    after = timedelta(minutes=rules.buffer_after_min)
    span_lo, span_hi = first_start - before, last_start + duration + after
    days = av._days(span_lo, span_hi, tz)
    open_days = [d for d in days if d not in calendar.closures]
    opening = av._weekly(calendar.opening_hours, open_days, tz)
    shifts: dict[int, list[tuple[datetime, datetime]]] = {}
    for res in resources:
        weekly = av._weekly(res.shifts, days, tz)
        off = av._union(
            (av._aware(s, "starts_at"), av._aware(e, "ends_at"))
            for s, e, avail in res.exceptions
            if not avail
        )
        extra = [
            (av._aware(s, "starts_at"), av._aware(e, "ends_at"))
            for s, e, avail in res.exceptions
            if avail
        ]
        shifts[res.resource_id] = av._union([*av._subtract(weekly, off), *extra])
    known = {res.resource_id for res in resources}
    usage: dict[int, dict[datetime, int]] = {rid: defaultdict(int) for rid in known}
    for c in commitments:
        if c.resource_id not in known:
            continue
        lo, hi = av._aware(c.starts_at, "starts_at"), av._aware(c.ends_at, "ends_at")
        if hi <= span_lo or lo >= span_hi or lo >= hi or not c.seats:
            continue
        usage[c.resource_id][lo] += c.seats
        usage[c.resource_id][hi] -= c.seats
    profiles = {rid: profile_of(d) for rid, d in usage.items()}
    counters = [r for r in resources if r.kind == "counter"]
    pool = None
    if counters:
        capacity: dict[datetime, int] = defaultdict(int)
        booked: dict[datetime, int] = defaultdict(int)
        for counter in counters:
            for lo, hi in shifts[counter.resource_id]:
                capacity[lo] += counter.capacity
                capacity[hi] -= counter.capacity
            for t, d in usage[counter.resource_id].items():
                booked[t] += d
        share = 1 - Fraction(repr(calendar.walk_in_reserve))
        times = sorted(set(capacity) | set(booked))
        levels: list[int] = []
        cap = used = 0
        for t in times:
            cap += capacity.get(t, 0)
            used += booked.get(t, 0)
            levels.append(math.floor(cap * share) - used)
        pool = av._Profile(times, levels, 0)
    ordered = sorted(resources, key=lambda r: r.resource_id)
    starts: set[datetime] = set()
    interval = timedelta(minutes=rules.slot_interval_min)
    for day in open_days:
        midnight = datetime.combine(day, time())
        for weekday, opens, closes in calendar.opening_hours:
            if weekday != day.isoweekday():
                continue
            # The grid, three hours back from `opens` (not before midnight) and on to
            # `closes`: every instant it reads at or after the opening instant.
            opened = av._boundary(day, opens, tz, is_end=False)
            wall = midnight + timedelta(minutes=opens) - interval * (180 // rules.slot_interval_min)
            while wall < midnight + timedelta(minutes=closes):
                for instant in av._wall_instants(wall, tz) if wall >= midnight else ():
                    if first_start <= instant < last_start and instant >= opened:
                        starts.add(instant)
                wall += interval
    out: list[Slot] = []
    for start in sorted(starts):
        end = start + duration
        if not _reference_covers(opening, start, end):
            continue
        lo, hi = start - before, end + after
        pool_free = max(0, pool.low(lo, hi)) if pool is not None else 0
        other_total = counter_total = 0
        free_by_resource: list[tuple[int, int]] = []
        for res in ordered:
            if not _reference_covers(shifts[res.resource_id], lo, hi):
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
        out.append(
            Slot(
                start,
                end,
                start.astimezone(tz),
                other_total + min(counter_total, pool_free),
                tuple(free_by_resource),
            )
        )
    return out


# Zones on a day with a daylight-saving change (Lord Howe moves by 30 minutes), and
# plain days.
ZONE_DAYS = [
    ("Europe/London", date(2026, 3, 29)),
    ("Europe/London", date(2026, 10, 25)),
    ("America/New_York", date(2026, 3, 8)),
    ("America/New_York", date(2026, 11, 1)),
    ("Australia/Lord_Howe", date(2026, 4, 5)),
    ("Australia/Lord_Howe", date(2026, 10, 4)),
    ("Asia/Shanghai", MONDAY),
    ("UTC", MONDAY),
]


def stretch(draw: st.DrawFn) -> tuple[int, int]:
    """A part of the day, mostly a long one; sometimes odd or empty."""
    if draw(st.integers(0, 3)):
        return draw(
            st.sampled_from(
                [(480, 1200), (0, 1440), (420, 720), (540, 1035), (60, 180), (90, 180), (75, 150)]
            )
        )
    a, b = draw(st.integers(0, 1440)), draw(st.integers(0, 1440))
    return min(a, b), max(a, b)


def week(draw: st.DrawFn, most: int) -> tuple[tuple[int, int, int], ...]:
    """Weekly windows: mostly the same every day, else a few on random weekdays."""
    kind = draw(st.integers(0, 5))
    if kind <= 1:
        return tuple((w, 0, 1440) for w in EVERY_DAY)
    if kind <= 3:
        opens, closes = stretch(draw)
        return tuple((w, opens, closes) for w in EVERY_DAY)
    return tuple(
        (draw(st.integers(1, 7)), *stretch(draw)) for _ in range(draw(st.integers(0, most)))
    )


@st.composite
def wide_scenarios(
    draw: st.DrawFn,
) -> tuple[BranchCalendar, ServiceRules, list[ResourceSchedule], list[Commitment], dict[str, Any]]:
    zone, day = draw(st.sampled_from(ZONE_DAYS))
    tz = ZoneInfo(zone)
    base = datetime(day.year, day.month, day.day, tzinfo=tz).astimezone(UTC)
    hours_ = week(draw, 6)
    closures = frozenset(
        day + timedelta(days=n) for n in draw(st.sets(st.integers(-1, 3), max_size=2))
    )
    reserve = draw(st.sampled_from([0.0, 0.2, 0.25, 0.34, 0.5, 1.0]))
    cal = BranchCalendar(zone, hours_, closures, reserve)
    min_party = draw(st.sampled_from([0, 1, 1, 2]))
    rules = ServiceRules(
        duration_min=draw(st.sampled_from([5, 15, 30, 45, 60, 90, 150])),
        buffer_before_min=draw(st.sampled_from([0, 0, 5, 15, 30])),
        buffer_after_min=draw(st.sampled_from([0, 0, 10, 15])),
        slot_interval_min=draw(st.sampled_from([10, 15, 20, 30, 45, 60])),
        lead_time_min=draw(st.sampled_from([0, 90])),
        horizon_days=draw(st.sampled_from([2, 30])),
        min_party=min_party,
        max_party=4,
    )
    minutes = st.integers(-1440, 4 * 1440)
    resources: list[ResourceSchedule] = []
    for _ in range(draw(st.integers(0, 6) | st.integers(1, 3))):
        shifts = week(draw, 8)
        exceptions = tuple(
            (
                base + timedelta(minutes=a),
                base + timedelta(minutes=a + draw(st.integers(-30, 600))),
                draw(st.booleans()),
            )
            for a in (draw(minutes) for _ in range(draw(st.integers(0, 3))))
        )
        resources.append(
            ResourceSchedule(
                draw(st.integers(1, 7)),  # ids may repeat
                draw(st.sampled_from(["counter", "staff", "room"])),
                draw(st.sampled_from([0, 1, 1, 2, 3, 5])),
                shifts,
                exceptions,
            )
        )
    step = draw(st.sampled_from([1, 5, 15, 30]))  # coarse: commitments on the slot grid
    offsets = st.integers(-96, 4 * 96).map(lambda n: timedelta(minutes=15 * n))
    commitments: list[Commitment] = []
    for _ in range(draw(st.integers(0, 40))):
        if commitments and draw(st.integers(0, 2)) == 0:  # the same interval again
            twin = draw(st.sampled_from(commitments))
            commitments.append(Commitment(twin.resource_id, twin.starts_at, twin.ends_at, 1))
            continue
        start = base + draw(offsets) + timedelta(minutes=step * draw(st.integers(0, 3)))
        if draw(st.integers(0, 9)) == 0:
            start += timedelta(seconds=draw(st.integers(1, 59)), microseconds=7)
        end = start + timedelta(minutes=draw(st.sampled_from([-15, 0, 15, 30, 45, 60, 200])))
        if draw(st.integers(0, 9)) == 0:
            start, end = start.astimezone(tz), end.astimezone(LONDON)  # other offsets
        commitments.append(
            Commitment(
                draw(st.integers(1, 8)),
                start,
                end,
                draw(st.sampled_from([1, 1, 1, 2, 3, 5, 0, -1])),
            )
        )
    first = base + timedelta(
        minutes=draw(st.sampled_from([0, -600, 180]) | st.integers(-600, 1440))
    )
    kwargs: dict[str, Any] = {
        "party_size": max(min_party, draw(st.sampled_from([0, 1, 1, 2, 4]))),
        "window_from": first,
        "window_to": first
        + timedelta(
            minutes=draw(st.sampled_from([2880, 4320, 1440, 30, 1]) | st.integers(1, 4320))
        ),
        "now": first - timedelta(minutes=draw(st.sampled_from([0, 60, 1440]))),
    }
    return cal, rules, resources, commitments, kwargs


def epoch_rows(commitments: list[Commitment]) -> list[tuple[int, int, int, int]]:
    """Commitments as the database hands them to `available_slots_from_rows`."""
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    return [
        (
            c.resource_id,
            (c.starts_at - epoch) // timedelta(microseconds=1),
            (c.ends_at - epoch) // timedelta(microseconds=1),
            c.seats,
        )
        for c in commitments
    ]


def comparable(result: list[Slot]) -> list[tuple[Any, ...]]:
    return [
        (
            s.start,
            s.start.tzinfo,
            s.end,
            s.local_start.isoformat(),
            s.local_start.fold,
            s.local_start.tzinfo,
            s.remaining,
            s.free_by_resource,
        )
        for s in result
    ]


@settings(max_examples=500, deadline=None)
@given(wide_scenarios())
def test_matches_the_straightforward_implementation(
    scenario: tuple[
        BranchCalendar, ServiceRules, list[ResourceSchedule], list[Commitment], dict[str, Any]
    ],
) -> None:
    cal, rules, res, com, kwargs = scenario
    expected = reference_slots(cal, rules, res, com, **kwargs)
    assert comparable(available_slots(cal, rules, res, com, **kwargs)) == comparable(expected)
    from_rows = av.available_slots_from_rows(cal, rules, res, epoch_rows(com), **kwargs)
    assert comparable(from_rows) == comparable(expected)


@pytest.mark.parametrize(
    "pattern", ["one per slot", "parties per slot", "parties every other slot", "mixed lengths"]
)
def test_matches_the_straightforward_implementation_on_a_busy_branch(pattern: str) -> None:
    """Bench-like: 30 resources with the same shifts and a fortnight of bookings on the
    grid: at most one per resource and slot, several parties per slot (on every slot,
    or on every other one, so that a candidate meets one booked interval only), or
    bookings of several lengths that overlap partly."""
    rng = random.Random(5)
    tz = ZoneInfo("Europe/London")
    cal = BranchCalendar("Europe/London", hours("08:00", "20:00"), frozenset(), 0.2)
    res = [
        ResourceSchedule(i, ["counter", "staff", "room"][i % 3], 1 + i % 4, hours("08:00", "20:00"))
        for i in range(1, 31)
    ]
    day0 = datetime(2026, 10, 19, tzinfo=tz)  # a fall-back Sunday inside the range
    counts, lengths = {
        "one per slot": ([0, 1], [30]),
        "parties per slot": ([0, 1, 2, 3], [30]),
        "parties every other slot": ([0, 1, 2, 3], [30]),
        "mixed lengths": ([0, 0, 1, 1, 2], [30, 30, 30, 45, 60]),
    }[pattern]
    com: list[Commitment] = []
    for d in range(-1, 16):
        for r in res:
            for slot in range(24):
                if pattern == "parties every other slot" and slot % 2:
                    continue
                for _ in range(rng.choice(counts)):
                    start = (day0 + timedelta(days=d, minutes=480 + 30 * slot)).astimezone(UTC)
                    end = start + timedelta(minutes=rng.choice(lengths))
                    com.append(Commitment(r.resource_id, start, end, rng.randint(1, 2)))
    for rules in (
        ServiceRules(duration_min=30, slot_interval_min=30, max_party=3),
        ServiceRules(duration_min=30, slot_interval_min=15, max_party=3),
        ServiceRules(30, buffer_before_min=5, buffer_after_min=10, slot_interval_min=15),
    ):
        for party in (1, 2):
            kwargs: dict[str, Any] = {
                "party_size": min(party, rules.max_party),
                "window_from": day0,
                "window_to": day0 + timedelta(days=14),
                "now": day0 - timedelta(days=1),
            }
            expected = reference_slots(cal, rules, res, com, **kwargs)
            assert expected
            got = available_slots(cal, rules, res, com, **kwargs)
            assert comparable(got) == comparable(expected)
            from_rows = av.available_slots_from_rows(cal, rules, res, epoch_rows(com), **kwargs)
            assert comparable(from_rows) == comparable(expected)


def test_packed_commitments_unpack_to_rows() -> None:
    """The database hands the commitments to `compute_slots` as big-endian int8 byte
    strings, times in microseconds since 2000-01-01 UTC (PostgreSQL's binary form)."""
    from selfserve.scheduling import slots as sl

    def packed(*columns: list[int], n: int | None = None) -> dict[str, Any]:
        names = ("resource_ids", "starts_at", "ends_at", "seats")
        record: dict[str, Any] = {
            name: b"".join(v.to_bytes(8, "big", signed=True) for v in values) or None
            for name, values in zip(names, columns, strict=True)
        }
        record["n"] = len(columns[0]) if n is None else n
        return record

    start = datetime(2026, 6, 1, 9, 0, 0, 250, tzinfo=UTC)
    us = (start - datetime(2000, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)
    rows = list(sl._unpack(packed([7, 2**40], [us, -5], [us + 1_800_000_000, 0], [3, 1])))  # type: ignore[arg-type]
    assert rows == [(7, us, us + 1_800_000_000, 3), (2**40, -5, 0, 1)]
    got = av.available_slots_from_rows(
        calendar(),
        RULES30,
        [resource(7, capacity=4)],
        rows,
        party_size=1,
        window_from=at(MONDAY, 0),
        window_to=at(MONDAY, 23),
        now=at(MONDAY, 0) - timedelta(days=1),
        epoch=datetime(2000, 1, 1, tzinfo=UTC),
    )
    expected = slots(calendar(), RULES30, [resource(7, capacity=4)], [booked(7, start, 30, 3)])
    assert comparable(got) == comparable(expected)
    assert slot_at(got, at(MONDAY, 9)) is not None
    with pytest.raises(ValueError, match="without starts_at"):
        sl._unpack(packed([7, 8], [us], [us + 1, us + 2], [1, 1], n=2))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="finite"):
        sl._unpack(packed([7], [us], [2**63 - 1], [1]))  # type: ignore[arg-type]
