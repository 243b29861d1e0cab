"""Shared by the booking tests: a seeded branch open around the clock, customers and
kiosks with tokens, availability and booking calls, the ledger invariant."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx

from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.messaging.inbound import handle_inbound
from selfserve.scheduling import ledger
from selfserve.settings import Settings
from tests.conftest import ModuleEnv
from tests.helpers import bearer

_seq = itertools.count(1)
ALL_WEEK = [{"weekday": d, "opens": "00:00", "closes": "24:00"} for d in range(1, 8)]


def at_hour(days: float, hour_offset: int = 0) -> datetime:
    """A slot start on the 30-minute grid, `days` from now (whole UTC hours)."""
    base = datetime.now(UTC) + timedelta(days=days)
    return base.replace(minute=0, second=0, microsecond=0) + timedelta(hours=hour_offset + 1)


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def seed(
    pool: asyncpg.Pool,
    *,
    capacity: int = 1,
    resources: int = 1,
    deposit: int = 0,
    cancellation_window_min: int = 0,
    max_party: int = 4,
) -> tuple[int, int, list[int]]:
    """A branch open around the clock, a 30-minute service on a 30-minute grid, and
    `resources` counters with the skill on shift all week."""
    n = next(_seq)
    async with pool.acquire() as conn, conn.transaction():
        bid = await conn.fetchval(
            "INSERT INTO branches (name, timezone, opening_hours) "
            "VALUES ($1, 'Asia/Shanghai', $2) RETURNING id",
            f"Hall {n}",
            ALL_WEEK,
        )
        sid = await conn.fetchval(
            "INSERT INTO services (branch_id, name, duration_min, slot_interval_min, "
            "price_minor, deposit_minor, max_party, cancellation_window_min) "
            "VALUES ($1, $2, 30, 30, $3, $3, $4, $5) RETURNING id",
            bid,
            f"Service {n}",
            deposit,
            max_party,
            cancellation_window_min,
        )
        rids = []
        for i in range(resources):
            rid = await conn.fetchval(
                "INSERT INTO resources (branch_id, kind, name, capacity) "
                "VALUES ($1, 'room', $2, $3) RETURNING id",
                bid,
                f"Room {n}.{i}",
                capacity,
            )
            await conn.execute(
                "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)", rid, sid
            )
            for day in range(1, 8):
                await conn.execute(
                    "INSERT INTO schedules (resource_id, kind, weekday, start_minute, end_minute) "
                    "VALUES ($1, 'shift', $2, 0, 1440)",
                    rid,
                    day,
                )
            rids.append(rid)
    return bid, sid, rids


async def customer(pool: asyncpg.Pool, env: ModuleEnv, locale: str = "en") -> tuple[int, str, str]:
    """A customer row and an access token: (id, phone, token)."""
    phone = f"+86138{next(_seq):08d}"
    cid = await pool.fetchval(
        "INSERT INTO customers (phone, locale) VALUES ($1, $2) RETURNING id", phone, locale
    )
    token = issue_access_token(
        env.settings,
        Principal(kind="customer", id=cid, role="customer", channel="app", branches=()),
    )
    return cid, phone, token


async def kiosk(pool: asyncpg.Pool, env: ModuleEnv, branch_id: int) -> str:
    did = await pool.fetchval(
        "INSERT INTO devices (branch_id, name, secret_hash) VALUES ($1, 'Kiosk', '\\x00') "
        "RETURNING id",
        branch_id,
    )
    return issue_access_token(
        env.settings,
        Principal(kind="device", id=did, role="kiosk", channel="kiosk", branches=(branch_id,)),
    )


async def slots(
    client: httpx.AsyncClient, bid: int, sid: int, start: datetime, end: datetime, party: int = 1
) -> list[dict[str, Any]]:
    resp = await client.get(
        "/v1/availability",
        params={
            "branch_id": bid,
            "service_id": sid,
            "from": iso(start),
            "to": iso(end),
            "party_size": party,
        },
    )
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["items"]
    return items


async def remaining(client: httpx.AsyncClient, bid: int, sid: int, start: datetime) -> int:
    found = await slots(client, bid, sid, start, start + timedelta(minutes=1))
    return found[0]["remaining"] if found else 0


async def book(
    client: httpx.AsyncClient,
    token: str,
    bid: int,
    sid: int,
    start: datetime,
    *,
    key: str | None = None,
    **extra: Any,
) -> httpx.Response:
    headers = bearer(token)
    if key is not None:
        headers["Idempotency-Key"] = key
    body = {"branch_id": bid, "service_id": sid, "start": iso(start), **extra}
    return await client.post("/v1/bookings", json=body, headers=headers)


async def invariant_holds(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        assert await ledger.overbooked(conn) == []


async def messages_of(pool: asyncpg.Pool, booking_id: int) -> dict[str, datetime]:
    rows = await pool.fetch(
        "SELECT dedupe_key, send_at FROM messages WHERE dedupe_key LIKE $1",
        f"booking:{booking_id}:%",
    )
    return {r["dedupe_key"].split(":")[2]: r["send_at"] for r in rows}


_sids = itertools.count(1)


async def sms(pool: asyncpg.Pool, phone: str, body: str, settings: Settings | None = None) -> str:
    return await handle_inbound(
        pool,
        message_sid=f"SMbooking{next(_sids):024d}",
        phone=phone,
        to="+15005550006",
        body=body,
        settings=settings,
    )


async def mark_sent(pool: asyncpg.Pool, booking_id: int, kind: str) -> None:
    """The booking's pending `kind` message (`confirmation`, `reminder_24h`, ...) was
    sent now, as the worker records a send."""
    done = await pool.execute(
        "UPDATE messages SET status = 'sent', provider_sid = 'SMtest' || id, sent_at = now() "
        "WHERE dedupe_key LIKE $1 AND status = 'pending'",
        f"booking:{booking_id}:{kind}%",
    )
    assert done != "UPDATE 0", f"no pending {kind} message for booking {booking_id}"
