"""arq worker: job functions and periodic sweeps. Providers live in ctx."""

from __future__ import annotations

import asyncio
from typing import Any

import structlog
from arq import cron, func
from arq.connections import RedisSettings
from arq.worker import Worker, get_kwargs

from selfserve import db
from selfserve.logs import configure_logging
from selfserve.messaging.service import (
    SEND_JOB,
    SEND_JOB_MAX_TRIES,
    SEND_JOB_TIMEOUT_S,
    send_message,
    sweep_outbox,
)
from selfserve.messaging.transport import build_transport
from selfserve.queueing.sweeps import close_stale_tickets, sweep_turn_near
from selfserve.scheduling.service import (
    purge_capacity_ledger,
    purge_idempotency_keys,
    sweep_holds,
    sweep_no_shows,
    sweep_waitlist,
)
from selfserve.settings import ConfigError, load_settings

PURGE_REFRESH_TOKENS = """
DELETE FROM refresh_tokens
WHERE expires_at < now() - interval '7 days'
   OR (revoked_at IS NOT NULL AND revoked_at < now() - interval '7 days')
"""


async def purge_refresh_tokens(ctx: dict[str, Any]) -> int:
    """Drop refresh tokens long expired or revoked (kept a week for reuse detection)."""
    result: str = await ctx["pool"].execute(PURGE_REFRESH_TOKENS)
    return int(result.split()[-1])


async def purge_early_status_callbacks(ctx: dict[str, Any]) -> int:
    """Drop delivery callbacks kept a day for a send that never recorded their sid
    (e.g. messages another system sent from the same Twilio account)."""
    result: str = await ctx["pool"].execute(
        "DELETE FROM sms_status_early WHERE received_at < now() - interval '1 day'"
    )
    return int(result.split()[-1])


async def startup(ctx: dict[str, Any]) -> None:
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    if not settings.database_url:
        raise ConfigError("DATABASE_URL is not set")
    ctx["settings"] = settings
    ctx["pool"] = await db.create_pool(
        settings.database_url,
        min_size=1,
        max_size=settings.db_pool_max,
        acquire_timeout=settings.db_acquire_timeout_s,
        command_timeout=settings.db_command_timeout_s,
    )
    ctx["sms"] = build_transport(settings)


async def shutdown(ctx: dict[str, Any]) -> None:
    sms = ctx.pop("sms", None)
    if sms is not None:
        await sms.close()
    pool = ctx.pop("pool", None)
    if pool is not None:
        await pool.close()


def redis_settings() -> RedisSettings:
    url = load_settings().redis_url
    if not url:
        raise ConfigError("REDIS_URL is not set")
    return RedisSettings.from_dsn(url)


class WorkerSettings:
    functions = [
        purge_refresh_tokens,
        purge_early_status_callbacks,
        # keep_result=0: a finished send frees its job id (`message:<id>`) at once, so
        # the sweep can enqueue the row again after a crash or a move.
        func(
            send_message,
            name=SEND_JOB,
            keep_result=0,
            max_tries=SEND_JOB_MAX_TRIES,
            timeout=SEND_JOB_TIMEOUT_S,
        ),
        func(sweep_outbox, max_tries=1, timeout=300),
        func(sweep_holds, max_tries=1, timeout=120),
        func(sweep_no_shows, max_tries=1, timeout=120),
        func(sweep_waitlist, max_tries=1, timeout=120),
        func(close_stale_tickets, max_tries=1, timeout=120),
        func(sweep_turn_near, max_tries=1, timeout=120),
        purge_idempotency_keys,
        func(purge_capacity_ledger, max_tries=1, timeout=300),
    ]
    cron_jobs = [
        cron(purge_refresh_tokens, hour=3, minute=17, run_at_startup=False),
        cron(purge_early_status_callbacks, minute=41, run_at_startup=False),
        # Every minute, and once at start: whatever Redis lost is enqueued again.
        cron(sweep_outbox, second=0, run_at_startup=True, timeout=300),
        # Every minute: expired holds give their seats back (writes also do this on demand).
        cron(sweep_holds, second=30, run_at_startup=True, timeout=120),
        # Every minute: bookings nobody checked in for by start + grace become no-shows.
        cron(sweep_no_shows, second=45, run_at_startup=True, timeout=120),
        # Every minute: close passed windows, offer free seats to waiting entries.
        cron(sweep_waitlist, second=15, run_at_startup=True, timeout=120),
        cron(purge_idempotency_keys, minute=23, run_at_startup=False),
        # Every 10 minutes: capacity-ledger units that ended days ago go, in small batches.
        cron(
            purge_capacity_ledger, minute=set(range(7, 60, 10)), run_at_startup=False, timeout=300
        ),
        # Every 10 minutes: tickets left open from an earlier local day are closed
        # when their branch closed in between (a 24-hour branch keeps its queue).
        cron(close_stale_tickets, minute=set(range(2, 60, 10)), run_at_startup=True),
        # Every minute: "turn near" texts a dead process did not send after its commit.
        cron(sweep_turn_near, second=50, run_at_startup=True, timeout=120),
    ]
    on_startup = startup
    on_shutdown = shutdown
    max_tries = 5
    job_timeout = 60
    keep_result = 3600


class _Worker(Worker):
    async def close(self) -> None:
        """arq's close re-raises the CancelledError of every job a stop signal cut
        short, skipping the rest of the shutdown (`on_shutdown`, the Redis pool) and
        ending `selfserve worker` with a traceback. Jobs are idempotent and the sweeps
        enqueue again whatever they left: wait for them to end, then close as usual."""
        if self._handle_signals and self.tasks:
            await asyncio.gather(*self.tasks.values(), return_exceptions=True)
            self.tasks.clear()
        await super().close()


RESTART_MIN_S = 1.0
RESTART_MAX_S = 30.0


def run() -> None:
    """`selfserve worker`: run the arq worker until it is told to stop.

    arq's worker ends when Redis goes away under it (a restart, a failover). Redis
    only carried jobs, which PostgreSQL can rebuild: so the worker closes what it
    opened and starts again, backing off while Redis does not answer. The sweeps that
    run at start enqueue again whatever is due and not done.
    """
    import signal
    import time

    from redis.exceptions import RedisError

    delay = RESTART_MIN_S
    while True:
        kwargs: dict[str, Any] = dict(get_kwargs(WorkerSettings))  # type: ignore[arg-type]
        kwargs["redis_settings"] = redis_settings()
        worker = _Worker(**kwargs)
        started = time.monotonic()
        try:
            worker.run()
            return
        except (RedisError, OSError) as exc:
            _close_after_failure(worker)
            if time.monotonic() - started > 2 * RESTART_MAX_S:
                delay = RESTART_MIN_S  # it ran a good while: a new outage
            structlog.get_logger("selfserve.worker").warning(
                "worker_lost_redis", error=type(exc).__name__, detail=str(exc), restart_in=delay
            )
        # Signals arrive as usual while waiting (arq handles them only in its loop).
        signal.signal(signal.SIGTERM, signal.default_int_handler)
        time.sleep(delay)
        delay = min(delay * 2, RESTART_MAX_S)


def _close_after_failure(worker: Any) -> None:
    """arq's close stops at its first Redis call when Redis is gone: close the rest."""
    import contextlib

    with contextlib.suppress(Exception):
        worker.loop.run_until_complete(shutdown(worker.ctx))
    with contextlib.suppress(Exception):
        if worker._pool is not None:
            worker.loop.run_until_complete(worker._pool.close(close_connection_pool=True))
            worker._pool = None
