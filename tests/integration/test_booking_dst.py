"""Daylight-saving acceptance tests through the HTTP layer, on real PostgreSQL.

Branches, services, resources and shifts are made through the admin API; slots are
read from `GET /v1/availability` and booked with `POST /v1/bookings`; reminders are
read from the outbox (`messages`).

The app reads the real clock, so the switch days are the next Europe/London ones
that are at least a few days ahead (services get a 730-day horizon). The expected
instants come from the EU rule, independently of the code under test: clocks go
forward on the last Sunday of March and back on the last Sunday of October, both
at 01:00 UTC.
"""

from __future__ import annotations

import itertools
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from selfserve.auth.tokens import Principal, issue_access_token
from tests.conftest import ModuleEnv
from tests.helpers import bearer, create_branch, create_service, login, make_staff

LONDON = "Europe/London"
SHANGHAI = "Asia/Shanghai"
_seq = itertools.count(1)


def _last_sunday(year: int, month: int) -> date:
    day = date(year, month + 1, 1) - timedelta(days=1)
    return day - timedelta(days=day.isoweekday() % 7)


def _next_switch(month: int) -> date:
    """The next London switch day of `month` (3 or 10) at least three days ahead."""
    soon = datetime.now(UTC) + timedelta(days=3)
    for year in (soon.year, soon.year + 1):
        day = _last_sunday(year, month)
        if datetime(day.year, day.month, day.day, 1, tzinfo=UTC) > soon:
            return day
    raise AssertionError("unreachable")


SPRING = _next_switch(3)  # 01:00 GMT -> 02:00 BST, at 01:00 UTC
FALL = _next_switch(10)  # 02:00 BST -> 01:00 GMT, at 01:00 UTC


def day(d: date, shift: int) -> str:
    return (d + timedelta(days=shift)).isoformat()


def utc(d: date, clock: str, shift: int = 0) -> str:
    """An instant as the API writes it: `YYYY-MM-DDTHH:MM:00Z`."""
    return f"{day(d, shift)}T{clock}:00Z"


def local(d: date, clock: str, offset: str, shift: int = 0) -> str:
    """A branch wall time with its offset, as `local_start` writes it."""
    return f"{day(d, shift)}T{clock}:00{offset}"


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


def test_the_switch_days_are_what_the_tz_database_says() -> None:
    """Guards the oracle above: the EU rule agrees with zoneinfo for the chosen days."""
    tz = ZoneInfo(LONDON)
    for switch, before, after in ((SPRING, 0, 1), (FALL, 1, 0)):
        assert switch.isoweekday() == 7
        change = datetime(switch.year, switch.month, switch.day, 1, tzinfo=UTC)
        assert (change - timedelta(seconds=1)).astimezone(tz).utcoffset() == timedelta(hours=before)
        assert change.astimezone(tz).utcoffset() == timedelta(hours=after)


# --- setup through the admin API ----------------------------------------------------


@pytest.fixture(scope="module")
async def admin(client: httpx.AsyncClient, pool: asyncpg.Pool) -> str:
    return await login(client, await make_staff(pool, "admin"))


async def bookable(
    client: httpx.AsyncClient,
    token: str,
    *,
    timezone: str,
    opens: str = "00:00",
    closes: str = "24:00",
    weekdays: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7),
    capacity: int = 1,
) -> tuple[int, int]:
    """A branch open `opens`-`closes` on `weekdays`, a 30-minute service on a 30-minute
    grid with a 730-day horizon, and one room of `capacity` on shift in those hours."""
    n = next(_seq)
    hours = [{"weekday": d, "opens": opens, "closes": closes} for d in weekdays]
    branch = await create_branch(
        client, token, name=f"DST Hall {n}", timezone=timezone, opening_hours=hours, closures=[]
    )
    service = await create_service(
        client,
        token,
        branch["id"],
        name=f"DST Service {n}",
        duration_min=30,
        slot_interval_min=30,
        horizon_days=730,
        lead_time_min=0,
    )
    resp = await client.post(
        "/v1/admin/resources",
        json={
            "branch_id": branch["id"],
            "kind": "room",
            "name": f"Room {n}",
            "capacity": capacity,
            "skills": [service["id"]],
        },
        headers=bearer(token),
    )
    assert resp.status_code == 201, resp.text
    rid = resp.json()["id"]
    for d in weekdays:
        shift = {"kind": "shift", "resource_id": rid, "weekday": d, "start": opens, "end": closes}
        resp = await client.post("/v1/admin/schedules", json=shift, headers=bearer(token))
        assert resp.status_code == 201, resp.text
    return branch["id"], service["id"]


