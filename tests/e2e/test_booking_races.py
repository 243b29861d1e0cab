"""Booking under contention across real processes.

Two `selfserve serve` APIs on the module's database; 200 concurrent clients, each on
a connection of its own, spread over both. A slot has 5 seats (one resource of
capacity 5). Races: holds, bookings, reschedules into a nearly full slot, and
cancellations while others try to book the freed seats. After each race the whole
ledger is checked (`ledger.overbooked`: no unit over capacity, `used` equal to the
seats of the rows), and the slot's own units are recounted from the rows.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
import httpx
import msgspec
import pytest

from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.scheduling import ledger
from tests.conftest import ModuleEnv
from tests.e2e.processes import api_processes

pytestmark = pytest.mark.e2e
T = TypeVar("T")

SECRET = "race-secret-" + "z" * 40
CAPACITY = 5
CLIENTS = 200
DURATION = timedelta(minutes=30)  # the service's duration and slot interval; no buffers

_phones = itertools.count()
TLS = ssl.create_default_context()  # unused over http, but every client would build one


@pytest.fixture(scope="module")
def apis(module_env: ModuleEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    with api_processes(module_env, 2, SECRET, tmp_path_factory.mktemp("logs")) as urls:
        yield urls


@pytest.fixture(scope="module")
def auth(module_env: ModuleEnv) -> Callable[[int], dict[str, str]]:
    """The Authorization header of a customer, signed with the processes' secret."""
    settings = msgspec.structs.replace(module_env.settings, jwt_secret=SECRET)

    def header(customer_id: int) -> dict[str, str]:
        principal = Principal(
            kind="customer", id=customer_id, role="customer", channel="app", branches=()
        )
        return {"Authorization": f"Bearer {issue_access_token(settings, principal)}"}

    return header


# --- seeding ---------------------------------------------------------------------


@dataclass
class Hall:
    """A branch open around the clock with one service on one resource of CAPACITY."""

    branch_id: int
    service_id: int
    resource_id: int
    customers: list[int]

    def body(self, start: datetime) -> dict[str, Any]:
        return {"branch_id": self.branch_id, "service_id": self.service_id, "start": iso(start)}


def iso(instant: datetime) -> str:
    return instant.isoformat()


def first_slot() -> datetime:
    """A slot two days ahead (the service's lead time is 0, its horizon 30 days)."""
    return (datetime.now(UTC) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)


async def seed_hall(pool: asyncpg.Pool, customers: int) -> Hall:
    async with pool.acquire() as conn, conn.transaction():
        bid = await conn.fetchval(
            "INSERT INTO branches (name, timezone, opening_hours) "
            "VALUES ('Race Hall', 'Asia/Shanghai', $1::text::jsonb) RETURNING id",
            msgspec.json.encode(
                [{"weekday": d, "opens": "00:00", "closes": "24:00"} for d in range(1, 8)]
            ).decode(),
        )
        sid = await conn.fetchval(
            "INSERT INTO services (branch_id, name, duration_min, slot_interval_min) "
            "VALUES ($1, 'Race', 30, 30) RETURNING id",
            bid,
        )
        rid = await conn.fetchval(
            "INSERT INTO resources (branch_id, kind, name, capacity) "
            "VALUES ($1, 'room', 'Room', $2) RETURNING id",
            bid,
            CAPACITY,
        )
        await conn.execute(
            "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)", rid, sid
        )
        await conn.execute(
            "INSERT INTO schedules (resource_id, kind, weekday, start_minute, end_minute) "
            "SELECT $1, 'shift', d, 0, 1440 FROM generate_series(1, 7) AS d",
            rid,
        )
        ids = await conn.fetch(
            "INSERT INTO customers (phone, locale) "
            "SELECT p, 'en' FROM unnest($1::text[]) AS p RETURNING id",
            [f"+86136{next(_phones):08d}" for _ in range(customers)],
        )
    return Hall(bid, sid, rid, [r["id"] for r in ids])


async def seed_bookings(
    pool: asyncpg.Pool, hall: Hall, placed: Sequence[tuple[int, datetime]]
) -> dict[int, int]:
    """Book (customer, start) pairs through the ledger, as the API would (one seat
    each, confirmed, the customer's phone on it); returns {booking id: customer id}."""
    booked: dict[int, int] = {}
    async with pool.acquire() as conn, conn.transaction():
        now = datetime.now(UTC)
        for customer_id, start in placed:
            phone = await conn.fetchval("SELECT phone FROM customers WHERE id = $1", customer_id)
            booking = await ledger.create_booking(
                conn,
                service_id=hall.service_id,
                resource_id=hall.resource_id,
                starts_at=start,
                party_size=1,
                channel="app",
                now=now,
                customer_id=customer_id,
                phone=phone,
            )
            booked[booking.id] = customer_id
    return booked


