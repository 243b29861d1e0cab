"""The walk-in reserve holds where capacity is taken, under concurrency: the ledger's
guarded update also checks the counter seats committed at once against
floor(C * (1 - reserve)), so racing bookings get exactly what availability shows.
Many requests at once over separate pool connections, real PostgreSQL."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import datetime, timedelta

import asyncpg
import httpx
import pytest

from selfserve import db
from selfserve.errors import SlotFull
from selfserve.scheduling import ledger
from tests.booking_helpers import ALL_WEEK, at_hour, book, customer, invariant_holds, remaining
from tests.conftest import ModuleEnv

_seq = itertools.count(1)


@pytest.fixture(scope="module")
async def pool(module_env: ModuleEnv) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(module_env.database_url, min_size=1, max_size=40)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture(scope="module")
async def tokens(pool: asyncpg.Pool, module_env: ModuleEnv) -> list[str]:
    return [(await customer(pool, module_env))[2] for _ in range(12)]


async def counters(
    pool: asyncpg.Pool, *, n: int = 4, capacity: int = 1, reserve: float = 0.5
) -> tuple[int, int, list[int]]:
    """A branch open around the clock with a walk-in reserve, a 30-minute service on
    a 30-minute grid, and `n` counters offering it, on shift all week."""
    k = next(_seq)
    async with pool.acquire() as conn, conn.transaction():
        bid = await conn.fetchval(
            "INSERT INTO branches (name, timezone, opening_hours, walk_in_reserve) "
            "VALUES ($1, 'Asia/Shanghai', $2, $3) RETURNING id",
            f"Reserve hall {k}",
            ALL_WEEK,
            reserve,
        )
        sid = await conn.fetchval(
            "INSERT INTO services (branch_id, name, duration_min, slot_interval_min, max_party) "
            "VALUES ($1, $2, 30, 30, 4) RETURNING id",
            bid,
            f"Service {k}",
        )
        rids = []
        for i in range(n):
            rid = await conn.fetchval(
                "INSERT INTO resources (branch_id, kind, name, capacity) "
                "VALUES ($1, 'counter', $2, $3) RETURNING id",
                bid,
                f"Counter {k}.{i}",
                capacity,
            )
            await conn.execute(
                "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)", rid, sid
            )
            await conn.executemany(
                "INSERT INTO schedules (resource_id, kind, weekday, start_minute, end_minute) "
                "VALUES ($1, 'shift', $2, 0, 1440)",
                [(rid, day) for day in range(1, 8)],
            )
            rids.append(rid)
    return bid, sid, rids


async def race_bookings(
    client: httpx.AsyncClient, tokens: list[str], bid: int, sid: int, start: datetime
) -> list[httpx.Response]:
    results = await asyncio.gather(*(book(client, t, bid, sid, start) for t in tokens))
    for r in results:
        assert r.status_code in (201, 409), r.text
        if r.status_code == 409:
            assert r.json()["code"] == "slot_full"
    return list(results)


async def test_8_simultaneous_bookings_on_4_counters_with_half_in_reserve_get_2(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tokens: list[str]
) -> None:
    for trial in range(5):
        bid, sid, _ = await counters(pool)
        start = at_hour(2, trial)
        assert await remaining(client, bid, sid, start) == 2
        results = await race_bookings(client, tokens[:8], bid, sid, start)
        assert sum(r.status_code == 201 for r in results) == 2
        assert await remaining(client, bid, sid, start) == 0
    await invariant_holds(pool)


async def test_what_availability_shows_is_exactly_what_racing_bookings_get(
    client: httpx.AsyncClient, pool: asyncpg.Pool, tokens: list[str]
) -> None:
    # 5 counters of 2 seats, reserve 0.3: floor(10 * 0.7) = 7 seats at once.
    bid, sid, rids = await counters(pool, n=5, capacity=2, reserve=0.3)
    start = at_hour(3)
    assert await remaining(client, bid, sid, start) == 7
    first = await race_bookings(client, tokens[:3], bid, sid, start)
    assert sum(r.status_code == 201 for r in first) == 3
    left = await remaining(client, bid, sid, start)
    assert left == 4
    second = await race_bookings(client, tokens[3:12], bid, sid, start)
    assert sum(r.status_code == 201 for r in second) == left
    assert await remaining(client, bid, sid, start) == 0
    # Two counters off for that hour: C = 6, floor(6 * 0.7) = 4 at once.
    later = at_hour(3, 2)
    async with pool.acquire() as conn, conn.transaction():
        for rid in rids[:2]:
            await conn.execute(
                "INSERT INTO schedules (resource_id, kind, starts_at, ends_at, available) "
                "VALUES ($1, 'exception', $2, $3, false)",
                rid,
                later - timedelta(hours=1),
                later + timedelta(hours=1),
            )
    assert await remaining(client, bid, sid, later) == 4
    third = await race_bookings(client, tokens[:10], bid, sid, later)
    assert sum(r.status_code == 201 for r in third) == 4
    assert await remaining(client, bid, sid, later) == 0
    await invariant_holds(pool)


async def test_the_ledger_itself_refuses_counter_seats_over_the_reserve(
    pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    """Holds taken straight through the ledger, each trying every counter in turn,
    on two pools at once: the reserve is enforced below the booking service."""
    _, sid, rids = await counters(pool, n=4, capacity=2)
    start = at_hour(4)
    other = await db.create_pool(module_env.database_url, min_size=1, max_size=20)
    try:

        async def hold(conn: db.Conn) -> ledger.Hold | SlotFull:
            for rid in rids:
                try:
                    return await ledger.create_hold(
                        conn,
                        service_id=sid,
                        resource_id=rid,
                        starts_at=start,
                        party_size=1,
                        channel="kiosk",
                        now=start - timedelta(days=1),
                    )
                except SlotFull:
                    continue
            return SlotFull()

        results = await asyncio.gather(
            *(db.in_transaction_with_retry([pool, other][i % 2], hold) for i in range(16))
        )
    finally:
        await other.close()
    assert sum(isinstance(r, ledger.Hold) for r in results) == 4  # floor(8 * 0.5)
    await invariant_holds(pool)
