"""The SMS outbox end to end: real PostgreSQL, real Redis and arq workers, the real
`twilio` library talking to a local Twilio-compatible server that counts requests.

Time is controlled, never slept on: rows are made due by moving `send_at`, queued
jobs by moving their score in arq's queue, and quiet hours by the worker's clock.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from zoneinfo import ZoneInfo

import asyncpg
import pytest
from arq.connections import ArqRedis, RedisSettings
from arq.constants import default_queue_name
from arq.worker import Worker
from redis.exceptions import ConnectionError as RedisConnectionError

from selfserve import worker as worker_module
from selfserve.db import transaction
from selfserve.messaging.models import SendReceipt, SmsRequest
from selfserve.messaging.service import (
    MAX_SEND_ATTEMPTS,
    backoff_s,
    cancel_messages,
    enqueue_after_commit,
    job_id,
    queue_message,
    reschedule_messages,
    sweep_outbox,
)
from selfserve.messaging.transport import SmsTransport
from selfserve.settings import load_settings
from tests.conftest import ModuleEnv
from tests.twilio_server import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio, Reply

QUEUE = default_queue_name
STATUS_CALLBACK = "http://testserver.local/v1/webhooks/twilio/status"
LEASE_S = 300
# Daytime in both demo zones (17:00 Shanghai, 10:00 London): no quiet hours.
DAYTIME = datetime(2026, 6, 1, 9, 0, tzinfo=UTC)
PAST = datetime(2026, 1, 1, tzinfo=UTC)
_seq = itertools.count(1)


# --- fixtures and helpers ------------------------------------------------------


@pytest.fixture(scope="module")
def twilio() -> Iterator[FakeTwilio]:
    server = FakeTwilio().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
async def env(
    module_env: ModuleEnv,
    twilio: FakeTwilio,
    redis: ArqRedis,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[ModuleEnv]:
    """What a worker process would see, pointed at the local Twilio; Redis empty."""
    values = {
        "DATABASE_URL": module_env.database_url,
        "REDIS_URL": module_env.redis_url,
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "SELFSERVE_TWILIO_FROM": FROM_NUMBER,
        "SELFSERVE_TWILIO_API_BASE_URL": twilio.base_url,
        "SELFSERVE_PUBLIC_BASE_URL": "http://testserver.local",
        "SELFSERVE_LOG_LEVEL": "WARNING",
        "SELFSERVE_QUIET_HOURS_START": "21:00",
        "SELFSERVE_QUIET_HOURS_END": "08:00",
        "SELFSERVE_QUIET_HOURS_TZ": "Asia/Shanghai",
        "SELFSERVE_SMS_SEND_LEASE": str(LEASE_S),
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    twilio.reset()
    await redis.flushdb()
    yield module_env
    twilio.release.set()


Wrap = Callable[[SmsTransport], SmsTransport]


def startup_with(
    clock: datetime | None = DAYTIME, wrap: Wrap | None = None
) -> Callable[[dict[str, Any]], Awaitable[None]]:
    """The production worker startup, then a fixed clock and an optional wrapper."""

    async def startup(ctx: dict[str, Any]) -> None:
        await worker_module.startup(ctx)
        if clock is not None:
            ctx["clock"] = lambda: clock
        if wrap is not None:
            ctx["sms"] = wrap(ctx["sms"])

    return startup


def make_worker(
    env: ModuleEnv,
    startup: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    **kwargs: Any,
) -> Worker:
    return Worker(
        functions=worker_module.WorkerSettings.functions,
        on_startup=startup or startup_with(),
        on_shutdown=worker_module.shutdown,
        redis_settings=RedisSettings.from_dsn(env.redis_url),
        burst=True,
        poll_delay=0,
        max_jobs=10,
        handle_signals=False,
        **kwargs,
    )


@dataclass
class Ran:
    complete: int = 0
    retried: int = 0
    failed: int = 0


def now_ms() -> float:
    return time.time() * 1000


async def drain(
    env: ModuleEnv,
    redis: ArqRedis,
    startup: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
) -> Ran:
    """Run every job that is due now, and those they make due now, then stop.

    A burst worker waits for deferred jobs too, so each round runs exactly as many
    jobs as are due; deferred ones stay queued for the test to inspect."""
    ran = Ran()
    for _ in range(20):
        # arq rounds a job's score to the nearest millisecond: allow for that.
        due = await redis.zcount(QUEUE, "-inf", now_ms() + 5)
        if not due:
            return ran
        w = make_worker(env, startup, max_burst_jobs=due)
        try:
            async with asyncio.timeout(30):
                await w.main()
        finally:
            await w.close()
        ran.complete += w.jobs_complete
        ran.retried += w.jobs_retried
        ran.failed += w.jobs_failed
    raise AssertionError("jobs kept coming due")


def new_phone() -> str:
    return f"+8613{next(_seq):09d}"


async def queue(
    pool: asyncpg.Pool,
    redis: ArqRedis | None = None,
    *,
    phone: str | None = None,
    body: str = "Reminder: your appointment is tomorrow at 09:30.",
    send_at: datetime = PAST,
    dedupe_key: str | None = None,
    branch_id: int | None = None,
    time_critical: bool = False,
    locale: str = "en",
    encoding: str = "GSM-7",
    expires_at: datetime | None = None,
) -> int:
    """One outbox row written in its own transaction, enqueued after commit."""
    async with transaction(pool) as conn:
        message_id = await queue_message(
            conn,
            phone=phone or new_phone(),
            body=body,
            segments=1,
            encoding=encoding,
            template="reminder",
            locale=locale,
            send_at=send_at,
            dedupe_key=dedupe_key or f"test:{next(_seq)}:reminder",
            branch_id=branch_id,
            time_critical=time_critical,
            expires_at=expires_at,
        )
    assert message_id is not None
    if redis is not None:
        assert await enqueue_after_commit(redis, [message_id], send_at) == 1
    return message_id


async def row(pool: asyncpg.Pool, message_id: int) -> asyncpg.Record:
    found = await pool.fetchrow("SELECT * FROM messages WHERE id = $1", message_id)
    assert found is not None
    return found


async def sweep(pool: asyncpg.Pool, redis: ArqRedis) -> int:
    return await sweep_outbox({"pool": pool, "redis": redis, "settings": load_settings()})


async def deferred_s(redis: ArqRedis, message_id: int) -> float:
    """How far in the future arq will run this message's job."""
    return (await job_due_at(redis, message_id) - datetime.now(UTC)).total_seconds()


