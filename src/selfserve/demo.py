"""Demo data for `selfserve dev`: loaded once, recognised by a marker row."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

from selfserve.auth.passwords import hash_password
from selfserve.auth.tokens import hash_secret
from selfserve.db import Conn

DEMO_ADMIN_EMAIL = "admin@selfserve.local"
DEMO_ADMIN_PASSWORD = "selfserve-admin"  # noqa: S105  (demo only, printed at start)
DEMO_MANAGER_EMAIL = "manager.shanghai@selfserve.local"
DEMO_MANAGER_PASSWORD = "selfserve-manager"  # noqa: S105
DEMO_STAFF_PASSWORD = "selfserve-staff"  # noqa: S105
DEMO_KIOSK_NAME = "Lobby kiosk"

WEEKDAYS = (1, 2, 3, 4, 5)

# Per demo branch: a short key for the e-mail addresses and its accounts.
DEMO_BRANCHES = (("Shanghai Pudong Hall", "shanghai"), ("London Holborn Centre", "london"))
DEMO_ROLES = (("manager", DEMO_MANAGER_PASSWORD), ("staff", DEMO_STAFF_PASSWORD))


@dataclass
class DemoAccount:
    role: str
    email: str
    password: str


@dataclass
class DemoBranch:
    name: str
    timezone: str
    branch_id: int
    accounts: list[DemoAccount]
    kiosk_device_id: int
    kiosk_secret: str | None
    """Only when the kiosk was made by this call: the secret is stored hashed."""


@dataclass
class DemoCredentials:
    admin_email: str
    admin_password: str
    branches: list[DemoBranch] = field(default_factory=list)


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


async def _demo_people(conn: Conn, creds: DemoCredentials) -> None:
    """A kiosk, a manager and a staff member for each demo branch that lacks them, so
    that older demo installs get them on their next start."""
    for name, key in DEMO_BRANCHES:
        branch = await conn.fetchrow("SELECT id, timezone FROM branches WHERE name = $1", name)
        if branch is None:
            continue
        bid = branch["id"]
        accounts: list[DemoAccount] = []
        for role, password in DEMO_ROLES:
            email = f"{role}.{key}@selfserve.local"
            accounts.append(DemoAccount(role, email, password))
            exists = await conn.fetchval(
                "SELECT 1 FROM staff WHERE lower(email) = lower($1)", email
            )
            if exists:
                continue
            staff_id = await conn.fetchval(
                "INSERT INTO staff (email, name, password_hash, role) "
                "VALUES ($1, $2, $3, $4) RETURNING id",
                email,
                f"{key.title()} {role}",
                hash_password(password),
                role,
            )
            await conn.execute(
                "INSERT INTO staff_branches (staff_id, branch_id) VALUES ($1, $2)", staff_id, bid
            )
        device_id = await conn.fetchval(
            "SELECT min(id) FROM devices WHERE branch_id = $1 AND name = $2",
            bid,
            DEMO_KIOSK_NAME,
        )
        secret = None
        if device_id is None:
            secret = secrets.token_urlsafe(24)
            device_id = await conn.fetchval(
                "INSERT INTO devices (branch_id, name, kind, secret_hash) "
                "VALUES ($1, $2, 'kiosk', $3) RETURNING id",
                bid,
                DEMO_KIOSK_NAME,
                hash_secret(secret),
            )
        creds.branches.append(
            DemoBranch(name, branch["timezone"], bid, accounts, device_id, secret)
        )


async def load_demo(conn: Conn) -> DemoCredentials:
    """Insert demo branches, services, resources, shifts, a kiosk, a manager and a staff
    member per branch, and an admin, once; what an older install lacks is added."""
    creds = DemoCredentials(DEMO_ADMIN_EMAIL, DEMO_ADMIN_PASSWORD)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(7305822914002)")
        existing = await conn.fetchval(
            "SELECT id FROM branches WHERE name = 'Shanghai Pudong Hall'"
        )
        if existing is None:
            await _demo_catalogue(conn)
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
        # Data made before queues, London's kiosk or the staff accounts existed gets them.
        await _demo_queues(conn)
        await _demo_people(conn, creds)
    return creds


async def _demo_catalogue(conn: Conn) -> None:
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


def kiosk_secrets(known: dict[str, object], creds: DemoCredentials) -> dict[str, str]:
    """The kiosk secrets to keep (device id -> secret): those kept before (`known`, the
    content of the credentials file; an older file has Shanghai's alone, as
    `kiosk_secret`) and those made now."""
    kept: dict[str, str] = {}
    kiosks = known.get("kiosks")
    if isinstance(kiosks, dict):
        kept.update({str(k): str(v) for k, v in kiosks.items()})
    legacy = known.get("kiosk_secret")
    if isinstance(legacy, str) and creds.branches:
        kept.setdefault(str(creds.branches[0].kiosk_device_id), legacy)
    for branch in creds.branches:
        if branch.kiosk_secret is not None:
            kept[str(branch.kiosk_device_id)] = branch.kiosk_secret
    return kept


def credentials_text(creds: DemoCredentials, secrets_by_device: dict[str, str]) -> str:
    """What `selfserve dev` prints about the demo accounts and kiosks."""
    lines = [f"  admin:      {creds.admin_email} / {creds.admin_password}"]
    for branch in creds.branches:
        lines.append(f"  {branch.name} ({branch.timezone}, branch_id {branch.branch_id}):")
        for account in branch.accounts:
            label = f"{account.role}:"
            lines.append(f"    {label:<10}{account.email} / {account.password}")
        secret = secrets_by_device.get(
            str(branch.kiosk_device_id), "<lost: demo-credentials.json is gone>"
        )
        lines.append(f"    {'kiosk:':<10}device_id {branch.kiosk_device_id} / secret {secret}")
    return "\n".join(lines)
