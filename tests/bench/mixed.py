"""Mixed load on a production-shaped stack: 2 API processes and 2 workers.

    python -m tests.bench.mixed [--duration 180] [--concurrency 16] [--sse 20] [--baseline 20]

Servers, database and Redis db as the other benchmarks (`common.py`). A local Twilio
(tests/twilio_server.py) takes the SMS the workers send. First a baseline phase
(`GET /bench/baseline`, `SELECT 1` on the API's pool) at the same concurrency, then
the mix for `--duration` seconds, all at once: availability (one day), holds,
bookings, remote tickets, counters calling/starting/finishing, signed inbound SMS
(`STATUS`), and `--sse` Server-Sent-Event subscribers on tickets held open
throughout. Reported: per operation req/s, its ratio to the baseline, p50/p99;
PostgreSQL transactions per second (pg_stat_database); the resident memory of each
process every minute; 5xx answers; the ledger invariant and one ticket per counter
at the end. Exit status 1 on any 5xx or invariant violation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
from twilio.request_validator import RequestValidator

from selfserve import db
from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.scheduling import ledger
from selfserve.settings import Settings
from tests.bench.common import (
    BASELINE_PATH,
    ROOT,
    UNLIMITED,
    create_database,
    drop_database,
    free_port,
    raise_open_files,
    redis_db,
    run,
    run_phase,
    servers,
    with_database,
)
from tests.booking_helpers import at_hour, iso, seed
from tests.conftest import ModuleEnv
from tests.queue_helpers import hall
from tests.twilio_server import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio

SECRET = "bench-mixed-" + secrets.token_hex(24)
SMS_PATH = "/v1/webhooks/twilio/sms"


# --- processes -------------------------------------------------------------------------


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@contextlib.contextmanager
def stack(env: dict[str, str], logdir: Path) -> Iterator[tuple[list[str], list[Proc]]]:
    procs: list[Proc] = []

    def start(name: str, args: list[str]) -> Proc:
        log = logdir / f"{name}.log"
        out = log.open("wb")
        p = subprocess.Popen(
            [sys.executable, *args],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        proc = Proc(name, p, log)
        procs.append(proc)
        return proc

    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    env["SELFSERVE_PUBLIC_BASE_URL"] = urls[0]
    try:
        for i in range(2):
            start(f"worker{i}", ["-m", "selfserve", "worker"])
        for i, port in enumerate(ports):
            start(f"api{i}", ["-m", "tests.bench.server", "--host", "127.0.0.1", f"--port={port}"])
        for url in urls:
            deadline = time.monotonic() + 90
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/ready", timeout=2).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise SystemExit(f"bench: {url} did not get ready")
                time.sleep(0.2)
        yield urls, procs
    finally:
        for p in procs:
            if p.popen.poll() is None:
                os.killpg(p.popen.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.popen.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.popen.pid, signal.SIGKILL)
                p.popen.wait()


# --- the load ----------------------------------------------------------------------------


@dataclass
class Op:
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)


@dataclass
class Mix:
    urls: list[str]
    settings: Settings
    branch_id: int
    service_id: int
    starts: list[str]
    queue_id: int
    counters: list[int]
    staff: str
    customers: list[tuple[int, str]]
    ops: dict[str, Op] = field(default_factory=dict)
    sse_events: int = 0
    measuring: bool = False
    _next: Iterator[tuple[int, str]] | None = None

    def customer(self) -> tuple[int, str]:
        if self._next is None:
            self._next = iter(self.customers)
        return next(self._next)

    def token(self, customer_id: int) -> dict[str, str]:
        principal = Principal(
            kind="customer", id=customer_id, role="customer", channel="app", branches=()
        )
        return {"Authorization": f"Bearer {issue_access_token(self.settings, principal)}"}

    async def timed(
        self, name: str, send: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response | None:
        t0 = time.monotonic()
        try:
            resp = await send()
            outcome = str(resp.status_code)
            if resp.status_code >= 400:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    outcome += " " + resp.json()["code"]
        except httpx.HTTPError as exc:
            resp, outcome = None, type(exc).__name__
        if self.measuring:
            op = self.ops.setdefault(name, Op())
            op.latencies.append(time.monotonic() - t0)
            op.outcomes[outcome] += 1
        return resp

    async def availability(self, c: httpx.AsyncClient) -> None:
        day = random.randrange(2, 8)
        params = {
            "branch_id": self.branch_id,
            "service_id": self.service_id,
            "from": iso(at_hour(day)),
            "to": iso(at_hour(day + 1)),
        }
        await self.timed("availability (1 day)", lambda: c.get("/v1/availability", params=params))

    def _slot(self) -> dict[str, Any]:
        return {
            "branch_id": self.branch_id,
            "service_id": self.service_id,
            "start": random.choice(self.starts),
        }

    async def hold(self, c: httpx.AsyncClient) -> None:
        who, _ = self.customer()
        body = self._slot()
        await self.timed("hold", lambda: c.post("/v1/holds", json=body, headers=self.token(who)))

    async def booking(self, c: httpx.AsyncClient) -> None:
        who, _ = self.customer()
        body = self._slot()
        await self.timed(
            "booking", lambda: c.post("/v1/bookings", json=body, headers=self.token(who))
        )

    async def ticket(self, c: httpx.AsyncClient) -> None:
        who, _ = self.customer()
        body = {"queue_id": self.queue_id}
        await self.timed(
            "ticket (remote)", lambda: c.post("/v1/tickets", json=body, headers=self.token(who))
        )

    async def inbound(self, c: httpx.AsyncClient) -> None:
        _, phone = random.choice(self.customers)
        params = {
            "MessageSid": "SM" + secrets.token_hex(16),
            "AccountSid": ACCOUNT_SID,
            "From": phone,
            "To": FROM_NUMBER,
            "Body": "STATUS",
        }
        signature = RequestValidator(AUTH_TOKEN).compute_signature(self.urls[0] + SMS_PATH, params)
        await self.timed(
            "inbound SMS",
            lambda: c.post(SMS_PATH, data=params, headers={"X-Twilio-Signature": signature}),
        )

    async def counter(self, c: httpx.AsyncClient, counter_id: int, stop: asyncio.Event) -> None:
        staff = {"Authorization": f"Bearer {self.staff}"}
        while not stop.is_set():
            resp = await self.timed(
                "call-next", lambda: c.post(f"/v1/counters/{counter_id}/call-next", headers=staff)
            )
            if resp is None or resp.status_code != 200:
                await asyncio.sleep(0.2)  # nobody waiting: a clerk looks up again later
                continue
            ticket = resp.json()["id"]
            for action in ("start", "finish"):
                await self.timed(
                    f"ticket {action}",
                    lambda a=action, t=ticket: c.post(f"/v1/tickets/{t}/{a}", headers=staff),  # type: ignore[misc]
                )

    async def subscriber(self, url: str, stop: asyncio.Event) -> None:
        """A customer's phone following its ticket (re-subscribing once it ends)."""
        async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(60, read=None)) as c:
            while not stop.is_set():
                who, _ = self.customer()
                resp = await c.post(
                    "/v1/tickets", json={"queue_id": self.queue_id}, headers=self.token(who)
                )
                if resp.status_code != 201:
                    await asyncio.sleep(1)
                    continue
                path = f"/v1/tickets/{resp.json()['id']}/events"
                with contextlib.suppress(httpx.HTTPError):
                    async with c.stream("GET", path, headers=self.token(who)) as sse:
                        async for line in sse.aiter_lines():
                            if line.startswith("event:"):
                                self.sse_events += 1
                            if stop.is_set():
                                break


