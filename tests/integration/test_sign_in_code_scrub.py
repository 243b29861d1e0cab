"""A sign-in code does not stay in clear in its message row once the provider has it
(or never will): real PostgreSQL, Redis, arq workers and the local Twilio server,
with the outbox tests' fixtures and helpers."""

from __future__ import annotations

import asyncio

import asyncpg
from arq.connections import ArqRedis

from selfserve.db import transaction
from selfserve.messaging.service import enqueue_after_commit, queue_template
from tests.conftest import ModuleEnv
from tests.integration.test_outbox import (  # fixtures: env (autouse), twilio
    PAST,
    drain,
    env,
    expire_claim,
    kill_job_when,
    new_phone,
    row,
    sweep,
    twilio,
)
from tests.twilio_server import FakeTwilio, Reply

__all__ = ["env", "twilio"]  # fixtures used by name

CODE = "493817"


async def code_message(pool: asyncpg.Pool, redis: ArqRedis, phone: str) -> int:
    async with transaction(pool) as conn:
        message_id = await queue_template(
            conn,
            "sign_in_code",
            "en",
            {"code": CODE, "minutes": 5},
            phone=phone,
            send_at=PAST,
            dedupe_key=f"otp-scrub:{phone}",
            time_critical=True,
        )
    assert message_id is not None
    assert await enqueue_after_commit(redis, [message_id], PAST) == 1
    return message_id


async def test_the_code_is_masked_once_twilio_accepted_it(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await code_message(pool, redis, phone)
    assert CODE in (await row(pool, mid))["body"]  # the worker needs it to send

    await drain(env, redis)

    [sent] = twilio.sent_to(phone)
    assert CODE in sent["body"]  # the customer got the code
    r = await row(pool, mid)
    assert r["status"] == "sent"
    assert CODE not in r["body"]
    assert "******" in r["body"]
    assert "5 minutes" in r["body"]  # only the code is masked


async def test_a_code_that_will_never_be_sent_is_masked_too(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await code_message(pool, redis, phone)
    twilio.reply(Reply(400, code=21211, message="not a valid phone number"))

    await drain(env, redis)

    r = await row(pool, mid)
    assert r["status"] == "failed"
    assert CODE not in r["body"]


async def test_a_crash_after_twilio_accepted_is_resolved_then_masked(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    """Twilio took the message, the worker died before recording it: the row keeps the
    code until the next claim has found the sent text at Twilio (it compares bodies),
    sends nothing more, and masks it."""
    phone = new_phone()
    mid = await code_message(pool, redis, phone)
    twilio.reply(Reply(hold=True))
    held = twilio.held

    async def at_twilio() -> None:
        assert await asyncio.to_thread(held.wait, 10)

    await kill_job_when(env, mid, at_twilio)
    twilio.release.set()
    r = await row(pool, mid)
    assert (r["status"], CODE in r["body"]) == ("sending", True)

    await expire_claim(pool, mid)
    assert await sweep(pool, redis) == 1
    await drain(env, redis)

    assert len(twilio.sent_to(phone)) == 1  # found at Twilio, not sent again
    assert len(twilio.lookups) == 1
    r = await row(pool, mid)
    assert r["status"] == "sent"
    assert CODE not in r["body"]


async def test_a_code_past_its_deadline_is_masked_whoever_expires_it(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    """Expired by the send job that claims it, or by the sweep after an outage: never
    sent, and not kept in clear either."""
    by_job, by_sweep = new_phone(), new_phone()
    job_mid = await code_message(pool, redis, by_job)
    await redis.flushdb()  # the second one's job is lost: only the sweep will meet it
    sweep_mid = await code_message(pool, redis, by_sweep)
    await redis.flushdb()
    assert await enqueue_after_commit(redis, [job_mid], PAST) == 1
    await pool.execute(
        "UPDATE messages SET expires_at = now() - interval '1 second' WHERE id = ANY($1)",
        [job_mid, sweep_mid],
    )

    await drain(env, redis)
    await sweep(pool, redis)

    assert twilio.sent_to(by_job) == twilio.sent_to(by_sweep) == []
    for mid in (job_mid, sweep_mid):
        r = await row(pool, mid)
        assert r["status"] == "expired"
        assert CODE not in r["body"]
        assert "******" in r["body"]
