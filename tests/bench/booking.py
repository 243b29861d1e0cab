"""Booking benchmark: the real API process against a branch with 100,000 past bookings.

Run by hand, from the repository root, in the dev virtualenv:

    python -m tests.bench.booking [--duration 10] [--rounds 3] [--concurrency 16]
                                  [--history 100000] [--explain]

What it does
1. Servers: `DATABASE_URL` and `REDIS_URL` when both are set (the user must be allowed
   to create databases), otherwise embedded PostgreSQL and Valkey in a temporary
   directory, as the test suite does. It creates its own database
   `selfserve_bench_<random>`, applies the migrations, and drops it at the end; no
   other database is touched. In Redis it claims an empty db index 1-15 with the
   test suite's lease key and empties only that index when it is done.
2. Data, set-based (INSERT ... SELECT generate_series): one branch (Asia/Shanghai,
   open 08:00-20:00 every day) with 50 resources of capacity 1-5, each on shift
   08:00-20:00, all skilled for one 30-minute service on a 30-minute grid;
   `--history` past bookings (default 100,000: completed / cancelled / no_show,
   spread over the past months), future confirmed bookings filling part of the next
   30 days (`--future-fill`), and the ledger rows (`resource_capacity_units`) that
   match them. `ledger.overbooked()` must be empty after seeding.
3. One API process, `python -m tests.bench.server`: the app exactly as
   `selfserve serve` runs it (uvicorn, 1 worker, production settings) plus
   `GET /bench/baseline`, a bare handler doing `SELECT 1` on the same pool.
4. Load: `--concurrency` workers on one httpx.AsyncClient (keep-alive), each phase
   `--warmup` seconds unmeasured then `--duration` seconds measured, in `--rounds`
   rounds of: baseline, `GET /v1/availability` (14-day ranges), `POST
   /v1/bookings` (every request a different free slot, so none conflict). Reported
   per endpoint: req/s (median of the rounds and their range), the median of each
   round's ratio to that round's baseline, p50/p99 latency, and CPU per request of
   the API process (from /proc) and of this load generator.
5. Contention: 200 clients, each on its own connection, POST the same slot of a
   resource of capacity 5 at once: exactly 5 must get 201 and the rest 409
   `slot_full`; then `ledger.overbooked()` over the whole database must be empty.
   Otherwise the exit status is 1.

Absolute numbers depend on the machine and on whatever else runs on it (the load
generator shares the CPUs with the server and PostgreSQL); the ratios to the
baseline, and the API's CPU per request, are what to compare between runs.
`--explain` adds EXPLAIN ANALYZE of the commitments read behind availability.
SIGTERM or Ctrl-C stops the API and drops the database.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import secrets
import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import msgspec

from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.logs import configure_logging
from selfserve.scheduling import ledger
from selfserve.scheduling import queries as q
from selfserve.settings import Settings
from tests.bench.common import (
    BASELINE,
    BASELINE_PATH,
    Api,
    Phase,
    api_server,
    create_database,
    drop_database,
    redis_db,
    run,
    run_phase,
    servers,
    table,
    with_database,
)

TIMEZONE = "Asia/Shanghai"
OPENS_MIN, CLOSES_MIN = 8 * 60, 20 * 60
SLOT_MIN = 30  # service duration and slot interval
SLOTS_PER_DAY = (CLOSES_MIN - OPENS_MIN) // SLOT_MIN
HORIZON_DAYS = 30
AVAILABILITY_DAYS = 14
MIN_HISTORY_DAYS = 180
CONTENTION_CAPACITY = 5
CONTENTION_CLIENTS = 200
BOOKERS = 500  # customers the POST phase books for, none with past bookings


# --- data ------------------------------------------------------------------------


@dataclass
class Seeded:
    branch_id: int
    service_id: int
    resources: int
    seats: int  # summed capacity
    booker_ids: list[int]  # customers with no history (no no-show rule can refuse them)
    contention_branch_id: int
    contention_service_id: int
    contention_customer_ids: list[int]
    bookings: dict[str, int] = field(default_factory=dict)  # status -> rows
    future_bookings: int = 0
    ledger_rows: int = 0
    database_mb: float = 0.0
    seconds: float = 0.0
    steps: dict[str, float] = field(default_factory=dict)


# A booking code (6 characters of the code alphabet) from a bijection of a number:
# 31^6 = 887,503,681 codes and 3^18 is coprime to 31, so distinct numbers give
# distinct codes. A session function, gone when the seeding connection closes.
CODE_FUNCTION = """
CREATE FUNCTION pg_temp.bench_code(n bigint) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT substr(a, (x % 31)::int + 1, 1) || substr(a, (x / 31 % 31)::int + 1, 1)
        || substr(a, (x / 961 % 31)::int + 1, 1) || substr(a, (x / 29791 % 31)::int + 1, 1)
        || substr(a, (x / 923521 % 31)::int + 1, 1) || substr(a, (x / 28629151 % 31)::int + 1, 1)
    FROM (SELECT 'ABCDEFGHJKMNPQRSTUVWXYZ23456789'::text AS a,
                 (n * 387420489 + 12345) % 887503681 AS x) AS c
