"""Customer sign-in by SMS code, through the real app, PostgreSQL and Redis."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import asyncpg
import httpx
import jwt
import msgspec
import pytest
from arq.connections import ArqRedis

from selfserve.app import create_app
from tests.conftest import ModuleEnv
from tests.helpers import bearer, login, make_staff

ClientFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@pytest.fixture
async def app_client(module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis) -> ClientFactory:
    await redis.flushdb()

    @asynccontextmanager
    async def make(peer: str = "203.0.113.7", **changes: Any) -> AsyncIterator[httpx.AsyncClient]:
        settings = msgspec.structs.replace(module_env.settings, **changes)
        app = create_app(settings, pool=pool, redis=redis)
        transport = httpx.ASGITransport(app=app, client=(peer, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c

    return make


_numbers = iter(range(10_000_000, 99_999_999))


def new_phone() -> str:
    return f"+86139{next(_numbers):08d}"


async def texted_code(pool: asyncpg.Pool, phone: str) -> str:
    body = await pool.fetchval(
        "SELECT body FROM messages WHERE phone = $1 AND template = 'sign_in_code' "
        "ORDER BY id DESC LIMIT 1",
        phone,
    )
    assert body is not None
    match = re.search(r"\d{6}", body)
    assert match is not None
    return match.group(0)


async def ask(c: httpx.AsyncClient, phone: str, **headers: str) -> httpx.Response:
    return await c.post("/v1/auth/otp", json={"phone": phone}, headers=headers)


async def exchange(
    c: httpx.AsyncClient, phone: str, code: str, channel: str = "app"
) -> httpx.Response:
    return await c.post("/v1/auth/token", json={"phone": phone, "code": code, "channel": channel})


async def test_code_is_texted_and_exchanged_once(
    app_client: ClientFactory, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    phone = new_phone()
    async with app_client() as c:
        sent = await ask(c, phone.replace("+86", "+86 "))  # spaces are normalised away
        assert sent.status_code == 202, sent.text
        assert sent.json() == {"expires_in": 300}
        message = await pool.fetchrow(
            "SELECT time_critical, locale, status FROM messages WHERE phone = $1", phone
        )
        assert message is not None
        assert message["time_critical"] is True
        assert message["status"] == "pending"
        code = await texted_code(pool, phone)
        stored = await pool.fetchval("SELECT code_hash FROM otp_codes WHERE phone = $1", phone)
        # an HMAC-SHA256 of phone and code under the server's secret, never the code itself
        key = module_env.settings.jwt_secret.encode()
        expected = hmac.new(key, f"otp:{phone}:{code}".encode(), hashlib.sha256).digest()
        assert bytes(stored) == expected

        tokens = await exchange(c, phone, code, channel="mini_program")
        assert tokens.status_code == 200, tokens.text
        claims = jwt.decode(tokens.json()["access_token"], options={"verify_signature": False})
        assert claims["role"] == "customer"
        assert claims["channel"] == "mini_program"
        me = await c.get("/v1/me", headers=bearer(tokens.json()["access_token"]))
        assert me.status_code == 200
        assert me.json()["phone"] == phone
        assert me.json()["sms_opted_out"] is False

        reused = await exchange(c, phone, code)
        assert reused.status_code == 401
        assert reused.json()["code"] == "invalid_code"
        # The refresh token rotates like any other.
        refreshed = await c.post(
            "/v1/auth/refresh", json={"refresh_token": tokens.json()["refresh_token"]}
        )
        assert refreshed.status_code == 200
        assert refreshed.json()["channel"] == "mini_program"


async def test_wrong_expired_and_sixth_try(app_client: ClientFactory, pool: asyncpg.Pool) -> None:
    async with app_client(otp_resend_after_s=1) as c:
        phone = new_phone()
        await ask(c, phone)
        code = await texted_code(pool, phone)
        wrong = "000000" if code != "000000" else "111111"
        for _ in range(5):
            resp = await exchange(c, phone, wrong)
            assert resp.status_code == 401
            assert resp.json()["code"] == "invalid_code"
        sixth = await exchange(c, phone, code)  # right, but too late
        assert sixth.status_code == 401
        assert sixth.json()["code"] == "code_locked"
        assert await pool.fetchval("SELECT attempts FROM otp_codes WHERE phone = $1", phone) == 5

        other = new_phone()
        await ask(c, other)
        code = await texted_code(pool, other)
        await pool.execute(
            "UPDATE otp_codes SET expires_at = now() - interval '1 second' WHERE phone = $1", other
        )
        expired = await exchange(c, other, code)
        assert expired.status_code == 401
        assert expired.json()["code"] == "code_expired"


async def test_a_new_code_retires_the_old_one(
    app_client: ClientFactory, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    phone = new_phone()
    async with app_client() as c:
        await ask(c, phone)
        first = await texted_code(pool, phone)
        # ask again until the new code differs (two equal draws in a row are one in 10^6)
        for _ in range(3):
            await redis.delete(f"selfserve:rl:otp-phone-burst:{phone}")
            assert (await ask(c, phone)).status_code == 202
            second = await texted_code(pool, phone)
            if second != first:
                break
        assert second != first
        refused = await exchange(c, phone, first)
        assert (refused.status_code, refused.json()["code"]) == (401, "invalid_code")
        assert (await exchange(c, phone, second)).status_code == 200


async def test_phone_limits_answer_429_with_retry_after(
    app_client: ClientFactory, redis: ArqRedis
) -> None:
    phone = new_phone()
    async with app_client() as c:
        assert (await ask(c, phone)).status_code == 202
        again = await ask(c, phone)
        assert again.status_code == 429
        assert again.json()["code"] == "rate_limited"
        assert 1 <= int(again.headers["retry-after"]) <= 60
    async with app_client(otp_per_phone_hour=2, otp_resend_after_s=1) as c:
        phone = new_phone()
        for _ in range(2):
            assert (await ask(c, phone)).status_code == 202
            await redis.delete(f"selfserve:rl:otp-phone-burst:{phone}")
        third = await ask(c, phone)
        assert third.status_code == 429
        assert int(third.headers["retry-after"]) > 60


async def test_client_address_limit_ignores_forged_forwarded_for(app_client: ClientFactory) -> None:
    async with app_client(peer="198.51.100.9", otp_per_client_hour=2) as c:
        for _ in range(2):
            assert (await ask(c, new_phone(), **{"X-Forwarded-For": "1.2.3.4"})).status_code == 202
        # A forged header from an untrusted peer does not buy a new allowance.
        blocked = await ask(c, new_phone(), **{"X-Forwarded-For": "5.6.7.8"})
        assert blocked.status_code == 429


async def test_trusted_proxy_forwards_the_real_client(app_client: ClientFactory) -> None:
    async with app_client(
        peer="10.0.0.2", otp_per_client_hour=1, trusted_proxies=("10.0.0.0/8",)
    ) as c:
        assert (
            await ask(c, new_phone(), **{"X-Forwarded-For": "192.0.2.1, 10.0.0.3"})
        ).status_code == 202
        assert (await ask(c, new_phone(), **{"X-Forwarded-For": "192.0.2.1"})).status_code == 429
        assert (await ask(c, new_phone(), **{"X-Forwarded-For": "192.0.2.2"})).status_code == 202


async def test_daily_budget_fails_closed(app_client: ClientFactory, pool: asyncpg.Pool) -> None:
    async with app_client(sms_daily_budget=0) as c:
        phone = new_phone()
        resp = await ask(c, phone)
        assert resp.status_code == 429
        assert await pool.fetchval("SELECT count(*) FROM otp_codes WHERE phone = $1", phone) == 0


async def test_redis_down_refuses_rather_than_texts(
    module_env: ModuleEnv, pool: asyncpg.Pool
) -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = ArqRedis(host="127.0.0.1", port=port, socket_connect_timeout=1)
    app = create_app(module_env.settings, pool=pool, redis=dead)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        phone = new_phone()
        resp = await ask(c, phone)
    await dead.aclose()
    assert resp.status_code == 503
    assert await pool.fetchval("SELECT count(*) FROM otp_codes WHERE phone = $1", phone) == 0


@pytest.mark.parametrize(
    ("phone", "field_message"),
    [
        ("13800138000", "international"),  # national format: no safe default region
        ("+86123", "not a valid"),
        ("+861065529988", "not a mobile"),  # Beijing landline
        ("hello", "international"),
    ],
)
async def test_bad_phones_are_422(
    app_client: ClientFactory, phone: str, field_message: str
) -> None:
    async with app_client() as c:
        resp = await ask(c, phone)
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "phone"
    assert field_message in resp.json()["errors"][0]["message"]


async def test_me_is_for_customers_only(app_client: ClientFactory, pool: asyncpg.Pool) -> None:
    async with app_client() as c:
        staff = await login(c, await make_staff(pool, "admin"))
        assert (await c.get("/v1/me", headers=bearer(staff))).status_code == 403
        assert (await c.get("/v1/me")).status_code == 401
