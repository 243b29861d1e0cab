"""Walk-in queue benchmark: the real API process against busy branches.

Run by hand, from the repository root, in the dev virtualenv:

    python -m tests.bench.queue [--duration 10] [--rounds 3] [--concurrency 16]
                                [--queues 20] [--counters 20] [--call-waiting 3000]
                                [--read-waiting 500] [--subscribers 1000] [--profile]

Servers, database, Redis db and the API process exactly as `tests/bench/booking.py`
(`tests/bench/common.py`): `DATABASE_URL` / `REDIS_URL` when both are set, else
embedded ones; a database `selfserve_bench_<random>` created, migrated and dropped at
the end; an empty Redis db index claimed with the test suite's lease key; one API
process (`python -m tests.bench.server`: uvicorn, 1 worker, production settings,
pool of 10, plus `GET /bench/baseline`, a bare `SELECT 1` on the same pool) with a
live-feed channel prefix of its own.

Data (branches in Asia/Shanghai, open 24 hours every day, so no phase meets a
closing time), each with kiosks, a staff member and customers as
`tests/queue_helpers.py` seeds them:

- issue hall: `--queues` queues (prefixes A, B, ...; one service each, 5-15 min),
  10 open counters each skilled for 8 of the services, `--issue-waiting` tickets
  waiting at the start of each issue phase;
- call hall: 4 queues, `--counters` open counters each skilled for 3 of the 4
  services, `--call-waiting` tickets waiting (issued over the last 3 hours, half
  with a phone, 1 in 20 with a priority class), topped up after each call phase;
- read hall: 5 queues, 10 open counters, `--read-waiting` tickets, each owned by
  its own customer;
- live hall: 1 queue, 1 open counter, `--subscribers` + 1 waiting tickets, each
  owned by its own customer;
- `--history` finished / cancelled / no-show tickets of earlier days spread over
  the halls, with their `queue_day_numbers` rows.

Waiting tickets with a phone near the head of their queue are seeded as already
texted "turn near", as the app would have left them (`--untexted`: none is; then
the first concurrent call-nexts all mark the same rows, see README).

Load, in `--rounds` rounds (`--warmup` s unmeasured + `--duration` s measured per
phase), each ratio against the same round's baseline:

1. baseline `GET /bench/baseline`;
2. `POST /v1/tickets` with kiosk tokens (4 kiosks, an `Idempotency-Key` each
   request, half with a phone): spread over all queues, then all on one hot queue
   (its `queue_day_numbers` row is locked by every issue). The tickets issued are
   cancelled in SQL after each phase, so every phase starts at `--issue-waiting`;
3. call-next: one worker per open counter loops `POST /v1/counters/{id}/call-next`,
   `POST /v1/tickets/{id}/start`, `POST /v1/tickets/{id}/finish`. req/s and
   latency are those of call-next; server CPU per request is per whole cycle (3
   requests); start and finish have their own row;
4. `GET /v1/tickets/{id}` by each ticket's customer in the read hall.

Then SSE fan-out: `--subscribers` clients (raw asyncio streams, one connection
each) open `GET /v1/tickets/{id}/events` with their customer's token and read the
first `ticket` event; then staff call the head of the live queue once. Every
subscriber's ticket moves up one place, so each should receive a `position` event:
reported are how many did within `--sse-timeout` s, and the time from the
call-next response to each receipt (p50 / p99 / max), with the API's CPU for the
connections and for the fan-out (until the process is quiet again). Then `start`
of the called ticket publishes another board in which nobody moves; its CPU too.
Each round also reports the deadlocks PostgreSQL detected (`pg_stat_database`).
`--skip load` / `--skip sse` leave a part out.

`--profile` finally runs call-next cycles and ticket issues in this process (the
service functions on their own pool, no HTTP) under cProfile and prints where the
time goes. SIGTERM or Ctrl-C stops the API and drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import itertools
import math
import os
import pstats
import secrets
import signal
import statistics
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import msgspec

from selfserve import db
from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.logs import configure_logging
from selfserve.queueing import policy as call_policy
from selfserve.queueing import service as svc
from selfserve.queueing.models import TicketCreate
from selfserve.settings import Settings
from tests.bench.common import (
    BASELINE,
    BASELINE_PATH,
    Api,
    Phase,
    Request,
    api_server,
    create_database,
    drop_database,
    merge,
    process_cpu_s,
    raise_open_files,
    redis_db,
    run,
    run_phase,
    servers,
    table,
    with_database,
)

TIMEZONE = "Asia/Shanghai"
ALL_DAY = [{"weekday": d, "opens": "00:00", "closes": "24:00"} for d in range(1, 8)]
DURATIONS = (5, 8, 10, 12, 15)  # minutes, cycled over a hall's services
HISTORY_DAYS = 180
KIOSKS = 4

ISSUE_SPREAD = "POST /v1/tickets spread"
ISSUE_HOT = "POST /v1/tickets 1 queue"
CALL = "POST call-next (cycle)"
CALL_REST = "  start + finish"
READ = "GET /v1/tickets/{id}"
WIDTH = 26


# --- data ------------------------------------------------------------------------


@dataclass
class Hall:
    name: str
    branch_id: int
    services: list[int]
    queues: list[tuple[int, str, int]]  # (queue id, prefix, service id)
    counters: list[int]
    kiosks: list[str]  # "Bearer <jwt>" of the branch's kiosks
    staff: str  # "Bearer <jwt>" of a staff member of the branch
    tickets: list[int] = field(default_factory=list)  # customer-owned waiting tickets
    owners: list[str] = field(default_factory=list)  # their owners' "Bearer <jwt>"


@dataclass
class Seeded:
    issue: Hall
    call: Hall
    read: Hall
    live: Hall
    history: int = 0
    waiting: dict[str, int] = field(default_factory=dict)  # hall -> waiting tickets
    database_mb: float = 0.0
    seconds: float = 0.0


def bearer(settings: Settings, principal: Principal) -> str:
    return "Bearer " + issue_access_token(settings, principal)


def prefix_of(n: int) -> str:
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    return letters[n] if n < 26 else letters[n // 26 - 1] + letters[n % 26]


def today(now: datetime) -> date:
    return now.astimezone(ZoneInfo(TIMEZONE)).date()


async def make_hall(
    conn: asyncpg.Connection,
    settings: Settings,
    name: str,
    *,
    queues: int,
    counters: int,
    skills_per_counter: int,
) -> Hall:
    """A branch open 24 h with one service per queue, `counters` open counters (counter
    c serves services c .. c + skills_per_counter - 1, wrapping), kiosks and a clerk."""
    bid: int = await conn.fetchval(
        "INSERT INTO branches (name, timezone, opening_hours) "
        "VALUES ($1, $2, $3::text::jsonb) RETURNING id",
        name,
        TIMEZONE,
        msgspec.json.encode(ALL_DAY).decode(),
    )
    services: list[int] = []
    hall_queues: list[tuple[int, str, int]] = []
    for i in range(queues):
        sid: int = await conn.fetchval(
            "INSERT INTO services (branch_id, name, duration_min) VALUES ($1, $2, $3) RETURNING id",
            bid,
            f"Service {i + 1}",
            DURATIONS[i % len(DURATIONS)],
        )
        prefix = prefix_of(i)
        qid: int = await conn.fetchval(
            "INSERT INTO queues (branch_id, name, prefix) VALUES ($1, $2, $3) RETURNING id",
            bid,
            f"Queue {prefix}",
            prefix,
        )
        await conn.execute(
            "INSERT INTO queue_services (queue_id, service_id) VALUES ($1, $2)", qid, sid
        )
        services.append(sid)
        hall_queues.append((qid, prefix, sid))
    counter_ids: list[int] = []
    for c in range(counters):
        rid: int = await conn.fetchval(
            "INSERT INTO resources (branch_id, kind, name) VALUES ($1, 'counter', $2) RETURNING id",
            bid,
            f"Counter {c + 1}",
        )
        span = min(skills_per_counter, len(services))
        await conn.executemany(
            "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)",
            [(rid, services[(c + k) % len(services)]) for k in range(span)],
        )
        counter_ids.append(rid)
    staff_id: int = await conn.fetchval(
        "INSERT INTO staff (email, name, password_hash, role) "
        "VALUES ($1, 'Clerk', 'x', 'staff') RETURNING id",
        f"clerk-{bid}@bench.example",
    )
    await conn.execute(
        "INSERT INTO staff_branches (staff_id, branch_id) VALUES ($1, $2)", staff_id, bid
    )
    await conn.execute(
        "INSERT INTO counter_states (resource_id, branch_id, open, opened_at, opened_by) "
        "SELECT unnest($1::bigint[]), $2, true, now(), $3",
        counter_ids,
        bid,
        staff_id,
    )
    kiosks = []
    for k in range(KIOSKS):
        did: int = await conn.fetchval(
            "INSERT INTO devices (branch_id, name, secret_hash) VALUES ($1, $2, '\\x00') "
            "RETURNING id",
            bid,
            f"Kiosk {k + 1}",
        )
        kiosks.append(
            bearer(
                settings,
                Principal(kind="device", id=did, role="kiosk", channel="kiosk", branches=(bid,)),
            )
        )
    staff = bearer(
        settings,
        Principal(kind="staff", id=staff_id, role="staff", channel="staff", branches=(bid,)),
    )
    return Hall(name, bid, services, hall_queues, counter_ids, kiosks, staff)


# Earlier days' tickets of a hall: $6 a day over the days before today (branch time),
# 08:00-18:00, round robin over the queues; 85% done, 10% cancelled, 5% no-show.
HISTORY = """
WITH q AS (
    SELECT x.id, x.prefix, x.service_id, (x.n - 1)::int AS idx, count(*) OVER () AS nq
    FROM unnest($2::bigint[], $3::text[], $4::bigint[]) WITH ORDINALITY AS x(id, prefix, service_id, n)
), c AS (
    SELECT y.id, (y.n - 1)::int AS idx, count(*) OVER () AS nc
    FROM unnest($5::bigint[]) WITH ORDINALITY AS y(id, n)
), g AS (
    SELECT i, i / $6::int AS d, i % $6::int AS k, random() AS roll,
           (now() AT TIME ZONE $8::text)::date - (1 + i / $6::int) AS day
    FROM generate_series(0, $7::int - 1) AS i
), t AS (
    SELECT g.*, (g.day + make_interval(secs => 28800 + g.k * 36000.0 / $6::int))
                AT TIME ZONE $8::text AS issued
    FROM g
), n AS (
    SELECT t.*, q.id AS queue_id, q.prefix, q.service_id, 1 + t.k / q.nq AS number,
           c.id AS counter_id
    FROM t JOIN q ON q.idx = t.k % q.nq JOIN c ON c.idx = t.i % c.nc
)
INSERT INTO tickets (branch_id, queue_id, service_id, local_date, number, display_code,
                     channel, status, issued_at, created_at, counter_id, called_at,
                     started_at, finished_at, ended_at, updated_at)
