from __future__ import annotations

import asyncpg
from httpx import AsyncClient

from tests.helpers import bearer, create_branch, create_service, login, make_staff


async def test_health_and_ready(client: AsyncClient) -> None:
    assert (await client.get("/health")).json() == {"status": "ok"}
    ready = await client.get("/ready")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"postgres": "ok", "redis": "ok"}


async def test_admin_creates_branch_and_service(client: AsyncClient, pool: asyncpg.Pool) -> None:
    token = await login(client, await make_staff(pool, "admin"))
    branch = await create_branch(client, token)
    service = await create_service(client, token, branch["id"])
    listed = await client.get(f"/v1/branches/{branch['id']}/services")
    assert [s["id"] for s in listed.json()["items"]] == [service["id"]]
    res = await client.post(
        "/v1/admin/resources",
        json={
            "branch_id": branch["id"],
            "kind": "counter",
            "name": "C1",
            "skills": [service["id"]],
        },
        headers=bearer(token),
    )
    assert res.status_code == 201, res.text
    assert res.json()["skills"] == [service["id"]]
