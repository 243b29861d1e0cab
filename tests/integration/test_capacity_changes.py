"""Capacity changes go through the capacity ledger: a resource's new capacity reaches
its ledger units in the same transaction, a change that taken seats would not fit is
refused (409 `capacity_in_use`), and the invariant query compares with the resource's
real capacity. Through the real app on real PostgreSQL; races run many requests at
once over separate pool connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from selfserve import db
from selfserve.scheduling import ledger
from tests.booking_helpers import (
    at_hour,
    book,
    customer,
    invariant_holds,
    iso,
    remaining,
    seed,
)
from tests.conftest import ModuleEnv
from tests.helpers import bearer, login, make_staff

HOUR = timedelta(hours=1)


@pytest.fixture(scope="module")
async def pool(module_env: ModuleEnv) -> AsyncIterator[asyncpg.Pool]:
    """Room for a few dozen requests at once."""
    p = await db.create_pool(module_env.database_url, min_size=1, max_size=40)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture(scope="module")
async def admin_token(client: httpx.AsyncClient, pool: asyncpg.Pool) -> str:
    return await login(client, await make_staff(pool, "admin"))


async def patch_capacity(
    client: httpx.AsyncClient, token: str, rid: int, capacity: int
) -> httpx.Response:
    return await client.patch(
        f"/v1/admin/resources/{rid}", json={"capacity": capacity}, headers=bearer(token)
    )


async def seats_by_unit(pool: asyncpg.Pool, rid: int) -> dict[Any, int]:
    """Seats of live commitments per unit, recomputed from the rows."""
    rows = await pool.fetch(
        """
        SELECT g.unit_start, sum(b.party_size)::int AS seats
        FROM bookings b,
        LATERAL generate_series(
            date_bin('5 minutes', lower(b.occupied), timestamptz 'epoch'),
            date_bin('5 minutes', upper(b.occupied) - interval '1 microsecond',
                     timestamptz 'epoch'),
            interval '5 minutes') AS g(unit_start)
        WHERE b.resource_id = $1 AND b.status IN ('pending_payment', 'confirmed', 'completed')
        GROUP BY 1
        """,
        rid,
    )
    return {r["unit_start"]: r["seats"] for r in rows}


async def test_a_raised_capacity_is_bookable_at_once(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin_token: str
) -> None:
    bid, sid, [rid] = await seed(pool, capacity=1)
    start = at_hour(2)
    _, _, token = await customer(pool, module_env)
    assert (await book(client, token, bid, sid, start)).status_code == 201
    assert await remaining(client, bid, sid, start) == 0

    resp = await patch_capacity(client, admin_token, rid, 2)
    assert resp.status_code == 200, resp.text
    assert resp.json()["capacity"] == 2
    assert await remaining(client, bid, sid, start) == 1
    _, _, other = await customer(pool, module_env)
    second = await book(client, other, bid, sid, start)
    assert second.status_code == 201, second.text  # not `slot_full` from a stale ledger
    assert await remaining(client, bid, sid, start) == 0
    caps = await pool.fetch(
        "SELECT DISTINCT capacity FROM resource_capacity_units WHERE resource_id = $1", rid
    )
    assert [r["capacity"] for r in caps] == [2]
    await invariant_holds(pool)


async def test_lowering_below_taken_seats_is_refused_naming_the_bookings(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin_token: str
) -> None:
    bid, sid, [rid] = await seed(pool, capacity=3)
    start = at_hour(3)
    ids = []
    for _ in range(2):
        _, _, token = await customer(pool, module_env)
        resp = await book(client, token, bid, sid, start)
        assert resp.status_code == 201, resp.text
        ids.append(resp.json()["id"])

    refused = await patch_capacity(client, admin_token, rid, 1)
    assert refused.status_code == 409, refused.text
    assert refused.headers["content-type"].startswith("application/problem+json")
    problem = refused.json()
    assert problem["code"] == "capacity_in_use"
    assert problem["bookings"] == 2
    assert sorted(problem["booking_ids"]) == sorted(ids)
    assert problem["used"] == 2
    assert problem["capacity"] == 1
    assert await pool.fetchval("SELECT capacity FROM resources WHERE id = $1", rid) == 3

    lowered = await patch_capacity(client, admin_token, rid, 2)
    assert lowered.status_code == 200, lowered.text
    _, _, token = await customer(pool, module_env)
    full = await book(client, token, bid, sid, start)
    assert full.status_code == 409
    assert full.json()["code"] == "slot_full"
    await invariant_holds(pool)


async def test_the_invariant_compares_with_the_resources_real_capacity(
    pool: asyncpg.Pool,
) -> None:
    """A capacity written around the ledger (as a direct UPDATE would) is a violation."""
    _, sid, [rid] = await seed(pool, capacity=3)
    start = at_hour(4)
    async with pool.acquire() as conn, conn.transaction():
        for _ in range(2):
            await ledger.create_booking(
                conn,
                service_id=sid,
                resource_id=rid,
                starts_at=start,
                party_size=1,
                channel="app",
                now=start - timedelta(days=1),
            )
    await invariant_holds(pool)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE resources SET capacity = 1 WHERE id = $1", rid)
        found = await ledger.overbooked(conn)
        assert {(v.resource_id, v.seats, v.capacity, v.resource_capacity) for v in found} == {
            (rid, 2, 3, 1)
        }
        assert len(found) == 6  # the six 5-minute units of the 30-minute booking
        await conn.execute("UPDATE resources SET capacity = 3 WHERE id = $1", rid)
    await invariant_holds(pool)


async def test_a_capacity_cut_racing_bookings_never_leaves_more_than_capacity(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin_token: str
) -> None:
    tokens = [(await customer(pool, module_env))[2] for _ in range(24)]
    for round_ in range(6):
        bid, sid, [rid] = await seed(pool, capacity=3)
        start = at_hour(5, round_)
        tasks: list[asyncio.Task[httpx.Response]] = [
            asyncio.create_task(book(client, t, bid, sid, start)) for t in tokens[:12]
        ]
        tasks.insert(round_ * 2, asyncio.create_task(patch_capacity(client, admin_token, rid, 1)))
        tasks += [asyncio.create_task(book(client, t, bid, sid, start)) for t in tokens[12:]]
        results = await asyncio.gather(*tasks)
        cut = results[round_ * 2]
        bookings = [r for i, r in enumerate(results) if i != round_ * 2]
        assert cut.status_code in (200, 409), cut.text
        assert all(r.status_code in (201, 409) for r in bookings), [r.text for r in bookings]
        made = sum(r.status_code == 201 for r in bookings)
        capacity = await pool.fetchval("SELECT capacity FROM resources WHERE id = $1", rid)
        assert capacity == (1 if cut.status_code == 200 else 3)
        assert 1 <= made <= capacity
        seats = await seats_by_unit(pool, rid)
        assert len(seats) == 6  # the 30-minute slot's units
        assert all(n <= capacity for n in seats.values()), seats
        assert await remaining(client, bid, sid, start) == capacity - made
    await invariant_holds(pool)


async def test_a_resource_with_bookings_ahead_cannot_be_deactivated(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin_token: str
) -> None:
    bid, sid, [rid] = await seed(pool, capacity=2)
    start = at_hour(6)
    _, _, token = await customer(pool, module_env)
    made = await book(client, token, bid, sid, start)
    assert made.status_code == 201, made.text

    refused = await client.post(
        f"/v1/admin/resources/{rid}/deactivate", headers=bearer(admin_token)
    )
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "capacity_in_use"
    assert refused.json()["booking_ids"] == [made.json()["id"]]
    assert await pool.fetchval("SELECT active FROM resources WHERE id = $1", rid)

    cancelled = await client.post(f"/v1/bookings/{made.json()['id']}/cancel", headers=bearer(token))
    assert cancelled.status_code == 200, cancelled.text
    done = await client.post(f"/v1/admin/resources/{rid}/deactivate", headers=bearer(admin_token))
    assert done.status_code == 200, done.text
    assert done.json()["active"] is False
    await invariant_holds(pool)


async def time_off(
    client: httpx.AsyncClient, token: str, rid: int, lo: datetime, hi: datetime
) -> httpx.Response:
    body = {
        "kind": "exception",
        "resource_id": rid,
        "starts_at": iso(lo),
        "ends_at": iso(hi),
        "available": False,
    }
    return await client.post("/v1/admin/schedules", json=body, headers=bearer(token))


async def off_shift(pool: asyncpg.Pool, rid: int) -> set[tuple[str, int]]:
    """Live commitments of the resource that are not on shift any more."""
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        live = {(r["kind"], r["id"]) for r in await conn.fetch(ledger.LIVE_AHEAD, rid, now)}
        return live - await ledger.commitments_on_shift(conn, rid, now)


async def test_schedule_changes_that_leave_a_booking_off_shift_are_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin_token: str
) -> None:
    _, sid, [rid] = await seed(pool, capacity=2)
    bid = await pool.fetchval("SELECT branch_id FROM resources WHERE id = $1", rid)
    start = at_hour(2, 5)
    _, _, token = await customer(pool, module_env)
    made = await book(client, token, bid, sid, start)
    assert made.status_code == 201, made.text
    booking_id = made.json()["id"]

    refused = await time_off(client, admin_token, rid, start + timedelta(minutes=10), start + HOUR)
    assert refused.status_code == 409, refused.text
    assert refused.json()["code"] == "capacity_in_use"
    assert refused.json()["booking_ids"] == [booking_id]
    elsewhere = await time_off(client, admin_token, rid, start + HOUR, start + 2 * HOUR)
    assert elsewhere.status_code == 201, elsewhere.text

    weekday = start.astimezone(ZoneInfo("Asia/Shanghai")).isoweekday()
    shift_id = await pool.fetchval(
        "SELECT id FROM schedules WHERE resource_id = $1 AND kind = 'shift' AND weekday = $2",
        rid,
        weekday,
    )
    other_day = await pool.fetchval(
        "SELECT id FROM schedules WHERE resource_id = $1 AND kind = 'shift' AND weekday <> $2 "
        "ORDER BY id LIMIT 1",
        rid,
        weekday,
    )
    headers = bearer(admin_token)
    for resp in (
        await client.post(f"/v1/admin/schedules/{shift_id}/deactivate", headers=headers),
        await client.patch(
            f"/v1/admin/schedules/{shift_id}", json={"end": "00:05"}, headers=headers
        ),
        await client.patch(  # extra time removed: the exception turns into time on
            f"/v1/admin/schedules/{elsewhere.json()['id']}",
            json={"starts_at": iso(start), "ends_at": iso(start + HOUR)},
            headers=headers,
        ),
    ):
        assert resp.status_code == 409, resp.text
        assert resp.json()["code"] == "capacity_in_use"
    assert await off_shift(pool, rid) == set()
    fine = await client.post(f"/v1/admin/schedules/{other_day}/deactivate", headers=headers)
    assert fine.status_code == 200, fine.text
    await invariant_holds(pool)


async def test_time_off_racing_bookings_never_leaves_a_booking_off_shift(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin_token: str
) -> None:
    tokens = [(await customer(pool, module_env))[2] for _ in range(10)]
    for round_ in range(6):
        _, sid, [rid] = await seed(pool, capacity=20)
        bid = await pool.fetchval("SELECT branch_id FROM resources WHERE id = $1", rid)
        start = at_hour(3, round_)
        tasks = [asyncio.create_task(book(client, t, bid, sid, start)) for t in tokens]
        tasks.insert(
            round_,
            asyncio.create_task(time_off(client, admin_token, rid, start, start + HOUR)),
        )
        results = await asyncio.gather(*tasks)
        off = results[round_]
        made = sum(r.status_code == 201 for i, r in enumerate(results) if i != round_)
        assert off.status_code in (201, 409), off.text
        assert all(r.status_code in (201, 409) for i, r in enumerate(results) if i != round_), [
            r.text for r in results
        ]
        # Time off goes in only when no booking got there first, and then none after it.
        assert (made == 0) == (off.status_code == 201), (made, off.text)
        assert await off_shift(pool, rid) == set()
    await invariant_holds(pool)
