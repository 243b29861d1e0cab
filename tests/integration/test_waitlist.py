"""The waitlist against real PostgreSQL: freed seats go to the oldest matching entry as
a hold with an SMS offer; claims, declines, lapses and leaving pass the seat on."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx

from selfserve.scheduling import ledger, waitlist
from selfserve.scheduling import service as svc
from selfserve.scheduling.policy import DEFAULT_POLICY
from selfserve.scheduling.slots import Outbox
from tests.booking_helpers import (
    at_hour,
    book,
    customer,
    invariant_holds,
    iso,
    kiosk,
    remaining,
    seed,
    sms,
)
from tests.conftest import ModuleEnv
from tests.helpers import bearer

SHANGHAI = ZoneInfo("Asia/Shanghai")


def window(start: datetime, after_min: int = 0) -> dict[str, str]:
    """The branch-local date and wall times of a window starting at `start`."""
    local = start.astimezone(SHANGHAI)
    latest = local + timedelta(minutes=after_min)
    return {
        "date": local.date().isoformat(),
        "earliest": local.strftime("%H:%M"),
        "latest": latest.strftime("%H:%M"),
    }


def shanghai(days: int, hour: int) -> datetime:
    """`hour`:00 Shanghai wall time, `days` from today there, as a UTC instant."""
    day = datetime.now(SHANGHAI).date() + timedelta(days=days)
    return datetime(day.year, day.month, day.day, hour, tzinfo=SHANGHAI).astimezone(UTC)


async def join(
    client: httpx.AsyncClient,
    token: str,
    bid: int,
    sid: int,
    start: datetime,
    after_min: int = 0,
    **extra: Any,
) -> httpx.Response:
    body = {"branch_id": bid, "service_id": sid, **window(start, after_min), **extra}
    return await client.post("/v1/waitlist", json=body, headers=bearer(token))


async def entry(client: httpx.AsyncClient, token: str, entry_id: int) -> dict[str, Any]:
    resp = await client.get(f"/v1/waitlist/{entry_id}", headers=bearer(token))
    assert resp.status_code == 200, resp.text
    found: dict[str, Any] = resp.json()
    return found


async def cancel(client: httpx.AsyncClient, token: str, booking_id: int) -> None:
    resp = await client.post(f"/v1/bookings/{booking_id}/cancel", headers=bearer(token))
    assert resp.status_code == 200, resp.text


async def expire_at(pool: asyncpg.Pool, now: datetime) -> Outbox:
    """The expiry pass the worker runs, at a chosen instant."""
    outbox: Outbox = []
    async with pool.acquire() as conn, conn.transaction():
        await svc.expire_and_offer(conn, DEFAULT_POLICY, now, outbox)
    return outbox


async def offers_texted(pool: asyncpg.Pool, entry_id: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT phone, template, body, status FROM messages WHERE dedupe_key LIKE $1",
        f"waitlist:{entry_id}:offer:%",
    )


async def test_a_freed_seat_goes_to_the_oldest_entry_as_a_hold_with_an_sms_offer(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    start = at_hour(2)
    _, _, holder = await customer(pool, module_env)
    booking = (await book(client, holder, bid, sid, start)).json()
    _, phone1, first = await customer(pool, module_env)
    _, _, second = await customer(pool, module_env)
    _, _, outsider = await customer(pool, module_env)
    e1 = (await join(client, first, bid, sid, start)).json()
    e2 = (await join(client, second, bid, sid, start)).json()
    assert (e1["status"], e1["offer"]) == ("waiting", None)
    assert e2["status"] == "waiting"
    assert await offers_texted(pool, e1["id"]) == []

    before = datetime.now(UTC)
    await cancel(client, holder, booking["id"])
    after = datetime.now(UTC)

    got = await entry(client, first, e1["id"])
    assert got["status"] == "offered"
    offer = got["offer"]
    assert offer["start"] == iso(start)
    claim = DEFAULT_POLICY.waitlist_claim
    assert before + claim <= datetime.fromisoformat(offer["expires_at"]) <= after + claim
    assert (await entry(client, second, e2["id"]))["status"] == "waiting"
    # the seat is held for the offer: nobody else can take it meanwhile
    assert await remaining(client, bid, sid, start) == 0
    resp = await book(client, outsider, bid, sid, start)
    assert resp.status_code == 409
    assert resp.json()["code"] == "slot_full"
    texted = await offers_texted(pool, e1["id"])
    assert [(r["phone"], r["template"], r["status"]) for r in texted] == [
        (phone1, "waitlist_offer", "pending")
    ]
    assert "15 min" in texted[0]["body"]
    # the offer is not texted once it has lapsed
    deadline = await pool.fetchval(
        "SELECT expires_at FROM messages WHERE dedupe_key LIKE $1", f"waitlist:{e1['id']}:offer:%"
    )
    assert deadline == datetime.fromisoformat(offer["expires_at"])

    # claiming books the held seat
    resp = await client.post(
        "/v1/bookings", json={"hold_id": offer["hold_id"]}, headers=bearer(first)
    )
    assert resp.status_code == 201, resp.text
    claimed = await entry(client, first, e1["id"])
    assert (claimed["status"], claimed["booking_id"], claimed["offer"]) == (
        "booked",
        resp.json()["id"],
        None,
    )
    assert (await entry(client, second, e2["id"]))["status"] == "waiting"
    await invariant_holds(pool)


async def test_an_unclaimed_offer_lapses_and_passes_to_the_next_entry(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    start = at_hour(3)
    _, _, holder = await customer(pool, module_env)
    booking = (await book(client, holder, bid, sid, start)).json()
    _, _, first = await customer(pool, module_env)
    _, _, second = await customer(pool, module_env)
    e1 = (await join(client, first, bid, sid, start)).json()
    e2 = (await join(client, second, bid, sid, start)).json()
    await cancel(client, holder, booking["id"])
    offer = (await entry(client, first, e1["id"]))["offer"]

    # a moment before the deadline nothing moves; just after it, the offer lapses
    deadline = datetime.fromisoformat(offer["expires_at"])
    assert await expire_at(pool, deadline - timedelta(seconds=1)) == []
    outbox = await expire_at(pool, deadline + timedelta(seconds=1))
    assert len(outbox) == 1  # the second entry's offer
    assert (await entry(client, first, e1["id"]))["status"] == "lapsed"
    passed = await entry(client, second, e2["id"])
    assert passed["status"] == "offered"
    assert passed["offer"]["start"] == iso(start)
    # the lapsed offer's hold cannot be booked any more
    resp = await client.post(
        "/v1/bookings", json={"hold_id": offer["hold_id"]}, headers=bearer(first)
    )
    assert resp.status_code == 409
    assert resp.json()["code"] == "hold_expired"
    await invariant_holds(pool)


async def test_sms_y_claims_the_offer_and_n_passes_it_on(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    start = at_hour(4)
    _, _, holder = await customer(pool, module_env)
    booking = (await book(client, holder, bid, sid, start)).json()
    _, phone1, first = await customer(pool, module_env)
    c2, phone2, second = await customer(pool, module_env)
    _, _, third = await customer(pool, module_env)
    e1 = (await join(client, first, bid, sid, start)).json()
    e2 = (await join(client, second, bid, sid, start)).json()
    e3 = (await join(client, third, bid, sid, start)).json()
    await cancel(client, holder, booking["id"])
    assert (await entry(client, first, e1["id"]))["status"] == "offered"

    # "Y" from a phone without an offer or a booking claims nothing
    await sms(pool, phone2, "Y", module_env.settings)
    assert (await entry(client, first, e1["id"]))["status"] == "offered"
    assert (await entry(client, second, e2["id"]))["status"] == "waiting"

    # "N" from the offered phone declines: the seat goes to the next entry
    reply = await sms(pool, phone1, "N", module_env.settings)
    assert "next person" in reply
    assert (await entry(client, first, e1["id"]))["status"] == "declined"
    assert (await entry(client, second, e2["id"]))["status"] == "offered"

    # "Y" from that entry's phone books it; the reply is the confirmation
    reply = await sms(pool, phone2, "Y", module_env.settings)
    booked = await entry(client, second, e2["id"])
    assert booked["status"] == "booked"
    row = await pool.fetchrow(
        "SELECT code, status, customer_id, phone, starts_at FROM bookings WHERE id = $1",
        booked["booking_id"],
    )
    assert (row["status"], row["customer_id"], row["phone"], row["starts_at"]) == (
        "confirmed",
        c2,
        phone2,
        start,
    )
    assert row["code"] in reply
    # the reply was the confirmation: no second one is texted; the reminders are queued
    keys = {
        r["dedupe_key"].split(":")[2]
        for r in await pool.fetch(
            "SELECT dedupe_key FROM messages WHERE dedupe_key LIKE $1",
            f"booking:{booked['booking_id']}:%",
        )
    }
    assert keys == {"reminder_24h", "reminder_2h"}
    assert (await entry(client, third, e3["id"]))["status"] == "waiting"
    await invariant_holds(pool)


async def test_leaving_with_an_open_offer_passes_the_seat_on(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    start = at_hour(5)
    _, _, holder = await customer(pool, module_env)
    booking = (await book(client, holder, bid, sid, start)).json()
    _, _, first = await customer(pool, module_env)
    _, _, second = await customer(pool, module_env)
    e1 = (await join(client, first, bid, sid, start)).json()
    e2 = (await join(client, second, bid, sid, start)).json()
    await cancel(client, holder, booking["id"])

    # someone else's entry answers like a missing one
    resp = await client.post(f"/v1/waitlist/{e1['id']}/cancel", headers=bearer(second))
    assert resp.status_code == 404
    resp = await client.post(f"/v1/waitlist/{e1['id']}/cancel", headers=bearer(first))
    assert resp.status_code == 200, resp.text
    assert resp.json()["status"] == "cancelled"
    assert (await entry(client, second, e2["id"]))["status"] == "offered"
    resp = await client.post(f"/v1/waitlist/{e1['id']}/cancel", headers=bearer(first))
    assert resp.status_code == 409
    assert resp.json()["code"] == "waitlist_entry_closed"
    listed = (await client.get("/v1/waitlist", headers=bearer(first))).json()
    assert [(i["id"], i["status"]) for i in listed["items"]] == [(e1["id"], "cancelled")]
    await invariant_holds(pool)


async def test_joining_when_a_seat_is_free_offers_at_once_and_bad_entries_are_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    start = shanghai(6, 10)  # 10:00-12:00 local: the window stays inside the day
    _, _, token = await customer(pool, module_env)
    # a 2-hour window whose first slot is taken: offered the next free one
    _, _, holder = await customer(pool, module_env)
    assert (await book(client, holder, bid, sid, start)).status_code == 201
    resp = await join(client, token, bid, sid, start, after_min=120)
    assert resp.status_code == 201, resp.text
    assert resp.json()["status"] == "offered"
    assert resp.json()["offer"]["start"] == iso(start + timedelta(minutes=30))

    resp = await join(client, token, bid, sid, start, after_min=60)
    assert resp.status_code == 409
    assert resp.json()["code"] == "already_waitlisted"
    bad_window = {**window(start + timedelta(hours=1)), "latest": window(start)["earliest"]}
    resp = await client.post(
        "/v1/waitlist",
        json={"branch_id": bid, "service_id": sid, **bad_window},
        headers=bearer(token),
    )
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "latest"
    resp = await join(client, token, bid, sid, datetime.now(UTC) - timedelta(days=2))
    assert resp.status_code == 422
    resp = await join(client, token, bid, sid, datetime.now(UTC) + timedelta(days=400))
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "date"
    resp = await join(client, token, bid, sid, start, earliest="25:00")
    assert resp.status_code == 422
    resp = await join(client, await kiosk(pool, module_env, bid), bid, sid, start)
    assert resp.status_code == 403
    assert (
        await pool.fetchval("SELECT count(*) FROM waitlist_entries WHERE branch_id = $1", bid) == 1
    )


async def test_a_reschedule_and_an_expired_hold_free_seats_for_the_waitlist(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    old, new, held = at_hour(7), at_hour(7, 2), at_hour(7, 4)
    _, _, mover = await customer(pool, module_env)
    booking = (await book(client, mover, bid, sid, old)).json()
    _, _, waiter = await customer(pool, module_env)
    e1 = (await join(client, waiter, bid, sid, old)).json()
    resp = await client.post(
        f"/v1/bookings/{booking['id']}/reschedule",
        json={"start": iso(new)},
        headers=bearer(mover),
    )
    assert resp.status_code == 200, resp.text
    assert (await entry(client, waiter, e1["id"]))["offer"]["start"] == iso(old)

    _, _, browser = await customer(pool, module_env)
    hold = await client.post(
        "/v1/holds",
        json={"branch_id": bid, "service_id": sid, "start": iso(held)},
        headers=bearer(browser),
    )
    assert hold.status_code == 201
    _, _, later = await customer(pool, module_env)
    e2 = (await join(client, later, bid, sid, held)).json()
    assert e2["status"] == "waiting"
    await expire_at(pool, datetime.fromisoformat(hold.json()["expires_at"]) + timedelta(seconds=1))
    assert (await entry(client, later, e2["id"]))["offer"]["start"] == iso(held)
    await invariant_holds(pool)


async def test_windows_that_passed_close_and_the_sweep_offers_what_is_free(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, rids = await seed(pool, capacity=1)
    start = at_hour(8)
    _, _, holder = await customer(pool, module_env)
    assert (await book(client, holder, bid, sid, start)).status_code == 201
    _, _, waiter = await customer(pool, module_env)
    e1 = (await join(client, waiter, bid, sid, start)).json()
    # capacity grows by a path that does not call the waitlist: the sweep finds it
    resp = await client.get(f"/v1/waitlist/{e1['id']}", headers=bearer(waiter))
    assert resp.json()["status"] == "waiting"
    async with pool.acquire() as conn, conn.transaction():
        await ledger.resize_capacity(conn, rids[0], 2, datetime.now(UTC))
    ctx = {"pool": pool, "settings": module_env.settings}
    assert await svc.sweep_waitlist(ctx) >= 1
    assert (await entry(client, waiter, e1["id"]))["status"] == "offered"

    # entries for full slots: the one whose window passed closes, the later one waits
    bid2, sid2, _ = await seed(pool, capacity=1)
    for start in (at_hour(9), at_hour(12)):
        assert (await book(client, holder, bid2, sid2, start)).status_code == 201
    _, _, late = await customer(pool, module_env)
    e2 = (await join(client, late, bid2, sid2, at_hour(9))).json()
    e3 = (await join(client, late, bid2, sid2, at_hour(12))).json()
    async with pool.acquire() as conn, conn.transaction():
        assert await waitlist.expire_windows(conn, at_hour(9) + timedelta(minutes=1)) >= 1
    assert (await entry(client, late, e2["id"]))["status"] == "expired"
    assert (await entry(client, late, e3["id"]))["status"] == "waiting"
    await invariant_holds(pool)


async def test_seats_freed_at_once_go_to_distinct_entries(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=3)
    start = at_hour(10)
    holders = [await customer(pool, module_env) for _ in range(3)]
    bookings = [(await book(client, t, bid, sid, start)).json() for _, _, t in holders]
    waiters = [await customer(pool, module_env) for _ in range(6)]
    entries = [(await join(client, t, bid, sid, start)).json() for _, _, t in waiters]
    assert {e["status"] for e in entries} == {"waiting"}

    await asyncio.gather(
        *(cancel(client, t, b["id"]) for (_, _, t), b in zip(holders, bookings, strict=True))
    )
    states = [
        (await entry(client, t, e["id"]))["status"]
        for (_, _, t), e in zip(waiters, entries, strict=True)
    ]
    assert states.count("offered") == 3
    assert states.count("waiting") == 3
    holds = await pool.fetch(
        "SELECT hold_id FROM waitlist_entries WHERE branch_id = $1 AND status = 'offered'", bid
    )
    assert len({r["hold_id"] for r in holds}) == 3
    # an entry skipped while another transaction looked at it is served by the sweep;
    # with every seat offered, the sweep has nothing more to give
    await svc.sweep_waitlist({"pool": pool, "settings": module_env.settings})
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM waitlist_entries WHERE branch_id = $1 AND status = 'offered'", bid
        )
        == 3
    )
    assert await remaining(client, bid, sid, start) == 0
    await invariant_holds(pool)
