"""Demo data: loaded once, and an older demo install gets the walk-in queues."""

from __future__ import annotations

import asyncpg

from selfserve.demo import load_demo


async def queues(pool: asyncpg.Pool) -> list[tuple[str, str, str]]:
    rows = await pool.fetch(
        """
        SELECT b.name AS branch, q.prefix, s.name AS service
        FROM queues q JOIN branches b ON b.id = q.branch_id
        JOIN queue_services qs ON qs.queue_id = q.id JOIN services s ON s.id = qs.service_id
        ORDER BY 1, 2
        """
    )
    return [(r["branch"], r["prefix"], r["service"]) for r in rows]


async def test_demo_loads_once_with_queues_and_adds_them_to_older_installs(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        first = await load_demo(conn)
        assert first.kiosk_secret is not None
        expected = [
            ("London Holborn Centre", "A", "Open an account"),
            ("London Holborn Centre", "C", "Card services"),
            ("Shanghai Pudong Hall", "A", "Open an account"),
            ("Shanghai Pudong Hall", "C", "Card services"),
        ]
        assert await queues(pool) == expected
        # an install from before queues existed
        await conn.execute("DELETE FROM queue_services")
        await conn.execute("DELETE FROM queues")
        again = await load_demo(conn)
        assert again.kiosk_secret is None  # not made twice
        assert again.kiosk_device_id == first.kiosk_device_id
        assert await queues(pool) == expected
        assert await pool.fetchval("SELECT count(*) FROM branches") == 2
