"""The capacity ledger under real concurrency against real PostgreSQL.

Each race runs its transactions on separate connections from two pools (one of 50
connections, one of 20, standing for two API processes) at the same time, and then
checks the invariant query: nothing over capacity, the ledger equal to the rows.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from selfserve import db
from selfserve.errors import CapacityInUse, HoldExpired, SlotFull
from selfserve.scheduling import ledger
from tests.conftest import ModuleEnv

NOW = datetime(2030, 3, 4, 8, 0, tzinfo=UTC)
T10 = datetime(2030, 3, 4, 10, 0, tzinfo=UTC)
_names = itertools.count(1)

Op = Callable[[db.Conn], Awaitable[Any]]


@pytest.fixture(scope="module")
async def pools(module_env: ModuleEnv) -> AsyncIterator[list[asyncpg.Pool]]:
    a = await db.create_pool(module_env.database_url, min_size=50, max_size=50)
    b = await db.create_pool(module_env.database_url, min_size=20, max_size=20)
    try:
        yield [a, b]
    finally:
        await a.close()
        await b.close()


async def race(pools: list[asyncpg.Pool], ops: list[Op], *, retry: bool = True) -> list[Any]:
    """Run every op in its own transaction, alternating pools, all at once.

    Returns each op's result, or the domain error it raised (other errors fail the test).
    """

    async def one(i: int, op: Op) -> Any:
        pool = pools[i % len(pools)]
        try:
            if retry:
                return await db.in_transaction_with_retry(pool, op)
            async with pool.acquire() as conn, conn.transaction():
                return await op(conn)
        except (SlotFull, HoldExpired) as exc:
            return exc

    return await asyncio.gather(*(one(i, op) for i, op in enumerate(ops)))


async def make_resource(
    pool: asyncpg.Pool,
    *,
    capacity: int,
    services: list[dict[str, int]],
    branch_id: int | None = None,
) -> tuple[int, int, list[int]]:
    """A branch (unless given), a resource and services it is skilled for."""
    n = next(_names)
    async with pool.acquire() as conn, conn.transaction():
        if branch_id is None:
            branch_id = await conn.fetchval(
                "INSERT INTO branches (name, timezone) VALUES ($1, 'Asia/Shanghai') RETURNING id",
                f"Branch {n}",
            )
        rid = await conn.fetchval(
            "INSERT INTO resources (branch_id, kind, name, capacity) "
            "VALUES ($1, 'counter', $2, $3) RETURNING id",
            branch_id,
            f"Counter {n}",
            capacity,
        )
        sids = []
        for spec in services:
            sid = await conn.fetchval(
                "INSERT INTO services (branch_id, name, duration_min, buffer_before_min, "
                "buffer_after_min, min_party, max_party) VALUES ($1, $2, $3, $4, $5, 1, $6) "
                "RETURNING id",
                branch_id,
                f"Service {n}",
                spec["duration"],
                spec.get("before", 0),
                spec.get("after", 0),
                spec.get("max_party", 1),
            )
            await conn.execute(
                "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)", rid, sid
            )
            sids.append(sid)
    assert branch_id is not None
    return branch_id, rid, sids


def book(
    sid: int, rid: int, at: datetime, party: int = 1
) -> Callable[[db.Conn], Awaitable[ledger.Booking]]:
    async def op(conn: db.Conn) -> ledger.Booking:
        return await ledger.create_booking(
            conn,
            service_id=sid,
            resource_id=rid,
            starts_at=at,
            party_size=party,
            channel="app",
            now=NOW,
        )

    return op


def hold(sid: int, rid: int, at: datetime) -> Callable[[db.Conn], Awaitable[ledger.Hold]]:
    async def op(conn: db.Conn) -> ledger.Hold:
        return await ledger.create_hold(
            conn,
            service_id=sid,
            resource_id=rid,
            starts_at=at,
            party_size=1,
            channel="kiosk",
            now=NOW,
        )

    return op


def move(booking_id: int, to: datetime, resource_id: int | None = None) -> Op:
    async def op(conn: db.Conn) -> ledger.Booking:
        return await ledger.reschedule_booking(
            conn, booking_id, new_starts_at=to, now=NOW, new_resource_id=resource_id
        )

    return op


def cancel(booking_id: int) -> Op:
    async def op(conn: db.Conn) -> bool:
        return await ledger.cancel_booking(conn, booking_id, NOW)

    return op


async def assert_consistent(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert await ledger.overbooked(conn) == []


async def used(pool: asyncpg.Pool, rid: int) -> dict[datetime, int]:
    rows = await pool.fetch(
        "SELECT unit_start, used FROM resource_capacity_units WHERE resource_id = $1 "
        "ORDER BY unit_start",
        rid,
    )
    return {r["unit_start"]: r["used"] for r in rows}


def split(results: list[Any]) -> tuple[list[Any], list[Exception]]:
    ok = [r for r in results if not isinstance(r, Exception)]
    failed = [r for r in results if isinstance(r, Exception)]
    return ok, failed


# --- pure ----------------------------------------------------------------------


def test_units_round_the_occupied_span_outward() -> None:
    m = timedelta(minutes=1)
    assert ledger.unit_starts(T10, T10 + 30 * m) == [T10 + i * 5 * m for i in range(6)]
    # 10:03-10:11 is covered by 10:00, 10:05, 10:10
    assert ledger.unit_starts(T10 + 3 * m, T10 + 11 * m) == [T10, T10 + 5 * m, T10 + 10 * m]
    assert ledger.unit_starts(T10 - 1 * m, T10 + 1 * m) == [T10 - 5 * m, T10]
    with pytest.raises(ValueError, match="empty"):
        ledger.unit_starts(T10, T10)


# --- races ---------------------------------------------------------------------


async def test_200_concurrent_bookings_for_5_seats(
    pool: asyncpg.Pool, pools: list[asyncpg.Pool]
) -> None:
    _, rid, [sid] = await make_resource(pool, capacity=5, services=[{"duration": 30}])
    started = time.perf_counter()
    results = await race(pools, [book(sid, rid, T10) for _ in range(200)])
    elapsed = time.perf_counter() - started
    print(f"\n200-way booking race on 5 seats: {elapsed * 1000:.0f} ms")

    ok, failed = split(results)
    assert len(ok) == 5
    assert len(failed) == 195
    assert all(isinstance(e, SlotFull) and e.status == 409 for e in failed)
    assert all(e.code == "slot_full" for e in failed)
    codes = {b.code for b in ok}
    assert len(codes) == 5
    assert all(re.fullmatch(r"[A-HJKMNP-Z2-9]{6}", c) for c in codes)
    assert await pool.fetchval("SELECT count(*) FROM bookings WHERE resource_id = $1", rid) == 5
    assert set((await used(pool, rid)).values()) == {5}
    assert len(await used(pool, rid)) == 6  # 30 minutes = 6 units
    await assert_consistent(pool)


async def test_200_concurrent_holds_for_5_seats_then_convert_and_expire(
    pool: asyncpg.Pool, pools: list[asyncpg.Pool]
) -> None:
    _, rid, [sid] = await make_resource(
        pool, capacity=5, services=[{"duration": 20, "before": 5, "after": 10}]
    )
    results = await race(pools, [hold(sid, rid, T10) for _ in range(200)])
    ok, failed = split(results)
    assert len(ok) == 5
    assert len(failed) == 195
    assert all(isinstance(e, SlotFull) for e in failed)
    # buffers count: 09:55-10:30 is 7 units
    assert await used(pool, rid) == {T10 + timedelta(minutes=5 * i): 5 for i in range(-1, 6)}
    await assert_consistent(pool)

    # Converting passes the seats over: the ledger does not move, nothing is over.
    async with pool.acquire() as conn, conn.transaction():
        booked = [
            await ledger.create_booking_from_hold(conn, h.id, now=NOW + timedelta(minutes=1))
            for h in ok[:2]
        ]
    assert [b.starts_at for b in booked] == [T10, T10]
    assert set((await used(pool, rid)).values()) == {5}
    await assert_consistent(pool)

    # Expiry releases the other three, once, even when two sweeps run at once.
    later = NOW + ledger.HOLD_TTL

    async def sweep(conn: db.Conn) -> int:
        return await ledger.expire_holds(conn, later)

    first = await race(pools, [sweep, sweep])
    assert sum(first) == 3  # SKIP LOCKED may split the work, never double it
    assert await race(pools, [sweep]) == [0]
    assert set((await used(pool, rid)).values()) == {2}
    await assert_consistent(pool)

    # An expired hold cannot be booked.
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(HoldExpired):
            await ledger.create_booking_from_hold(conn, ok[4].id, now=later)


async def test_a_hold_converted_by_many_at_once_becomes_one_booking(
    pool: asyncpg.Pool, pools: list[asyncpg.Pool]
) -> None:
    _, rid, [sid] = await make_resource(pool, capacity=3, services=[{"duration": 15}])
    async with pool.acquire() as conn, conn.transaction():
        h = await hold(sid, rid, T10)(conn)

    async def convert(conn: db.Conn) -> ledger.Booking:
        return await ledger.create_booking_from_hold(conn, h.id, now=NOW)

    async def sweep(conn: db.Conn) -> int:
        return await ledger.expire_holds(conn, h.expires_at)  # due for the sweep

    ok, failed = split(await race(pools, [convert] * 20))
    assert len(ok) == 1
    assert len(failed) == 19
    assert all(isinstance(e, HoldExpired) for e in failed)
    assert await race(pools, [sweep]) == [0]  # converted: nothing to expire
    assert set((await used(pool, rid)).values()) == {1}
    await assert_consistent(pool)


async def test_reschedules_racing_into_a_full_slot(
    pool: asyncpg.Pool, pools: list[asyncpg.Pool]
) -> None:
    _, rid, [sid] = await make_resource(pool, capacity=5, services=[{"duration": 30}])
    target = T10
    async with pool.acquire() as conn, conn.transaction():
        for _ in range(3):  # 2 seats left at 10:00
            await book(sid, rid, target)(conn)
        movers = [await book(sid, rid, T10 + timedelta(hours=1 + i // 5))(conn) for i in range(40)]
    results = await race(pools, [move(b.id, target) for b in movers])
    ok, failed = split(results)
    assert len(ok) == 2
    assert len(failed) == 38
    assert all(isinstance(e, SlotFull) for e in failed)
    moved = {b.id for b in ok}
    rows = await pool.fetch(
        "SELECT id, starts_at, status FROM bookings WHERE id = ANY($1::bigint[])",
        [b.id for b in movers],
    )
    for r in rows:
        original = next(b for b in movers if b.id == r["id"])
        assert r["status"] == "confirmed"
        assert r["starts_at"] == (target if r["id"] in moved else original.starts_at)
    assert set((await used(pool, rid)).values()) <= {3, 4, 5}
    assert (await used(pool, rid))[target] == 5
    await assert_consistent(pool)


async def test_a_move_overlapping_its_own_span_does_not_compete_with_itself(
    pool: asyncpg.Pool,
) -> None:
    _, rid, [sid] = await make_resource(pool, capacity=1, services=[{"duration": 30}])
    async with pool.acquire() as conn, conn.transaction():
        b = await book(sid, rid, T10)(conn)
        moved = await move(b.id, T10 + timedelta(minutes=15))(conn)
    assert moved.starts_at == T10 + timedelta(minutes=15)
    units = await used(pool, rid)
    assert [u for u, n in units.items() if n == 1] == [
        T10 + timedelta(minutes=5 * i) for i in range(3, 9)
    ]
    await assert_consistent(pool)


async def test_cancel_then_rebook_races_never_exceed_capacity(
    pool: asyncpg.Pool, pools: list[asyncpg.Pool]
) -> None:
    _, rid, [sid] = await make_resource(pool, capacity=5, services=[{"duration": 30}])
    async with pool.acquire() as conn, conn.transaction():
        full = [await book(sid, rid, T10)(conn) for _ in range(5)]
    cancels = [cancel(b.id) for b in full[:3]]
    rebooks = [book(sid, rid, T10) for _ in range(30)]
    # interleave so cancels do not all start first
    ops: list[Op] = []
    for i, op in enumerate(rebooks):
        ops.append(op)
        if i % 10 == 5:
            ops.append(cancels.pop())
    results = await race(pools, ops)
    assert results.count(True) == 3  # every cancel went through once
    rebooked = [r for r in results if isinstance(r, ledger.Booking)]
    assert len(rebooked) <= 3
    active = await pool.fetchval(
        "SELECT count(*) FROM bookings WHERE resource_id = $1 AND status = 'confirmed'", rid
    )
    assert active == 2 + len(rebooked)
    await assert_consistent(pool)
    # whatever the race left free is bookable now, and no more
    after = await race(pools, [book(sid, rid, T10) for _ in range(10)])
    assert len(split(after)[0]) == 3 - len(rebooked)
    assert set((await used(pool, rid)).values()) == {5}
    await assert_consistent(pool)


async def test_long_and_short_bookings_contend_unit_by_unit(
    pool: asyncpg.Pool, pools: list[asyncpg.Pool]
) -> None:
    _, rid, [long_sid, short_sid] = await make_resource(
        pool, capacity=2, services=[{"duration": 60}, {"duration": 15}]
    )
    quarters = [T10 + timedelta(minutes=15 * q) for q in range(4)]
    ops: list[Op] = []
    for _ in range(10):
        ops.append(book(long_sid, rid, T10))
        ops.extend(book(short_sid, rid, q) for q in quarters)
    ok, failed = split(await race(pools, ops))
    assert all(isinstance(e, SlotFull) for e in failed)
    longs = sum(1 for b in ok if b.service_id == long_sid)
    for q in quarters:
        shorts = sum(1 for b in ok if b.service_id == short_sid and b.starts_at == q)
        # Never over, and never needlessly refused: seats only got taken, and 10
        # requests for each quarter competed, so each quarter ends full.
        assert longs + shorts == 2
    await assert_consistent(pool)


async def test_party_sizes_fill_exactly(pool: asyncpg.Pool, pools: list[asyncpg.Pool]) -> None:
    _, rid, [sid] = await make_resource(
        pool, capacity=7, services=[{"duration": 30, "max_party": 3}]
    )
    parties = [1 + i % 3 for i in range(60)]
    results = await race(pools, [book(sid, rid, T10, p) for p in parties])
    taken = sum(r.party_size for r in results if isinstance(r, ledger.Booking))
    assert taken <= 7
    free = 7 - taken
    # each refused party did not fit when it ran, and free seats only shrank since
    assert all(p > free for p, r in zip(parties, results, strict=True) if isinstance(r, SlotFull))
    assert set((await used(pool, rid)).values()) == {taken}
    await assert_consistent(pool)


async def test_opposite_moves_do_not_deadlock(
    pool: asyncpg.Pool, pools: list[asyncpg.Pool]
) -> None:
    """Bookings swap places both ways at once, across overlapping spans and two resources.

    Taking the new seats before giving back the old would lock A-then-B in one
    transaction and B-then-A in the other; sorted locking makes them queue instead.
    Run without the retry helper: a deadlock would fail the test.
    """
    # 30 seats: room for all 30 bookings anywhere, so every move must succeed.
    branch, r1, [sid] = await make_resource(pool, capacity=30, services=[{"duration": 60}])
    _, r2, _ = await make_resource(pool, capacity=30, services=[], branch_id=branch)
    await pool.execute(
        "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)", r2, sid
    )
    s1, s2 = T10, T10 + timedelta(minutes=30)  # overlapping hours
    async with pool.acquire() as conn, conn.transaction():
        at_s1 = [(await book(sid, r1, s1)(conn)).id for _ in range(10)]
        at_s2 = [(await book(sid, r1, s2)(conn)).id for _ in range(10)]
        on_r2 = [(await book(sid, r2, s1)(conn)).id for _ in range(10)]
    for round_ in range(6):
        there = round_ % 2 == 0
        ops: list[Op] = []
        for a, b, c in zip(at_s1, at_s2, on_r2, strict=True):
            ops.append(move(a, s2 if there else s1))
            ops.append(move(b, s1 if there else s2))
            ops.append(move(c, s1, r1 if there else r2))
        results = await race(pools, ops, retry=False)
        assert all(isinstance(r, ledger.Booking) for r in results), results
    await assert_consistent(pool)


async def test_resize_refuses_below_used_and_applies_to_future_units(
    pool: asyncpg.Pool,
) -> None:
    _, rid, [sid] = await make_resource(pool, capacity=4, services=[{"duration": 10}])
    async with pool.acquire() as conn, conn.transaction():
        for _ in range(3):
            await book(sid, rid, T10)(conn)
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(CapacityInUse):
            await ledger.resize_capacity(conn, rid, 2, NOW)
    async with pool.acquire() as conn, conn.transaction():
        await ledger.resize_capacity(conn, rid, 3, NOW)
    caps = await pool.fetch(
        "SELECT DISTINCT capacity FROM resource_capacity_units WHERE resource_id = $1", rid
    )
    assert [r["capacity"] for r in caps] == [3]
    assert await pool.fetchval("SELECT capacity FROM resources WHERE id = $1", rid) == 3
    async with pool.acquire() as conn, conn.transaction():
        with pytest.raises(SlotFull):
            await book(sid, rid, T10)(conn)
    await assert_consistent(pool)


async def test_invariant_query_sees_a_tampered_ledger(pool: asyncpg.Pool) -> None:
    _, rid, [sid] = await make_resource(pool, capacity=2, services=[{"duration": 5}])
    async with pool.acquire() as conn, conn.transaction():
        await book(sid, rid, T10)(conn)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "UPDATE resource_capacity_units SET used = 2 WHERE resource_id = $1", rid
        )
        found = await ledger.overbooked(conn)
        assert [(v.resource_id, v.unit_start, v.seats, v.used) for v in found] == [(rid, T10, 1, 2)]
        await conn.execute(
            "UPDATE resource_capacity_units SET used = 1 WHERE resource_id = $1", rid
        )
    await assert_consistent(pool)
