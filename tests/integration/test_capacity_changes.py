"""Capacity changes go through the capacity ledger: a resource's new capacity reaches
its ledger units in the same transaction, a change that taken seats would not fit is
refused (409 `capacity_in_use`), and the invariant query compares with the resource's
real capacity. Through the real app on real PostgreSQL; races run many requests at
once over separate pool connections."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from selfserve import db
from selfserve.scheduling import ledger
from tests.booking_helpers import at_hour, book, customer, invariant_holds, remaining, seed
from tests.conftest import ModuleEnv
from tests.helpers import bearer, login, make_staff


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