# --- racing --------------------------------------------------------------------


async def race(
    apis: Sequence[str], calls: Sequence[Callable[[httpx.AsyncClient], Awaitable[T]]]
) -> list[T]:
    """Run every call at once, each with a client (so a connection) of its own,
    the clients spread over the API processes. All are made before the first request:
    making one costs ~20 ms (an SSL context each, unless shared), which would
    otherwise spread the "concurrent" requests out over seconds."""
    async with AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(
                httpx.AsyncClient(base_url=apis[i % len(apis)], timeout=60, verify=TLS)
            )
            for i in range(len(calls))
        ]
        return await asyncio.gather(*(call(c) for call, c in zip(calls, clients, strict=True)))


def post(
    path: str, body: dict[str, Any], headers: dict[str, str]
) -> Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]:
    async def call(client: httpx.AsyncClient) -> httpx.Response:
        return await client.post(path, json=body, headers=headers)

    return call


def outcome(responses: Sequence[httpx.Response]) -> Counter[tuple[int, str | None]]:
    """(status, problem code) -> how many; any 5xx fails at once with its body."""
    errors = [r.text for r in responses if r.status_code >= 500]
    assert not errors, errors[:3]
    return Counter(
        (r.status_code, r.json().get("code") if r.status_code >= 400 else None) for r in responses
    )


# --- checking the ledger -------------------------------------------------------------

SLOT_UNITS = """
SELECT k.unit_start, u.used, u.capacity,
       (SELECT coalesce(sum(h.party_size), 0) FROM holds h
        WHERE h.resource_id = $1 AND h.released_at IS NULL
          AND h.occupied && tstzrange(k.unit_start, k.unit_start + interval '5 minutes'))
       AS hold_seats,
       (SELECT coalesce(sum(b.party_size), 0) FROM bookings b
        WHERE b.resource_id = $1 AND b.status = ANY($3::text[])
          AND b.occupied && tstzrange(k.unit_start, k.unit_start + interval '5 minutes'))
       AS booking_seats
FROM unnest($2::timestamptz[]) AS k(unit_start)
LEFT JOIN resource_capacity_units u ON u.resource_id = $1 AND u.unit_start = k.unit_start
ORDER BY k.unit_start
"""


async def slot_seats(
    conn: asyncpg.Connection | asyncpg.Pool, resource_id: int, start: datetime
) -> int:
    """The seats taken on the slot at `start`: on each of its units the ledger's `used`
    must equal the party sizes of the live holds plus the counting bookings there, and
    stay within capacity. (One statement: one snapshot.)"""
    units = ledger.unit_starts(start, start + DURATION)
    rows = await conn.fetch(SLOT_UNITS, resource_id, units, list(ledger.CAPACITY_STATUSES))
    seats = {r["hold_seats"] + r["booking_seats"] for r in rows}
    for r in rows:
        assert r["used"] == r["hold_seats"] + r["booking_seats"], dict(r)
        assert r["capacity"] == CAPACITY, dict(r)
        assert r["used"] <= r["capacity"], dict(r)
    assert len(seats) == 1, [dict(r) for r in rows]  # every commitment covers the whole slot
    taken: int = seats.pop()
    return taken


async def assert_ledger_sound(pool: asyncpg.Pool) -> None:
    """No resource over capacity anywhere, and the ledger equal to the rows."""
    async with pool.acquire() as conn:
        assert await ledger.overbooked(conn) == []


# --- the races ---------------------------------------------------------------------


async def test_200_concurrent_holds_for_5_seats_across_two_processes(
    apis: list[str], auth: Callable[[int], dict[str, str]], pool: asyncpg.Pool
) -> None:
    hall = await seed_hall(pool, CLIENTS)
    start = first_slot()
    body = {**hall.body(start), "party_size": 1}

    responses = await race(apis, [post("/v1/holds", body, auth(c)) for c in hall.customers])

    assert outcome(responses) == {(201, None): CAPACITY, (409, "slot_full"): CLIENTS - CAPACITY}
    granted = {r.json()["id"] for r in responses if r.status_code == 201}
    live = await pool.fetch(
        "SELECT id, starts_at FROM holds WHERE resource_id = $1 AND released_at IS NULL",
        hall.resource_id,
    )
    assert {r["id"] for r in live} == granted
    assert {r["starts_at"] for r in live} == {start}
    assert await slot_seats(pool, hall.resource_id, start) == CAPACITY
    await assert_ledger_sound(pool)


