"""Demo data for `selfserve dev`: loaded once, recognised by a marker row."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from selfserve.auth.passwords import hash_password
from selfserve.auth.tokens import hash_secret
from selfserve.db import Conn

DEMO_ADMIN_EMAIL = "admin@selfserve.local"
DEMO_ADMIN_PASSWORD = "selfserve-admin"  # noqa: S105  (demo only, printed at start)
DEMO_MANAGER_EMAIL = "manager.shanghai@selfserve.local"
DEMO_MANAGER_PASSWORD = "selfserve-manager"  # noqa: S105

WEEKDAYS = (1, 2, 3, 4, 5)


@dataclass
class DemoCredentials:
    admin_email: str
    admin_password: str
    manager_email: str
    manager_password: str
    kiosk_device_id: int | None
    kiosk_secret: str | None


def _hours(opens: str, closes: str, days: tuple[int, ...]) -> list[dict[str, object]]:
    return [{"weekday": d, "opens": opens, "closes": closes} for d in days]


DEMO_QUEUES = (("A", "Accounts", "Open an account"), ("C", "Cards", "Card services"))


async def _demo_queues(conn: Conn) -> None:
    """Walk-in queues for the demo branches that have none yet."""
    for prefix, name, service in DEMO_QUEUES:
        await conn.execute(
            """
            WITH made AS (
                INSERT INTO queues (branch_id, name, prefix)
                SELECT b.id, $2, $1 FROM branches b
                WHERE b.name IN ('Shanghai Pudong Hall', 'London Holborn Centre')
                  AND NOT EXISTS (SELECT 1 FROM queues q WHERE q.branch_id = b.id
                                  AND q.prefix = $1)
                RETURNING id, branch_id
            )
            INSERT INTO queue_services (queue_id, service_id)
            SELECT made.id, s.id FROM made JOIN services s
                ON s.branch_id = made.branch_id AND s.name = $3
            """,
            prefix,
            name,
            service,
        )


async def load_demo(conn: Conn) -> DemoCredentials:
    """Insert demo branches, services, resources, shifts, a kiosk and accounts, once."""
    creds = DemoCredentials(
        DEMO_ADMIN_EMAIL,
        DEMO_ADMIN_PASSWORD,
        DEMO_MANAGER_EMAIL,
        DEMO_MANAGER_PASSWORD,
        None,
        None,
    )
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7305822914002)")
        existing = await conn.fetchval(
            "SELECT id FROM branches WHERE name = 'Shanghai Pudong Hall'"
        )
        if existing is not None:
            creds.kiosk_device_id = await conn.fetchval(
                "SELECT min(id) FROM devices WHERE branch_id = $1", existing
            )
            await _demo_queues(conn)  # data made before queues existed gets them now
            return creds
        branches = [
            (
                "Shanghai Pudong Hall",
                "Asia/Shanghai",
                "88 Century Avenue, Pudong, Shanghai",
                "+862150001234",
                _hours("08:30", "17:30", (1, 2, 3, 4, 5)) + _hours("09:00", "13:00", (6,)),
                "CNY",
            ),
            (
                "London Holborn Centre",
                "Europe/London",
                "1 High Holborn, London WC1V 6AA",
                "+442070001234",
                _hours("09:00", "17:00", WEEKDAYS),
                "GBP",
            ),
        ]
        branch_ids: list[int] = []
        for name, tz, address, phone, hours, currency in branches:
            bid = await conn.fetchval(
                "INSERT INTO branches (name, timezone, address, phone, opening_hours, closures, "
                "walk_in_reserve) VALUES ($1, $2, $3, $4, $5, $6, 0.3) RETURNING id",
                name,
                tz,
                address,
                phone,
                hours,
                [{"date": "2026-12-25", "reason": "Christmas Day"}]
                if tz == "Europe/London"
                else [{"date": "2027-02-17", "reason": "Spring Festival"}],
            )
            branch_ids.append(bid)
            services = [
                ("Open an account", 30, 5, 5, 0, 0, 4),
                ("Card services", 15, 0, 5, 0, 0, 1),
                ("Mortgage consultation", 60, 10, 10, 20000, 5000, 2),
            ]
            service_ids = []
            for sname, dur, before, after, price, deposit, max_party in services:
                sid = await conn.fetchval(
                    "INSERT INTO services (branch_id, name, duration_min, buffer_before_min, "
                    "buffer_after_min, price_minor, deposit_minor, currency, max_party, "
                    "lead_time_min, horizon_days, cancellation_window_min, slot_interval_min) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 60, 30, 120, 15) RETURNING id",
                    bid,
                    sname,
                    dur,
                    before,
                    after,
                    price,
                    deposit,
                    currency,
                    max_party,
                )
                service_ids.append(sid)
            resources = [
                ("counter", "Counter 1", 1, service_ids[:2]),
                ("counter", "Counter 2", 1, service_ids[:2]),
                ("staff", "Advisor", 1, service_ids),
                ("room", "Meeting room", 4, [service_ids[0]]),
            ]
            for kind, rname, capacity, skills in resources:
                rid = await conn.fetchval(
                    "INSERT INTO resources (branch_id, kind, name, capacity) "
                    "VALUES ($1, $2, $3, $4) RETURNING id",
                    bid,
                    kind,
                    rname,
                    capacity,
                )
                await conn.execute(
                    "INSERT INTO resource_skills (resource_id, service_id) "
                    "SELECT $1, unnest($2::bigint[])",
                    rid,
                    skills,
                )
                for day in WEEKDAYS:
                    await conn.execute(
                        "INSERT INTO schedules (resource_id, kind, weekday, start_minute, "
                        "end_minute) VALUES ($1, 'shift', $2, $3, $4)",
                        rid,
                        day,
                        9 * 60,
                        17 * 60,
                    )
        secret = secrets.token_urlsafe(24)
        creds.kiosk_device_id = await conn.fetchval(
            "INSERT INTO devices (branch_id, name, kind, secret_hash) "
            "VALUES ($1, 'Lobby kiosk', 'kiosk', $2) RETURNING id",
            branch_ids[0],
            hash_secret(secret),
        )
        creds.kiosk_secret = secret
        await _demo_queues(conn)
        admin_exists = await conn.fetchval(
            "SELECT 1 FROM staff WHERE lower(email) = lower($1)", DEMO_ADMIN_EMAIL
        )
        if not admin_exists:
            await conn.execute(
                "INSERT INTO staff (email, name, password_hash, role) "
                "VALUES ($1, 'Demo admin', $2, 'admin')",
                DEMO_ADMIN_EMAIL,
                hash_password(DEMO_ADMIN_PASSWORD),
            )
        manager_id = await conn.fetchval(
            "INSERT INTO staff (email, name, password_hash, role) "
            "VALUES ($1, 'Shanghai manager', $2, 'manager') RETURNING id",
            DEMO_MANAGER_EMAIL,
            hash_password(DEMO_MANAGER_PASSWORD),
        )
        await conn.execute(
            "INSERT INTO staff_branches (staff_id, branch_id) VALUES ($1, $2)",
            manager_id,
            branch_ids[0],
        )
    return creds
