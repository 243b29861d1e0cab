"""Demo data: loaded once; an older demo install gets the walk-in queues, a kiosk and
a manager and a staff member in each branch on its next start; every printed
credential signs in."""

from __future__ import annotations

import re

import asyncpg
import httpx

from selfserve.demo import (
    DEMO_ADMIN_EMAIL,
    DEMO_ADMIN_PASSWORD,
    credentials_text,
    kiosk_secrets,
    load_demo,
)


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


async def people(pool: asyncpg.Pool) -> list[tuple[str, str, str, list[str]]]:
    rows = await pool.fetch(
        """
        SELECT s.email, s.role, coalesce(array_agg(b.name ORDER BY b.name)
               FILTER (WHERE b.id IS NOT NULL), '{}') AS branches
        FROM staff s LEFT JOIN staff_branches sb ON sb.staff_id = s.id
        LEFT JOIN branches b ON b.id = sb.branch_id
        GROUP BY s.id ORDER BY s.email
        """
    )
    kiosks = await pool.fetch(
        "SELECT d.name, d.kind, b.name AS branch FROM devices d "
        "JOIN branches b ON b.id = d.branch_id ORDER BY b.name"
    )
    return [("staff", r["email"], r["role"], list(r["branches"])) for r in rows] + [
        ("device", r["name"], r["kind"], [r["branch"]]) for r in kiosks
    ]


EXPECTED_PEOPLE = [
    ("staff", "admin@selfserve.local", "admin", []),
    ("staff", "manager.london@selfserve.local", "manager", ["London Holborn Centre"]),
    ("staff", "manager.shanghai@selfserve.local", "manager", ["Shanghai Pudong Hall"]),
    ("staff", "staff.london@selfserve.local", "staff", ["London Holborn Centre"]),
    ("staff", "staff.shanghai@selfserve.local", "staff", ["Shanghai Pudong Hall"]),
    ("device", "Lobby kiosk", "kiosk", ["London Holborn Centre"]),
    ("device", "Lobby kiosk", "kiosk", ["Shanghai Pudong Hall"]),
]


async def test_demo_loads_once_and_older_installs_get_queues_kiosks_and_staff(
    pool: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    async with pool.acquire() as conn:
        first = await load_demo(conn)
        assert [b.name for b in first.branches] == [
            "Shanghai Pudong Hall",
            "London Holborn Centre",
        ]
        assert all(b.kiosk_secret for b in first.branches)
        expected = [
            ("London Holborn Centre", "A", "Open an account"),
            ("London Holborn Centre", "C", "Card services"),
            ("Shanghai Pudong Hall", "A", "Open an account"),
            ("Shanghai Pudong Hall", "C", "Card services"),
        ]
        assert await queues(pool) == expected
        assert await people(pool) == EXPECTED_PEOPLE

        # an install from before queues, London's kiosk and the staff accounts existed
        await conn.execute("DELETE FROM queue_services")
        await conn.execute("DELETE FROM queues")
        london = first.branches[1]
        await conn.execute("DELETE FROM devices WHERE id = $1", london.kiosk_device_id)
        await conn.execute(
            "DELETE FROM staff_branches WHERE staff_id IN (SELECT id FROM staff "
            "WHERE email <> 'admin@selfserve.local' AND email <> 'manager.shanghai@selfserve.local')"
        )
        await conn.execute(
            "DELETE FROM staff WHERE email <> 'admin@selfserve.local' "
            "AND email <> 'manager.shanghai@selfserve.local'"
        )
        again = await load_demo(conn)
        shanghai, london = again.branches
        assert shanghai.kiosk_secret is None  # not made twice
        assert shanghai.kiosk_device_id == first.branches[0].kiosk_device_id
        assert london.kiosk_secret is not None  # made now
        assert await queues(pool) == expected
        assert await people(pool) == EXPECTED_PEOPLE
        assert await pool.fetchval("SELECT count(*) FROM branches") == 2

        third = await load_demo(conn)
        assert [b.kiosk_secret for b in third.branches] == [None, None]
        assert await people(pool) == EXPECTED_PEOPLE

    # what `dev` prints, with the secrets it kept from each start (an older file kept
    # Shanghai's alone), signs in: the admin, every manager and staff member, every kiosk
    older_file = {"kiosk_secret": first.branches[0].kiosk_secret}
    kept = kiosk_secrets(older_file, again)
    assert kiosk_secrets({"kiosks": kept}, third) == kept
    text = credentials_text(third, kept)
    assert f"admin:      {DEMO_ADMIN_EMAIL} / {DEMO_ADMIN_PASSWORD}" in text
    logins = re.findall(r"(admin|manager|staff):\s+(\S+@\S+) / (\S+)", text)
    assert [(role, email) for role, email, _ in logins] == [
        ("admin", "admin@selfserve.local"),
        ("manager", "manager.shanghai@selfserve.local"),
        ("staff", "staff.shanghai@selfserve.local"),
        ("manager", "manager.london@selfserve.local"),
        ("staff", "staff.london@selfserve.local"),
    ]
    for role, email, password in logins:
        resp = await client.post(
            "/v1/auth/staff/login", json={"email": email, "password": password}
        )
        assert resp.status_code == 200, (email, resp.text)
        me = await pool.fetchval("SELECT role FROM staff WHERE email = $1", email)
        assert me == role
    devices = re.findall(r"kiosk:\s+device_id (\d+) / secret (\S+)", text)
    assert [int(d) for d, _ in devices] == [b.kiosk_device_id for b in third.branches]
    for device_id, secret in devices:
        resp = await client.post(
            "/v1/auth/device", json={"device_id": int(device_id), "secret": secret}
        )
        assert resp.status_code == 200, resp.text
