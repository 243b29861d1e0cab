"""Quiet hours: the pure "next allowed send time", checked minute by minute against a
brute-force scan across normal days and daylight-saving changes, plus properties
over many zones; and the settings that configure it."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfserve.messaging.quiet_hours import (
    first_instant_at,
    in_quiet_hours,
    next_allowed_send_time,
    parse_clock,
)
from selfserve.settings import ConfigError, load_settings

SHANGHAI = ZoneInfo("Asia/Shanghai")
LONDON = ZoneInfo("Europe/London")
NINE_PM, EIGHT_AM = time(21, 0), time(8, 0)


def utc(year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=UTC)


def wall(at: datetime, tz: ZoneInfo) -> time:
    return at.astimezone(tz).time().replace(tzinfo=None)


# --- the acceptance examples -------------------------------------------------------


@pytest.mark.parametrize(
    ("tz", "at", "expected", "why"),
    [
        (SHANGHAI, utc(2026, 12, 1, 14, 30), utc(2026, 12, 2, 0, 0), "22:30 -> 08:00 tomorrow"),
        (SHANGHAI, utc(2026, 12, 1, 17, 0), utc(2026, 12, 2, 0, 0), "01:00 -> 08:00 today"),
        (SHANGHAI, utc(2026, 12, 1, 23, 59), utc(2026, 12, 2, 0, 0), "07:59 -> 08:00"),
        (SHANGHAI, utc(2026, 12, 2, 0, 0), utc(2026, 12, 2, 0, 0), "08:00 is allowed"),
        (SHANGHAI, utc(2026, 12, 2, 12, 59), utc(2026, 12, 2, 12, 59), "20:59 is allowed"),
        (SHANGHAI, utc(2026, 12, 2, 13, 0), utc(2026, 12, 3, 0, 0), "21:00 is quiet"),
        (LONDON, utc(2027, 3, 27, 22, 30), utc(2027, 3, 28, 7, 0), "spring forward: 08:00 BST"),
        (LONDON, utc(2027, 3, 28, 0, 30), utc(2027, 3, 28, 7, 0), "00:30 GMT, same morning"),
        (LONDON, utc(2027, 3, 28, 1, 30), utc(2027, 3, 28, 7, 0), "02:30 BST, same morning"),
        (LONDON, utc(2027, 3, 28, 7, 0), utc(2027, 3, 28, 7, 0), "08:00 BST is allowed"),
        (LONDON, utc(2027, 3, 28, 19, 59), utc(2027, 3, 28, 19, 59), "20:59 BST is allowed"),
        (LONDON, utc(2027, 3, 28, 20, 0), utc(2027, 3, 29, 7, 0), "21:00 BST is quiet"),
        (LONDON, utc(2026, 10, 24, 21, 30), utc(2026, 10, 25, 8, 0), "fall back: 08:00 GMT"),
        (LONDON, utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 8, 0), "01:30 BST, first pass"),
        (LONDON, utc(2026, 10, 25, 1, 30), utc(2026, 10, 25, 8, 0), "01:30 GMT, second pass"),
        (LONDON, utc(2026, 10, 25, 7, 59), utc(2026, 10, 25, 8, 0), "07:59 GMT -> 08:00"),
        (LONDON, utc(2026, 10, 25, 20, 59), utc(2026, 10, 25, 20, 59), "20:59 GMT allowed"),
    ],
)
def test_next_allowed_send_time_examples(
    tz: ZoneInfo, at: datetime, expected: datetime, why: str
) -> None:
    assert next_allowed_send_time(at, tz, NINE_PM, EIGHT_AM) == expected, why


def test_the_morning_is_eight_local_even_when_the_night_is_shorter_or_longer() -> None:
    spring = next_allowed_send_time(utc(2027, 3, 27, 21, 0), LONDON, NINE_PM, EIGHT_AM)
    autumn = next_allowed_send_time(utc(2026, 10, 24, 20, 0), LONDON, NINE_PM, EIGHT_AM)
    assert spring - utc(2027, 3, 27, 21, 0) == timedelta(hours=10)  # an hour lost
    assert autumn - utc(2026, 10, 24, 20, 0) == timedelta(hours=12)  # an hour gained
    assert wall(spring, LONDON) == wall(autumn, LONDON) == EIGHT_AM


def test_a_window_ending_in_the_skipped_hour_ends_when_the_clocks_jump() -> None:
    # 00:30-01:30 on 28 March 2027: 01:30 never happens in London; at 01:00 GMT the
    # clocks read 02:00 BST, already past the end.
    end = time(1, 30)
    at = utc(2027, 3, 28, 0, 45)
    assert next_allowed_send_time(at, LONDON, time(0, 30), end) == utc(2027, 3, 28, 1, 0)
    assert first_instant_at(at.date(), end, LONDON, after=at) == utc(2027, 3, 28, 1, 0)


def test_a_window_ending_in_the_repeated_hour_ends_at_the_next_occurrence() -> None:
    end = time(1, 30)
    # First pass through 01:xx (BST): the first 01:30.
    assert next_allowed_send_time(utc(2026, 10, 25, 0, 15), LONDON, time(23, 0), end) == utc(
        2026, 10, 25, 0, 30
    )
    # Second pass (GMT): 01:15 is quiet again, until the second 01:30.
    assert next_allowed_send_time(utc(2026, 10, 25, 1, 15), LONDON, time(23, 0), end) == utc(
        2026, 10, 25, 1, 30
    )


def test_equal_start_and_end_switch_quiet_hours_off() -> None:
    at = utc(2026, 12, 1, 14, 30)
    assert next_allowed_send_time(at, SHANGHAI, EIGHT_AM, EIGHT_AM) == at
    assert not in_quiet_hours(time(3, 0), EIGHT_AM, EIGHT_AM)


def test_naive_instants_are_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        next_allowed_send_time(datetime(2026, 12, 1, 22, 30), SHANGHAI, NINE_PM, EIGHT_AM)


def test_parse_clock() -> None:
    assert parse_clock("21:00") == NINE_PM
    assert parse_clock("08:05") == time(8, 5)


# --- exhaustive: every minute against a brute-force scan -------------------------------

WINDOWS = [
    (NINE_PM, EIGHT_AM),  # the default, wrapping midnight
    (time(22, 0), time(7, 30)),
    (time(0, 0), time(6, 0)),  # not wrapping
    (time(0, 30), time(1, 30)),  # ends inside London's skipped/repeated hour
    (time(1, 30), time(3, 0)),  # starts inside it
    (time(23, 0), time(1, 30)),
]
SPANS = [
    (SHANGHAI, utc(2026, 11, 30, 0, 0)),
    (LONDON, utc(2027, 3, 26, 0, 0)),  # spring forward on the 28th
    (LONDON, utc(2026, 10, 23, 0, 0)),  # fall back on the 25th
    (LONDON, utc(2026, 6, 10, 0, 0)),  # an ordinary summer week
]


@pytest.mark.parametrize(("tz", "start_at"), SPANS, ids=lambda v: str(v))
@pytest.mark.parametrize(("start", "end"), WINDOWS, ids=lambda v: str(v))
def test_every_minute_matches_a_brute_force_scan(
    tz: ZoneInfo, start_at: datetime, start: time, end: time
) -> None:
    minutes = 5 * 24 * 60
    instants = [start_at + timedelta(minutes=m) for m in range(minutes + 24 * 60)]
    quiet = [in_quiet_hours(wall(t, tz), start, end) for t in instants]
    # Scanning backwards: the first allowed minute at or after each minute.
    first_allowed: list[datetime | None] = [None] * len(instants)
    upcoming: datetime | None = None
    for i in range(len(instants) - 1, -1, -1):
        if not quiet[i]:
            upcoming = instants[i]
        first_allowed[i] = upcoming
    for i in range(minutes):
        at = instants[i]
        got = next_allowed_send_time(at, tz, start, end)
        assert got == first_allowed[i], (at, got, first_allowed[i])
        assert (got == at) == (not quiet[i])


# --- properties in many zones ---------------------------------------------------------

ZONES = [
    "Asia/Shanghai",
    "Europe/London",
    "America/New_York",
    "Australia/Lord_Howe",  # half-hour daylight saving
    "Asia/Kathmandu",  # UTC+05:45
    "America/Santiago",  # DST changes at midnight
    "Pacific/Chatham",
]


@settings(max_examples=400, deadline=None)
@given(
    at=st.datetimes(
        min_value=datetime(2020, 1, 1), max_value=datetime(2035, 12, 31), timezones=st.just(UTC)
    ),
    zone=st.sampled_from(ZONES),
    start=st.times(),
    end=st.times(),
)
def test_the_answer_is_the_first_allowed_second(
    at: datetime, zone: str, start: time, end: time
) -> None:
    tz = ZoneInfo(zone)
    start, end = start.replace(second=0, microsecond=0), end.replace(second=0, microsecond=0)
    got = next_allowed_send_time(at, tz, start, end)
    assert got >= at
    quiet_now = in_quiet_hours(wall(at, tz), start, end)
    assert (got == at) == (not quiet_now)
    if got > at:
        assert not in_quiet_hours(wall(got, tz), start, end)
        just_before = got - timedelta(seconds=1)
        assert just_before < at or in_quiet_hours(wall(just_before, tz), start, end)
        assert got - at <= timedelta(hours=26)


# --- settings ---------------------------------------------------------------------------


def test_quiet_hours_settings_default_and_override() -> None:
    default = load_settings({})
    assert (default.quiet_hours_start, default.quiet_hours_end) == ("21:00", "08:00")
    assert default.quiet_hours_tz == "Asia/Shanghai"
    assert default.sms_send_lease_s == 300
    custom = load_settings(
        {
            "SELFSERVE_QUIET_HOURS_START": "22:30",
            "SELFSERVE_QUIET_HOURS_END": "07:00",
            "SELFSERVE_QUIET_HOURS_TZ": "Europe/London",
            "SELFSERVE_SMS_SEND_LEASE": "600",
        }
    )
    assert (custom.quiet_hours_start, custom.quiet_hours_end) == ("22:30", "07:00")
    assert custom.quiet_hours_tz == "Europe/London"
    assert custom.sms_send_lease_s == 600


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("SELFSERVE_QUIET_HOURS_START", "9pm"),
        ("SELFSERVE_QUIET_HOURS_END", "24:00"),
        ("SELFSERVE_QUIET_HOURS_END", "8:00"),
        ("SELFSERVE_QUIET_HOURS_TZ", "Mars/Olympus"),
        ("SELFSERVE_SMS_SEND_LEASE", "30"),  # shorter than a send job may take
    ],
)
def test_bad_quiet_hours_settings_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({name: value})