$$
"""

BOOKING_COLUMNS = """
code, branch_id, service_id, resource_id, party_size, starts_at, ends_at, occupied,
status, channel, customer_id, phone, cancelled_at, created_at, updated_at
"""

# $1 branch, $2 service, $3 zone, $4 rows, $5 rows per resource, $6 history days,
# $7 first customer id, $8 customers. Resource idx = i % resources; each resource's
# bookings sit on distinct slots of the past, spread evenly over $6 days back from
# yesterday; 80% completed, 12% cancelled, 8% no-show.
HISTORY = f"""
WITH r AS (
    SELECT id, (row_number() OVER (ORDER BY id) - 1)::int AS idx, count(*) OVER () AS n
    FROM resources WHERE branch_id = $1
), placed AS (
    SELECT i, r.id AS resource_id,
           ((i / r.n)::bigint * $6::int * {SLOTS_PER_DAY} / $5::int)::int AS k,
           random() AS roll
    FROM generate_series(0, $4::int - 1) AS i
    JOIN r ON r.idx = i % r.n
), timed AS (
    SELECT p.*,
           (((now() AT TIME ZONE $3::text)::date - (1 + p.k / {SLOTS_PER_DAY}))
             + make_interval(mins => {OPENS_MIN} + (p.k % {SLOTS_PER_DAY}) * {SLOT_MIN}))
             AT TIME ZONE $3::text AS s
    FROM placed p
)
INSERT INTO bookings ({BOOKING_COLUMNS})
SELECT pg_temp.bench_code(t.i), $1, $2, t.resource_id, 1,
       t.s, t.s + interval '{SLOT_MIN} minutes',
       tstzrange(t.s, t.s + interval '{SLOT_MIN} minutes'),
       CASE WHEN t.roll < 0.80 THEN 'completed'
            WHEN t.roll < 0.92 THEN 'cancelled' ELSE 'no_show' END,
       (ARRAY['app', 'mini_program', 'kiosk', 'sms', 'web'])[1 + t.i % 5],
       c.id, c.phone,
       CASE WHEN t.roll >= 0.80 AND t.roll < 0.92 THEN t.s - interval '20 hours' END,
       t.s - interval '6 days', t.s + interval '{SLOT_MIN} minutes'
FROM timed t
JOIN customers c ON c.id = $7::bigint + t.i % $8::int
"""

# $1 branch, $2 service, $3 zone, $4 fill (0-1), $5 first code number, $6 first
# customer id, $7 customers. Each (resource, future slot) is busy with probability
# $4, and a busy one has 1..capacity seats booked (party of 1 each).
FUTURE = f"""
WITH cells AS (
    SELECT r.id AS resource_id, r.capacity,
           (((now() AT TIME ZONE $3::text)::date + d)
             + make_interval(mins => {OPENS_MIN} + slot * {SLOT_MIN})) AT TIME ZONE $3::text AS s,
           random() AS busy, random() AS share
    FROM resources r, generate_series(1, {HORIZON_DAYS - 1}) AS d,
         generate_series(0, {SLOTS_PER_DAY - 1}) AS slot
    WHERE r.branch_id = $1
), seats AS (
    SELECT c.resource_id, c.s, row_number() OVER () - 1 AS j
    FROM cells c, generate_series(1, 1 + floor(c.share * c.capacity)::int) AS seat
    WHERE c.busy < $4::float8
)
INSERT INTO bookings ({BOOKING_COLUMNS})
SELECT pg_temp.bench_code($5::bigint + x.j), $1, $2, x.resource_id, 1,
       x.s, x.s + interval '{SLOT_MIN} minutes',
       tstzrange(x.s, x.s + interval '{SLOT_MIN} minutes'),
       'confirmed', (ARRAY['app', 'mini_program', 'kiosk', 'sms', 'web'])[1 + x.j % 5],
       c.id, c.phone, NULL, now() - interval '2 days', now() - interval '2 days'