SELECT $1, n.queue_id, n.service_id, n.day, n.number,
       n.prefix || lpad(n.number::text, greatest(3, length(n.number::text)), '0'),
       'kiosk',
       CASE WHEN n.roll < 0.85 THEN 'done' WHEN n.roll < 0.95 THEN 'cancelled'
            ELSE 'no_show' END,
       n.issued, n.issued,
       CASE WHEN n.roll < 0.85 OR n.roll >= 0.95 THEN n.counter_id END,
       CASE WHEN n.roll < 0.85 OR n.roll >= 0.95 THEN n.issued + interval '12 minutes' END,
       CASE WHEN n.roll < 0.85 THEN n.issued + interval '13 minutes' END,
       CASE WHEN n.roll < 0.85 THEN n.issued + interval '23 minutes' END,
       n.issued + interval '23 minutes', n.issued + interval '23 minutes'
FROM n
"""

NUMBERS = """
INSERT INTO queue_day_numbers (branch_id, prefix, local_date, last_number)
SELECT t.branch_id, q.prefix, t.local_date, max(t.number)
FROM tickets t JOIN queues q ON q.id = t.queue_id
WHERE t.branch_id = $1
GROUP BY 1, 2, 3
ON CONFLICT (branch_id, prefix, local_date)
DO UPDATE SET last_number = greatest(queue_day_numbers.last_number, excluded.last_number)
"""


async def seed_history(conn: asyncpg.Connection, hall: Hall, n: int) -> None:
    if n <= 0:
        return
    per_day = max(1, math.ceil(n / HISTORY_DAYS))
    await conn.execute(
        HISTORY,
        hall.branch_id,
        [q[0] for q in hall.queues],
        [q[1] for q in hall.queues],
        [q[2] for q in hall.queues],
        hall.counters,
        per_day,
        n,
        TIMEZONE,
    )
    await conn.execute(NUMBERS, hall.branch_id)


async def customers(conn: asyncpg.Connection, prefix: str, n: int) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        "INSERT INTO customers (phone, locale) "
        "SELECT $1 || lpad(g::text, 8, '0'), CASE WHEN g % 3 = 0 THEN 'en' ELSE 'zh-CN' END "
        "FROM generate_series(1, $2::int) AS g RETURNING id, phone",
        prefix,
        n,
    )
    return sorted((r["id"], r["phone"]) for r in rows)


_phones = itertools.count(1)
TICKET_COLUMNS = (
    "branch_id",
    "queue_id",
    "service_id",
    "local_date",
    "number",
    "display_code",
    "priority",
    "channel",
    "customer_id",
    "phone",
    "issued_at",
)


async def add_waiting(
    conn: asyncpg.Connection,
    hall: Hall,
    n: int,
    *,
    span: timedelta,
    phone_share: float = 0.5,
    priority_every: int = 0,
    owners: list[tuple[int, str]] | None = None,
    queue: int | None = None,
) -> list[int]:
    """`n` waiting tickets issued evenly over the last `span` (oldest first), round
    robin over the queues (or all on `queue`), numbered on from today's
    `queue_day_numbers`. With `owners` each ticket belongs to one (their phone,
    channel app); else kiosk tickets, `phone_share` of them with a phone."""
    if n <= 0:
        return []
    now = datetime.now(UTC)
    day = today(now)
    last = {
        r["prefix"]: r["last_number"]
        for r in await conn.fetch(
            "SELECT prefix, last_number FROM queue_day_numbers "
            "WHERE branch_id = $1 AND local_date = $2",
            hall.branch_id,
            day,
        )
    }
    records = []
    for i in range(n):
        qid, prefix, sid = hall.queues[queue if queue is not None else i % len(hall.queues)]
        number = last.get(prefix, 0) + 1
        last[prefix] = number
        customer_id: int | None = None
        phone: str | None = None
        if owners is not None:
            customer_id, phone = owners[i]
        elif math.floor((i + 1) * phone_share) > math.floor(i * phone_share):
            phone = f"+86136{next(_phones):08d}"
        records.append(
            (
                hall.branch_id,
                qid,
                sid,
                day,
                number,
                svc.display_code(prefix, number),
                1 if priority_every and i % priority_every == priority_every - 1 else 0,
                "app" if owners is not None else "kiosk",
                customer_id,
                phone,
                now - span * (n - i) / n,
            )
        )
    await conn.copy_records_to_table("tickets", records=records, columns=TICKET_COLUMNS)
    await conn.executemany(
        "INSERT INTO queue_day_numbers (branch_id, prefix, local_date, last_number) "
        "VALUES ($1, $2, $3, $4) ON CONFLICT (branch_id, prefix, local_date) "
        "DO UPDATE SET last_number = excluded.last_number",
        [(hall.branch_id, p, day, number) for p, number in last.items()],
    )
    rows = await conn.fetch(
        "SELECT id FROM tickets WHERE branch_id = $1 AND status = 'waiting' "
        "ORDER BY id DESC LIMIT $2",
        hall.branch_id,
        n,
    )
    return sorted(r["id"] for r in rows)


# The app texts "turn near" once a ticket with a phone has fewer than
# `turn_near_position` ahead in its queue, and marks it; seeded tickets already near
# the head are marked as if that had happened (queue order by issue time).
TEXTED = """
UPDATE tickets t SET turn_near_sent = true
FROM (
    SELECT id, row_number() OVER (PARTITION BY queue_id ORDER BY issued_at, id) AS place
    FROM tickets WHERE branch_id = $1 AND status = 'waiting'
) r
WHERE t.id = r.id AND r.place <= $2 AND t.phone IS NOT NULL
"""


async def waiting_count(conn: asyncpg.Connection | asyncpg.Pool, branch_id: int) -> int:
    n: int = await conn.fetchval(
        "SELECT count(*) FROM tickets WHERE branch_id = $1 AND status = 'waiting'", branch_id
    )
    return n


async def seed(database_url: str, settings: Settings, args: argparse.Namespace) -> Seeded:
    started = time.perf_counter()
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT setseed(0.42)")
        async with conn.transaction():
            await conn.execute("SET LOCAL synchronous_commit = off")
            issue = await make_hall(
                conn, settings, "Issue Hall", queues=args.queues, counters=10, skills_per_counter=8
            )
            call = await make_hall(
                conn,
                settings,
                "Call Hall",
                queues=4,
                counters=args.counters,
                skills_per_counter=3,
            )
            read = await make_hall(
                conn, settings, "Read Hall", queues=5, counters=10, skills_per_counter=2
            )
            live = await make_hall(
                conn, settings, "Live Hall", queues=1, counters=1, skills_per_counter=1
            )
            for hall in (issue, call, read, live):
                await seed_history(conn, hall, args.history // 4)
            await add_waiting(conn, issue, args.issue_waiting, span=timedelta(hours=1))
            await add_waiting(
                conn, call, args.call_waiting, span=timedelta(hours=3), priority_every=20
            )
            owners = await customers(conn, "+86135", args.read_waiting)
            read.tickets = await add_waiting(
                conn, read, args.read_waiting, span=timedelta(hours=1), owners=owners
            )
            read.owners = [_customer(settings, cid) for cid, _ in owners]
            owners = await customers(conn, "+86134", args.subscribers + 1)
            live.tickets = await add_waiting(
                conn, live, args.subscribers + 1, span=timedelta(hours=2), owners=owners
            )
            live.owners = [_customer(settings, cid) for cid, _ in owners]
            for hall in (issue, call, read, live):
                if not args.untexted:
                    await conn.execute(TEXTED, hall.branch_id, settings.turn_near_position)
        await conn.execute("ANALYZE")
        waiting = {
            h.name: await waiting_count(conn, h.branch_id) for h in (issue, call, read, live)
        }
        history: int = await conn.fetchval("SELECT count(*) FROM tickets WHERE status <> 'waiting'")
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
    finally:
        await conn.close()
    return Seeded(
        issue=issue,
        call=call,
        read=read,
        live=live,
        history=history,
        waiting=waiting,
        database_mb=size / 2**20,
        seconds=time.perf_counter() - started,
    )


def _customer(settings: Settings, customer_id: int) -> str:
    return bearer(
        settings,
        Principal(kind="customer", id=customer_id, role="customer", channel="app", branches=()),
    )


# --- load: issue, reads ----------------------------------------------------------------


_issue_phones = itertools.count(1)


def issuer(hall: Hall, queue_ids: list[int], tag: str) -> Request:
    """Kiosk issues round robin over `queue_ids`, each with its own Idempotency-Key;
    every other one with a phone."""

    def request(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        body: dict[str, Any] = {"queue_id": queue_ids[i % len(queue_ids)]}
        if i % 2:
            body["phone"] = f"+86133{next(_issue_phones):08d}"
        return client.post(
            "/v1/tickets",
            json=body,
            headers={
                "Authorization": hall.kiosks[i % len(hall.kiosks)],
                "Idempotency-Key": f"{tag}-{i}-{uuid.uuid4().hex}",
            },
        )

    return request


async def cancel_since(database_url: str, hall: Hall, after_id: int) -> int:
    """Cancel the waiting tickets the phase issued (ids above `after_id`)."""
    conn = await asyncpg.connect(database_url)
    try:
        done: str = await conn.execute(
            "UPDATE tickets SET status = 'cancelled', ended_at = now(), updated_at = now() "
            "WHERE branch_id = $1 AND status = 'waiting' AND id > $2",
            hall.branch_id,
            after_id,
        )
        return int(done.split()[-1])
    finally:
        await conn.close()


async def last_ticket_id(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval("SELECT coalesce(max(id), 0) FROM tickets")
        return n
    finally:
        await conn.close()


async def deadlocks(database_url: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
        return n
    finally:
        await conn.close()


async def top_up(database_url: str, hall: Hall, wanted: int) -> tuple[int, int]:
    """Bring the hall back to `wanted` waiting tickets (new ones at the back)."""
    conn = await asyncpg.connect(database_url)
    try:
        before = await waiting_count(conn, hall.branch_id)
        async with conn.transaction():
            await add_waiting(
                conn, hall, wanted - before, span=timedelta(seconds=1), priority_every=20
            )
        return before, await waiting_count(conn, hall.branch_id)
    finally:
        await conn.close()


# --- load: call-next cycles ------------------------------------------------------------


async def call_phase(api: Api, hall: Hall, args: argparse.Namespace) -> tuple[Phase, Phase]:
    """One worker per open counter: call-next, start, finish, again, for warmup +
    duration seconds. Returns the call-next phase (CPU over the whole cycles) and
    the start + finish phase (latencies only)."""
    loop = asyncio.get_running_loop()
    measure_from = loop.time() + args.warmup
    deadline = measure_from + args.duration
    calls: list[float] = []
    steps: list[float] = []
    failures: Counter[str] = Counter()
    step_failures: Counter[str] = Counter()
    ran_out: list[float] = []
    headers = {"Authorization": hall.staff}
    limits = httpx.Limits(
        max_connections=len(hall.counters), max_keepalive_connections=len(hall.counters)
    )

    async def post(client: httpx.AsyncClient, path: str) -> tuple[str, dict[str, Any], float]:
        t0 = loop.time()
        try:
            response = await client.post(path, headers=headers)
            outcome = str(response.status_code)
            body: dict[str, Any] = response.json()
            if response.status_code != 200:
                outcome += " " + str(body.get("code"))
        except (httpx.HTTPError, ValueError) as exc:
            outcome, body = type(exc).__name__, {}
        return outcome, body, loop.time() - t0

    async with httpx.AsyncClient(base_url=api.url, timeout=60, limits=limits) as client:

        async def counter(counter_id: int) -> None:
            while loop.time() < deadline:
                outcome, body, took = await post(client, f"/v1/counters/{counter_id}/call-next")
                measured = measure_from <= loop.time() <= deadline
                if measured:
                    calls.append(took)
                    if outcome != "200":
                        failures[outcome] += 1
                if outcome != "200":
                    if outcome.endswith("no_ticket_waiting"):
                        ran_out.append(loop.time())
                        return
                    await asyncio.sleep(0.1)
                    continue
                for step in ("start", "finish"):
                    outcome, _, took = await post(client, f"/v1/tickets/{body['id']}/{step}")
                    if measure_from <= loop.time() <= deadline:
                        steps.append(took)
                        if outcome != "200":
                            step_failures[f"{step} {outcome}"] += 1

        async def meter() -> tuple[float | None, float, float | None, float]:
            await asyncio.sleep(max(0.0, measure_from - loop.time()))
            s0, c0 = process_cpu_s(api.pid), time.process_time()
            await asyncio.sleep(max(0.0, deadline - loop.time()))
            s1, c1 = process_cpu_s(api.pid), time.process_time()
            return s0, c0, s1, c1

        metering = asyncio.create_task(meter())
        await asyncio.gather(*(counter(c) for c in hall.counters))
        s0, c0, s1, c1 = await metering
    seconds, note = args.duration, ""
    if ran_out and min(ran_out) < deadline:
        seconds = max(0.0, min(ran_out) - measure_from)
        note = "ran out of waiting tickets"
    cpu = None if s0 is None or s1 is None else s1 - s0
    return (
        Phase(CALL, seconds, calls, failures, cpu, c1 - c0, note),
        Phase(CALL_REST, seconds, steps, step_failures, None, 0.0, note),
    )


# --- the rounds ------------------------------------------------------------------------


def count_deadlocks(notes: list[str], name: str, before: int, after: int) -> None:
    if after > before:
        notes.append(f"{name}: {after - before} deadlock(s) detected")


async def load_phases(
    api: Api, seeded: Seeded, database_url: str, args: argparse.Namespace
) -> list[dict[str, Phase]]:
    def baseline(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        return client.get(BASELINE_PATH)

    read = seeded.read

    def position(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        k = i % len(read.tickets)
        return client.get(
            f"/v1/tickets/{read.tickets[k]}", headers={"Authorization": read.owners[k]}
        )

    issue = seeded.issue
    all_queues = [q[0] for q in issue.queues]
    rounds: list[dict[str, Phase]] = []
    for n in range(1, args.rounds + 1):
        phases: dict[str, Phase] = {}
        notes: list[str] = []
        deadlocked = await deadlocks(database_url)
        phases[BASELINE] = await run_phase(BASELINE, api.url, baseline, 200, args, api.pid)
        for name, queues, tag in (
            (ISSUE_SPREAD, all_queues, f"{n}1"),
            (ISSUE_HOT, all_queues[:1], f"{n}2"),
        ):
            mark = await last_ticket_id(database_url)
            d0 = await deadlocks(database_url)
            phases[name] = await run_phase(
                name, api.url, issuer(issue, queues, tag), 201, args, api.pid
            )
            count_deadlocks(notes, name, d0, await deadlocks(database_url))
            issued = await cancel_since(database_url, issue, mark)
            notes.append(f"{name}: waiting {args.issue_waiting} -> {args.issue_waiting + issued}")
        d0 = await deadlocks(database_url)
        call, rest = await call_phase(api, seeded.call, args)
        count_deadlocks(notes, "call-next", d0, await deadlocks(database_url))
        phases[CALL], phases[CALL_REST] = call, rest
        before, after = await top_up(database_url, seeded.call, args.call_waiting)
        notes.append(f"call-next: waiting {args.call_waiting} -> {before} (topped up: {after})")
        d0 = await deadlocks(database_url)
        phases[READ] = await run_phase(READ, api.url, position, 200, args, api.pid)
        count_deadlocks(notes, READ, d0, await deadlocks(database_url))
        notes.append(f"deadlocks in the round: {await deadlocks(database_url) - deadlocked}")
        rounds.append(phases)
        base = phases[BASELINE].rps
        print(
            f"round {n}: "
            + ", ".join(
                f"{name.strip()} {p.rps:.1f} req/s"
                + ("" if name in (BASELINE, CALL_REST) else f" ({p.rps / base:.3f}x)")
                for name, p in phases.items()
            )
            + "\n  "
            + "; ".join(notes),
            flush=True,
        )
    return rounds


def latency_lines(rounds: list[dict[str, Phase]]) -> str:
    lines = []
    for name in (ISSUE_SPREAD, ISSUE_HOT, CALL, CALL_REST, READ):
        merged = merge([r[name] for r in rounds])
        lines.append(
            f"  {name.strip():<24} p90 {merged.percentile_ms(0.9):7.1f} ms, "
            f"max {merged.percentile_ms(1.0):7.1f} ms, {merged.requests} requests measured"
        )
    return "\n".join(lines)


# --- SSE fan-out -----------------------------------------------------------------------


@dataclass
class Subscriber:
    ticket_id: int
    token: str
    status: str = ""  # the HTTP status line, or the error that ended it
    position: int | None = None  # from the first `ticket` event
    connected_at: float | None = None
    events: list[tuple[float, str, str]] = field(default_factory=list)  # after the mark


class Mark:
    """Set just before the call-next is sent: events are recorded from then on."""

    def __init__(self) -> None:
        self.at: float | None = None
        self.expected = 0
        self.received = 0
        self.all_received = asyncio.Event()


async def sse_events(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[tuple[str, str]]:
    """(event, data) of a Server-Sent Events body; comments are skipped."""

    async def pieces() -> AsyncIterator[bytes]:
        if not chunked:
            while data := await reader.read(65536):
                yield data
            return
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                return
            data = await reader.readexactly(size)
            await reader.readexactly(2)
            yield data

    buffer = b""
    async for piece in pieces():
        buffer = (buffer + piece).replace(b"\r\n", b"\n")
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            event, data = "message", []
            for line in block.decode().split("\n"):
                if line.startswith(":") or not line:
                    continue
                key, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if key == "event":
                    event = value
                elif key == "data":
                    data.append(value)
            if data:
                yield event, "\n".join(data)


async def subscribe(
    url: str,
    sub: Subscriber,
    gate: asyncio.Semaphore,
    connected: asyncio.Event,
    mark: Mark,
) -> None:
    """One EventSource-like client on its own connection, until cancelled. Holds
    `gate` until its first event (so only so many connect at once)."""
    loop = asyncio.get_running_loop()
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    writer: asyncio.StreamWriter | None = None
    released = False
    await gate.acquire()
    try:
        reader, writer = await asyncio.open_connection(host, port, limit=2**20)
        writer.write(
            (
                f"GET /v1/tickets/{sub.ticket_id}/events HTTP/1.1\r\n"
                f"Host: {host}:{port}\r\nAccept: text/event-stream\r\n"
                f"Authorization: {sub.token}\r\nAccept-Language: en\r\n\r\n"
            ).encode()
        )
        await writer.drain()
        sub.status = (await reader.readline()).decode().strip()
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            key, _, value = line.decode().partition(":")
            headers[key.strip().lower()] = value.strip()
        if " 200" not in sub.status:
            return
        chunked = "chunked" in headers.get("transfer-encoding", "")
        async for event, data in sse_events(reader, chunked):
            now = loop.time()
            if sub.connected_at is None and event == "ticket":
                sub.position = msgspec.json.decode(data).get("position")
                sub.connected_at = now
                gate.release()
                released = True
                connected.set()
                continue
            if mark.at is None:
                continue
            if event in ("position", "called") and not any(
                e[1] in ("position", "called") for e in sub.events
            ):
                mark.received += 1
                if mark.received >= mark.expected:
                    mark.all_received.set()
            sub.events.append((now, event, data))
        sub.status += " (stream ended)"
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        sub.status = f"{sub.status} {type(exc).__name__}: {exc}".strip()
    finally:
        if not released:
            gate.release()
            connected.set()
        if writer is not None:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@dataclass
class FanOut:
    subscribers: int
    connected: int
    connect_s: float
    connect_cpu_ms: float | None  # API CPU per subscription
    call_status: str
    call_ms: float
    received: int
    moved_up: int  # position events with exactly one place less
    after_response_ms: list[float]
    after_send_ms: list[float]
    fanout_cpu_s: float | None  # from the call until the API went quiet
    statuses: Counter[str]
    start_status: str
    start_cpu_s: float | None
    start_told: int  # subscribers that got an event after the start


async def fan_out(api: Api, hall: Hall, args: argparse.Namespace) -> FanOut:
    """`--subscribers` SSE clients on the tickets behind the head of the live queue,
    then one call-next (which takes the head): who hears that they moved up?"""
    loop = asyncio.get_running_loop()
    subs = [
        Subscriber(tid, token) for tid, token in zip(hall.tickets[1:], hall.owners[1:], strict=True)
    ]
    gate = asyncio.Semaphore(args.sse_connect_concurrency)
    mark = Mark()
    mark.expected = len(subs)
    flags = [asyncio.Event() for _ in subs]
    cpu0 = process_cpu_s(api.pid)
    t0 = loop.time()
    tasks = [
        asyncio.create_task(subscribe(api.url, s, gate, f, mark))
        for s, f in zip(subs, flags, strict=True)
    ]
    try:
        waiting = [asyncio.create_task(f.wait()) for f in flags]
        _, pending = await asyncio.wait(waiting, timeout=args.sse_timeout * 10)
        for p in pending:
            p.cancel()
        connect_s = loop.time() - t0
        cpu1 = process_cpu_s(api.pid)
        connected = [s for s in subs if s.connected_at is not None]
        print(
            f"SSE: {len(connected)} of {len(subs)} subscribers connected in {connect_s:.1f} s",
            flush=True,
        )
        await asyncio.sleep(1.0)  # let everything settle
        headers = {"Authorization": hall.staff}
        async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
            await client.get("/health")  # the connection is open before the mark
            mark.expected = len(connected)
            cpu2 = process_cpu_s(api.pid)
            mark.at = sent = loop.time()
            response = await client.post(
                f"/v1/counters/{hall.counters[0]}/call-next", headers=headers
            )
            answered = loop.time()
        call_status = str(response.status_code)
        if response.status_code != 200:
            call_status += " " + response.text[:200]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(mark.all_received.wait(), args.sse_timeout)
        fanout_cpu = await cpu_until_quiet(api.pid, cpu2)
        # A second board, after `start` (the called customer arrived): nobody moves.
        start_status, start_cpu, second = "-", None, loop.time()
        if response.status_code == 200:
            async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
                cpu4 = process_cpu_s(api.pid)
                second = loop.time()
                started = await client.post(
                    f"/v1/tickets/{response.json()['id']}/start", headers=headers
                )
            start_status = str(started.status_code)
            start_cpu = await cpu_until_quiet(api.pid, cpu4)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    after_response, after_send, moved_up = [], [], 0
    for s in connected:
        first = next((e for e in s.events if e[1] in ("position", "called")), None)
        if first is None:
            continue
        after_response.append(1000 * (first[0] - answered))
        after_send.append(1000 * (first[0] - sent))
        if first[1] == "position" and s.position is not None:
            new = msgspec.json.decode(first[2]).get("position")
            moved_up += new == s.position - 1
    return FanOut(
        subscribers=len(subs),
        connected=len(connected),
        connect_s=connect_s,
        connect_cpu_ms=None
        if cpu0 is None or cpu1 is None
        else 1000 * (cpu1 - cpu0) / max(len(connected), 1),
        call_status=call_status,
        call_ms=1000 * (answered - sent),
        received=len(after_response),
        moved_up=moved_up,
        after_response_ms=sorted(after_response),
        after_send_ms=sorted(after_send),
        fanout_cpu_s=fanout_cpu,
        statuses=Counter(s.status.split(" (")[0] for s in subs),
        start_status=start_status,
        start_cpu_s=start_cpu,
        start_told=sum(any(e[0] >= second for e in s.events) for s in connected),
    )


async def cpu_until_quiet(pid: int, since: float | None, limit_s: float = 120.0) -> float | None:
    """API CPU seconds from `since` until the process goes quiet (under 2 clock ticks
    in each of two 0.25 s samples in a row), the quiet samples left out."""
    if since is None:
        return None
    loop = asyncio.get_running_loop()
    end = loop.time() + limit_s
    busy = last = since
    quiet = 0
    while quiet < 2 and loop.time() < end:
        await asyncio.sleep(0.25)
        now = process_cpu_s(pid)
        if now is None:
            return None
        if now - last < 2 / os.sysconf("SC_CLK_TCK"):
            quiet += 1
        else:
            quiet, busy = 0, now
        last = now
    return busy - since


def _pct(values: list[float], p: float) -> float:
    if not values:
        return math.nan
    return values[min(len(values) - 1, math.ceil(p * len(values)) - 1)]


def fan_out_report(f: FanOut) -> str:
    cpu = "-" if f.connect_cpu_ms is None else f"{f.connect_cpu_ms:.1f} ms"
    fan = "-" if f.fanout_cpu_s is None else f"{1000 * f.fanout_cpu_s:.0f} ms"
    lines = [
        f"SSE fan-out: {f.connected} of {f.subscribers} subscribers connected in "
        f"{f.connect_s:.1f} s (API CPU {cpu} per subscription); HTTP status lines: "
        + ", ".join(f"{k or '-'}: {v}" for k, v in f.statuses.most_common()),
        f"  one call-next: {f.call_status} in {f.call_ms:.0f} ms; "
        f"{f.received} of {f.connected} subscribers received their event "
        f"({f.moved_up} a `position` one place up); API CPU from the call until it "
        f"went quiet {fan}",
        f"  then `start` of the called ticket ({f.start_status}): another board, "
        f"{f.start_told} subscribers sent an event; API CPU until quiet "
        + ("-" if f.start_cpu_s is None else f"{1000 * f.start_cpu_s:.0f} ms"),
    ]
    for label, values in (
        ("after the call-next response", f.after_response_ms),
        ("after the call-next was sent", f.after_send_ms),
    ):
        if values:
            lines.append(
                f"  receipt {label}: p50 {_pct(values, 0.5):.0f} ms, "
                f"p99 {_pct(values, 0.99):.0f} ms, max {values[-1]:.0f} ms, "
                f"min {values[0]:.0f} ms"
            )
    return "\n".join(lines)


# --- profile (in this process, no HTTP) ---------------------------------------------------


async def profile(
    database_url: str, seeded: Seeded, settings: Settings, args: argparse.Namespace
) -> str:
    """cProfile of call-next cycles (with the board each publishes) on the call hall,
    and of ticket issues (with their board) on the issue hall, through the service
    functions on a pool of this process."""
    pool = await db.create_pool(database_url, min_size=1, max_size=2)
    out = io.StringIO()
    conn_settings = settings
    try:
        hall = seeded.call
        staff = Principal(kind="staff", id=0, role="staff", channel="staff", branches=None)
        n = args.profile_cycles
        timings: dict[str, list[float]] = {}

        def timed(name: str, t0: float) -> None:
            timings.setdefault(name, []).append(time.perf_counter() - t0)

        async def board(branch_id: int) -> None:
            t0 = time.perf_counter()
            async with pool.acquire() as conn:
                await svc.board_snapshot(conn, branch_id, svc.utcnow(), conn_settings)
            timed("board_snapshot", t0)

        async def cycles() -> None:
            for i in range(n):
                counter = hall.counters[i % len(hall.counters)]
                t0 = time.perf_counter()
                changed = await svc.call_next(
                    pool, staff, counter, now=svc.utcnow(), settings=conn_settings, locale="en"
                )
                timed("call_next", t0)
                await board(hall.branch_id)
                for action in ("start", "finish"):
                    t0 = time.perf_counter()
                    await svc.act(
                        pool,
                        staff,
                        changed.ticket.id,
                        action,
                        now=svc.utcnow(),
                        settings=conn_settings,
                        locale="en",
                    )
                    timed(action, t0)
                    await board(hall.branch_id)

        async def issues() -> None:
            kiosk = Principal(kind="device", id=0, role="kiosk", channel="kiosk", branches=None)
            for i in range(n):
                t0 = time.perf_counter()
                await svc.issue_ticket(
                    pool,
                    kiosk,
                    TicketCreate(queue_id=seeded.issue.queues[i % len(seeded.issue.queues)][0]),
                    idempotency_key=None,
                    now=svc.utcnow(),
                    settings=conn_settings,
                    locale="en",
                )
                timed("issue_ticket", t0)
                await board(seeded.issue.branch_id)

        for label, work, branch_id in (
            ("call-next cycles", cycles, hall.branch_id),
            ("ticket issues", issues, seeded.issue.branch_id),
        ):
            waiting = await waiting_count(pool, branch_id)
            timings.clear()
            await work()  # timed without the profiler
            plain = {k: statistics.median(v) for k, v in timings.items()}
            profiler = cProfile.Profile()
            profiler.enable()
            await work()
            profiler.disable()
            out.write(f"\n--- {n} {label} in-process, {waiting} waiting; median per operation:\n")
            for name, value in plain.items():
                out.write(f"  {name:<15} {1000 * value:7.1f} ms\n")
            out.write(f"then {n} more under cProfile, by cumulative time (selfserve only):\n")
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(r"selfserve/", args.profile_lines)
            out.write("by own time (everything):\n")
            stats.sort_stats("tottime").print_stats(args.profile_lines)
        out.write(await explain_call_next(pool, hall, settings))
    finally:
        await pool.close()
    return out.getvalue()


async def explain_call_next(pool: asyncpg.Pool, hall: Hall, settings: Settings) -> str:
    """EXPLAIN ANALYZE of call-next's UPDATE for the hall's first counter, rolled back."""
    async with pool.acquire() as conn:
        services = [
            r["service_id"]
            for r in await conn.fetch(
                "SELECT service_id FROM resource_skills WHERE resource_id = $1", hall.counters[0]
            )
        ]
        now = svc.utcnow()
        aged, due = call_policy.cutoffs(now, svc.config_of(settings))
        tx = conn.transaction()
        await tx.start()
        try:
            rows = await conn.fetch(
                "EXPLAIN (ANALYZE, BUFFERS) " + svc.CALL_NEXT,
                hall.branch_id,
                services,
                aged,
                due,
                hall.counters[0],
                now,
            )
        finally:
            await tx.rollback()
    return "\nEXPLAIN ANALYZE of call-next's UPDATE (rolled back):\n" + "\n".join(
        r[0] for r in rows
    )


# --- main ------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.queue",
        description="Walk-in queue benchmark against a real API process "
        "(see the module docstring).",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all phases")
    parser.add_argument("--concurrency", type=int, default=16, help="client workers (not call)")
    parser.add_argument("--queues", type=int, default=20, help="queues of the issue hall")
    parser.add_argument(
        "--issue-waiting", type=int, default=200, help="waiting at each issue phase's start"
    )
    parser.add_argument("--counters", type=int, default=20, help="open counters, call hall")
    parser.add_argument("--call-waiting", type=int, default=3000, help="waiting, call hall")
    parser.add_argument("--read-waiting", type=int, default=500, help="waiting, read hall")
    parser.add_argument("--subscribers", type=int, default=1000, help="SSE subscribers")
    parser.add_argument(
        "--sse-connect-concurrency", type=int, default=50, help="SSE connections opened at once"
    )
    parser.add_argument(
        "--sse-timeout", type=float, default=30.0, help="seconds to wait for the SSE events"
    )
    parser.add_argument("--history", type=int, default=100_000, help="tickets of earlier days")
    parser.add_argument("--pool-max", type=int, default=0, help="SELFSERVE_DB_POOL_MAX (app: 10)")
    parser.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    parser.add_argument(
        "--profile", action="store_true", help="cProfile call-next and issue in-process"
    )
    parser.add_argument("--profile-cycles", type=int, default=30, help="operations profiled")
    parser.add_argument("--profile-lines", type=int, default=25, help="functions printed")
    parser.add_argument(
        "--untexted",
        action="store_true",
        help="seed no ticket as already texted 'turn near' (concurrent first calls then "
        "mark the same rows)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=["load", "sse"],
        help="leave out the rounds (load) or the SSE fan-out (sse)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.rounds, args.concurrency, args.queues, args.counters, args.subscribers) < 1:
        raise SystemExit("bench: counts must be positive")
    if args.queues > 26 * 27:
        raise SystemExit("bench: at most 702 queues (two-letter prefixes)")
    configure_logging("console", "WARNING")
    files = raise_open_files(2 * args.subscribers + 1024)
    secret = secrets.token_urlsafe(48)
    settings = Settings(environment="production", jwt_secret=secret, access_token_ttl_s=3600)
    ok = True
    with servers() as (admin_url, redis_server_url), redis_db(redis_server_url) as redis_url:
        name = run(create_database(admin_url))
        database_url = with_database(admin_url, name)
        print(f"database: {name} (created, migrated; dropped at the end)")
        try:
            seeded = run(seed(database_url, settings, args))
            print(
                f"seeded in {seeded.seconds:.1f} s: {seeded.history} tickets of earlier days; "
                "waiting: "
                + ", ".join(f"{k} {v}" for k, v in seeded.waiting.items())
                + f"; database {seeded.database_mb:.0f} MB; open files limit {files}"
            )
            with api_server(database_url, redis_url, secret, args) as api:
                print(
                    f"API: {api.url} (pid {api.pid}); {args.concurrency} workers "
                    f"({args.counters} for call-next), {args.warmup:g} s warm-up + "
                    f"{args.duration:g} s measured per phase\n",
                    flush=True,
                )
                if "load" not in args.skip:
                    rounds = run(load_phases(api, seeded, database_url, args))
                    print(f"\n{len(rounds)} round(s)\n")
                    print(table(rounds, width=WIDTH))
                    print(
                        "(call-next: req/s and latency of call-next; CPU per whole cycle "
                        "of call-next + start + finish)\n" + latency_lines(rounds)
                    )
                    for phases in rounds:
                        for phase in phases.values():
                            ok = ok and not phase.failures
                fan: FanOut | None = None
                if "sse" not in args.skip:
                    print()
                    fan = run(fan_out(api, seeded.live, args))
                    print(fan_out_report(fan))
                    if fan.received < fan.subscribers:
                        ok = False
                        print(f"FAIL: {fan.subscribers - fan.received} subscribers heard nothing")
            if api.traceback:
                ok = False
                print(f"FAIL: the API logged a traceback:\n{api.traceback}")
            if args.profile:
                print(run(profile(database_url, seeded, settings, args)))
        finally:
            run(drop_database(admin_url, name))
            print(f"database {name} dropped")
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    # SIGTERM stops it the way Ctrl-C does: the API is stopped, the database dropped.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