async def customer(pool: asyncpg.Pool, env: ModuleEnv) -> tuple[str, str]:
    """A customer with a phone on file: (phone, access token)."""
    phone = f"+447700{next(_seq):06d}"
    cid = await pool.fetchval(
        "INSERT INTO customers (phone, locale) VALUES ($1, 'en') RETURNING id", phone
    )
    token = issue_access_token(
        env.settings,
        Principal(kind="customer", id=cid, role="customer", channel="app", branches=()),
    )
    return phone, token


async def slots(
    client: httpx.AsyncClient, bid: int, sid: int, start: str, end: str
) -> list[dict[str, Any]]:
    resp = await client.get(
        "/v1/availability",
        params={"branch_id": bid, "service_id": sid, "from": start, "to": end},
    )
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["items"]
    return items


def starts(items: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(i["start"], i["local_start"]) for i in items]


async def book(
    client: httpx.AsyncClient, token: str, bid: int, sid: int, start: str
) -> httpx.Response:
    body = {"branch_id": bid, "service_id": sid, "start": start}
    return await client.post("/v1/bookings", json=body, headers=bearer(token))


def refused(resp: httpx.Response, code: str) -> None:
    assert resp.status_code == 409, resp.text
    assert resp.json()["code"] == code


# --- spring forward --------------------------------------------------------------


async def test_spring_forward_skips_the_missing_hour_and_slots_stay_contiguous_instants(
    client: httpx.AsyncClient, admin: str
) -> None:
    bid, sid = await bookable(client, admin, timezone=LONDON, weekdays=(7,), closes="04:00")
    items = await slots(client, bid, sid, utc(SPRING, "22:00", -1), utc(SPRING, "06:00"))
    # 00:00-04:00 on the clock is three real hours: six 30-minute slots, back to back
    assert starts(items) == [
        (utc(SPRING, "00:00"), local(SPRING, "00:00", "+00:00")),
        (utc(SPRING, "00:30"), local(SPRING, "00:30", "+00:00")),
        (utc(SPRING, "01:00"), local(SPRING, "02:00", "+01:00")),
        (utc(SPRING, "01:30"), local(SPRING, "02:30", "+01:00")),
        (utc(SPRING, "02:00"), local(SPRING, "03:00", "+01:00")),
        (utc(SPRING, "02:30"), local(SPRING, "03:30", "+01:00")),
    ]
    assert not [i for i in items if i["local_start"][11:13] == "01"]
    assert [i["end"] for i in items] == [
        utc(SPRING, c) for c in ("00:30", "01:00", "01:30", "02:00", "02:30", "03:00")
    ]
    assert {(i["timezone"], i["remaining"]) for i in items} == {(LONDON, 1)}
    # the last GMT slot (00:30) and the first BST one (02:00) are 30 real minutes
    # apart, although the wall clock moves on by 90 minutes between them
    assert instant(items[2]["start"]) - instant(items[1]["start"]) == timedelta(minutes=30)
    assert instant(items[2]["local_start"]) - instant(items[1]["local_start"]) == timedelta(
        minutes=30
    )


