"""Helpers shared by tests: accounts, tokens and common records made through the API."""

from __future__ import annotations

import itertools
from typing import Any

import asyncpg
from httpx import AsyncClient

from selfserve.auth.passwords import hash_password

_seq = itertools.count(1)
PASSWORD = "correct horse battery"


async def make_staff(
    pool: asyncpg.Pool, role: str, branch_ids: list[int] | None = None, email: str | None = None
) -> str:
    email = email or f"{role}{next(_seq)}@example.test"
    async with pool.acquire() as conn, conn.transaction():
        sid = await conn.fetchval(
            "INSERT INTO staff (email, name, password_hash, role) VALUES ($1, $2, $3, $4) "
            "RETURNING id",
            email,
            role.title(),
            hash_password(PASSWORD),
            role,
        )
        for b in branch_ids or []:
            await conn.execute(
                "INSERT INTO staff_branches (staff_id, branch_id) VALUES ($1, $2)", sid, b
            )
    return email


async def login(client: AsyncClient, email: str, password: str = PASSWORD) -> str:
    resp = await client.post("/v1/auth/staff/login", json={"email": email, "password": password})
    assert resp.status_code == 200, resp.text
    token: str = resp.json()["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


BRANCH = {
    "name": "Test Hall",
    "timezone": "Asia/Shanghai",
    "address": "1 Test Road",
    "opening_hours": [{"weekday": 1, "opens": "09:00", "closes": "17:00"}],
    "closures": [{"date": "2027-01-01", "reason": "New Year"}],
}


async def create_branch(client: AsyncClient, token: str, **overrides: Any) -> dict[str, Any]:
    resp = await client.post(
        "/v1/admin/branches", json={**BRANCH, **overrides}, headers=bearer(token)
    )
    assert resp.status_code == 201, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def create_service(
    client: AsyncClient, token: str, branch_id: int, **overrides: Any
) -> dict[str, Any]:
    body = {"branch_id": branch_id, "name": "Accounts", "duration_min": 30, **overrides}
    resp = await client.post("/v1/admin/services", json=body, headers=bearer(token))
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out
