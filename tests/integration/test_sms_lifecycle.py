"""Inbound SMS, the outbox and delivery callbacks together, as they meet in production."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlencode

import asyncpg
import httpx
import msgspec
import pytest
from arq.connections import ArqRedis
from twilio.request_validator import RequestValidator

from selfserve.app import create_app
from tests.conftest import ModuleEnv
from tests.integration.test_outbox import drain, env, new_phone, queue, row, twilio
from tests.twilio_server import AUTH_TOKEN, FakeTwilio, Reply

__all__ = ["env", "twilio"]  # fixtures shared with the outbox tests
PUBLIC = "https://hall.example.com"


@pytest.fixture
async def hook(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> AsyncIterator[httpx.AsyncClient]:
    settings = msgspec.structs.replace(
        env.settings, public_base_url=PUBLIC, twilio_auth_token=AUTH_TOKEN
    )
    app = create_app(settings, pool=pool, redis=redis)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://internal"
    ) as c:
        yield c


_sid = iter(range(1, 1_000_000))


async def twilio_posts(c: httpx.AsyncClient, path: str, params: dict[str, str]) -> httpx.Response:
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC + path, params)
    return await c.post(
        path,
        content=urlencode(params),
        headers={
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )


async def reply_sms(c: httpx.AsyncClient, phone: str, body: str) -> httpx.Response:
    params = {
        "MessageSid": f"SMin{next(_sid):030d}",
        "From": phone,
        "To": "+10000000000",
        "Body": body,
    }
    return await twilio_posts(c, "/v1/webhooks/twilio/sms", params)


async def test_stop_then_a_reminder_sends_nothing_and_start_restores(
    env: ModuleEnv,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
    hook: httpx.AsyncClient,
) -> None:
    phone = new_phone()
    assert (await reply_sms(hook, phone, "STOP")).status_code == 200
    held_back = await queue(pool, redis, phone=phone)
    await drain(env, redis)
    assert twilio.creates == []
    skipped = await row(pool, held_back)
    assert (skipped["status"], skipped["error_message"]) == ("skipped", "opted_out")

    assert (await reply_sms(hook, phone, "start")).status_code == 200
    welcome_back = await queue(pool, redis, phone=phone)
    await drain(env, redis)
    assert len(twilio.sent_to(phone)) == 1
    assert (await row(pool, welcome_back))["status"] == "sent"
    assert (await row(pool, held_back))["status"] == "skipped"  # not resurrected


async def test_a_delivery_callback_that_beats_the_send_record_is_not_lost(
    env: ModuleEnv,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
    hook: httpx.AsyncClient,
) -> None:
    phone = new_phone()
    message_id = await queue(pool, redis, phone=phone)
    twilio.reply(Reply(hold=True))  # Twilio accepts, then is slow to answer us
    worker = asyncio.create_task(drain(env, redis))
    assert await asyncio.to_thread(twilio.held.wait, 10)
    [accepted] = twilio.sent_to(phone)

    # The delivery report arrives while our worker still waits for the create answer.
    early = await twilio_posts(
        hook,
        "/v1/webhooks/twilio/status",
        {"MessageSid": accepted["sid"], "MessageStatus": "delivered"},
    )
    assert early.status_code == 204
    assert (await row(pool, message_id))["status"] == "sending"

    twilio.release.set()
    await asyncio.wait_for(worker, 30)
    done = await row(pool, message_id)
    assert (done["status"], done["provider_sid"]) == ("delivered", accepted["sid"])
    assert await pool.fetchval("SELECT count(*) FROM sms_status_early") == 0
