"""The worker prunes capacity-ledger units of the past in small batches, keeping the
units a live commitment still covers and the invariant query meaningful. Real
PostgreSQL, a real arq worker over Redis; concurrent purges on separate connections.
(A module of its own: the purge mark is database-wide.)"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from arq.connections import ArqRedis

from selfserve.scheduling import ledger
from tests.booking_helpers import invariant_holds, seed
from tests.conftest import ModuleEnv
from tests.integration.test_worker import run_burst_worker

NOW = datetime.now(UTC).replace(second=0, microsecond=0)
DAY = timedelta(days=1)


@pytest.fixture
def worker_env(module_env: ModuleEnv, monkeypatch: pytest.MonkeyPatch) -> ModuleEnv:
    monkeypatch.setenv("DATABASE_URL", module_env.database_url)
    monkeypatch.setenv("REDIS_URL", module_env.redis_url)
    monkeypatch.setenv("SELFSERVE_LOG_LEVEL", "WARNING")
    return module_env


def aligned(t: datetime) -> datetime:
    return t.replace(minute=t.minute - t.minute % 30)


async def booked(
    pool: asyncpg.Pool, sid: int, rid: int, at: datetime, status: str = "confirmed"
) -> int:
    """A 30-minute booking (six units) made through the ledger, then set to `status`."""
    async with pool.acquire() as conn, conn.transaction():
        b = await ledger.create_booking(
            conn,
            service_id=sid,
            resource_id=rid,
            starts_at=aligned(at),
            party_size=1,
            channel="app",
            now=aligned(at) - DAY,
        )
        if status in ("cancelled", "no_show"):
            assert await ledger.cancel_booking(conn, b.id, at)
            await conn.execute("UPDATE bookings SET status = $2 WHERE id = $1", b.id, status)
        elif status != "confirmed":
            await conn.execute("UPDATE bookings SET status = $2 WHERE id = $1", b.id, status)
    return b.id


async def units(pool: asyncpg.Pool, rid: int) -> list[datetime]:
    rows = await pool.fetch(
        "SELECT unit_start FROM resource_capacity_units WHERE resource_id = $1 ORDER BY unit_start",
        rid,
    )
    return [r["unit_start"] for r in rows]


async def test_old_units_go_in_batches_and_live_recent_and_future_ones_stay(
    pool: asyncpg.Pool,
) -> None:
    _, sid, [rid] = await seed(pool, capacity=2)
    for days in (12, 11, 10, 9):
        await booked(pool, sid, rid, NOW - days * DAY, "completed")
    await booked(pool, sid, rid, NOW - 8 * DAY, "cancelled")  # six rows at used 0
    await booked(pool, sid, rid, NOW - 8 * DAY, "no_show")  # rows kept by no one
    live = await booked(pool, sid, rid, NOW - 5 * DAY)  # never checked in nor marked yet
    recent = await booked(pool, sid, rid, NOW - DAY / 2, "completed")
    future = await booked(pool, sid, rid, NOW + 3 * DAY)
    del recent, future
    before = await units(pool, rid)
    assert len(before) == 6 * 8  # the two bookings at -8 d share their units
    await invariant_holds(pool)

    # One batch of 5: the five oldest units go, nothing else.
    assert await ledger.purge_units(pool, NOW, batch=5, max_batches=1) == 5
    assert await units(pool, rid) == before[5:]
    await invariant_holds(pool)

    # The rest, 5 at a time: every unit that ended two days ago, but the live booking's.
    gone = await ledger.purge_units(pool, NOW, batch=5)
    assert gone == 6 * 5 - 5
    left = await units(pool, rid)
    live_span = aligned(NOW - 5 * DAY)
    assert left[:6] == [live_span + timedelta(minutes=5 * i) for i in range(6)]
    assert left[6:] == before[-12:]  # the recent and the future booking
    assert await ledger.purge_units(pool, NOW, batch=5) == 0  # twice: nothing more
    await invariant_holds(pool)

    # The live booking still gives its seats back (its rows are there), then goes too.
    async with pool.acquire() as conn, conn.transaction():
        assert [r["id"] for r in await ledger.mark_no_shows(conn, NOW - DAY, NOW)] == [live]
    await invariant_holds(pool)
    assert await ledger.purge_units(pool, NOW) == 6
    assert await units(pool, rid) == before[-12:]
    await invariant_holds(pool)
    mark = await pool.fetchval("SELECT purged_before FROM capacity_ledger_purge")
    assert mark == ledger._current_unit(NOW - ledger.PURGE_KEEP)


async def test_the_invariant_still_sees_what_the_purge_did_not_excuse(
    pool: asyncpg.Pool,
) -> None:
    _, sid, [rid] = await seed(pool, capacity=2)
    await booked(pool, sid, rid, NOW - 20 * DAY, "completed")
    kept = await booked(pool, sid, rid, NOW - 19 * DAY)  # live: its units stay
    await booked(pool, sid, rid, NOW + 2 * DAY)
    await ledger.purge_units(pool, NOW)
    await invariant_holds(pool)
    span = await pool.fetchrow("SELECT lower(occupied) AS f FROM bookings WHERE id = $1", kept)
    assert span is not None
    for at in (span["f"], aligned(NOW + 2 * DAY)):  # a kept old unit, a future unit
        async with pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE resource_capacity_units SET used = used + 1 "
                "WHERE resource_id = $1 AND unit_start = $2",
                rid,
                at,
            )
            found = await ledger.overbooked(conn)
            assert [(v.resource_id, v.unit_start, v.seats, v.used) for v in found] == [
                (rid, at, 1, 2)
            ]
            await conn.execute(
                "UPDATE resource_capacity_units SET used = used - 1 "
                "WHERE resource_id = $1 AND unit_start = $2",
                rid,
                at,
            )
    # A unit after the mark whose row went missing is still a violation.
    async with pool.acquire() as conn, conn.transaction():
        at = aligned(NOW + 2 * DAY)
        await conn.execute(
            "DELETE FROM resource_capacity_units WHERE resource_id = $1 AND unit_start = $2",
            rid,
            at,
        )
        found = await ledger.overbooked(conn)
        assert [(v.unit_start, v.seats, v.used) for v in found] == [(at, 1, None)]
        await conn.execute(
            "INSERT INTO resource_capacity_units (resource_id, unit_start, used, capacity) "
            "VALUES ($1, $2, 1, 2)",
            rid,
            at,
        )
    await invariant_holds(pool)


async def test_concurrent_purges_share_the_work(pool: asyncpg.Pool) -> None:
    _, sid, [rid] = await seed(pool, capacity=50)
    for i in range(40):
        await booked(pool, sid, rid, NOW - 30 * DAY + i * timedelta(hours=1), "completed")
    old = len(await units(pool, rid))
    assert old == 40 * 6
    results = await asyncio.gather(*(ledger.purge_units(pool, NOW, batch=7) for _ in range(4)))
    assert sum(results) == old
    assert await units(pool, rid) == []
    await invariant_holds(pool)


async def test_the_worker_job_purges_through_redis(
    pool: asyncpg.Pool, redis: ArqRedis, worker_env: ModuleEnv
) -> None:
    _, sid, [rid] = await seed(pool, capacity=1)
    await booked(pool, sid, rid, NOW - 40 * DAY, "completed")
    await booked(pool, sid, rid, NOW + DAY)
    assert len(await units(pool, rid)) == 12
    job = await redis.enqueue_job("purge_capacity_ledger")
    assert job is not None
    await run_burst_worker(worker_env)
    assert await job.result() >= 6
    assert len(await units(pool, rid)) == 6
    await invariant_holds(pool)
