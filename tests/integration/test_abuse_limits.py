"""Abuse limits against real PostgreSQL and Redis: one customer (or one walk-in phone)
cannot hold, book, queue or wait without bound, not even with many requests at once;
numbers typed at a kiosk or desk count against the SMS limits; no-shows booked under a
typed phone do not count against the account of that phone."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis
from litestar import Litestar
from redis.asyncio import Redis

from selfserve.app import create_app
from selfserve.scheduling import ledger
from tests.booking_helpers import book, customer, iso, kiosk, seed
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import bearer, login, make_staff
from tests.queue_helpers import customer as queue_customer
from tests.queue_helpers import hall, take

SHANGHAI = ZoneInfo("Asia/Shanghai")
HOLDS, PER_DAY, TICKETS, WAITLIST = 2, 2, 2, 2
PER_NUMBER, PER_DEVICE = 3, 4


@pytest.fixture(scope="module")
def app(module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis) -> Litestar:
    settings = settings_with(
        module_env,
        max_active_holds=HOLDS,
        max_bookings_per_day=PER_DAY,
        max_open_tickets=TICKETS,
        max_waitlist_entries=WAITLIST,
        sms_per_number_hour=PER_NUMBER,
        sms_per_device_hour=PER_DEVICE,
    )
    return create_app(settings, pool=pool, redis=redis)


def local_slot(days: int, hour: int = 9, step: int = 0) -> datetime:
    """A 30-minute slot `step` after `hour`:00 Shanghai time, `days` from today there."""
    day = (datetime.now(SHANGHAI) + timedelta(days=days)).date()
    start = datetime.combine(day, time(hour), tzinfo=SHANGHAI) + timedelta(minutes=30 * step)
    return start.astimezone(UTC)


def codes(responses: list[httpx.Response]) -> list[Any]:
    return sorted(
        (r.status_code, r.json().get("code") if r.status_code >= 400 else None) for r in responses
    )


# --- holding limits, raced ------------------------------------------------------------


async def test_concurrent_holds_of_one_customer_stop_at_the_limit(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    # At different branches: the requests share no row lock, only the owner's lock.
    n = 10
    places = [await seed(pool, capacity=5) for _ in range(n)]
    bid, sid, _ = places[0]
    cid, _, token = await customer(pool, module_env)

    async def hold(step: int) -> httpx.Response:
        b, s, _ = places[step % n]
        body = {"branch_id": b, "service_id": s, "start": iso(local_slot(3, step=step))}
        return await client.post("/v1/holds", json=body, headers=bearer(token))

    results = await asyncio.gather(*(hold(i) for i in range(n)))
    assert codes(results) == [(201, None)] * HOLDS + [(409, "too_many_holds")] * (n - HOLDS)
    refused = next(r for r in results if r.status_code == 409)
    assert refused.json()["max"] == HOLDS
    assert refused.headers["content-type"].startswith("application/problem+json")
    live = await pool.fetchval(
        "SELECT count(*) FROM holds WHERE customer_id = $1 AND released_at IS NULL", cid
    )
    assert live == HOLDS

    # An expired hold no longer counts.
    await pool.execute(
        "UPDATE holds SET expires_at = now() - interval '1 second' "
        "WHERE id = (SELECT min(id) FROM holds WHERE customer_id = $1)",
        cid,
    )
    assert (await hold(n)).status_code == 201

    # Staff are not limited.
    staff = await login(client, await make_staff(pool, "staff", [bid]))
    for step in range(n + 1, n + 1 + HOLDS + 1):
        body = {"branch_id": bid, "service_id": sid, "start": iso(local_slot(3, step=step))}
        resp = await client.post("/v1/holds", json=body, headers=bearer(staff))
        assert resp.status_code == 201, resp.text


async def test_concurrent_bookings_stop_at_the_limit_per_branch_service_and_day(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=5)
    cid, _, token = await customer(pool, module_env)
    n = 10

    results = await asyncio.gather(
        *(book(client, token, bid, sid, local_slot(4, step=i)) for i in range(n))
    )
    assert codes(results) == [(201, None)] * PER_DAY + [(409, "too_many_bookings")] * (n - PER_DAY)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM bookings WHERE customer_id = $1 AND status = 'confirmed'", cid
        )
        == PER_DAY
    )
    # Another day, or a booking from a hold on the full day.
    assert (await book(client, token, bid, sid, local_slot(5))).status_code == 201
    hold = await client.post(
        "/v1/holds",
        json={"branch_id": bid, "service_id": sid, "start": iso(local_slot(4, step=n))},
        headers=bearer(token),
    )
    assert hold.status_code == 201, hold.text
    from_hold = await client.post(
        "/v1/bookings", json={"hold_id": hold.json()["id"]}, headers=bearer(token)
    )
    assert (from_hold.status_code, from_hold.json()["code"]) == (409, "too_many_bookings")
    # A cancelled booking frees its place.
    booked = next(r.json() for r in results if r.status_code == 201)
    resp = await client.post(f"/v1/bookings/{booked['id']}/cancel", headers=bearer(token))
    assert resp.status_code == 200
    assert (await book(client, token, bid, sid, local_slot(4, step=n + 1))).status_code == 201

    # A kiosk booking for one walk-in phone, many at once: the phone is limited too.
    kiosk_token = await kiosk(pool, module_env, bid)
    phone = "+8613700000001"
    results = await asyncio.gather(
        *(book(client, kiosk_token, bid, sid, local_slot(6, step=i), phone=phone) for i in range(n))
    )
    assert codes(results) == [(201, None)] * PER_DAY + [(409, "too_many_bookings")] * (n - PER_DAY)
    # ... but not staff, and not a kiosk booking without a phone.
    staff = await login(client, await make_staff(pool, "staff", [bid]))
    resp = await book(client, staff, bid, sid, local_slot(6, step=n))
    assert resp.status_code == 201, resp.text
    for step in range(n + 1, n + 2 + PER_DAY):
        resp = await book(client, kiosk_token, bid, sid, local_slot(6, step=step))
        assert resp.status_code == 201, resp.text


async def test_concurrent_tickets_stop_at_the_limit_per_customer_and_walk_in_phone(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, durations=(10, 20))
    _, _, remote = await queue_customer(pool, module_env)
    n = 8
    # Queues of their own (display numbers are counted per prefix, under a row lock):
    # the requests share no row lock, only the owner's lock.
    for prefix in "CDEFGHIJ":
        qid = await pool.fetchval(
            "INSERT INTO queues (branch_id, name, prefix) VALUES ($1, $2, $2) RETURNING id",
            h.branch_id,
            prefix,
        )
        await pool.execute(
            "INSERT INTO queue_services (queue_id, service_id) VALUES ($1, $2)",
            qid,
            h.services[0],
        )
        h.queues[prefix] = qid

    async def ticket(token: str, queue: str, **body: Any) -> httpx.Response:
        return await client.post(
            "/v1/tickets", json={"queue_id": h.queues[queue], **body}, headers=bearer(token)
        )

    results = await asyncio.gather(*(ticket(remote, "CDEFGHIJ"[i]) for i in range(n)))
    assert codes(results) == [(201, None)] * TICKETS + [(409, "too_many_tickets")] * (n - TICKETS)
    # Leaving the queue frees a place.
    first = next(r.json() for r in results if r.status_code == 201)
    assert (
        await client.post(f"/v1/tickets/{first['id']}/cancel", headers=bearer(remote))
    ).status_code == 200
    assert (await ticket(remote, "A")).status_code == 201

    phone = "+8613700000002"
    results = await asyncio.gather(*(ticket(h.kiosk, "CDEFGHIJ"[i], phone=phone) for i in range(n)))
    assert codes(results) == [(201, None)] * TICKETS + [(409, "too_many_tickets")] * (n - TICKETS)
    open_ = await pool.fetchval(
        "SELECT count(*) FROM tickets WHERE phone = $1 AND status = 'waiting'", phone
    )
    assert open_ == TICKETS
    # Staff, and kiosks without a phone, are not limited.
    for _ in range(TICKETS + 1):
        assert (await ticket(h.staff, "A")).status_code == 201
        assert (await ticket(h.kiosk, "A")).status_code == 201


async def test_concurrent_waitlist_entries_stop_at_the_limit(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    cid, _, token = await customer(pool, module_env)
    n = 8
    today = datetime.now(SHANGHAI).date()

    async def join(day: date) -> httpx.Response:
        body = {
            "branch_id": bid,
            "service_id": sid,
            "date": day.isoformat(),
            "earliest": "10:00",
            "latest": "12:00",
        }
        return await client.post("/v1/waitlist", json=body, headers=bearer(token))

    results = await asyncio.gather(*(join(today + timedelta(days=2 + i)) for i in range(n)))
    assert codes(results) == [(201, None)] * WAITLIST + [(409, "too_many_waitlist_entries")] * (
        n - WAITLIST
    )
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM waitlist_entries WHERE customer_id = $1 "
            "AND status IN ('waiting', 'offered')",
            cid,
        )
        == WAITLIST
    )


# --- texts to typed numbers -----------------------------------------------------------


async def _texts_to(pool: asyncpg.Pool, phone: str) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM messages WHERE phone = $1", phone))


async def test_typed_numbers_count_against_the_per_number_limit(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=5)
    kiosk_a = await kiosk(pool, module_env, bid)
    kiosk_b = await kiosk(pool, module_env, bid)
    phone = "+8613700000003"
    # Bookings on different days stay under the holding limits; each counts a text.
    for day in range(PER_NUMBER):
        token = kiosk_a if day % 2 == 0 else kiosk_b
        resp = await book(client, token, bid, sid, local_slot(3 + day), phone=phone)
        assert resp.status_code == 201, resp.text
    texts, bookings = (
        await _texts_to(pool, phone),
        await pool.fetchval("SELECT count(*) FROM bookings WHERE phone = $1", phone),
    )

    resp = await book(client, kiosk_b, bid, sid, local_slot(3 + PER_NUMBER), phone=phone)
    assert resp.status_code == 429, resp.text
    body = resp.json()
    assert (body["code"], body["limit"]) == ("sms_limit_reached", "per_number")
    assert 1 <= int(resp.headers["retry-after"]) <= 3600
    # Refused before anything was written: no booking, no message, seats free.
    assert await _texts_to(pool, phone) == texts
    assert await pool.fetchval("SELECT count(*) FROM bookings WHERE phone = $1", phone) == bookings
    # A ticket for the same number is refused alike (and nothing is issued) ...
    h = await hall(pool, module_env)
    resp = await client.post(
        "/v1/tickets", json={"queue_id": h.queues["A"], "phone": phone}, headers=bearer(h.kiosk)
    )
    assert (resp.status_code, resp.json()["code"]) == (429, "sms_limit_reached")
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE phone = $1", phone) == 0
    # ... and the same request without a phone goes through, untexted.
    resp = await book(client, kiosk_b, bid, sid, local_slot(3 + PER_NUMBER))
    assert resp.status_code == 201, resp.text
    # Staff typing the number are counted too.
    staff = await login(client, await make_staff(pool, "staff", [bid]))
    resp = await book(client, staff, bid, sid, local_slot(4 + PER_NUMBER), phone=phone)
    assert (resp.status_code, resp.json()["code"]) == (429, "sms_limit_reached")


async def test_typed_numbers_count_against_the_per_device_limit(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env)
    for i in range(PER_DEVICE):
        await take(client, h.kiosk, h.queues["A"], phone=f"+86137100000{i:02d}")
    resp = await client.post(
        "/v1/tickets",
        json={"queue_id": h.queues["A"], "phone": "+8613710000099"},
        headers=bearer(h.kiosk),
    )
    assert resp.status_code == 429, resp.text
    assert (resp.json()["code"], resp.json()["limit"]) == ("sms_limit_reached", "per_device")
    assert "retry-after" in resp.headers
    assert await pool.fetchval("SELECT count(*) FROM tickets WHERE phone = '+8613710000099'") == 0
    # The customer's own number (verified at sign-in) is not a typed number.
    _, _, remote = await queue_customer(pool, module_env)
    assert (
        await client.post("/v1/tickets", json={"queue_id": h.queues["A"]}, headers=bearer(remote))
    ).status_code == 201


async def test_typed_numbers_spend_the_daily_sms_budget(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, redis: ArqRedis
) -> None:
    h = await hall(pool, module_env)
    key = f"selfserve:rl:sms-day:{datetime.now(UTC):%Y%m%d}"
    before = int(await redis.get(key) or 0)
    await take(client, h.kiosk, h.queues["A"], phone="+8613720000001")
    assert int(await redis.get(key) or 0) == before + 1  # one budget with sign-in codes
    await redis.set(key, module_env.settings.sms_daily_budget, ex=3600)  # the budget is spent
    try:
        resp = await client.post(
            "/v1/tickets",
            json={"queue_id": h.queues["A"], "phone": "+8613720000002"},
            headers=bearer(h.kiosk),
        )
        assert resp.status_code == 429, resp.text
        assert (resp.json()["code"], resp.json()["limit"]) == ("sms_limit_reached", "daily_budget")
        otp = await client.post("/v1/auth/otp", json={"phone": "+8613720000003"})
        assert otp.status_code == 429
    finally:
        await redis.delete(key)


# --- no-shows under a typed phone ------------------------------------------------------


async def test_no_shows_booked_under_a_typed_phone_do_not_block_its_account(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, (rid,) = await seed(pool, capacity=5)
    cid, phone, token = await customer(pool, module_env)
    limit = module_env.settings.no_show_limit
    # A stranger at a kiosk booked under the customer's phone and never came.
    for i in range(limit):
        start = datetime.now(UTC).replace(minute=0, second=0, microsecond=0) - timedelta(days=1 + i)
        async with pool.acquire() as conn, conn.transaction():
            booking = await ledger.create_booking(
                conn,
                service_id=sid,
                resource_id=rid,
                starts_at=start,
                party_size=1,
                channel="kiosk",
                now=start - timedelta(days=1),
                phone=phone,
            )
        await pool.execute("UPDATE bookings SET status = 'no_show' WHERE id = $1", booking.id)

    # The account books itself as before.
    resp = await book(client, token, bid, sid, local_slot(3))
    assert resp.status_code == 201, resp.text
    hold = await client.post(
        "/v1/holds",
        json={"branch_id": bid, "service_id": sid, "start": iso(local_slot(3, step=2))},
        headers=bearer(token),
    )
    assert hold.status_code == 201, hold.text
    # At a kiosk, that phone must now go through staff.
    kiosk_token = await kiosk(pool, module_env, bid)
    resp = await book(client, kiosk_token, bid, sid, local_slot(4), phone=phone)
    assert (resp.status_code, resp.json()["code"]) == (403, "staff_booking_required")

    # The account's own no-shows still count against it.
    await pool.execute(
        "UPDATE bookings SET customer_id = $1 WHERE phone = $2 AND status = 'no_show'",
        cid,
        phone,
    )
    resp = await book(client, token, bid, sid, local_slot(5))
    assert (resp.status_code, resp.json()["code"]) == (403, "staff_booking_required")


async def test_texts_to_typed_numbers_are_refused_when_redis_cannot_count_them(
    module_env: ModuleEnv, pool: asyncpg.Pool
) -> None:
    """The SMS limits fail closed: no Redis, no booking with a typed phone (503), and
    nothing written; without a phone the booking goes through."""
    bid, sid, _ = await seed(pool, capacity=5)
    kiosk_token = await kiosk(pool, module_env, bid)
    dead = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    app = create_app(module_env.settings, pool=pool, redis=dead)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t.local") as client:
            phone = "+8613730000001"
            resp = await book(client, kiosk_token, bid, sid, local_slot(3), phone=phone)
            assert (resp.status_code, resp.json()["code"]) == (503, "service_unavailable")
            assert await pool.fetchval("SELECT count(*) FROM bookings WHERE phone = $1", phone) == 0
            assert await _texts_to(pool, phone) == 0
            resp = await book(client, kiosk_token, bid, sid, local_slot(3))
            assert resp.status_code == 201, resp.text
    finally:
        await dead.aclose()