FROM seats x
JOIN customers c ON c.id = $6::bigint + x.j % $7::int
"""

# The ledger exactly as the app would have left it: one row per (resource, 5-minute
# unit) any booking touched, `used` = seats of the counting bookings (cancelled and
# no-show gave theirs back, leaving rows at 0), same unit rounding as ledger.py.
LEDGER = """
INSERT INTO resource_capacity_units (resource_id, unit_start, used, capacity)
SELECT b.resource_id, u.unit_start,
       coalesce(sum(b.party_size)
                FILTER (WHERE b.status IN ('pending_payment', 'confirmed', 'completed')), 0),
       r.capacity
FROM bookings b
JOIN resources r ON r.id = b.resource_id,
LATERAL generate_series(
    date_bin('5 minutes', lower(b.occupied), timestamptz 'epoch'),
    date_bin('5 minutes', upper(b.occupied) - interval '1 microsecond', timestamptz 'epoch'),
    interval '5 minutes'
) AS u(unit_start)
GROUP BY b.resource_id, u.unit_start, r.capacity
ORDER BY b.resource_id, u.unit_start
"""


async def _branch(conn: asyncpg.Connection, name: str) -> tuple[int, int]:
    hours = [
        {"weekday": d, "opens": _clock(OPENS_MIN), "closes": _clock(CLOSES_MIN)}
        for d in range(1, 8)
    ]
    bid: int = await conn.fetchval(
        "INSERT INTO branches (name, timezone, opening_hours) "
        "VALUES ($1, $2, $3::text::jsonb) RETURNING id",
        name,
        TIMEZONE,
        msgspec.json.encode(hours).decode(),
    )
    sid: int = await conn.fetchval(
        "INSERT INTO services (branch_id, name, duration_min, slot_interval_min, horizon_days) "
        "VALUES ($1, 'Account opening', $2, $2, $3) RETURNING id",
        bid,
        SLOT_MIN,
        HORIZON_DAYS,
    )
    return bid, sid


def _clock(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


async def _resources_with_shifts(
    conn: asyncpg.Connection, bid: int, sid: int, capacities: list[int]
) -> None:
    # Capacity 1: counters and staff alternately; more: rooms.
    await conn.execute(
        """
        INSERT INTO resources (branch_id, kind, name, capacity)
        SELECT $1,
               CASE WHEN c.cap > 1 THEN 'room' WHEN c.n % 2 = 0 THEN 'counter' ELSE 'staff' END,
               'Resource ' || c.n, c.cap
        FROM unnest($2::int[]) WITH ORDINALITY AS c(cap, n)
        """,
        bid,
        capacities,
    )
    await conn.execute(
        "INSERT INTO resource_skills (resource_id, service_id) "
        "SELECT id, $2 FROM resources WHERE branch_id = $1",
        bid,
        sid,
    )
    await conn.execute(
        "INSERT INTO schedules (resource_id, kind, weekday, start_minute, end_minute) "
        "SELECT r.id, 'shift', d, $2, $3 FROM resources r, generate_series(1, 7) AS d "
        "WHERE r.branch_id = $1",
        bid,
        OPENS_MIN,
        CLOSES_MIN,
    )


async def _customers(conn: asyncpg.Connection, prefix: str, n: int) -> list[int]:
    rows = await conn.fetch(
        "INSERT INTO customers (phone, locale) "
        "SELECT $1 || lpad(g::text, 8, '0'), CASE WHEN g % 3 = 0 THEN 'en' ELSE 'zh-CN' END "
        "FROM generate_series(1, $2::int) AS g RETURNING id",
        prefix,
        n,
    )
    return sorted(r["id"] for r in rows)


async def seed(database_url: str, args: argparse.Namespace) -> Seeded:
    started = time.perf_counter()
    steps: dict[str, float] = {}
    mark = [started]

    def lap(step: str) -> None:
        now = time.perf_counter()
        steps[step] = now - mark[0]
        mark[0] = now

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("SELECT setseed(0.42)")  # same data on every run
        await conn.execute(CODE_FUNCTION)
        async with conn.transaction():
            # This session only: sort and hash the ledger rows in memory; nothing to
            # lose on a crash (the database is dropped anyway).
            await conn.execute("SET LOCAL work_mem = '256MB'")
            await conn.execute("SET LOCAL synchronous_commit = off")
            bid, sid = await _branch(conn, "Bench Hall")
            capacities = [1 + i % 5 for i in range(args.resources)]
            await _resources_with_shifts(conn, bid, sid, capacities)
            customers = await _customers(conn, "+86138", args.customers)
            assert customers[-1] - customers[0] == len(customers) - 1  # ids the SQL computes
            bookers = await _customers(conn, "+86137", BOOKERS)
            cbid, csid = await _branch(conn, "Contention Hall")
            await _resources_with_shifts(conn, cbid, csid, [CONTENTION_CAPACITY])
            contenders = await _customers(conn, "+86139", CONTENTION_CLIENTS)

            per_resource = math.ceil(args.history / args.resources)
            days = max(MIN_HISTORY_DAYS, math.ceil(per_resource / SLOTS_PER_DAY))
            await conn.execute(
                HISTORY,
                bid,
                sid,
                TIMEZONE,
                args.history,
                per_resource,
                days,
                customers[0],
                len(customers),
            )
            lap("past bookings")
            future = await conn.execute(
                FUTURE,
                bid,
                sid,
                TIMEZONE,
                args.future_fill,
                args.history,
                customers[0],
                len(customers),
            )
            lap("future bookings")
            units = await conn.execute(LEDGER)
            lap("ledger")
        lap("commit")
        await conn.execute("ANALYZE")  # as autovacuum would have, long before a peak hour
        lap("analyze")
        statuses = {
            r["status"]: r["n"]
            for r in await conn.fetch("SELECT status, count(*) AS n FROM bookings GROUP BY 1")
        }
        size = await conn.fetchval("SELECT pg_database_size(current_database())")
        violations = await ledger.overbooked(conn)
        if violations:
            raise SystemExit(f"bench: seeded data breaks the ledger invariant: {violations[:3]}")
        lap("invariant check")
    finally:
        await conn.close()
    return Seeded(
        branch_id=bid,
        service_id=sid,
        resources=args.resources,
        seats=sum(capacities),
        booker_ids=bookers,
        contention_branch_id=cbid,
        contention_service_id=csid,
        contention_customer_ids=contenders,
        bookings=statuses,
        future_bookings=int(future.split()[-1]),
        ledger_rows=int(units.split()[-1]),
        database_mb=size / 2**20,
        seconds=time.perf_counter() - started,
        steps=steps,
    )


def _local_midnight(days_ahead: int) -> datetime:
    zone = ZoneInfo(TIMEZONE)
    today = datetime.now(zone).date()
    return datetime(today.year, today.month, today.day, tzinfo=zone) + timedelta(days=days_ahead)


def tokens_for(settings: Settings, customer_ids: list[int]) -> list[str]:
    return [
        "Bearer "
        + issue_access_token(
            settings,
            Principal(kind="customer", id=cid, role="customer", channel="app", branches=()),
        )
        for cid in customer_ids
    ]


async def free_slots(url: str, seeded: Seeded) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        response = await client.get(
            "/v1/availability",
            params={
                "branch_id": seeded.branch_id,
                "service_id": seeded.service_id,
                "from": now.isoformat(),
                "to": (now + timedelta(days=HORIZON_DAYS)).isoformat(),
            },
        )
    response.raise_for_status()
    items: list[dict[str, Any]] = response.json()["items"]
    return items


def booking_plan(slots: list[dict[str, Any]]) -> list[str]:
    """Starts to book, one per free seat: every free start once (shuffled, so requests
    in flight together are far apart in time), then again where seats remain."""
    starts: list[str] = []
    rng = random.Random(7)
    for n in range(max((s["remaining"] for s in slots), default=0)):
        batch = [s["start"] for s in slots if s["remaining"] > n]
        rng.shuffle(batch)
        starts.extend(batch)
    return starts


AVAILABILITY = "GET /v1/availability 14d"
BOOKING = "POST /v1/bookings free"


async def load_phases(
    api: Api, seeded: Seeded, settings: Settings, args: argparse.Namespace
) -> tuple[list[dict[str, Phase]], str]:
    """`args.rounds` rounds of baseline, availability, booking, back to back, so each
    round's ratios compare phases measured under the same background load."""

    def baseline(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        return client.get(BASELINE_PATH)

    # 14-day ranges starting on each of the next days, all inside the 30-day horizon.
    windows: list[dict[str, str | int]] = [
        {
            "branch_id": seeded.branch_id,
            "service_id": seeded.service_id,
            "from": _local_midnight(1 + d).isoformat(),
            "to": _local_midnight(1 + d + AVAILABILITY_DAYS).isoformat(),
        }
        for d in range(HORIZON_DAYS - 1 - AVAILABILITY_DAYS)
    ]

    def availability(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        return client.get("/v1/availability", params=windows[i % len(windows)])

    async with httpx.AsyncClient(base_url=api.url, timeout=60) as client:
        response = await availability(client, 0)
    if response.status_code != 200:
        raise SystemExit(f"bench: availability answered {response.status_code}: {response.text}")
    sample = response.json()["items"]
    shape = (
        f"one 14-day availability answer: {len(sample)} slots, "
        f"{sum(s['remaining'] for s in sample)} of {len(sample) * seeded.seats} seats free"
    )

    # Every booking request takes a start nobody else is booking (see booking_plan),
    # across all rounds.
    plan = iter(booking_plan(await free_slots(api.url, seeded)))
    tokens = tokens_for(settings, seeded.booker_ids)

    def book(client: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response] | None:
        start = next(plan, None)
        if start is None:
            return None
        return client.post(
            "/v1/bookings",
            json={"branch_id": seeded.branch_id, "service_id": seeded.service_id, "start": start},
            headers={"Authorization": tokens[i % len(tokens)]},
        )

    rounds: list[dict[str, Phase]] = []
    for n in range(1, args.rounds + 1):
        phases = {
            BASELINE: await run_phase(BASELINE, api.url, baseline, 200, args, api.pid),
            AVAILABILITY: await run_phase(AVAILABILITY, api.url, availability, 200, args, api.pid),
            BOOKING: await run_phase(BOOKING, api.url, book, 201, args, api.pid),
        }
        rounds.append(phases)
        base = phases[BASELINE].rps
        print(
            f"round {n}: "
            + ", ".join(
                f"{name} {p.rps:.1f} req/s"
                + ("" if name == BASELINE else f" ({p.rps / base:.3f}x)")
                for name, p in phases.items()
            ),
            flush=True,
        )
    return rounds, shape


@dataclass
class Contention:
    statuses: Counter[str]
    seconds: float
    booked: int


async def contention(api: Api, seeded: Seeded, settings: Settings) -> Contention:
    """200 clients, each on its own connection, POST one slot of capacity 5 at once."""
    start = _local_midnight(2) + timedelta(hours=10)
    body = {
        "branch_id": seeded.contention_branch_id,
        "service_id": seeded.contention_service_id,
        "start": start.isoformat(),
    }
    tokens = tokens_for(settings, seeded.contention_customer_ids)
    clients = [httpx.AsyncClient(base_url=api.url, timeout=120) for _ in tokens]
    go = asyncio.Event()

    async def one(client: httpx.AsyncClient, token: str) -> str:
        await client.get("/health")  # the connection is open before the start signal
        await go.wait()
        try:
            response = await client.post(
                "/v1/bookings", json=body, headers={"Authorization": token}
            )
        except httpx.HTTPError as exc:
            return type(exc).__name__
        outcome = str(response.status_code)
        if response.status_code != 201:
            with contextlib.suppress(ValueError, KeyError, TypeError):
                outcome += " " + response.json()["code"]
        return outcome

    try:
        tasks = [asyncio.create_task(one(c, t)) for c, t in zip(clients, tokens, strict=True)]
        await asyncio.sleep(0.5)
        t0 = time.perf_counter()
        go.set()
        outcomes = await asyncio.gather(*tasks)
        seconds = time.perf_counter() - t0
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))
    return Contention(statuses=Counter(outcomes), seconds=seconds, booked=0)


