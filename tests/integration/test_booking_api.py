"""The booking API against real PostgreSQL and Redis: availability, holds, bookings,
idempotency, ownership, cancel, reschedule, reminders and SMS replies."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest

from tests.booking_helpers import (
    at_hour,
    book,
    customer,
    invariant_holds,
    iso,
    kiosk,
    mark_sent,
    messages_of,
    remaining,
    seed,
    slots,
    sms,
)
from tests.conftest import ModuleEnv
from tests.helpers import bearer, login, make_staff

# --- availability ----------------------------------------------------------------


async def test_availability_lists_slots_and_remaining_drops_after_a_booking(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=3, resources=2)
    start = at_hour(2)
    items = await slots(client, bid, sid, start, start + timedelta(hours=2))
    assert [i["start"] for i in items] == [iso(start + timedelta(minutes=30 * k)) for k in range(4)]
    first = items[0]
    assert first["remaining"] == 6
    assert first["timezone"] == "Asia/Shanghai"
    assert first["end"] == iso(start + timedelta(minutes=30))
    assert datetime.fromisoformat(first["local_start"]) == start
    assert first["local_start"].endswith("+08:00")

    _, _, token = await customer(pool, module_env)
    resp = await book(client, token, bid, sid, start, party_size=3)
    assert resp.status_code == 201, resp.text
    assert await remaining(client, bid, sid, start) == 3
    assert await remaining(client, bid, sid, start + timedelta(minutes=30)) == 6
    # a party of four fits no single room any more
    assert await slots(client, bid, sid, start, start + timedelta(minutes=1), party=4) == []


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"from": "2030-01-01T00:00:00", "to": "2030-01-02T00:00:00Z"}, "from"),
        ({"from": "2030-01-01T00:00:00Z", "to": "2030-01-01T00:00:00Z"}, "to"),
        ({"from": "2030-01-01T00:00:00Z", "to": "2030-02-02T00:00:00Z"}, "to"),
    ],
)
async def test_availability_rejects_naive_empty_and_long_ranges(
    client: httpx.AsyncClient, pool: asyncpg.Pool, params: dict[str, str], field: str
) -> None:
    bid, sid, _ = await seed(pool)
    resp = await client.get(
        "/v1/availability", params={"branch_id": bid, "service_id": sid, **params}
    )
    assert resp.status_code == 422, resp.text
    assert resp.json()["errors"][0]["field"] == field


async def test_availability_of_a_service_of_another_branch_is_404(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    bid, _, _ = await seed(pool)
    sid_branch, sid, _ = await seed(pool)
    start = at_hour(1)
    params = {"from": iso(start), "to": iso(start + timedelta(days=1)), "service_id": sid}
    # the same range is a valid question for the service's own branch
    own = await client.get("/v1/availability", params={**params, "branch_id": sid_branch})
    assert own.status_code == 200, own.text
    resp = await client.get("/v1/availability", params={**params, "branch_id": bid})
    assert (resp.status_code, resp.json()["code"]) == (404, "not_found")


# --- holds and bookings ------------------------------------------------------------


async def test_hold_then_book(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    start = at_hour(3)
    _, phone, token = await customer(pool, module_env)
    resp = await client.post(
        "/v1/holds",
        json={"branch_id": bid, "service_id": sid, "start": iso(start), "party_size": 1},
        headers=bearer(token),
    )
    assert resp.status_code == 201, resp.text
    hold = resp.json()
    expires = datetime.fromisoformat(hold["expires_at"])
    assert timedelta(minutes=4) < expires - datetime.now(UTC) <= timedelta(minutes=5)
    assert await remaining(client, bid, sid, start) == 0

    # another customer cannot use this hold
    _, _, other = await customer(pool, module_env)
    resp = await client.post("/v1/bookings", json={"hold_id": hold["id"]}, headers=bearer(other))
    assert resp.status_code == 404

    resp = await client.post("/v1/bookings", json={"hold_id": hold["id"]}, headers=bearer(token))
    assert resp.status_code == 201, resp.text
    booking = resp.json()
    assert booking["status"] == "confirmed"
    assert booking["channel"] == "app"
    assert booking["start"] == iso(start)
    assert len(booking["code"]) == 6
    assert await pool.fetchval("SELECT phone FROM bookings WHERE id = $1", booking["id"]) == phone

    resp = await client.post("/v1/bookings", json={"hold_id": hold["id"]}, headers=bearer(token))
    assert resp.status_code == 409
    assert resp.json()["code"] == "hold_expired"
    await invariant_holds(pool)


async def test_direct_booking_full_slot_and_deposit(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=2, deposit=5000)
    start = at_hour(4)
    _, _, token = await customer(pool, module_env)
    first = await book(client, token, bid, sid, start, party_size=2)
    assert first.status_code == 201, first.text
    assert first.json()["status"] == "pending_payment"
    full = await book(client, token, bid, sid, start)
    assert full.status_code == 409
    assert full.json()["code"] == "slot_full"
    off_grid = await book(client, token, bid, sid, start + timedelta(minutes=10))
    assert off_grid.status_code == 409
    assert off_grid.json()["code"] == "slot_unavailable"
    too_many = await book(client, token, bid, sid, start + timedelta(hours=1), party_size=9)
    assert too_many.status_code == 422
    await invariant_holds(pool)


async def test_a_customer_cannot_send_a_phone_and_a_kiosk_books_for_a_walk_in(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=3)
    start = at_hour(2, 5)
    _, _, token = await customer(pool, module_env)
    resp = await book(client, token, bid, sid, start, phone="+8613912345678")
    assert resp.status_code == 422
    kiosk_token = await kiosk(pool, module_env, bid)
    resp = await book(client, kiosk_token, bid, sid, start, phone="+86 139-1234-5678")
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert body["channel"] == "kiosk"
    row = await pool.fetchrow("SELECT phone, customer_id FROM bookings WHERE id = $1", body["id"])
    assert (row["phone"], row["customer_id"]) == ("+8613912345678", None)
    # a kiosk books only at its own branch: another one looks missing
    other_bid, other_sid, _ = await seed(pool)
    resp = await book(client, kiosk_token, other_bid, other_sid, start)
    assert resp.status_code == 404


async def test_idempotency_key_replays_and_refuses_another_body(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=5)
    start = at_hour(5)
    _, _, token = await customer(pool, module_env)
    first = await book(client, token, bid, sid, start, key="k-1")
    again = await book(client, token, bid, sid, start, key="k-1")
    assert first.status_code == again.status_code == 201
    assert first.json() == again.json()
    assert again.headers.get("idempotent-replayed") == "true"
    count = await pool.fetchval("SELECT count(*) FROM bookings WHERE service_id = $1", sid)
    assert count == 1
    other = await book(client, token, bid, sid, start + timedelta(minutes=30), key="k-1")
    assert other.status_code == 422
    assert other.json()["code"] == "idempotency_key_reused"
    # keys belong to their caller: another customer's "k-1" is a new request
    _, _, token2 = await customer(pool, module_env)
    theirs = await book(client, token2, bid, sid, start, key="k-1")
    assert theirs.status_code == 201
    assert theirs.json()["id"] != first.json()["id"]
    # holds honour keys too
    hold_body = {"branch_id": bid, "service_id": sid, "start": iso(start)}
    headers = {**bearer(token), "Idempotency-Key": "h-1"}
    h1 = await client.post("/v1/holds", json=hold_body, headers=headers)
    h2 = await client.post("/v1/holds", json=hold_body, headers=headers)
    assert h1.status_code == h2.status_code == 201
    assert h1.json()["id"] == h2.json()["id"]
    assert await remaining(client, bid, sid, start) == 2
    await invariant_holds(pool)


async def test_other_customers_bookings_answer_404(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=2)
    start = at_hour(6)
    _, _, mine = await customer(pool, module_env)
    _, _, theirs = await customer(pool, module_env)
    booking = (await book(client, mine, bid, sid, start)).json()
    own = await client.get(f"/v1/bookings/{booking['id']}", headers=bearer(mine))
    assert own.status_code == 200
    assert own.json() == booking
    listed = await client.get("/v1/bookings", headers=bearer(mine))
    assert [b["id"] for b in listed.json()["items"]] == [booking["id"]]
    assert (await client.get("/v1/bookings", headers=bearer(theirs))).json()["items"] == []
    for path in (f"/v1/bookings/{booking['id']}", "/v1/bookings/999999999"):
        resp = await client.get(path, headers=bearer(theirs))
        assert resp.status_code == 404
        assert resp.json()["code"] == "not_found"
    for action in ("cancel", "reschedule"):
        body = {"start": iso(start + timedelta(hours=1))} if action == "reschedule" else None
        resp = await client.post(
            f"/v1/bookings/{booking['id']}/{action}", json=body, headers=bearer(theirs)
        )
        assert resp.status_code == 404


async def test_cancel_frees_capacity_at_once_and_cancels_messages(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1, cancellation_window_min=24 * 60)
    start = at_hour(2, 2)
    _, _, token = await customer(pool, module_env)
    _, _, second = await customer(pool, module_env)
    booking = (await book(client, token, bid, sid, start)).json()
    assert (await book(client, second, bid, sid, start)).status_code == 409
    resp = await client.post(f"/v1/bookings/{booking['id']}/cancel", headers=bearer(token))
    assert resp.status_code == 200, resp.text
    cancelled = resp.json()
    assert cancelled["status"] == "cancelled"
    assert cancelled["late_cancellation"] is False  # two days ahead, window one day
    statuses = await pool.fetch(
        "SELECT status FROM messages WHERE dedupe_key LIKE $1", f"booking:{booking['id']}:%"
    )
    assert statuses
    assert {r["status"] for r in statuses} == {"canceled"}
    assert await remaining(client, bid, sid, start) == 1
    rebook = await book(client, second, bid, sid, start)
    assert rebook.status_code == 201
    again = await client.post(f"/v1/bookings/{booking['id']}/cancel", headers=bearer(token))
    assert again.status_code == 409
    assert again.json()["code"] == "booking_not_active"
    await invariant_holds(pool)


async def test_cancel_inside_the_window_records_the_policy(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1, cancellation_window_min=48 * 60)
    start = at_hour(1)
    _, _, token = await customer(pool, module_env)
    booking = (await book(client, token, bid, sid, start)).json()
    resp = await client.post(f"/v1/bookings/{booking['id']}/cancel", headers=bearer(token))
    assert resp.json()["late_cancellation"] is True


async def test_reschedule_into_a_full_slot_keeps_the_old_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    old, full, free = at_hour(3, 1), at_hour(3, 2), at_hour(3, 3)
    _, _, token = await customer(pool, module_env)
    _, _, other = await customer(pool, module_env)
    booking = (await book(client, token, bid, sid, old)).json()
    assert (await book(client, other, bid, sid, full)).status_code == 201
    path = f"/v1/bookings/{booking['id']}/reschedule"
    resp = await client.post(path, json={"start": iso(full)}, headers=bearer(token))
    assert resp.status_code == 409
    assert resp.json()["code"] == "slot_full"
    kept = (await client.get(f"/v1/bookings/{booking['id']}", headers=bearer(token))).json()
    assert kept["start"] == iso(old)
    assert await remaining(client, bid, sid, old) == 0

    # a free slot: the booking moves, keeping its code, and frees the old seats
    resp = await client.post(path, json={"start": iso(free)}, headers=bearer(token))
    assert resp.status_code == 200, resp.text
    assert resp.json()["start"] == iso(free)
    assert resp.json()["code"] == booking["code"]
    assert await remaining(client, bid, sid, old) == 1
    assert await remaining(client, bid, sid, free) == 0
    # pending reminders moved with it
    rows = await pool.fetch(
        "SELECT dedupe_key, send_at, expires_at FROM messages WHERE dedupe_key LIKE $1 "
        "AND status = 'pending' AND template IN ('reminder', 'confirm_request') ORDER BY send_at",
        f"booking:{booking['id']}:%",
    )
    assert [r["send_at"] for r in rows] == [free - timedelta(hours=24), free - timedelta(hours=2)]
    # and so did their deadline: a reminder not out by the new start is never sent
    assert [r["expires_at"] for r in rows] == [free, free]
    await invariant_holds(pool)


# --- messages -----------------------------------------------------------------------


async def test_reminders_land_exactly_24h_and_2h_before_and_skip_the_past(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=3)
    _, phone, token = await customer(pool, module_env)
    far = at_hour(3)
    booked_at = datetime.now(UTC)
    booking = (await book(client, token, bid, sid, far)).json()
    sent = await messages_of(pool, booking["id"])
    assert set(sent) == {"confirmation", "reminder_24h", "reminder_2h"}
    deadlines = {
        r["dedupe_key"].split(":")[2]: r["expires_at"]
        for r in await pool.fetch(
            "SELECT dedupe_key, expires_at FROM messages WHERE dedupe_key LIKE $1",
            f"booking:{booking['id']}:reminder%",
        )
    }
    # a reminder held up (an outage, quiet hours) past the appointment is dropped
    assert deadlines == {"reminder_24h": far, "reminder_2h": far}
    assert sent["reminder_24h"] == far - timedelta(hours=24)
    assert sent["reminder_2h"] == far - timedelta(hours=2)
    assert booked_at <= sent["confirmation"] <= datetime.now(UTC)
    row = await pool.fetchrow(
        "SELECT phone, template, locale, status FROM messages WHERE dedupe_key = $1",
        f"booking:{booking['id']}:confirmation",
    )
    assert (row["phone"], row["template"], row["locale"], row["status"]) == (
        phone,
        "booking_confirmation",
        "en",
        "pending",
    )

    # the 24 h reminder asks for a Y/N reply; the 2 h one only reminds
    templates = dict(
        await pool.fetch(
            "SELECT split_part(dedupe_key, ':', 3), template FROM messages "
            "WHERE dedupe_key LIKE $1",
            f"booking:{booking['id']}:reminder%",
        )
    )
    assert templates == {"reminder_24h": "confirm_request", "reminder_2h": "reminder"}

    soon = at_hour(0, 3)  # 3-4 hours ahead: the 24 h reminder is already past
    booking = (await book(client, token, bid, sid, soon)).json()
    sent = await messages_of(pool, booking["id"])
    assert set(sent) == {"confirmation", "reminder_2h"}
    assert sent["reminder_2h"] == soon - timedelta(hours=2)

    very_soon = at_hour(0, 0)  # under 2 hours ahead: no reminder at all
    booking = (await book(client, token, bid, sid, very_soon)).json()
    assert set(await messages_of(pool, booking["id"])) == {"confirmation"}


async def test_sms_y_from_the_bookings_phone_confirms_and_another_phone_changes_nothing(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=2)
    _, phone, token = await customer(pool, module_env)
    booking = (await book(client, token, bid, sid, at_hour(2, 3))).json()
    assert booking["confirmed_by_sms_at"] is None
    await mark_sent(pool, booking["id"], "reminder_24h")  # the confirm request

    answer = await sms(pool, "+8613700999999", "Y")
    assert "a member of staff" in answer  # kept for staff
    view = (await client.get(f"/v1/bookings/{booking['id']}", headers=bearer(token))).json()
    assert view["confirmed_by_sms_at"] is None

    answer = await sms(pool, phone, "Y")
    assert booking["code"] in answer
    view = (await client.get(f"/v1/bookings/{booking['id']}", headers=bearer(token))).json()
    assert view["confirmed_by_sms_at"] is not None
    assert view["status"] == "confirmed"


async def test_sms_n_cancels_the_booking_whose_message_asked_and_frees_it(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    _, phone, token = await customer(pool, module_env)
    earlier = at_hour(2, 4)
    later = at_hour(4, 6)
    first = (await book(client, token, bid, sid, earlier)).json()
    await mark_sent(pool, first["id"], "confirmation")
    second = (await book(client, token, bid, sid, later)).json()
    await mark_sent(pool, second["id"], "confirmation")  # "Reply N to cancel", the last text
    answer = await sms(pool, phone, "取消")
    assert second["code"] in answer
    view = (await client.get(f"/v1/bookings/{second['id']}", headers=bearer(token))).json()
    assert view["status"] == "cancelled"
    view = (await client.get(f"/v1/bookings/{first['id']}", headers=bearer(token))).json()
    assert view["status"] == "confirmed"
    assert await remaining(client, bid, sid, later) == 1
    assert await remaining(client, bid, sid, earlier) == 0
    await invariant_holds(pool)


async def test_bookers_act_within_their_branches_with_one_kind_of_body(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool)
    other_bid, _, _ = await seed(pool)
    resp = await book(client, "nonsense", bid, sid, at_hour(1))
    assert resp.status_code == 401
    # to staff of another branch this branch looks missing; staff of this branch book
    outsider = await make_staff(pool, "staff", [other_bid])
    resp = await book(client, await login(client, outsider), bid, sid, at_hour(1))
    assert resp.status_code == 404
    assert resp.json()["code"] == "not_found"
    insider = await make_staff(pool, "staff", [bid])
    resp = await book(client, await login(client, insider), bid, sid, at_hour(1))
    assert resp.status_code == 201, resp.text
    assert resp.json()["channel"] == "staff"
    _, _, token = await customer(pool, module_env)
    resp = await client.post(
        "/v1/bookings", json={"hold_id": 1, "start": iso(at_hour(1))}, headers=bearer(token)
    )
    assert resp.status_code == 422
    assert resp.json()["errors"][0]["field"] == "start"
    resp = await client.post("/v1/bookings", json={"branch_id": bid}, headers=bearer(token))
    assert resp.status_code == 422
