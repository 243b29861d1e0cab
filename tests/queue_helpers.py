"""Shared by the queue tests: a branch with queues and counters, tokens for its kiosk,
staff and customers, and ticket calls through the HTTP API."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from selfserve.auth.tokens import Principal, issue_access_token
from tests.conftest import ModuleEnv
from tests.helpers import bearer

_seq = itertools.count(1)
ALL_DAY = [{"weekday": d, "opens": "00:00", "closes": "24:00"} for d in range(1, 8)]


@dataclass
class Hall:
    branch_id: int
    services: list[int]
    queues: dict[str, int]
    counters: list[int]
    kiosk: str
    staff: str
    customers: list[tuple[int, str, str]] = field(default_factory=list)


def token(
    env: ModuleEnv, kind: str, id_: int, role: str, channel: str, branches: tuple[int, ...]
) -> str:
    return issue_access_token(
        env.settings,
        Principal(kind=kind, id=id_, role=role, channel=channel, branches=branches),  # type: ignore[arg-type]
    )


async def hall(
    pool: asyncpg.Pool,
    env: ModuleEnv,
    *,
    timezone: str = "Asia/Shanghai",
    opening_hours: list[dict[str, Any]] | None = None,
    durations: tuple[int, ...] = (10,),
    counters: int = 2,
    counter_skills: list[list[int]] | None = None,
) -> Hall:
    """A branch with one service per duration, queue "A" covering the first service
    (and "B" the second, if any), and `counters` counters skilled for every service
    (or per `counter_skills`, as indexes into the services)."""
    n = next(_seq)
    async with pool.acquire() as conn, conn.transaction():
        bid = await conn.fetchval(
            "INSERT INTO branches (name, timezone, opening_hours) VALUES ($1, $2, $3) RETURNING id",
            f"Hall {n}",
            timezone,
            ALL_DAY if opening_hours is None else opening_hours,
        )
        services = []
        for i, minutes in enumerate(durations):
            services.append(
                await conn.fetchval(
                    "INSERT INTO services (branch_id, name, duration_min) VALUES ($1, $2, $3) "
                    "RETURNING id",
                    bid,
                    f"Service {n}.{i}",
                    minutes,
                )
            )
        queues = {}
        for letter, sid in zip("AB", services, strict=False):
            qid = await conn.fetchval(
                "INSERT INTO queues (branch_id, name, prefix) VALUES ($1, $2, $3) RETURNING id",
                bid,
                f"Queue {letter}",
                letter,
            )
            await conn.execute(
                "INSERT INTO queue_services (queue_id, service_id) VALUES ($1, $2)", qid, sid
            )
            queues[letter] = qid
        counter_ids = []
        for c in range(counters):
            rid = await conn.fetchval(
                "INSERT INTO resources (branch_id, kind, name) VALUES ($1, 'counter', $2) "
                "RETURNING id",
                bid,
                f"{c + 1}",
            )
            skills = (
                [services[i] for i in counter_skills[c]] if counter_skills is not None else services
            )
            for sid in skills:
                await conn.execute(
                    "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)",
                    rid,
                    sid,
                )
            counter_ids.append(rid)
        did = await conn.fetchval(
            "INSERT INTO devices (branch_id, name, secret_hash) VALUES ($1, 'Kiosk', '\\x00') "
            "RETURNING id",
            bid,
        )
        staff_id = await conn.fetchval(
            "INSERT INTO staff (email, name, password_hash, role) "
            "VALUES ($1, 'Clerk', 'x', 'staff') RETURNING id",
            f"clerk{n}@example.test",
        )
        await conn.execute(
            "INSERT INTO staff_branches (staff_id, branch_id) VALUES ($1, $2)", staff_id, bid
        )
    return Hall(
        branch_id=bid,
        services=services,
        queues=queues,
        counters=counter_ids,
        kiosk=token(env, "device", did, "kiosk", "kiosk", (bid,)),
        staff=token(env, "staff", staff_id, "staff", "staff", (bid,)),
    )


async def customer(pool: asyncpg.Pool, env: ModuleEnv, locale: str = "en") -> tuple[int, str, str]:
    phone = f"+86139{next(_seq):08d}"
    cid = await pool.fetchval(
        "INSERT INTO customers (phone, locale) VALUES ($1, $2) RETURNING id", phone, locale
    )
    return cid, phone, token(env, "customer", cid, "customer", "app", ())


async def take(client: httpx.AsyncClient, tok: str, queue_id: int, **body: Any) -> dict[str, Any]:
    resp = await client.post(
        "/v1/tickets", json={"queue_id": queue_id, **body}, headers=bearer(tok)
    )
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def staff_post(client: httpx.AsyncClient, h: Hall, path: str, **body: Any) -> httpx.Response:
    return await client.post(path, json=body or None, headers=bearer(h.staff))


async def open_counters(
    client: httpx.AsyncClient, h: Hall, counters: list[int] | None = None
) -> None:
    for cid in counters if counters is not None else h.counters:
        resp = await staff_post(client, h, f"/v1/counters/{cid}/open")
        assert resp.status_code == 200, resp.text
