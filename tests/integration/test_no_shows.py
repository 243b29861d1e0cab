"""No-shows against real PostgreSQL: the sweep marks bookings nobody checked in for
after the grace period and gives their seats back; customers with repeated no-shows
must be booked by staff."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx

from selfserve.auth.tokens import Principal
from selfserve.scheduling import ledger
from selfserve.scheduling import service as svc
from selfserve.scheduling.models import BookingCreate
from selfserve.scheduling.policy import policy_of
from tests.booking_helpers import at_hour, book, customer, invariant_holds, iso, kiosk, seed
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import bearer, login, make_staff


async def past_booking(
    pool: asyncpg.Pool,
    sid: int,
    rid: int,
    starts_at: datetime,
    *,
    customer_id: int | None = None,
    phone: str | None = None,
) -> int:
    """A booking that started already (the API books only ahead; the ledger does not care)."""
    async with pool.acquire() as conn, conn.transaction():
        booking = await ledger.create_booking(
            conn,
            service_id=sid,
            resource_id=rid,
            starts_at=starts_at,
            party_size=1,
            channel="app",
            now=starts_at - timedelta(days=1),
            customer_id=customer_id,
            phone=phone,
        )
    return booking.id


async def used_seats(pool: asyncpg.Pool, rid: int, start: datetime) -> int:
    value = await pool.fetchval(
        "SELECT coalesce(max(used), 0) FROM resource_capacity_units "
        "WHERE resource_id = $1 AND unit_start >= $2 AND unit_start < $2 + interval '30 min'",
        rid,
        start,
    )
    return int(value)


def slot_ago(minutes: int) -> datetime:
    """A start on the 30-minute grid at least `minutes` ago."""
    t = datetime.now(UTC) - timedelta(minutes=minutes)
    return t.replace(minute=0 if t.minute < 30 else 30, second=0, microsecond=0)


async def test_the_sweep_marks_no_shows_after_the_grace_and_frees_their_seats(
    pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    _, sid, (rid,) = await seed(pool, capacity=3)
    cid, phone, _ = await customer(pool, module_env)
    long_ago = slot_ago(60)  # start + 15 min grace has passed
    missed = await past_booking(pool, sid, rid, long_ago, customer_id=cid, phone=phone)
    came = await past_booking(pool, sid, rid, long_ago, customer_id=cid, phone=phone)
    await pool.execute("UPDATE bookings SET checked_in_at = starts_at WHERE id = $1", came)
    # started 5 minutes ago: still inside the grace
    recent = (datetime.now(UTC) - timedelta(minutes=5)).replace(second=0, microsecond=0)
    inside_grace = await past_booking(pool, sid, rid, recent, phone=phone)
    pending = await pool.fetchval(
        "INSERT INTO messages (phone, body, template, locale, send_at, dedupe_key, segments, "
        "encoding) VALUES ($1, 'x', 'reminder', 'en', now() + interval '1 day', $2, 1, 'GSM-7') "
        "RETURNING id",
        phone,
        f"booking:{missed}:reminder_2h:0",
    )
    assert await used_seats(pool, rid, long_ago) == 2

    ctx = {"pool": pool, "settings": module_env.settings}
    assert await svc.sweep_no_shows(ctx) >= 1
    statuses = dict(
        await pool.fetch(
            "SELECT id, status FROM bookings WHERE id = ANY($1::bigint[])",
            [missed, came, inside_grace],
        )
    )
    assert statuses == {missed: "no_show", came: "confirmed", inside_grace: "confirmed"}
    assert await pool.fetchval("SELECT no_show_at FROM bookings WHERE id = $1", missed)
    assert await used_seats(pool, rid, long_ago) == 1
    assert await pool.fetchval("SELECT status FROM messages WHERE id = $1", pending) == "canceled"
    # running it again changes nothing
    assert await svc.sweep_no_shows(ctx) == 0
    await invariant_holds(pool)


async def test_the_grace_period_is_a_setting(pool: asyncpg.Pool, module_env: ModuleEnv) -> None:
    _, sid, (rid,) = await seed(pool, capacity=1)
    start = slot_ago(60)
    booking = await past_booking(pool, sid, rid, start)
    long_grace = settings_with(module_env, no_show_grace_min=24 * 60)
    assert await svc.sweep_no_shows({"pool": pool, "settings": long_grace}) == 0
    assert await pool.fetchval("SELECT status FROM bookings WHERE id = $1", booking) == "confirmed"
    assert await svc.sweep_no_shows({"pool": pool, "settings": module_env.settings}) >= 1
    assert await pool.fetchval("SELECT status FROM bookings WHERE id = $1", booking) == "no_show"


async def test_repeated_no_shows_need_staff_to_book(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, (rid,) = await seed(pool, capacity=5)
    cid, phone, token = await customer(pool, module_env)
    limit = module_env.settings.no_show_limit
    # one no-show outside the window does not count
    old = datetime.now(UTC) - timedelta(days=module_env.settings.no_show_window_days + 1)
    stale = await past_booking(pool, sid, rid, old.replace(minute=0, second=0, microsecond=0))
    await pool.execute(
        "UPDATE bookings SET status = 'no_show', customer_id = $2, phone = $3 WHERE id = $1",
        stale,
        cid,
        phone,
    )
    for k in range(limit - 1):
        missed = await past_booking(
            pool, sid, rid, slot_ago(120 + 60 * k), customer_id=cid, phone=phone
        )
        await pool.execute("UPDATE bookings SET status = 'no_show' WHERE id = $1", missed)
    assert (await book(client, token, bid, sid, at_hour(1))).status_code == 201

    last = await past_booking(pool, sid, rid, slot_ago(60 * 24), customer_id=cid, phone=phone)
    await svc.sweep_no_shows({"pool": pool, "settings": module_env.settings})
    assert await pool.fetchval("SELECT status FROM bookings WHERE id = $1", last) == "no_show"

    before = await pool.fetchval("SELECT count(*) FROM bookings")
    resp = await book(client, token, bid, sid, at_hour(1, 1))
    assert resp.status_code == 403
    assert resp.json()["code"] == "staff_booking_required"
    resp = await client.post(
        "/v1/holds",
        json={"branch_id": bid, "service_id": sid, "start": iso(at_hour(1, 1))},
        headers=bearer(token),
    )
    assert resp.status_code == 403
    assert resp.json()["code"] == "staff_booking_required"
    # a kiosk booking for the same phone is refused too; staff can book for them
    resp = await book(
        client, await kiosk(pool, module_env, bid), bid, sid, at_hour(1, 1), phone=phone
    )
    assert resp.status_code == 403
    assert await pool.fetchval("SELECT count(*) FROM bookings") == before
    staff = await login(client, await make_staff(pool, "staff", [bid]))
    resp = await book(client, staff, bid, sid, at_hour(1, 1), phone=phone)
    assert resp.status_code == 201, resp.text
    assert resp.json()["channel"] == "staff"

    # with the rule switched off the customer books again
    off = settings_with(module_env, no_show_limit=0)
    out, _ = await svc.create_booking(
        pool,
        None,
        _principal(cid),
        BookingCreate(branch_id=bid, service_id=sid, start=at_hour(1, 2)),
        idempotency_key=None,
        now=datetime.now(UTC),
        policy=policy_of(off),
    )
    assert out.status == "confirmed"


def _principal(cid: int) -> Principal:
    return Principal(kind="customer", id=cid, role="customer", channel="app", branches=())