async def main_async(args: argparse.Namespace) -> int:
    raise_open_files(4096)
    twilio = FakeTwilio().start()
    with servers() as (admin_url, redis_server), redis_db(redis_server) as redis_url:
        name = await create_database(admin_url)
        database_url = with_database(admin_url, name)
        try:
            return await bench(args, admin_url, database_url, redis_url, twilio)
        finally:
            await drop_database(admin_url, name)
            twilio.stop()


async def bench(
    args: argparse.Namespace, admin_url: str, database_url: str, redis_url: str, twilio: FakeTwilio
) -> int:
    settings = Settings(
        environment="test", database_url=database_url, redis_url=redis_url, jwt_secret=SECRET
    )
    pool = await db.create_pool(database_url, min_size=1, max_size=4)
    try:
        bid, sid, _ = await seed(pool, capacity=5, resources=10)
        h = await hall(pool, ModuleEnv(database_url, redis_url, admin_url, settings), counters=4)
        rows = await pool.fetch(
            "INSERT INTO customers (phone, locale) SELECT '+86134' || lpad(i::text, 8, '0'), 'en' "
            "FROM generate_series(1, $1) AS i RETURNING id, phone",
            args.customers,
        )
        first = at_hour(2)
        starts = [iso(first + timedelta(minutes=30 * i)) for i in range(48 * 6)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFSERVE_", "TWILIO_"))}
        env.update(
            DATABASE_URL=database_url,
            REDIS_URL=redis_url,
            SELFSERVE_ENV="production",
            SELFSERVE_JWT_SECRET=SECRET,
            SELFSERVE_LOG_LEVEL="WARNING",
            SELFSERVE_LIVE_CHANNEL_PREFIX=f"selfserve-bench-{secrets.token_hex(5)}",
            TWILIO_ACCOUNT_SID=ACCOUNT_SID,
            TWILIO_AUTH_TOKEN=AUTH_TOKEN,
            SELFSERVE_TWILIO_FROM=FROM_NUMBER,
            SELFSERVE_TWILIO_API_BASE_URL=twilio.base_url,
            SELFSERVE_QUIET_HOURS_START="00:00",
            SELFSERVE_QUIET_HOURS_END="00:00",
        )
        env.update(UNLIMITED)
        logdir = Path(tempfile.mkdtemp(prefix="selfserve-bench-mixed-"))
        try:
            with stack(env, logdir) as (urls, procs):
                customers = [(r["id"], r["phone"]) for r in rows]
                mix = Mix(
                    urls, settings, bid, sid, starts, h.queues["A"], h.counters, h.staff, customers
                )
                return await measure(args, mix, pool, procs, twilio, urls)
        finally:
            for log in sorted(logdir.glob("*.log")):
                if "Traceback" in (text := log.read_text(errors="replace")):
                    print(f"--- {log.name} logged a traceback ---\n{text[-3000:]}")
            shutil.rmtree(logdir, ignore_errors=True)
    finally:
        await pool.close()


async def measure(
    args: argparse.Namespace,
    mix: Mix,
    pool: asyncpg.Pool,
    procs: list[Proc],
    twilio: FakeTwilio,
    urls: list[str],
) -> int:
    api_pid = next(p.popen.pid for p in procs if p.name == "api0")
    base_args = argparse.Namespace(warmup=2, duration=args.baseline, concurrency=args.concurrency)
    baseline = await run_phase(
        "baseline SELECT 1",
        urls[0],
        lambda c, n: c.get(BASELINE_PATH),
        200,
        base_args,
        api_pid,
    )
    staff = {"Authorization": f"Bearer {mix.staff}"}
    async with httpx.AsyncClient(base_url=urls[0], timeout=60) as c:
        for counter in mix.counters:
            await c.post(f"/v1/counters/{counter}/open", headers=staff)

    stop = asyncio.Event()
    weights = {
        mix.availability: 3,
        mix.hold: 2,
        mix.booking: 2,
        mix.ticket: 2,
        mix.inbound: 1,
    }
    actions = list(weights)
    chances = list(weights.values())
    clients = [httpx.AsyncClient(base_url=urls[i % 2], timeout=60) for i in range(args.concurrency)]

    async def worker(c: httpx.AsyncClient) -> None:
        while not stop.is_set():
            await random.choices(actions, chances)[0](c)

    async def xacts() -> int:
        return int(
            await pool.fetchval(
                "SELECT xact_commit + xact_rollback FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
        )

    tasks = [asyncio.create_task(worker(c)) for c in clients]
    tasks += [
        asyncio.create_task(mix.counter(clients[i], counter, stop))
        for i, counter in enumerate(mix.counters)
    ]
    tasks += [asyncio.create_task(mix.subscriber(urls[i % 2], stop)) for i in range(args.sse)]
    await asyncio.sleep(5)  # warm-up
    mix.measuring = True
    x0, t0 = await xacts(), time.monotonic()
    memory: list[dict[str, float | None]] = []
    while time.monotonic() - t0 < args.duration:
        memory.append({p.name: rss_mb(p.popen.pid) for p in procs})
        await asyncio.sleep(min(60.0, args.duration - (time.monotonic() - t0)))
    x1, seconds = await xacts(), time.monotonic() - t0
    mix.measuring = False
    memory.append({p.name: rss_mb(p.popen.pid) for p in procs})
    stop.set()
    await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        t.cancel()
    for c in clients:
        await c.aclose()

    async with pool.acquire() as conn:
        overbooked = await ledger.overbooked(conn)
        busy = await conn.fetchval(
            "SELECT count(*) FROM (SELECT counter_id FROM tickets "
            "WHERE status IN ('called', 'serving') GROUP BY counter_id HAVING count(*) > 1) x"
        )
    return report(
        args, baseline.rps, mix, seconds, (x1 - x0) / seconds, memory, overbooked, busy, twilio
    )


def report(
    args: argparse.Namespace,
    baseline_rps: float,
    mix: Mix,
    seconds: float,
    tps: float,
    memory: list[dict[str, float | None]],
    overbooked: list[Any],
    busy: int,
    twilio: FakeTwilio,
) -> int:
    print(f"\nbaseline SELECT 1 (alone, {args.concurrency} clients): {baseline_rps:.0f} req/s")
    print(
        f"mixed load for {seconds:.0f} s: {args.concurrency} clients + {len(mix.counters)} "
        f"counters + {args.sse} SSE subscribers, 2 API processes, 2 workers\n"
    )
    print("| operation | req/s | x baseline | p50 / p99 ms | answers |")
    print("|---|---|---|---|---|")
    fivexx = 0
    for name, op in sorted(mix.ops.items()):
        lat = sorted(op.latencies)
        p50 = 1000 * lat[len(lat) // 2]
        p99 = 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))]
        rps = len(lat) / seconds
        fivexx += sum(n for k, n in op.outcomes.items() if k[:1] == "5" or not k[:1].isdigit())
        answers = ", ".join(f"{k}: {n}" for k, n in op.outcomes.most_common())
        print(
            f"| {name} | {rps:.1f} | {rps / baseline_rps:.3f} | {p50:.0f} / {p99:.0f} | {answers} |"
        )
    print(
        f"\nPostgreSQL: {tps:.0f} transactions/s; SSE events received: {mix.sse_events}; "
        f"SMS handed to Twilio: {len(twilio.messages)}"
    )
    print(
        "resident memory, MB, per minute: "
        + "; ".join(
            name + " " + " > ".join(f"{m[name]:.0f}" if m[name] else "-" for m in memory)
            for name in memory[0]
        )
    )
    print(
        f"5xx or transport errors: {fivexx}; ledger over capacity: {len(overbooked)}; "
        f"counters with two tickets: {busy}"
    )
    return 1 if fivexx or overbooked or busy else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--duration", type=float, default=180.0)
    parser.add_argument("--baseline", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sse", type=int, default=20)
    parser.add_argument("--customers", type=int, default=60_000)
    args = parser.parse_args()
    sys.exit(run(main_async(args)))


if __name__ == "__main__":
    main()
