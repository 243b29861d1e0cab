"""What changes to a booking do to its texts and its queue ticket, and which booking
an SMS reply acts on: a reschedule is texted with its new time (what the local Twilio
receives); a checked-in booking can no longer be moved or cancelled through the
booking endpoints or by SMS; a Y or N answers the message that asked, and asks back
when that cannot be told."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis
from litestar import Litestar

from selfserve.app import create_app
from tests.booking_helpers import (
    at_hour,
    book,
    customer,
    invariant_holds,
    iso,
    remaining,
    seed,
    sms,
)
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import bearer
from tests.integration.test_outbox import drain, env, make_due, twilio
from tests.twilio_server import FakeTwilio

__all__ = ["env", "twilio"]  # fixtures shared with the outbox tests


@pytest.fixture(scope="module")
def app(module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis) -> Litestar:
    # Check-in opens a day ahead here, so a booking made now can check in at once.
    settings = settings_with(module_env, check_in_early_min=24 * 60)
    return create_app(settings, pool=pool, redis=redis)


def wall(instant: datetime) -> str:
    """How a text names a start: branch wall time (the seeded branches are in Shanghai)."""
    return instant.astimezone(ZoneInfo("Asia/Shanghai")).strftime("%Y-%m-%d %H:%M")


async def pending_of(pool: asyncpg.Pool, booking_id: int) -> list[int]:
    rows = await pool.fetch(
        "SELECT id FROM messages WHERE dedupe_key LIKE $1 AND status = 'pending' ORDER BY id",
        f"booking:{booking_id}:%",
    )
    return [r["id"] for r in rows]


# --- a reschedule is texted with the new time ----------------------------------------


async def test_after_a_reschedule_every_text_still_to_come_names_the_new_time(
    env: ModuleEnv,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, phone, token = await customer(pool, env)
    old, new = at_hour(3, 1), at_hour(3, 6)
    booking = (await book(client, token, bid, sid, old)).json()
    await drain(env, redis)  # the confirmation goes out at once, naming the old time
    [confirmation] = twilio.sent_to(phone)
    assert wall(old) in confirmation["body"]

    resp = await client.post(
        f"/v1/bookings/{booking['id']}/reschedule", json={"start": iso(new)}, headers=bearer(token)
    )
    assert resp.status_code == 200, resp.text
    reminders = await pending_of(pool, booking["id"])
    assert len(reminders) == 2  # the 24 h confirm request and the 2 h reminder
    for mid in reminders:  # their send times come
        await make_due(pool, redis, mid)
    await drain(env, redis)

    later = twilio.sent_to(phone)[1:]
    assert len(later) == 2
    for message in later:
        assert wall(new) in message["body"], message["body"]
        assert wall(old) not in message["body"], message["body"]
    assert any("reply Y" in m["body"] for m in later)  # the confirm request too


async def test_a_confirmation_not_sent_yet_is_rewritten_with_the_new_time(
    env: ModuleEnv,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
) -> None:
    """Held back (quiet hours, an outage) and still pending when the booking moves."""
    bid, sid, _ = await seed(pool, capacity=1)
    _, phone, token = await customer(pool, env, locale="zh-CN")
    old, new = at_hour(4, 1), at_hour(4, 3)
    booking = (await book(client, token, bid, sid, old)).json()
    resp = await client.post(
        f"/v1/bookings/{booking['id']}/reschedule", json={"start": iso(new)}, headers=bearer(token)
    )
    assert resp.status_code == 200, resp.text
    await drain(env, redis)
    [confirmation] = twilio.sent_to(phone)
    assert wall(new) in confirmation["body"]
    assert booking["code"] in confirmation["body"]
    assert "预约" in confirmation["body"]  # still in the customer's language
    row = await pool.fetchrow(
        "SELECT body, segments, encoding FROM messages WHERE dedupe_key = $1",
        f"booking:{booking['id']}:confirmation",
    )
    assert row["body"] == confirmation["body"]
    assert row["encoding"] == "UCS-2"


async def send_now(
    env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, booking_id: int, kind: str
) -> None:
    """The booking's `kind` message comes due and the worker sends it (with anything
    else due, such as confirmations)."""
    rows = await pool.fetch(
        "SELECT id FROM messages WHERE dedupe_key LIKE $1 AND status = 'pending'",
        f"booking:{booking_id}:{kind}%",
    )
    assert rows, f"no pending {kind} for booking {booking_id}"
    for r in rows:
        await make_due(pool, redis, r["id"])
    await drain(env, redis)


async def status_of(pool: asyncpg.Pool, booking_id: int) -> tuple[str, bool]:
    row = await pool.fetchrow(
        "SELECT status, confirmed_by_sms_at IS NOT NULL AS confirmed FROM bookings WHERE id = $1",
        booking_id,
    )
    return row["status"], row["confirmed"]


# --- which booking an SMS reply acts on -----------------------------------------------


async def test_n_to_the_latest_confirmation_cancels_that_booking_not_the_earliest(
    env: ModuleEnv,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, phone, token = await customer(pool, env)
    sooner, later = at_hour(3, 1), at_hour(5, 1)
    first = (await book(client, token, bid, sid, sooner)).json()
    await drain(env, redis)
    second = (await book(client, token, bid, sid, later)).json()
    await drain(env, redis)
    assert len(twilio.sent_to(phone)) == 2  # both confirmations, "Reply N to cancel"

    answer = await sms(pool, phone, "N")
    assert second["code"] in answer
    assert "Cancelled" in answer
    assert await status_of(pool, second["id"]) == ("cancelled", False)
    assert await status_of(pool, first["id"]) == ("confirmed", False)
    assert await remaining(client, bid, sid, later) == 1  # its seat, not the other's
    assert await remaining(client, bid, sid, sooner) == 0
    applied = await pool.fetchval(
        "SELECT booking_id FROM inbound_sms WHERE from_phone = $1 ORDER BY id DESC LIMIT 1", phone
    )
    assert applied == second["id"]
    await invariant_holds(pool)


async def test_y_answers_the_confirm_request_not_the_phones_earliest_booking(
    env: ModuleEnv,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, phone, token = await customer(pool, env)
    asked = (await book(client, token, bid, sid, at_hour(2, 3))).json()
    await send_now(env, pool, redis, asked["id"], "reminder_24h")  # "reply Y to confirm"
    # Booked afterwards for an earlier time; its confirmation offers N only.
    sooner = (await book(client, token, bid, sid, at_hour(1, 5))).json()
    await drain(env, redis)

    answer = await sms(pool, phone, "yes")
    assert asked["code"] in answer
    assert await status_of(pool, asked["id"]) == ("confirmed", True)
    assert await status_of(pool, sooner["id"]) == ("confirmed", False)


async def test_with_two_confirm_requests_waiting_a_bare_reply_asks_which(
    env: ModuleEnv,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, phone, token = await customer(pool, env)
    a = (await book(client, token, bid, sid, at_hour(2, 3))).json()
    b = (await book(client, token, bid, sid, at_hour(2, 4))).json()
    await send_now(env, pool, redis, a["id"], "reminder_24h")
    await send_now(env, pool, redis, b["id"], "reminder_24h")

    for word in ("N", "Y", "取消"):
        answer = await sms(pool, phone, word)
        assert a["code"] in answer, answer  # asks back, listing both
        assert b["code"] in answer, answer
        assert await status_of(pool, a["id"]) == ("confirmed", False)
        assert await status_of(pool, b["id"]) == ("confirmed", False)
    assert (
        await pool.fetchval("SELECT count(*) FROM sms_inbox WHERE phone = $1", phone) == 0
    )  # answered, not left for staff

    # Named by its code, the reply acts on that booking.
    answer = await sms(pool, phone, f"n {b['code'].lower()}")
    assert b["code"] in answer
    assert "Cancelled" in answer
    assert await status_of(pool, b["id"]) == ("cancelled", False)
    # Now a's request is the only one waiting: a bare Y is for it.
    answer = await sms(pool, phone, "Y")
    assert a["code"] in answer
    assert await status_of(pool, a["id"]) == ("confirmed", True)
    # A code that is not one of this phone's open bookings changes nothing.
    _, _, other_token = await customer(pool, env)
    theirs = (await book(client, other_token, bid, sid, at_hour(2, 6))).json()
    answer = await sms(pool, phone, f"N {theirs['code']}")
    assert theirs["code"] not in answer
    assert a["code"] in answer
    assert await status_of(pool, theirs["id"]) == ("confirmed", False)
    await invariant_holds(pool)


async def test_without_a_message_that_asked_a_reply_asks_which_booking(
    env: ModuleEnv, client: httpx.AsyncClient, pool: asyncpg.Pool, twilio: FakeTwilio
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, phone, token = await customer(pool, env)
    booking = (await book(client, token, bid, sid, at_hour(3, 2))).json()  # nothing sent yet
    answer = await sms(pool, phone, "N")
    assert booking["code"] in answer
    assert "Which booking" in answer
    assert await status_of(pool, booking["id"]) == ("confirmed", False)
    # A phone with no booking at all: kept for staff, as before.
    _, lonely, _ = await customer(pool, env)
    assert "a member of staff" in await sms(pool, lonely, "N")


# --- a checked-in booking ----------------------------------------------------------------


async def add_queue(pool: asyncpg.Pool, branch_id: int, service_id: int) -> int:
    async with pool.acquire() as conn, conn.transaction():
        qid: int = await conn.fetchval(
            "INSERT INTO queues (branch_id, name, prefix) VALUES ($1, 'Queue', 'A') RETURNING id",
            branch_id,
        )
        await conn.execute(
            "INSERT INTO queue_services (queue_id, service_id) VALUES ($1, $2)", qid, service_id
        )
    return qid


async def test_a_checked_in_booking_cannot_be_moved_or_cancelled_only_its_ticket_can(
    env: ModuleEnv,
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    twilio: FakeTwilio,
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    await add_queue(pool, bid, sid)
    _, phone, token = await customer(pool, env)
    start = at_hour(0, 1)
    booking = (await book(client, token, bid, sid, start)).json()
    await drain(env, redis)  # its confirmation, "Reply N to cancel", is sent
    resp = await client.post(
        "/v1/check-ins", json={"booking_id": booking["id"]}, headers=bearer(token)
    )
    assert resp.status_code == 201, resp.text
    ticket = resp.json()

    moved = await client.post(
        f"/v1/bookings/{booking['id']}/reschedule",
        json={"start": iso(start + timedelta(hours=1))},
        headers=bearer(token),
    )
    assert (moved.status_code, moved.json()["code"]) == (409, "booking_checked_in")
    cancelled = await client.post(f"/v1/bookings/{booking['id']}/cancel", headers=bearer(token))
    assert (cancelled.status_code, cancelled.json()["code"]) == (409, "booking_checked_in")
    assert cancelled.headers["content-type"].startswith("application/problem+json")
    for reply in ("N", f"N {booking['code']}"):  # by SMS neither
        answer = await sms(pool, phone, reply)
        assert "checked in" in answer, answer
        assert "cancel your ticket" in answer, answer

    view = (await client.get(f"/v1/bookings/{booking['id']}", headers=bearer(token))).json()
    assert (view["status"], view["start"]) == ("confirmed", booking["start"])
    assert await remaining(client, bid, sid, start) == 0  # the seat was not given away
    got = await client.get(f"/v1/tickets/{ticket['id']}", headers=bearer(token))
    assert got.json()["status"] == "waiting"

    # Leaving the queue goes through the ticket.
    left = await client.post(f"/v1/tickets/{ticket['id']}/cancel", headers=bearer(token))
    assert left.status_code == 200, left.text
    assert left.json()["status"] == "cancelled"
    await invariant_holds(pool)


async def test_check_in_racing_cancel_and_reschedule_never_both_win(
    env: ModuleEnv, client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    """Each booking gets a check-in, a cancel and a reschedule at once, each on a pool
    connection of its own: once checked in, a booking is neither cancelled nor moved
    (a move that came first is what the ticket was issued for)."""
    n = 12
    bid, sid, _ = await seed(pool, capacity=n)
    await add_queue(pool, bid, sid)
    start = at_hour(0, 1)
    people = [await customer(pool, env) for _ in range(n)]
    bookings = [(await book(client, tok, bid, sid, start)).json() for _, _, tok in people]

    async def check_in(b: dict[str, object], tok: str) -> httpx.Response:
        return await client.post("/v1/check-ins", json={"booking_id": b["id"]}, headers=bearer(tok))

    async def cancel(b: dict[str, object], tok: str) -> httpx.Response:
        return await client.post(f"/v1/bookings/{b['id']}/cancel", headers=bearer(tok))

    async def move(b: dict[str, object], tok: str) -> httpx.Response:
        return await client.post(
            f"/v1/bookings/{b['id']}/reschedule",
            json={"start": iso(start + timedelta(hours=1))},
            headers=bearer(tok),
        )

    calls = []
    for b, (_, _, tok) in zip(bookings, people, strict=True):
        calls += [check_in(b, tok), cancel(b, tok), move(b, tok)]
    answers = await asyncio.gather(*calls)
    assert all(a.status_code < 500 for a in answers), [a.text for a in answers]
    for i, b in enumerate(bookings):
        checked, cancelled, moved = answers[3 * i : 3 * i + 3]
        row = await pool.fetchrow(
            "SELECT b.status, b.starts_at, b.checked_in_at, t.appointment_at, t.status AS ticket "
            "FROM bookings b LEFT JOIN tickets t ON t.booking_id = b.id WHERE b.id = $1",
            b["id"],
        )
        if checked.status_code == 201:
            assert (cancelled.status_code, cancelled.json()["code"]) == (409, "booking_checked_in")
            assert moved.status_code in (200, 409)
            if moved.status_code == 409:
                assert moved.json()["code"] == "booking_checked_in"
            assert (row["status"], row["ticket"]) == ("confirmed", "waiting")
            assert row["starts_at"] == row["appointment_at"]
            assert row["checked_in_at"] is not None
        else:
            assert checked.status_code == 409
            assert (row["checked_in_at"], row["ticket"]) == (None, None)
            assert cancelled.status_code == 200 or moved.status_code == 200
    await invariant_holds(pool)