async def job_due_at(redis: ArqRedis, message_id: int) -> datetime:
    """The instant arq will run this message's job (its score, whole milliseconds)."""
    score = await redis.zscore(QUEUE, job_id(message_id))
    assert score is not None, "the job is not queued"
    return datetime.fromtimestamp(score / 1000, UTC)


MS = timedelta(milliseconds=1)  # arq scores are whole milliseconds


async def make_due(pool: asyncpg.Pool, redis: ArqRedis, message_id: int) -> None:
    """The wait is over: the row and its queued job are due now."""
    await pool.execute(
        "UPDATE messages SET send_at = now() WHERE id = $1 AND status = 'pending'", message_id
    )
    assert await redis.zadd(QUEUE, {job_id(message_id): now_ms()}, xx=True, ch=True) == 1


async def expire_claim(pool: asyncpg.Pool, message_id: int) -> None:
    """The lease of a claim runs out (as if its worker died that long ago)."""
    await pool.execute(
        "UPDATE messages SET claimed_at = claimed_at - make_interval(secs => $2) WHERE id = $1",
        message_id,
        LEASE_S + 1.0,
    )


async def make_branch(pool: asyncpg.Pool, timezone: str) -> int:
    branch_id: int = await pool.fetchval(
        "INSERT INTO branches (name, timezone) VALUES ($1, $2) RETURNING id",
        f"Hall {timezone}",
        timezone,
    )
    return branch_id


# --- the request Twilio receives --------------------------------------------------


