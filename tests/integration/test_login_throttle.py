"""Staff login under attack, against real PostgreSQL and Redis: growing delays per
account and per client address, a real user at a known-good address is not locked
out, and password hashing runs off the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis
from litestar import Litestar

from selfserve.app import create_app
from selfserve.auth import passwords, throttle
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import PASSWORD, make_staff

PER_ACCOUNT, PER_CLIENT, CAP_S = 3, 10, 4


@pytest.fixture(scope="module")
def app(module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis) -> Litestar:
    settings = settings_with(
        module_env,
        login_failures_per_account=PER_ACCOUNT,
        login_failures_per_client=PER_CLIENT,
        login_delay_cap_s=CAP_S,
    )
    return create_app(settings, pool=pool, redis=redis)


@asynccontextmanager
async def from_address(app: Litestar, address: str) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver.local") as c:
        yield c


async def attempt(client: httpx.AsyncClient, email: str, password: str) -> httpx.Response:
    return await client.post("/v1/auth/staff/login", json={"email": email, "password": password})


async def expire_delay(redis: ArqRedis, key: str) -> None:
    """What waiting out the delay does (the lock key expires), without waiting."""
    assert await redis.pttl(key) > 0
    await redis.delete(key)


async def test_an_account_gets_growing_delays_but_its_known_address_still_signs_in(
    app: Litestar, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    email = await make_staff(pool, "staff")
    desk, attacker = "198.51.100.10", "203.0.113.66"
    keys = throttle.keys(email, attacker)
    async with from_address(app, desk) as clerk, from_address(app, attacker) as evil:
        assert (await attempt(clerk, email, PASSWORD)).status_code == 200  # a known address

        for _ in range(PER_ACCOUNT):
            resp = await attempt(evil, email, "wrong password")
            assert (resp.status_code, resp.json()["code"]) == (401, "invalid_credentials")
        # Delays now: 1 s, then 2, 4, capped at CAP_S, each failure doubling it.
        seen = []
        for _ in range(4):
            refused = await attempt(evil, email, PASSWORD)  # even the right password
            assert (refused.status_code, refused.json()["code"]) == (429, "login_throttled")
            seen.append(int(refused.headers["retry-after"]))
            await expire_delay(redis, keys.account_lock)
            assert (await attempt(evil, email, "wrong again")).status_code == 401
        assert seen == [1, 2, 4, CAP_S]

        # The clerk at the known desk is not held by the account's delay ...
        assert await redis.pttl(keys.account_lock) > 0
        resp = await attempt(clerk, email, PASSWORD)
        assert resp.status_code == 200, resp.text
        # ... and a success clears the account's failures for everyone.
        assert await redis.pttl(keys.account_lock) < 0
        assert (await attempt(evil, email, "wrong")).status_code == 401

    # An unknown account is throttled the same way (nothing tells them apart).
    async with from_address(app, "203.0.113.67") as evil:
        ghost = "nobody@example.test"
        answers = [(await attempt(evil, ghost, "x")).status_code for _ in range(PER_ACCOUNT + 1)]
        assert answers == [401] * PER_ACCOUNT + [429]


async def test_an_address_spraying_many_accounts_is_delayed_alone(
    app: Litestar, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    email = await make_staff(pool, "staff")
    sprayer, other = "203.0.113.77", "198.51.100.20"
    async with from_address(app, sprayer) as evil, from_address(app, other) as fine:
        # Different accounts each time: no account reaches its own limit.
        for i in range(PER_CLIENT):
            resp = await attempt(evil, f"guess{i}@example.test", "password1")
            assert resp.status_code == 401, resp.text
        refused = await attempt(evil, email, PASSWORD)
        assert (refused.status_code, refused.json()["code"]) == (429, "login_throttled")
        assert int(refused.headers["retry-after"]) == 1
        # Another address signs in to the same account at once.
        assert (await attempt(fine, email, PASSWORD)).status_code == 200
        keys = throttle.keys(email, sprayer)
        await expire_delay(redis, keys.client_lock)
        assert (await attempt(evil, "guess-more@example.test", "password1")).status_code == 401
        refused = await attempt(evil, email, PASSWORD)
        assert (refused.status_code, int(refused.headers["retry-after"])) == (429, 2)


async def test_health_answers_while_a_password_is_being_hashed(
    app: Litestar, pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The login's hash is held in progress until /health has answered: were the hash
    on the event loop, /health could not answer and the hash would give up waiting."""
    email = await make_staff(pool, "staff")
    started, release = threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    real = passwords.verify_password

    def instrumented(stored_hash: str | None, password: str) -> bool:
        seen["thread"] = threading.current_thread().name
        started.set()
        seen["released"] = release.wait(timeout=20)  # a bound so a broken build fails
        return real(stored_hash, password)

    monkeypatch.setattr(passwords, "verify_password", instrumented)
    async with from_address(app, "198.51.100.30") as client:
        login = asyncio.create_task(attempt(client, email, PASSWORD))
        assert await asyncio.to_thread(started.wait, 20)
        health = await client.get("/health")
        assert health.status_code == 200
        release.set()
        resp = await login
    assert resp.status_code == 200, resp.text
    assert seen["released"] is True  # /health answered while the hash was in progress
    assert str(seen["thread"]).startswith("argon2")
    assert seen["thread"] != threading.current_thread().name