async def test_200_concurrent_bookings_for_5_seats_across_two_processes(
    apis: list[str], auth: Callable[[int], dict[str, str]], pool: asyncpg.Pool
) -> None:
    hall = await seed_hall(pool, CLIENTS)
    start = first_slot()

    responses = await race(
        apis, [post("/v1/bookings", hall.body(start), auth(c)) for c in hall.customers]
    )

    assert outcome(responses) == {(201, None): CAPACITY, (409, "slot_full"): CLIENTS - CAPACITY}
    granted = {r.json()["id"] for r in responses if r.status_code == 201}
    active = await pool.fetch(
        "SELECT id FROM bookings WHERE resource_id = $1 AND status = 'confirmed'",
        hall.resource_id,
    )
    assert {r["id"] for r in active} == granted
    assert await slot_seats(pool, hall.resource_id, start) == CAPACITY
    await assert_ledger_sound(pool)


TAKEN = 2  # seats of the target slot booked before the reschedule race


async def test_200_concurrent_reschedules_into_a_nearly_full_slot(
    apis: list[str], auth: Callable[[int], dict[str, str]], pool: asyncpg.Pool
) -> None:
    hall = await seed_hall(pool, CLIENTS + TAKEN)
    movers, takers = hall.customers[:CLIENTS], hall.customers[CLIENTS:]
    # 40 full slots around the target (20 before it, 20 after), 5 movers in each.
    first = first_slot()
    target = first + 20 * DURATION
    others = [first + i * DURATION for i in range(41) if i != 20]
    assert len(others) * CAPACITY == CLIENTS
    start_of = {c: others[i // CAPACITY] for i, c in enumerate(movers)}
    owner = await seed_bookings(pool, hall, list(start_of.items()))
    old_start = {b: start_of[c] for b, c in owner.items()}
    await seed_bookings(pool, hall, [(c, target) for c in takers])
    assert await slot_seats(pool, hall.resource_id, target) == TAKEN
    await assert_ledger_sound(pool)

    booking_ids = list(old_start)
    responses = await race(
        apis,
        [
            post(f"/v1/bookings/{b}/reschedule", {"start": iso(target)}, auth(owner[b]))
            for b in booking_ids
        ],
    )

    free = CAPACITY - TAKEN
    assert outcome(responses) == {(200, None): free, (409, "slot_full"): CLIENTS - free}
    moved = {b for b, r in zip(booking_ids, responses, strict=True) if r.status_code == 200}
    for b, r in zip(booking_ids, responses, strict=True):
        if b in moved:
            assert r.json()["id"] == b
            assert datetime.fromisoformat(r.json()["start"]) == target
    rows = {
        r["id"]: r
        for r in await pool.fetch(
            "SELECT id, starts_at, resource_id, status FROM bookings WHERE id = ANY($1::bigint[])",
            booking_ids,
        )
    }
    for b in booking_ids:
        expected = target if b in moved else old_start[b]  # a refused move keeps its slot
        assert (rows[b]["starts_at"], rows[b]["resource_id"], rows[b]["status"]) == (
            expected,
            hall.resource_id,
            "confirmed",
        ), b
    # The seats of a refused move are still counted at its old slot; a slot a booking
    # moved away from has given back exactly that seat.
    left = Counter(old_start[b] for b in moved)
    for start in others:
        assert await slot_seats(pool, hall.resource_id, start) == CAPACITY - left[start], start
    assert await slot_seats(pool, hall.resource_id, target) == CAPACITY
    await assert_ledger_sound(pool)


SNAPSHOT = """
SELECT (SELECT count(*) FROM bookings
        WHERE resource_id = $1 AND starts_at = $2 AND status = ANY($3::text[])) AS bookings,
       (SELECT count(*) FROM holds
        WHERE resource_id = $1 AND starts_at = $2 AND released_at IS NULL) AS holds,
       (SELECT min(used) FROM resource_capacity_units
        WHERE resource_id = $1 AND unit_start >= $2 AND unit_start < $2 + interval '30 minutes')
       AS min_used,
       (SELECT max(used) FROM resource_capacity_units
        WHERE resource_id = $1 AND unit_start >= $2 AND unit_start < $2 + interval '30 minutes')
       AS max_used
"""


async def test_cancellations_while_200_clients_book_the_freed_seats(
    apis: list[str], auth: Callable[[int], dict[str, str]], pool: asyncpg.Pool
) -> None:
    """The 5 owners of a full slot cancel while 200 others try to book it. A booker
    keeps trying until it gets a seat, or until the slot is full for a request it sent
    after every cancellation had been answered (so committed): then no seat can free
    up any more. So exactly the 5 freed seats are booked again, never more; a monitor
    reading the slot in single snapshots meanwhile never sees it over capacity, nor
    the ledger apart from the rows."""
    hall = await seed_hall(pool, CAPACITY + CLIENTS)
    owners, bookers = hall.customers[:CAPACITY], hall.customers[CAPACITY:]
    start = first_slot()
    originals = await seed_bookings(pool, hall, [(c, start) for c in owners])
    assert await slot_seats(pool, hall.resource_id, start) == CAPACITY

    cancelled = asyncio.Event()  # set once every cancellation has been answered
    answered = 0
    attempts: Counter[int] = Counter()

    def cancel(booking_id: int) -> Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]:
        async def call(client: httpx.AsyncClient) -> httpx.Response:
            nonlocal answered
            try:
                return await client.post(
                    f"/v1/bookings/{booking_id}/cancel", headers=auth(originals[booking_id])
                )
            finally:
                answered += 1
                if answered == len(originals):
                    cancelled.set()

        return call

    def book(customer_id: int) -> Callable[[httpx.AsyncClient], Awaitable[httpx.Response]]:
        headers = auth(customer_id)

        async def call(client: httpx.AsyncClient) -> httpx.Response:
            while True:
                last_word = cancelled.is_set()
                attempts[customer_id] += 1
                r = await client.post("/v1/bookings", json=hall.body(start), headers=headers)
                if r.status_code != 409 or r.json().get("code") != "slot_full" or last_word:
                    return r

        return call

    monitor_done = asyncio.Event()
    snapshots: list[asyncpg.Record] = []

    async def monitor() -> None:
        async with pool.acquire() as conn:
            while True:
                final = monitor_done.is_set()
                row = await conn.fetchrow(
                    SNAPSHOT, hall.resource_id, start, list(ledger.CAPACITY_STATUSES)
                )
                assert row is not None
                snapshots.append(row)
                if final:
                    return

    watching = asyncio.create_task(monitor())
    try:
        responses = await race(apis, [cancel(b) for b in originals] + [book(c) for c in bookers])
    finally:
        monitor_done.set()
        await watching

    cancels, bookings = responses[: len(originals)], responses[len(originals) :]
    assert outcome(cancels) == {(200, None): CAPACITY}
    assert {r.json()["status"] for r in cancels} == {"cancelled"}
    assert outcome(bookings) == {
        (201, None): CAPACITY,
        (409, "slot_full"): CLIENTS - CAPACITY,
    }, f"{attempts.total()} attempts"
    granted = {r.json()["id"] for r in bookings if r.status_code == 201}

    active = await pool.fetch(
        "SELECT id, customer_id FROM bookings WHERE resource_id = $1 AND status = ANY($2::text[])",
        hall.resource_id,
        list(ledger.CAPACITY_STATUSES),
    )
    assert {r["id"] for r in active} == granted
    assert {r["customer_id"] for r in active} <= set(bookers)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM bookings WHERE id = ANY($1::bigint[]) AND status = 'cancelled'",
            list(originals),
        )
        == CAPACITY
    )
    assert await slot_seats(pool, hall.resource_id, start) == CAPACITY
    await assert_ledger_sound(pool)

    assert len(snapshots) >= 2
    for s in snapshots:
        seats = s["bookings"] + s["holds"]
        assert seats <= CAPACITY, dict(s)
        assert s["min_used"] == s["max_used"] == seats, dict(s)
    assert snapshots[-1]["bookings"] == CAPACITY