async def test_a_message_reaches_twilio_as_the_api_expects(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    body = "提醒：您明天 09:30 在人民路网点有预约。回复 Y 确认。"
    mid = await queue(pool, redis, phone=phone, body=body, locale="zh-CN", encoding="UCS-2")

    ran = await drain(env, redis)

    assert (ran.complete, ran.retried, ran.failed) == (1, 0, 0)
    [seen] = twilio.creates
    assert seen.path == f"/2010-04-01/Accounts/{ACCOUNT_SID}/Messages.json"
    assert seen.authorised
    assert seen.fields == {
        "To": phone,
        "From": FROM_NUMBER,
        "Body": body,
        "StatusCallback": STATUS_CALLBACK,
    }
    [accepted] = twilio.sent_to(phone)
    r = await row(pool, mid)
    assert r["status"] == "sent"
    assert r["provider_sid"] == accepted["sid"]
    assert r["provider_sid"].startswith("SM")
    assert r["attempts"] == 1
    assert r["sent_at"] is not None
    assert r["claimed_at"] is None
    assert (r["error_code"], r["error_message"]) == (None, None)
    assert twilio.lookups == []  # a first attempt asks nothing before sending


async def test_a_wrong_auth_token_is_refused_by_twilio_and_recorded(
    env: ModuleEnv,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TWILIO_AUTH_TOKEN", "not-the-token")
    mid = await queue(pool, redis)

    ran = await drain(env, redis)

    assert ran.retried == 0
    [seen] = twilio.creates
    assert not seen.authorised
    assert seen.status == 401
    r = await row(pool, mid)
    assert (r["status"], r["error_code"]) == ("failed", "20003")


# --- exactly once ------------------------------------------------------------------


async def test_the_same_job_enqueued_twice_is_sent_once(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    # arq refuses a second job under the same id while the first is queued...
    assert await enqueue_after_commit(redis, [mid], PAST) == 0
    # ...and a stray job under another id runs alongside it: the claim decides.
    assert await redis.enqueue_job("send_message", mid, _job_id="stray-duplicate") is not None

    ran = await drain(env, redis)

    assert ran.complete == 2
    assert len(twilio.creates) == 1
    assert len(twilio.sent_to(phone)) == 1
    r = await row(pool, mid)
    assert (r["status"], r["attempts"]) == ("sent", 1)
    # Running the job again after the send does nothing either.
    assert await redis.enqueue_job("send_message", mid, _job_id=job_id(mid)) is not None
    await drain(env, redis)
    assert len(twilio.creates) == 1


async def test_messages_pending_when_redis_is_flushed_are_swept_and_sent_once(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phones = [new_phone() for _ in range(5)]
    ids = [await queue(pool, redis, phone=p) for p in phones]
    later = await queue(pool, redis, send_at=datetime.now(UTC) + timedelta(hours=3))
    # While the jobs are queued, the sweep adds nothing.
    assert await sweep(pool, redis) == 0

    await redis.flushdb()  # Redis restarted empty: every job is gone
    assert await drain(env, redis) == Ran()
    assert twilio.creates == []

    # The sweep, run as the worker runs it (a job through Redis), finds the due rows.
    assert await redis.enqueue_job("sweep_outbox") is not None
    ran = await drain(env, redis)

    assert ran.complete == 1 + len(ids)
    assert len(twilio.creates) == len(ids)
    for phone in phones:
        assert len(twilio.sent_to(phone)) == 1
    for mid in ids:
        assert (await row(pool, mid))["status"] == "sent"
    # The row not yet due stays in PostgreSQL for a later sweep; a second sweep
    # finds nothing more to do.
    assert (await row(pool, later))["status"] == "pending"
    assert await sweep(pool, redis) == 0
    assert await drain(env, redis) == Ran()
    assert len(twilio.creates) == len(ids)


class Stalled:
    """In front of the real transport: `send` stops before any request leaves, so the
    job can be killed there, after its claim."""

    def __init__(self, inner: SmsTransport, entered: asyncio.Event) -> None:
        self.inner = inner
        self.name = inner.name
        self.entered = entered

    async def send(self, request: SmsRequest) -> SendReceipt:
        self.entered.set()
        await asyncio.Event().wait()  # until cancelled
        raise AssertionError("unreachable")

    async def find_sent(self, request: SmsRequest, *, since: datetime) -> list[SendReceipt]:
        return await self.inner.find_sent(request, since=since)

    async def close(self) -> None:
        await self.inner.close()


async def kill_job_when(
    env: ModuleEnv, message_id: int, ready: Callable[[], Awaitable[object]], startup: Any = None
) -> None:
    """Run a worker; once `ready` returns, cancel the job mid-flight. arq runs the
    cancelled job again at once; it finds the row held by the dead claim and stops."""
    w = make_worker(env, startup)
    main = asyncio.create_task(w.main())
    try:
        async with asyncio.timeout(10):
            await ready()
        w.job_tasks[job_id(message_id)].cancel()
        async with asyncio.timeout(30):
            await main
    finally:
        main.cancel()
        await w.close()


async def test_a_worker_killed_after_its_claim_sends_once_after_the_lease(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    entered = asyncio.Event()

    await kill_job_when(
        env, mid, entered.wait, startup_with(wrap=lambda inner: Stalled(inner, entered))
    )

    assert twilio.creates == []
    r = await row(pool, mid)
    assert (r["status"], r["attempts"]) == ("sending", 1)
    # Within the lease nobody touches it: the dead worker might still be sending.
    assert await sweep(pool, redis) == 0

    await expire_claim(pool, mid)
    assert await sweep(pool, redis) == 1
    await drain(env, redis)

    assert len(twilio.creates) == 1
    assert len(twilio.sent_to(phone)) == 1
    assert len(twilio.lookups) == 1  # asked Twilio first: nothing there, so sent
    r = await row(pool, mid)
    assert (r["status"], r["attempts"], r["maybe_sent"]) == ("sent", 2, False)
    assert await sweep(pool, redis) == 0


async def test_a_worker_killed_while_twilio_holds_the_request_does_not_send_again(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    """Twilio accepted the message but the worker died before hearing so."""
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    twilio.reply(Reply(hold=True))
    held = twilio.held

    async def at_twilio() -> None:
        assert await asyncio.to_thread(held.wait, 10)

    await kill_job_when(env, mid, at_twilio)
    twilio.release.set()

    [accepted] = twilio.sent_to(phone)
    r = await row(pool, mid)
    assert (r["status"], r["provider_sid"]) == ("sending", None)

    await expire_claim(pool, mid)
    assert await sweep(pool, redis) == 1
    await drain(env, redis)

    # The new claim asked Twilio, found the accepted message and sent nothing.
    assert len(twilio.creates) == 1
    assert len(twilio.lookups) == 1
    r = await row(pool, mid)
    assert (r["status"], r["provider_sid"], r["attempts"]) == ("sent", accepted["sid"], 2)


async def test_without_a_lookup_endpoint_a_lost_answer_means_one_more_send(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    """The window that remains, shown rather than hidden: a Twilio-compatible gateway
    that cannot list messages leaves no way to learn that a request whose answer was
    lost went through, so the message is sent again (at-least-once)."""
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    twilio.list_status = 404
    twilio.reply(Reply(hold=True))
    held = twilio.held

    async def at_twilio() -> None:
        assert await asyncio.to_thread(held.wait, 10)

    await kill_job_when(env, mid, at_twilio)
    twilio.release.set()
    await expire_claim(pool, mid)
    await sweep(pool, redis)
    await drain(env, redis)

    assert len(twilio.sent_to(phone)) == 2
    r = await row(pool, mid)
    assert r["status"] == "sent"
    assert r["provider_sid"] == twilio.sent_to(phone)[-1]["sid"]


# --- provider errors -----------------------------------------------------------------


async def test_429_waits_for_retry_after_then_sends_once(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    twilio.reply(Reply(429, code=20429, message="Too Many Requests", retry_after="7"))

    before = datetime.now(UTC)
    ran = await drain(env, redis)
    after = datetime.now(UTC)

    assert ran.retried == 1
    r = await row(pool, mid)
    assert (r["status"], r["attempts"], r["error_code"]) == ("pending", 1, "20429")
    assert r["maybe_sent"] is False  # a 429 creates nothing
    # Both the row and the queued job wait Retry-After (7 s) from the moment the 429
    # came back, which lies between `before` and `after` however slow the machine is.
    retry_after = timedelta(seconds=7)
    assert before + retry_after <= r["send_at"] <= after + retry_after
    job_at = await job_due_at(redis, mid)
    assert before + retry_after - MS <= job_at <= after + retry_after + MS
    # Until then, neither a duplicate job nor the sweep can send it early.
    assert await redis.enqueue_job("send_message", mid, _job_id="early") is not None
    assert await sweep(pool, redis) == 0
    await drain(env, redis)
    assert len(twilio.creates) == 1

    await make_due(pool, redis, mid)
    await drain(env, redis)

    assert len(twilio.creates) == 2
    assert len(twilio.sent_to(phone)) == 1
    assert twilio.lookups == []
    r = await row(pool, mid)
    assert (r["status"], r["attempts"], r["error_code"]) == ("sent", 2, None)


async def test_5xx_is_retried_with_capped_backoff_then_given_up(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    mid = await queue(pool, redis)
    twilio.default = Reply(500, code=20500, message="Internal Server Error")
    for attempt in range(1, MAX_SEND_ATTEMPTS):
        before = datetime.now(UTC)
        ran = await drain(env, redis)
        after = datetime.now(UTC)
        assert ran.retried == 1
        # One request per attempt: the HTTP client never retries a create itself.
        assert len(twilio.creates) == attempt
        r = await row(pool, mid)
        assert (r["status"], r["attempts"], r["error_code"]) == ("pending", attempt, "20500")
        assert r["maybe_sent"] is True
        # the job waits the backoff from the moment the 500 came back
        backoff = timedelta(seconds=backoff_s(attempt))
        assert before + backoff - MS <= await job_due_at(redis, mid) <= after + backoff + MS
        await make_due(pool, redis, mid)

    ran = await drain(env, redis)

    assert ran.retried == 0
    assert len(twilio.creates) == MAX_SEND_ATTEMPTS
    # Each retry first asked whether the failed attempt had gone through after all.
    assert len(twilio.lookups) == MAX_SEND_ATTEMPTS - 1
    # doubling, capped at 10 minutes
    assert [backoff_s(n) for n in range(1, MAX_SEND_ATTEMPTS)] == [15, 30, 60, 120, 240, 480, 600]
    r = await row(pool, mid)
    assert (r["status"], r["attempts"], r["error_code"]) == ("failed", MAX_SEND_ATTEMPTS, "20500")
    assert r["error_message"].startswith(f"gave up after {MAX_SEND_ATTEMPTS} attempts")
    assert await redis.zcard(QUEUE) == 0


async def test_an_invalid_number_fails_at_once_and_is_not_retried(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    twilio.reply(
        Reply(400, code=21211, message=f"The 'To' number {phone} is not a valid phone number.")
    )

    ran = await drain(env, redis)

    assert (ran.complete, ran.retried) == (1, 0)
    assert len(twilio.creates) == 1
    r = await row(pool, mid)
    assert (r["status"], r["attempts"], r["error_code"]) == ("failed", 1, "21211")
    assert "is not a valid phone number" in r["error_message"]
    assert await redis.zcard(QUEUE) == 0
    assert await sweep(pool, redis) == 0
    assert not await pool.fetchval("SELECT count(*) FROM sms_opt_outs WHERE phone = $1", phone)


async def test_21610_fails_the_message_and_opts_the_number_out(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    twilio.reply(Reply(400, code=21610, message="Attempt to send to unsubscribed recipient"))

    ran = await drain(env, redis)

    assert ran.retried == 0
    r = await row(pool, mid)
    assert (r["status"], r["error_code"]) == ("failed", "21610")
    source = await pool.fetchval("SELECT source FROM sms_opt_outs WHERE phone = $1", phone)
    assert source == "carrier"

    # The next message to that number never reaches Twilio.
    later = await queue(pool, redis, phone=phone)
    await drain(env, redis)
    assert len(twilio.creates) == 1
    assert (await row(pool, later))["status"] == "skipped"


async def test_an_opted_out_number_is_skipped_with_the_reason_and_no_request(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await queue(pool, redis, phone=phone)
    # STOP arrives after the reminder was queued: the send re-checks.
    await pool.execute("INSERT INTO sms_opt_outs (phone, source) VALUES ($1, 'sms')", phone)

    ran = await drain(env, redis)

    assert (ran.complete, ran.retried) == (1, 0)
    assert twilio.requests == []
    r = await row(pool, mid)
    assert (r["status"], r["error_message"], r["attempts"]) == ("skipped", "opted_out", 0)
    assert r["provider_sid"] is None


# --- quiet hours ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("zone", "clock", "morning"),
    [
        # 22:30 in Shanghai (UTC+8, no DST) -> 08:00 the next morning.
        (
            "Asia/Shanghai",
            datetime(2026, 12, 1, 14, 30, tzinfo=UTC),
            datetime(2026, 12, 2, 0, 0, tzinfo=UTC),
        ),
        # 22:30 GMT on 27 March 2027; the clocks go forward overnight: 08:00 BST.
        (
            "Europe/London",
            datetime(2027, 3, 27, 22, 30, tzinfo=UTC),
            datetime(2027, 3, 28, 7, 0, tzinfo=UTC),
        ),
        # 22:30 BST on 24 October 2026; the clocks go back overnight: 08:00 GMT.
        (
            "Europe/London",
            datetime(2026, 10, 24, 21, 30, tzinfo=UTC),
            datetime(2026, 10, 25, 8, 0, tzinfo=UTC),
        ),
        # No branch: SELFSERVE_QUIET_HOURS_TZ (Asia/Shanghai).
        (
            None,
            datetime(2026, 12, 1, 14, 30, tzinfo=UTC),
            datetime(2026, 12, 2, 0, 0, tzinfo=UTC),
        ),
    ],
)
async def test_quiet_hours_hold_a_reminder_until_the_branch_morning(
    env: ModuleEnv,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
    zone: str | None,
    clock: datetime,
    morning: datetime,
) -> None:
    branch_id = await make_branch(pool, zone) if zone else None
    reminder = await queue(pool, redis, branch_id=branch_id)
    code = await queue(pool, redis, branch_id=branch_id, time_critical=True)

    before = datetime.now(UTC)
    ran = await drain(env, redis, startup_with(clock=clock))
    after = datetime.now(UTC)

    assert ran.retried == 1
    # The time-critical message (a code, "you are next") goes out at 22:30.
    assert (await row(pool, code))["status"] == "sent"
    assert len(twilio.creates) == 1
    # The reminder waits for 08:00 local; its claim did not count as an attempt.
    r = await row(pool, reminder)
    assert (r["status"], r["attempts"], r["send_at"]) == ("pending", 0, morning)
    # Its job waits in arq just as long (measured from the worker's clock).
    wait = morning - clock
    assert before + wait - MS <= await job_due_at(redis, reminder) <= after + wait + MS

    # Morning comes.
    await make_due(pool, redis, reminder)
    await drain(env, redis, startup_with(clock=morning))
    r = await row(pool, reminder)
    assert (r["status"], r["attempts"]) == ("sent", 1)
    assert len(twilio.creates) == 2


# --- development transport ---------------------------------------------------------------


async def test_without_twilio_credentials_the_console_records_the_message(
    env: ModuleEnv,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("TWILIO_ACCOUNT_SID")
    monkeypatch.delenv("TWILIO_AUTH_TOKEN")
    monkeypatch.setenv("SELFSERVE_LOG_LEVEL", "INFO")
    phone = "+8613812345678"
    mid = await queue(pool, redis, phone=phone, body="Your code is 123456")

    await drain(env, redis)

    assert twilio.requests == []
    r = await row(pool, mid)
    assert (r["status"], r["provider_sid"], r["attempts"]) == ("sent", f"console-{mid}", 1)
    logged = capsys.readouterr().err
    assert "sms_console" in logged
    assert "+86138****5678" in logged
    assert phone not in logged


# --- moving and cancelling with the cause ---------------------------------------------------


async def test_cancel_and_reschedule_follow_the_cause_inside_its_transaction(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    soon = datetime.now(UTC) + timedelta(hours=2)
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    n = next(_seq)
    async with transaction(pool) as conn:
        ids = {
            key: await queue_message(
                conn,
                phone=new_phone(),
                body=f"{key} for booking {n}",
                segments=1,
                encoding="GSM-7",
                template="reminder",
                locale="en",
                send_at=when,
                dedupe_key=key,
            )
            for key, when in [
                (f"booking:{n}:reminder_24h", tomorrow),
                (f"booking:{n}:reminder_2h", soon),
                (f"booking:{n}0:reminder_24h", tomorrow),  # another booking, same digits
                (f"booking:{n}:confirmation", PAST),
            ]
        }
        # The same cause queued twice (a retried request) yields one row.
        again = await queue_message(
            conn,
            phone=new_phone(),
            body="duplicate",
            segments=1,
            encoding="GSM-7",
            template="reminder",
            locale="en",
            send_at=tomorrow,
            dedupe_key=f"booking:{n}:reminder_24h",
        )
        assert again is None
    for key, mid in ids.items():
        assert mid is not None
        when = tomorrow if "24h" in key else soon
        await enqueue_after_commit(redis, [mid], PAST if "confirmation" in key else when)
    await drain(env, redis)  # the confirmation goes out
    r24, r2, other, confirmation = ids.values()
    assert (await row(pool, cast(int, confirmation)))["status"] == "sent"

    # A transaction that rolls back changes nothing.
    async def cancel_then_fail() -> None:
        async with transaction(pool) as conn:
            assert len(await cancel_messages(conn, f"booking:{n}:")) == 2
            raise RuntimeError("the booking change failed")

    with pytest.raises(RuntimeError, match="booking change failed"):
        await cancel_then_fail()
    assert (await row(pool, cast(int, r24)))["status"] == "pending"

    # The booking moves to the morning: its pending messages move with it, and the
    # job queued for tomorrow is pulled forward to the new time.
    new_time = datetime.now(UTC) - timedelta(seconds=1)
    async with transaction(pool) as conn:
        moved = await reschedule_messages(conn, f"booking:{n}:", new_time)
    assert sorted(moved) == sorted(cast(list[int], [r24, r2]))
    assert await enqueue_after_commit(redis, moved, new_time) == 0  # jobs exist: moved
    # due now: job scores are whole milliseconds, rounded, so allow one
    assert await deferred_s(redis, cast(int, r24)) <= 0.001
    await drain(env, redis)
    for mid in (r24, r2):
        assert (await row(pool, cast(int, mid)))["status"] == "sent"
    assert (await row(pool, cast(int, other)))["status"] == "pending"

    # The other booking is cancelled: its queued job then finds nothing to send.
    async with transaction(pool) as conn:
        assert await cancel_messages(conn, f"booking:{n}0:") == [other]
    await make_due_job(redis, cast(int, other))
    await drain(env, redis)
    r = await row(pool, cast(int, other))
    assert r["status"] == "canceled"
    assert len(twilio.creates) == 3

    async with pool.acquire() as conn:
        with pytest.raises(ValueError, match="ends with ':'"):
            await cancel_messages(conn, f"booking:{n}")


async def make_due_job(redis: ArqRedis, message_id: int) -> None:
    assert await redis.zadd(QUEUE, {job_id(message_id): now_ms()}, xx=True, ch=True) == 1


async def test_a_message_moved_later_waits_for_its_new_time(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    key = f"booking:{next(_seq)}:"
    mid = await queue(pool, redis, dedupe_key=key + "reminder")
    async with transaction(pool) as conn:
        assert await reschedule_messages(conn, key, datetime.now(UTC) + timedelta(hours=1)) == [mid]
    # The job queued for the old time runs, finds the row not due, and waits for it.
    before = datetime.now(UTC)
    ran = await drain(env, redis)
    after = datetime.now(UTC)
    assert ran.retried == 1
    assert twilio.creates == []
    r = await row(pool, mid)
    due = await job_due_at(redis, mid)
    assert r["send_at"] - MS <= due <= r["send_at"] + (after - before) + MS
    assert (r["status"], r["attempts"]) == ("pending", 0)


async def test_a_redis_failure_after_commit_is_logged_not_raised(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    class DeadRedis:
        default_queue_name = QUEUE

        async def enqueue_job(self, *args: Any, **kwargs: Any) -> None:
            raise RedisConnectionError("Connection refused")

    phone = new_phone()
    mid = await queue(pool, phone=phone)
    assert await enqueue_after_commit(cast(ArqRedis, DeadRedis()), [mid], PAST) == 0
    # The row is safe in PostgreSQL; the sweep sends it.
    assert await sweep(pool, redis) == 1
    await drain(env, redis)
    assert len(twilio.sent_to(phone)) == 1


async def test_queue_message_refuses_what_the_outbox_cannot_hold(pool: asyncpg.Pool) -> None:
    base: dict[str, Any] = {
        "phone": new_phone(),
        "body": "hello",
        "segments": 1,
        "encoding": "GSM-7",
        "template": "reminder",
        "locale": "en",
        "send_at": PAST,
        "dedupe_key": f"test:{next(_seq)}:bad",
    }
    cases: list[tuple[dict[str, Any], type[Exception]]] = [
        ({"send_at": datetime(2026, 1, 1)}, ValueError),
        ({"encoding": "UTF-8"}, ValueError),
        ({"locale": "fr"}, ValueError),
        ({"phone": "13812345678"}, asyncpg.CheckViolationError),
        ({"body": ""}, asyncpg.CheckViolationError),
        ({"segments": 0}, asyncpg.CheckViolationError),
    ]
    async with pool.acquire() as conn:
        for change, error in cases:
            with pytest.raises(error):
                await queue_message(conn, **{**base, **change})


# --- deadlines -----------------------------------------------------------------------


async def test_a_message_past_its_deadline_is_expired_and_never_sent(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    # Written an hour ago with ten minutes to live; the worker was down since.
    late_phone, live_phone = new_phone(), new_phone()
    written = datetime.now(UTC) - timedelta(hours=1)
    late = await queue(
        pool,
        redis,
        phone=late_phone,
        body="Ticket A001: please go to counter 3 now.",
        send_at=written,
        time_critical=True,
        expires_at=written + timedelta(minutes=10),
    )
    live = await queue(
        pool,
        redis,
        phone=live_phone,
        body="Ticket A002: please go to counter 4 now.",
        send_at=written,
        time_critical=True,
        expires_at=datetime.now(UTC) + timedelta(minutes=10),
    )

    ran = await drain(env, redis)

    assert (ran.complete, ran.retried, ran.failed) == (2, 0, 0)
    assert twilio.sent_to(late_phone) == []
    assert len(twilio.sent_to(live_phone)) == 1
    assert len(twilio.creates) == 1
    r = await row(pool, late)
    assert (r["status"], r["error_code"], r["attempts"]) == ("expired", "deadline_passed", 0)
    assert "deadline" in r["error_message"]
    assert (r["provider_sid"], r["sent_at"], r["claimed_at"]) == (None, None, None)
    assert (await row(pool, live))["status"] == "sent"
    # Final: running its job again changes nothing.
    assert await redis.enqueue_job("send_message", late, _job_id=job_id(late)) is not None
    await drain(env, redis)
    assert len(twilio.creates) == 1
    assert (await row(pool, late))["status"] == "expired"


async def test_after_a_redis_outage_the_sweep_expires_the_overdue_and_sends_the_rest(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    written = datetime.now(UTC) - timedelta(minutes=30)
    phones = [new_phone() for _ in range(4)]
    # Never enqueued (Redis was down at commit): only the sweep can find them.
    overdue = [
        await queue(pool, phone=p, send_at=written, time_critical=True, expires_at=written)
        for p in phones[:2]
    ]
    fresh = [
        await queue(
            pool,
            phone=p,
            send_at=written,
            time_critical=True,
            expires_at=datetime.now(UTC) + timedelta(minutes=5),
        )
        for p in phones[2:]
    ]

    assert await sweep(pool, redis) == len(fresh)  # the overdue ones are not queued
    for mid in overdue:
        r = await row(pool, mid)
        assert (r["status"], r["error_code"]) == ("expired", "deadline_passed")
    await drain(env, redis)

    assert [len(twilio.sent_to(p)) for p in phones] == [0, 0, 1, 1]
    assert [(await row(pool, m))["status"] for m in fresh] == ["sent", "sent"]
    assert await sweep(pool, redis) == 0


async def test_a_claim_left_by_a_dead_worker_past_the_deadline_is_looked_up_then_expired(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    phone = new_phone()
    mid = await queue(
        pool,
        redis,
        phone=phone,
        time_critical=True,
        expires_at=datetime.now(UTC) + timedelta(minutes=10),
    )
    entered = asyncio.Event()
    await kill_job_when(
        env, mid, entered.wait, startup_with(wrap=lambda inner: Stalled(inner, entered))
    )
    assert (await row(pool, mid))["status"] == "sending"

    # The lease runs out long after the deadline.
    await expire_claim(pool, mid)
    await pool.execute(
        "UPDATE messages SET expires_at = now() - interval '1 minute' WHERE id = $1", mid
    )
    assert await sweep(pool, redis) == 1
    await drain(env, redis)

    assert twilio.creates == []
    assert len(twilio.lookups) == 1  # it may have gone out: the provider was asked first
    r = await row(pool, mid)
    assert (r["status"], r["error_code"], r["maybe_sent"]) == ("expired", "deadline_passed", False)


async def test_quiet_hours_that_outlast_the_deadline_expire_the_message(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, twilio: FakeTwilio
) -> None:
    shanghai = ZoneInfo("Asia/Shanghai")
    night = (datetime.now(shanghai) + timedelta(days=1)).replace(
        hour=22, minute=30, second=0, microsecond=0
    )
    branch_id = await make_branch(pool, "Asia/Shanghai")
    # Not time-critical, worth sending until midnight: quiet hours hold it until 08:00.
    mid = await queue(
        pool,
        redis,
        branch_id=branch_id,
        expires_at=night.replace(hour=23, minute=59).astimezone(UTC),
    )

    await drain(env, redis, startup_with(clock=night.astimezone(UTC)))

    assert twilio.creates == []
    r = await row(pool, mid)
    assert (r["status"], r["error_code"], r["attempts"]) == ("expired", "deadline_passed", 0)
    assert "quiet hours" in r["error_message"]