async def count_contention_bookings(database_url: str, seeded: Seeded) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n: int = await conn.fetchval(
            "SELECT count(*) FROM bookings WHERE branch_id = $1 AND status = 'confirmed'",
            seeded.contention_branch_id,
        )
        return n
    finally:
        await conn.close()


async def invariant(database_url: str) -> list[ledger.Violation]:
    conn = await asyncpg.connect(database_url)
    try:
        return await ledger.overbooked(conn)
    finally:
        await conn.close()


async def explain_availability(database_url: str, seeded: Seeded) -> str:
    """EXPLAIN ANALYZE of the commitment read behind a 14-day availability request."""
    conn = await asyncpg.connect(database_url)
    try:
        ids = [r["id"] for r in await conn.fetch(q.RESOURCES, seeded.service_id, seeded.branch_id)]
        lo = _local_midnight(1)
        hi = lo + timedelta(days=AVAILABILITY_DAYS, minutes=SLOT_MIN)
        rows = await conn.fetch(
            "EXPLAIN (ANALYZE, BUFFERS) " + q.COMMITMENTS, ids, lo, hi, datetime.now(UTC), 0
        )
        return "\n".join(r[0] for r in rows)
    finally:
        await conn.close()


# --- main ----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench.booking",
        description="Booking benchmark against a real API process (see the module docstring).",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all phases")
    parser.add_argument("--concurrency", type=int, default=16, help="concurrent client workers")
    parser.add_argument("--history", type=int, default=100_000, help="past bookings to seed")
    parser.add_argument("--resources", type=int, default=50, help="resources in the branch")
    parser.add_argument(
        "--future-fill",
        type=float,
        default=0.4,
        help="share of (resource, future slot) cells with bookings (0-1)",
    )
    parser.add_argument(
        "--customers", type=int, default=2000, help="customers owning the past bookings"
    )
    parser.add_argument("--pool-max", type=int, default=0, help="SELFSERVE_DB_POOL_MAX (app: 10)")
    parser.add_argument("--port", type=int, default=0, help="API port (default: a free one)")
    parser.add_argument(
        "--explain", action="store_true", help="print EXPLAIN ANALYZE of the availability read"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if min(args.history, args.resources, args.concurrency, args.rounds) < 1:
        raise SystemExit("bench: --history, --resources, --concurrency, --rounds must be positive")
    configure_logging("console", "WARNING")
    secret = secrets.token_urlsafe(48)
    # Tokens are minted here with the API's secret; 1 hour outlives any run.
    settings = Settings(environment="production", jwt_secret=secret, access_token_ttl_s=3600)
    ok = True
    with servers() as (admin_url, redis_server_url), redis_db(redis_server_url) as redis_url:
        name = run(create_database(admin_url))
        database_url = with_database(admin_url, name)
        print(f"database: {name} (created, migrated; dropped at the end)")
        try:
            seeded = run(seed(database_url, args))
            print(
                f"seeded in {seeded.seconds:.1f} s: {seeded.resources} resources "
                f"({seeded.seats} seats), bookings {dict(sorted(seeded.bookings.items()))} "
                f"of which {seeded.future_bookings} future, {seeded.ledger_rows} ledger rows, "
                f"database {seeded.database_mb:.0f} MB; ledger invariant holds\n  ("
                + ", ".join(f"{k} {v:.1f} s" for k, v in seeded.steps.items())
                + ")"
            )
            with api_server(database_url, redis_url, secret, args) as api:
                print(
                    f"API: {api.url} (pid {api.pid}); {args.concurrency} workers, "
                    f"{args.warmup:g} s warm-up + {args.duration:g} s measured per phase\n"
                )
                rounds, shape = run(load_phases(api, seeded, settings, args))
                print(f"\n{len(rounds)} round(s); {shape}\n")
                print(table(rounds))
                race = run(contention(api, seeded, settings))
            if api.traceback:
                ok = False
                print(f"FAIL: the API logged a traceback:\n{api.traceback}")
            race.booked = run(count_contention_bookings(database_url, seeded))
            violations = run(invariant(database_url))
            wins = race.statuses.get("201", 0)
            lost = race.statuses.get("409 slot_full", 0)
            print(
                f"\ncontention: {CONTENTION_CLIENTS} clients, one slot of capacity "
                f"{CONTENTION_CAPACITY}, {race.seconds:.2f} s: "
                + ", ".join(f"{k}: {v}" for k, v in race.statuses.most_common())
                + f"; confirmed bookings in the database: {race.booked}"
            )
            if wins != CONTENTION_CAPACITY or lost != CONTENTION_CLIENTS - CONTENTION_CAPACITY:
                ok = False
                print(
                    f"FAIL: expected exactly {CONTENTION_CAPACITY} x 201 and "
                    f"{CONTENTION_CLIENTS - CONTENTION_CAPACITY} x 409 slot_full"
                )
            if race.booked != CONTENTION_CAPACITY:
                ok = False
                print(f"FAIL: {race.booked} bookings stored for {CONTENTION_CAPACITY} seats")
            if violations:
                ok = False
                print(f"FAIL: ledger.overbooked() found {len(violations)}: {violations[:5]}")
            else:
                print("ledger.overbooked(): empty (nothing over capacity, ledger = rows)")
            if args.explain:
                print("\nEXPLAIN ANALYZE, commitments read of a 14-day availability request:")
                print(run(explain_availability(database_url, seeded)))
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