async def test_spring_forward_a_booking_is_the_instant_sent_whatever_the_offset(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin: str
) -> None:
    bid, sid = await bookable(client, admin, timezone=LONDON, weekdays=(7,), closes="04:00")
    _, token = await customer(pool, module_env)

    # "01:30+00:00" names no wall time of the day, but it is an instant: 01:30 UTC,
    # which the branch clock shows as 02:30 BST; that slot is booked, nothing shifted
    resp = await book(client, token, bid, sid, f"{SPRING}T01:30:00+00:00")
    assert resp.status_code == 201, resp.text
    booking = resp.json()
    assert (booking["start"], booking["end"]) == (utc(SPRING, "01:30"), utc(SPRING, "02:00"))
    assert booking["local_start"] == local(SPRING, "02:30", "+01:00")
    assert booking["timezone"] == LONDON

    # "01:30+01:00" (a skipped wall time with the summer offset) is 00:30 UTC = 00:30 GMT
    resp = await book(client, token, bid, sid, f"{SPRING}T01:30:00+01:00")
    assert resp.status_code == 201, resp.text
    assert resp.json()["start"] == utc(SPRING, "00:30")
    assert resp.json()["local_start"] == local(SPRING, "00:30", "+00:00")

    # one instant under two spellings is one slot: the room (capacity 1) is then full
    resp = await book(client, token, bid, sid, f"{SPRING}T02:00:00+01:00")
    assert resp.status_code == 201, resp.text
    assert resp.json()["start"] == utc(SPRING, "01:00")
    refused(await book(client, token, bid, sid, utc(SPRING, "01:00")), "slot_full")
    refused(await book(client, token, bid, sid, f"{SPRING}T01:00:00+00:00"), "slot_full")

    # instants that are no slot: off the grid, at closing (04:00 BST = 03:00 UTC),
    # before opening (23:30 GMT on Saturday)
    for start in (
        f"{SPRING}T01:15:00+00:00",
        f"{SPRING}T02:15:00+01:00",
        f"{SPRING}T04:00:00+01:00",
        utc(SPRING, "03:00"),
        utc(SPRING, "23:30", -1),
    ):
        refused(await book(client, token, bid, sid, start), "slot_unavailable")
    # a time without an offset is no instant at all
    resp = await book(client, token, bid, sid, f"{SPRING}T01:30:00")
    assert resp.status_code == 422, resp.text

    left = await slots(client, bid, sid, utc(SPRING, "00:00"), utc(SPRING, "03:00"))
    assert starts(left) == [
        (utc(SPRING, "00:00"), local(SPRING, "00:00", "+00:00")),
        (utc(SPRING, "02:00"), local(SPRING, "03:00", "+01:00")),
        (utc(SPRING, "02:30"), local(SPRING, "03:30", "+01:00")),
    ]


async def test_spring_forward_hours_that_begin_in_the_gap_begin_when_clocks_resume(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin: str
) -> None:
    _, token = await customer(pool, module_env)
    window = (utc(SPRING, "20:00", -1), utc(SPRING, "06:00"))
    # opening at 01:30, a time the clock never shows that day: open from 02:00 BST
    bid, sid = await bookable(
        client, admin, timezone=LONDON, weekdays=(7,), opens="01:30", closes="04:00"
    )
    assert starts(await slots(client, bid, sid, *window)) == [
        (utc(SPRING, "01:00"), local(SPRING, "02:00", "+01:00")),
        (utc(SPRING, "01:30"), local(SPRING, "02:30", "+01:00")),
        (utc(SPRING, "02:00"), local(SPRING, "03:00", "+01:00")),
        (utc(SPRING, "02:30"), local(SPRING, "03:30", "+01:00")),
    ]
    # 00:30 GMT is "01:30" with the winter offset, but the branch is not open yet
    refused(await book(client, token, bid, sid, f"{SPRING}T01:30:00+01:00"), "slot_unavailable")
    resp = await book(client, token, bid, sid, f"{SPRING}T02:00:00+01:00")
    assert resp.status_code == 201, resp.text
    assert resp.json()["start"] == utc(SPRING, "01:00")

    # hours 01:00-02:00 lie wholly in the gap: no real time at all
    bid, sid = await bookable(
        client, admin, timezone=LONDON, weekdays=(7,), opens="01:00", closes="02:00"
    )
    assert await slots(client, bid, sid, *window) == []
    for start in (utc(SPRING, "00:30"), utc(SPRING, "01:00"), f"{SPRING}T01:30:00+00:00"):
        refused(await book(client, token, bid, sid, start), "slot_unavailable")


