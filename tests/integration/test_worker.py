"""The arq worker runs real jobs from Redis against the module's database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker

from selfserve import worker as worker_module
from tests.conftest import ModuleEnv


@pytest.fixture
def worker_env(module_env: ModuleEnv, monkeypatch: pytest.MonkeyPatch) -> ModuleEnv:
    monkeypatch.setenv("DATABASE_URL", module_env.database_url)
    monkeypatch.setenv("REDIS_URL", module_env.redis_url)
    monkeypatch.setenv("SELFSERVE_LOG_LEVEL", "WARNING")
    return module_env


async def run_burst_worker(env: ModuleEnv) -> Worker:
    """The production worker settings, run until the queue is empty."""
    w = Worker(
        functions=worker_module.WorkerSettings.functions,
        on_startup=worker_module.startup,
        on_shutdown=worker_module.shutdown,
        redis_settings=RedisSettings.from_dsn(env.redis_url),
        burst=True,
        poll_delay=0,
        max_jobs=4,
        handle_signals=False,
    )
    try:
        await w.main()
    finally:
        await w.close()
    return w


async def _insert_token(
    pool: asyncpg.Pool, expires_at: datetime, revoked_at: datetime | None
) -> None:
    await pool.execute(
        "INSERT INTO refresh_tokens (family_id, token_hash, principal_kind, principal_id, channel,"
        " expires_at, revoked_at) VALUES ($1, $2, 'staff', 1, 'staff', $3, $4)",
        uuid.uuid4(),
        uuid.uuid4().bytes,
        expires_at,
        revoked_at,
    )


async def test_purge_job_runs_through_redis_and_keeps_live_tokens(
    worker_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    now = datetime.now(UTC)
    await pool.execute("DELETE FROM refresh_tokens")
    await _insert_token(pool, now - timedelta(days=30), None)  # long expired: purged
    await _insert_token(pool, now + timedelta(days=1), now - timedelta(days=8))  # old revocation
    await _insert_token(pool, now + timedelta(days=1), None)  # live: kept
    await _insert_token(pool, now - timedelta(days=1), None)  # recently expired: kept a week
    job = await redis.enqueue_job("purge_refresh_tokens", _job_id="purge-test-1")
    assert job is not None
    # The same job id enqueued again while the first is pending is refused by arq.
    assert await redis.enqueue_job("purge_refresh_tokens", _job_id="purge-test-1") is None

    w = await run_burst_worker(worker_env)
    assert w.jobs_complete == 1
    assert w.jobs_failed == 0
    assert await job.result(timeout=5) == 2
    assert await pool.fetchval("SELECT count(*) FROM refresh_tokens") == 2


async def test_stale_early_status_callbacks_are_purged(
    worker_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    await pool.execute(
        "INSERT INTO sms_status_early (provider_sid, status, rank, received_at) VALUES "
        "('SMold', 'delivered', 3, now() - interval '2 days'), ('SMnew', 'delivered', 3, now())"
    )
    job = await redis.enqueue_job("purge_early_status_callbacks")
    assert job is not None
    await run_burst_worker(worker_env)
    assert await job.result(timeout=5) == 1
    assert await pool.fetchval("SELECT array_agg(provider_sid) FROM sms_status_early") == ["SMnew"]
