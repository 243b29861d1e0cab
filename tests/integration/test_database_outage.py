"""PostgreSQL unreachable: requests are answered at once with a 503 problem document
(`database_unavailable`, Retry-After), never a 500 and never a hang."""

from __future__ import annotations

import socket

import httpx
from arq.connections import ArqRedis

from selfserve import db
from selfserve.app import create_app
from tests.booking_helpers import at_hour, iso
from tests.conftest import ModuleEnv
from tests.helpers import bearer
from tests.queue_helpers import token


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # closed again: nothing listens there


async def test_a_database_that_cannot_be_reached_is_a_503(
    module_env: ModuleEnv, redis: ArqRedis
) -> None:
    dead = await db.create_pool(
        f"postgresql://postgres@127.0.0.1:{_dead_port()}/x", min_size=0, max_size=2
    )
    app = create_app(module_env.settings, pool=dead, redis=redis)
    customer = token(module_env, "customer", 1, "customer", "app", ())
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t"
        ) as c:
            answers = [
                await c.post(
                    "/v1/bookings",
                    json={"branch_id": 1, "service_id": 1, "start": iso(at_hour(2))},
                    headers=bearer(customer),
                ),
                await c.get("/v1/branches"),
                await c.post("/v1/tickets", json={"queue_id": 1}, headers=bearer(customer)),
            ]
    finally:
        await dead.close()
    for resp in answers:
        assert resp.status_code == 503, resp.text
        assert resp.headers["content-type"].startswith("application/problem+json")
        assert resp.headers["retry-after"] == "2"
        assert resp.json()["code"] == "database_unavailable"