# --- fall back -------------------------------------------------------------------


async def test_fall_back_offers_the_repeated_hour_twice_as_distinct_instants(
    client: httpx.AsyncClient, admin: str
) -> None:
    bid, sid = await bookable(client, admin, timezone=LONDON, weekdays=(7,), closes="04:00")
    items = await slots(client, bid, sid, utc(FALL, "20:00", -1), utc(FALL, "06:00"))
    # 00:00-04:00 on the clock is five real hours: ten slots, back to back
    assert starts(items) == [
        (utc(FALL, "23:00", -1), local(FALL, "00:00", "+01:00")),
        (utc(FALL, "23:30", -1), local(FALL, "00:30", "+01:00")),
        (utc(FALL, "00:00"), local(FALL, "01:00", "+01:00")),
        (utc(FALL, "00:30"), local(FALL, "01:30", "+01:00")),
        (utc(FALL, "01:00"), local(FALL, "01:00", "+00:00")),
        (utc(FALL, "01:30"), local(FALL, "01:30", "+00:00")),
        (utc(FALL, "02:00"), local(FALL, "02:00", "+00:00")),
        (utc(FALL, "02:30"), local(FALL, "02:30", "+00:00")),
        (utc(FALL, "03:00"), local(FALL, "03:00", "+00:00")),
        (utc(FALL, "03:30"), local(FALL, "03:30", "+00:00")),
    ]
    assert {i["remaining"] for i in items} == {1}
    twice = [i for i in items if i["local_start"][11:16] == "01:30"]
    assert instant(twice[1]["start"]) - instant(twice[0]["start"]) == timedelta(hours=1)


async def test_fall_back_each_one_thirty_is_booked_once_and_independently(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin: str
) -> None:
    bid, sid = await bookable(client, admin, timezone=LONDON, weekdays=(7,), closes="04:00")
    _, first = await customer(pool, module_env)
    _, second = await customer(pool, module_env)
    bst, gmt = f"{FALL}T01:30:00+01:00", f"{FALL}T01:30:00+00:00"

    async def remaining() -> dict[str, int]:
        items = await slots(client, bid, sid, utc(FALL, "00:30"), utc(FALL, "02:00"))
        return {i["local_start"]: i["remaining"] for i in items if "T01:30" in i["local_start"]}

    resp = await book(client, first, bid, sid, bst)
    assert resp.status_code == 201, resp.text
    assert (resp.json()["start"], resp.json()["local_start"]) == (utc(FALL, "00:30"), bst)
    # the BST 01:30 is gone, the GMT one is untouched
    assert await remaining() == {gmt: 1}
    refused(await book(client, second, bid, sid, bst), "slot_full")
    refused(await book(client, second, bid, sid, utc(FALL, "00:30")), "slot_full")

    resp = await book(client, second, bid, sid, gmt)
    assert resp.status_code == 201, resp.text
    assert (resp.json()["start"], resp.json()["local_start"]) == (utc(FALL, "01:30"), gmt)
    assert await remaining() == {}
    refused(await book(client, first, bid, sid, gmt), "slot_full")
    refused(await book(client, first, bid, sid, bst), "slot_full")

    rows = await pool.fetch(
        "SELECT starts_at FROM bookings WHERE service_id = $1 ORDER BY starts_at", sid
    )
    assert [r["starts_at"] for r in rows] == [instant(bst), instant(gmt)]


# --- whole days --------------------------------------------------------------------