RETRIES = 60


@pytest.mark.parametrize("path", ["/v1/bookings", "/v1/holds"])
async def test_60_retries_with_one_idempotency_key_across_two_processes(
    apis: list[str], auth: Callable[[int], dict[str, str]], pool: asyncpg.Pool, path: str
) -> None:
    """One customer's request for the last seat of a slot, sent 60 times at once with
    one key (a client retrying after timeouts), each on a connection of its own, over
    both processes: it runs once; every answer is that 201 (replayed) or 409
    `idempotency_key_in_progress`, never `slot_full` for the seat it took itself."""
    hall = await seed_hall(pool, CAPACITY)
    start = first_slot()
    await seed_bookings(pool, hall, [(c, start) for c in hall.customers[1:]])
    body = hall.body(start)
    headers = {**auth(hall.customers[0]), "Idempotency-Key": f"retry-{path}"}

    responses = await race(apis, [post(path, body, headers) for _ in range(RETRIES)])

    counts = outcome(responses)
    assert set(counts) <= {(201, None), (409, "idempotency_key_in_progress")}, counts
    created = [r for r in responses if r.status_code == 201]
    assert created
    assert len({r.json()["id"] for r in created}) == 1
    assert sum(r.headers.get("idempotent-replayed") != "true" for r in created) == 1
    assert all(r.headers["retry-after"] == "1" for r in responses if r.status_code == 409)
    table = "bookings" if path == "/v1/bookings" else "holds"
    rows = await pool.fetch(
        f"SELECT id FROM {table} WHERE resource_id = $1 AND customer_id = $2",
        hall.resource_id,
        hall.customers[0],
    )
    assert [r["id"] for r in rows] == [created[0].json()["id"]]
    assert await slot_seats(pool, hall.resource_id, start) == CAPACITY
    await assert_ledger_sound(pool)