async def test_a_london_day_has_as_many_slots_as_real_hours(
    client: httpx.AsyncClient, admin: str
) -> None:
    """Open around the clock: a local day is 23, 24 or 25 real hours of slots."""
    bid, sid = await bookable(client, admin, timezone=LONDON)
    cases = [
        # (local midnight to local midnight, hours, first local start, last local start)
        (
            f"{SPRING}T00:00:00+00:00",
            f"{day(SPRING, 1)}T00:00:00+01:00",
            23,
            local(SPRING, "00:00", "+00:00"),
            local(SPRING, "23:30", "+01:00"),
        ),
        (
            f"{day(SPRING, -1)}T00:00:00+00:00",
            f"{SPRING}T00:00:00+00:00",
            24,
            local(SPRING, "00:00", "+00:00", -1),
            local(SPRING, "23:30", "+00:00", -1),
        ),
        (
            f"{FALL}T00:00:00+01:00",
            f"{day(FALL, 1)}T00:00:00+00:00",
            25,
            local(FALL, "00:00", "+01:00"),
            local(FALL, "23:30", "+00:00"),
        ),
        (
            f"{day(FALL, 1)}T00:00:00+00:00",
            f"{day(FALL, 2)}T00:00:00+00:00",
            24,
            local(FALL, "00:00", "+00:00", 1),
            local(FALL, "23:30", "+00:00", 1),
        ),
    ]
    for lo, hi, hours, first, last in cases:
        items = await slots(client, bid, sid, lo, hi)
        assert len(items) == 2 * hours, (lo, hours)
        assert (items[0]["local_start"], items[-1]["local_start"]) == (first, last)
        begun = [instant(i["start"]) for i in items]
        assert begun[0] == instant(lo)
        assert all(b - a == timedelta(minutes=30) for a, b in itertools.pairwise(begun))
        # every local_start is the same instant as start, shown on the London clock
        assert [instant(i["local_start"]) for i in items] == begun
        tz = ZoneInfo(LONDON)
        assert [i["local_start"] for i in items] == [b.astimezone(tz).isoformat() for b in begun]


async def test_shanghai_has_no_anomaly_around_the_london_switch_days(
    client: httpx.AsyncClient, admin: str
) -> None:
    bid, sid = await bookable(client, admin, timezone=SHANGHAI, opens="09:00", closes="17:00")
    for switch in (SPRING, FALL):
        lo, hi = f"{day(switch, -1)}T00:00:00+08:00", f"{day(switch, 2)}T00:00:00+08:00"
        items = await slots(client, bid, sid, lo, hi)
        expected = [
            (utc(switch, f"{h:02d}:{m:02d}", d), local(switch, f"{h + 8:02d}:{m:02d}", "+08:00", d))
            for d in (-1, 0, 1)
            for h in range(1, 9)
            for m in (0, 30)
        ]
        assert starts(items) == expected
        assert {(i["timezone"], i["remaining"]) for i in items} == {(SHANGHAI, 1)}
        assert [i["end"] for i in items] == [
            (instant(s) + timedelta(minutes=30)).isoformat().replace("+00:00", "Z")
            for s, _ in expected
        ]


# --- reminders ---------------------------------------------------------------------


async def outbox(pool: asyncpg.Pool, booking_id: int) -> dict[str, asyncpg.Record]:
    rows = await pool.fetch(
        "SELECT dedupe_key, send_at, phone, body, status FROM messages WHERE dedupe_key LIKE $1",
        f"booking:{booking_id}:%",
    )
    return {r["dedupe_key"]: r for r in rows}


async def test_reminders_are_24_and_2_real_hours_before_across_dst_changes(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin: str
) -> None:
    bid, sid = await bookable(client, admin, timezone=LONDON, capacity=5)
    phone, token = await customer(pool, module_env)
    tz = ZoneInfo(LONDON)
    cases = [
        # (start, wall time in the SMS, 24 h reminder, 2 h reminder) as instants
        # 10:00 BST on the spring Sunday: 24 h before is 09:00 GMT on Saturday
        (
            f"{SPRING}T10:00:00+01:00",
            f"{SPRING} 10:00",
            local(SPRING, "09:00", "+00:00", -1),
            local(SPRING, "08:00", "+01:00"),
        ),
        # 03:00 BST on the spring Sunday: 2 h before is 00:00 GMT, three hours on the clock
        (
            f"{SPRING}T03:00:00+01:00",
            f"{SPRING} 03:00",
            local(SPRING, "02:00", "+00:00", -1),
            local(SPRING, "00:00", "+00:00"),
        ),
        # 10:00 BST on the Monday after: the change lies more than 24 h back, no shift
        (
            f"{day(SPRING, 1)}T10:00:00+01:00",
            f"{day(SPRING, 1)} 10:00",
            local(SPRING, "10:00", "+01:00"),
            local(SPRING, "08:00", "+01:00", 1),
        ),
        # 10:00 GMT on the autumn Sunday: 24 h before is 11:00 BST on Saturday
        (
            f"{FALL}T10:00:00+00:00",
            f"{FALL} 10:00",
            local(FALL, "11:00", "+01:00", -1),
            local(FALL, "08:00", "+00:00"),
        ),
        # 02:30 GMT on the autumn Sunday: 2 h before is the first 01:30 (BST)
        (
            f"{FALL}T02:30:00+00:00",
            f"{FALL} 02:30",
            local(FALL, "03:30", "+01:00", -1),
            local(FALL, "01:30", "+01:00"),
        ),
        # the second 01:30 (GMT): 2 h before is 00:30 BST, 24 h before 02:30 BST
        (
            f"{FALL}T01:30:00+00:00",
            f"{FALL} 01:30",
            local(FALL, "02:30", "+01:00", -1),
            local(FALL, "00:30", "+01:00"),
        ),
    ]
    for start, wall, day_before, two_hours in cases:
        resp = await book(client, token, bid, sid, start)
        assert resp.status_code == 201, resp.text
        booking = resp.json()
        begins = instant(start)
        assert instant(booking["start"]) == begins
        unix = int(begins.timestamp())
        key = f"booking:{booking['id']}"
        sent = await outbox(pool, booking["id"])
        assert set(sent) == {
            f"{key}:confirmation",
            f"{key}:reminder_24h:{unix}",
            f"{key}:reminder_2h:{unix}",
        }
        r24, r2 = sent[f"{key}:reminder_24h:{unix}"], sent[f"{key}:reminder_2h:{unix}"]
        # exact instants: real hours before the start
        assert r24["send_at"] == begins - timedelta(hours=24) == instant(day_before)
        assert r2["send_at"] == begins - timedelta(hours=2) == instant(two_hours)
        # and on the London clock, with the offset in force then
        assert r24["send_at"].astimezone(tz).isoformat() == day_before
        assert r2["send_at"].astimezone(tz).isoformat() == two_hours
        for row in (r24, r2):
            assert (row["phone"], row["status"]) == (phone, "pending")
            assert wall in row["body"]  # the SMS shows the booking's London wall time

    # the same wall time as the start, the day before, is not 24 h before on a switch day
    spring_24h = instant(cases[0][2]).astimezone(tz)
    assert (spring_24h.hour, instant(cases[0][0]).astimezone(tz).hour) == (9, 10)
    fall_24h = instant(cases[3][2]).astimezone(tz)
    assert (fall_24h.hour, instant(cases[3][0]).astimezone(tz).hour) == (11, 10)


async def test_reminders_already_past_are_not_queued(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin: str
) -> None:
    bid, sid = await bookable(client, admin, timezone=LONDON, capacity=5)
    _, token = await customer(pool, module_env)
    hour = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)

    soon = hour + timedelta(hours=4)  # 3-4 h ahead: only the 2 h reminder is ahead
    resp = await book(client, token, bid, sid, soon.isoformat())
    assert resp.status_code == 201, resp.text
    booking = resp.json()
    unix = int(soon.timestamp())
    sent = await outbox(pool, booking["id"])
    assert set(sent) == {
        f"booking:{booking['id']}:confirmation",
        f"booking:{booking['id']}:reminder_2h:{unix}",
    }
    assert sent[f"booking:{booking['id']}:reminder_2h:{unix}"]["send_at"] == soon - timedelta(
        hours=2
    )

    very_soon = hour + timedelta(hours=2)  # 1-2 h ahead: no reminder at all
    resp = await book(client, token, bid, sid, very_soon.isoformat())
    assert resp.status_code == 201, resp.text
    booking = resp.json()
    assert set(await outbox(pool, booking["id"])) == {f"booking:{booking['id']}:confirmation"}
