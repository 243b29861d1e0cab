"""Staff and bookings against real PostgreSQL and Redis: the day sheet and search
(filters, paging, scope), and staff cancel and reschedule (seats, texts, the change
record, atomic moves that keep the old slot on 409, racing clients)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis
from arq.constants import job_key_prefix
from litestar import Litestar

from selfserve.app import create_app
from selfserve.messaging.service import job_id
from tests.booking_helpers import (
    at_hour,
    book,
    customer,
    invariant_holds,
    iso,
    kiosk,
    remaining,
    seed,
)
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import bearer, login, make_staff

WALK_IN = "+8613912345678"


async def staff_token(client: httpx.AsyncClient, pool: asyncpg.Pool, role: str, *bids: int) -> str:
    return await login(client, await make_staff(pool, role, list(bids)))


async def sheet(
    client: httpx.AsyncClient, token: str, **params: Any
) -> tuple[list[dict[str, Any]], str | None]:
    resp = await client.get("/v1/admin/bookings", params=params, headers=bearer(token))
    assert resp.status_code == 200, resp.text
    body = resp.json()
    return body["items"], body["next_cursor"]


async def changes_of(pool: asyncpg.Pool, booking_id: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT * FROM booking_changes WHERE booking_id = $1 ORDER BY id", booking_id
    )


async def notices(pool: asyncpg.Pool, booking_id: int) -> list[asyncpg.Record]:
    return await pool.fetch(
        "SELECT id, phone, template, locale, body, status, branch_id FROM messages "
        "WHERE dedupe_key LIKE $1 ORDER BY id",
        f"booking:{booking_id}:staff_%",
    )


@pytest.fixture(scope="module")
def app(module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis) -> Litestar:
    """The day sheet needs many bookings of one customer and one walk-in phone on one
    day: the per-owner abuse limits are raised here (they have their own tests)."""
    settings = settings_with(module_env, max_bookings_per_day=50, sms_per_number_hour=50)
    return create_app(settings, pool=pool, redis=redis)


# --- the day sheet and search ----------------------------------------------------------


async def test_day_sheet_filters_and_pages_within_the_callers_branches(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, rids = await seed(pool, capacity=2, resources=2)
    other_bid, other_sid, _ = await seed(pool, capacity=2)
    _, phone, token = await customer(pool, module_env)
    device = await kiosk(pool, module_env, bid)
    day = at_hour(3)
    made: list[dict[str, Any]] = []
    for k in range(5):
        resp = await book(client, token, bid, sid, day + timedelta(minutes=30 * k))
        assert resp.status_code == 201, resp.text
        made.append(resp.json())
    walk_in = (await book(client, device, bid, sid, day, phone=WALK_IN)).json()
    made.append(walk_in)
    later = (await book(client, token, bid, sid, day + timedelta(days=1))).json()
    made.append(later)
    elsewhere = (await book(client, token, other_bid, other_sid, day)).json()
    await client.post(f"/v1/bookings/{made[1]['id']}/cancel", headers=bearer(token))

    staff = await staff_token(client, pool, "staff", bid)
    ordered = sorted(made, key=lambda b: (b["start"], b["id"]))
    items, nxt = await sheet(client, staff)
    assert [i["id"] for i in items] == [b["id"] for b in ordered]
    assert nxt is None
    first = next(i for i in items if i["id"] == walk_in["id"])
    assert first["phone"] == WALK_IN
    assert first["channel"] == "kiosk"
    assert first["resource_id"] in rids
    assert first["customer_id"] is None
    assert first["timezone"] == "Asia/Shanghai"

    # pages of two walk the same list, each row once
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page, cursor = await sheet(client, staff, **params)
        assert len(page) <= 2
        seen += [i["id"] for i in page]
        if cursor is None:
            break
    assert seen == [b["id"] for b in ordered]

    # each filter
    window = {"from": iso(day), "to": iso(day + timedelta(hours=1))}
    items, _ = await sheet(client, staff, **window)
    assert {i["id"] for i in items} == {made[0]["id"], made[1]["id"], walk_in["id"]}
    items, _ = await sheet(client, staff, status="cancelled")
    assert [i["id"] for i in items] == [made[1]["id"]]
    items, _ = await sheet(client, staff, phone=WALK_IN)
    assert [i["id"] for i in items] == [walk_in["id"]]
    items, _ = await sheet(client, staff, phone=phone, **window)
    assert [i["id"] for i in items] == [made[0]["id"], made[1]["id"]]
    items, _ = await sheet(client, staff, code=later["code"].lower())
    assert [i["id"] for i in items] == [later["id"]]
    items, _ = await sheet(client, staff, service_id=sid, branch_id=bid)
    assert len(items) == len(made)
    for rid in rids:
        items, _ = await sheet(client, staff, resource_id=rid)
        assert all(i["resource_id"] == rid for i in items)
    assert sum([len((await sheet(client, staff, resource_id=r))[0]) for r in rids]) == len(made)

    # another branch's bookings are not on this sheet, even when asked for
    for params in (
        {"branch_id": other_bid},
        {"service_id": other_sid},
        {"code": elsewhere["code"]},
    ):
        assert (await sheet(client, staff, **params))[0] == []
    # an admin sees every branch
    admin = await staff_token(client, pool, "admin")
    items, _ = await sheet(client, admin, code=elsewhere["code"])
    assert [i["id"] for i in items] == [elsewhere["id"]]


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"cursor": "MTIzNA"}, "cursor"),  # base64 of a bare number: not ours
        ({"cursor": "٣٤.٥"}, "cursor"),
        ({"cursor": "OTk5OTk5OTk5OTk5OTk5OTk5OS4x"}, "cursor"),
        ({"from": "2030-01-01T00:00:00"}, "from"),
        ({"from": "0001-01-01T00:00:00+01:00"}, "from"),
        ({"to": "9999-12-31T23:00:00-05:00"}, "to"),
        ({"from": "2030-01-02T00:00:00Z", "to": "2030-01-01T00:00:00Z"}, "to"),
        ({"phone": "12345"}, "phone"),
    ],
)
async def test_bad_filters_are_422_naming_the_parameter(
    client: httpx.AsyncClient, pool: asyncpg.Pool, params: dict[str, str], field: str
) -> None:
    admin = await staff_token(client, pool, "admin")
    resp = await client.get("/v1/admin/bookings", params=params, headers=bearer(admin))
    assert resp.status_code == 422, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert field in {e["field"] for e in resp.json()["errors"]}


@pytest.mark.parametrize(
    "query",
    [
        "status=bogus",
        "branch_id=abc",
        "branch_id=99999999999999999999",
        "resource_id=-1",
        "limit=0",
        "from=yesterday",
        "to=2030-13-01T00:00:00Z",
        "code=" + "Z" * 17,
        "phone=%2B%EF%BC%91%EF%BC%92",
        "cursor=" + "A" * 5000,
        "cursor=%00",
    ],
)
async def test_hostile_queries_are_4xx_problems(
    client: httpx.AsyncClient, pool: asyncpg.Pool, query: str
) -> None:
    admin = await staff_token(client, pool, "admin")
    resp = await client.get(f"/v1/admin/bookings?{query}", headers=bearer(admin))
    assert resp.status_code in (400, 422), resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert resp.json()["code"]


async def test_limit_is_at_most_200(client: httpx.AsyncClient, pool: asyncpg.Pool) -> None:
    admin = await staff_token(client, pool, "admin")
    resp = await client.get("/v1/admin/bookings?limit=201", headers=bearer(admin))
    assert resp.status_code in (400, 422), resp.text
    assert (await client.get("/v1/admin/bookings?limit=200", headers=bearer(admin))).is_success


# --- scope ---------------------------------------------------------------------------


async def test_bookings_of_other_branches_answer_404_like_missing_ones(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=2)
    other_bid, _, _ = await seed(pool)
    _, _, token = await customer(pool, module_env)
    start = at_hour(2)
    booking = (await book(client, token, bid, sid, start)).json()
    outsider = await staff_token(client, pool, "staff", other_bid)
    manager_elsewhere = await staff_token(client, pool, "manager", other_bid)
    for who in (outsider, manager_elsewhere):
        for booking_id in (booking["id"], 999_999_999):
            base = f"/v1/admin/bookings/{booking_id}"
            answers = [
                await client.get(base, headers=bearer(who)),
                await client.post(f"{base}/cancel", json={"reason": "x"}, headers=bearer(who)),
                await client.post(
                    f"{base}/reschedule",
                    json={"start": iso(start + timedelta(hours=1)), "reason": "x"},
                    headers=bearer(who),
                ),
            ]
            for resp in answers:
                assert resp.status_code == 404, resp.text
                assert resp.json()["code"] == "not_found"
    assert await changes_of(pool, booking["id"]) == []
    assert await remaining(client, bid, sid, start) == 1

    # customers and kiosks may never use the staff routes
    device = await kiosk(pool, module_env, bid)
    for who in (token, device):
        resp = await client.get(f"/v1/admin/bookings/{booking['id']}", headers=bearer(who))
        assert resp.status_code == 403
        resp = await client.get("/v1/admin/bookings", headers=bearer(who))
        assert resp.status_code == 403
    assert (await client.get("/v1/admin/bookings")).status_code == 401

    # staff, managers of the branch and admins read it
    for role, scope in (("staff", [bid]), ("manager", [bid, other_bid]), ("admin", [])):
        who = await staff_token(client, pool, role, *scope)
        resp = await client.get(f"/v1/admin/bookings/{booking['id']}", headers=bearer(who))
        assert resp.status_code == 200, resp.text
        assert resp.json()["code"] == booking["code"]
        assert resp.json()["changes"] == []


# --- cancel ----------------------------------------------------------------------------


async def test_staff_cancel_frees_seats_texts_and_is_recorded(
    client: httpx.AsyncClient, pool: asyncpg.Pool, redis: ArqRedis, module_env: ModuleEnv
) -> None:
    # inside the cancellation window: a customer would pay; the branch does not charge itself
    bid, sid, _ = await seed(pool, capacity=1, cancellation_window_min=72 * 60)
    start = at_hour(2, 5)
    device = await kiosk(pool, module_env, bid)
    walk_in = (await book(client, device, bid, sid, start, phone=WALK_IN)).json()
    assert await remaining(client, bid, sid, start) == 0
    email = await make_staff(pool, "staff", [bid])
    staff = await login(client, email)
    staff_id = await pool.fetchval("SELECT id FROM staff WHERE email = $1", email)
    path = f"/v1/admin/bookings/{walk_in['id']}/cancel"

    for body in ({}, {"reason": ""}, {"reason": "   "}, {"reason": "x" * 501}, {"reason": 5}):
        resp = await client.post(path, json=body, headers=bearer(staff))
        assert resp.status_code in (400, 422), resp.text
    assert await changes_of(pool, walk_in["id"]) == []

    resp = await client.post(
        path, json={"reason": "  customer phoned: ill  "}, headers=bearer(staff)
    )
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["status"] == "cancelled"
    assert out["late_cancellation"] is False
    assert await remaining(client, bid, sid, start) == 1
    await invariant_holds(pool)

    (change,) = await changes_of(pool, walk_in["id"])
    assert change["action"] == "cancel"
    assert change["staff_id"] == staff_id
    assert change["reason"] == "customer phoned: ill"
    assert change["new_starts_at"] is None
    assert change["old_starts_at"] == start
    assert [c["reason"] for c in out["changes"]] == ["customer phoned: ill"]
    assert out["changes"][0]["staff_id"] == staff_id

    # the walk-in's reminders are off, and they get one text saying what happened
    pending = await pool.fetch(
        "SELECT template FROM messages WHERE dedupe_key LIKE $1 AND status = 'pending'",
        f"booking:{walk_in['id']}:%",
    )
    assert [r["template"] for r in pending] == ["booking_cancelled_by_branch"]
    (notice,) = await notices(pool, walk_in["id"])
    assert (notice["phone"], notice["locale"], notice["branch_id"]) == (WALK_IN, "en", bid)
    assert walk_in["code"] in notice["body"]
    assert "cancelled" in notice["body"]
    assert await redis.exists(job_key_prefix + job_id(notice["id"]))

    again = await client.post(path, json={"reason": "again"}, headers=bearer(staff))
    assert again.status_code == 409
    assert again.json()["code"] == "booking_not_active"
    assert len(await changes_of(pool, walk_in["id"])) == 1
    assert len(await notices(pool, walk_in["id"])) == 1


async def test_a_customers_booking_cancelled_by_staff_is_texted_in_their_language(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool)
    _, phone, token = await customer(pool, module_env, locale="zh-CN")
    booking = (await book(client, token, bid, sid, at_hour(2, 7))).json()
    manager = await staff_token(client, pool, "manager", bid)
    resp = await client.post(
        f"/v1/admin/bookings/{booking['id']}/cancel",
        json={"reason": "room flooded"},
        headers=bearer(manager),
    )
    assert resp.status_code == 200, resp.text
    (notice,) = await notices(pool, booking["id"])
    assert (notice["phone"], notice["locale"]) == (phone, "zh-CN")
    assert "已取消" in notice["body"]
    # the customer sees the cancel as their own view of the booking
    own = await client.get(f"/v1/bookings/{booking['id']}", headers=bearer(token))
    assert own.json()["status"] == "cancelled"


# --- reschedule ------------------------------------------------------------------------


async def test_staff_reschedule_is_atomic_keeps_the_old_slot_on_409_and_is_recorded(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    old, full, free = at_hour(3, 1), at_hour(3, 2), at_hour(3, 3)
    device = await kiosk(pool, module_env, bid)
    _, _, other = await customer(pool, module_env)
    booking = (await book(client, device, bid, sid, old, phone=WALK_IN)).json()
    assert (await book(client, other, bid, sid, full)).status_code == 201
    staff = await staff_token(client, pool, "staff", bid)
    path = f"/v1/admin/bookings/{booking['id']}/reschedule"

    resp = await client.post(
        path, json={"start": iso(full), "reason": "wrong day"}, headers=bearer(staff)
    )
    assert resp.status_code == 409
    assert resp.json()["code"] == "slot_full"
    kept = (await client.get(f"/v1/admin/bookings/{booking['id']}", headers=bearer(staff))).json()
    assert kept["start"] == iso(old)
    assert kept["changes"] == []
    assert await remaining(client, bid, sid, old) == 0
    assert await notices(pool, booking["id"]) == []
    off_grid = await client.post(
        path,
        json={"start": iso(free + timedelta(minutes=7)), "reason": "x"},
        headers=bearer(staff),
    )
    assert off_grid.status_code == 409
    assert off_grid.json()["code"] == "slot_unavailable"
    no_reason = await client.post(path, json={"start": iso(free)}, headers=bearer(staff))
    assert no_reason.status_code in (400, 422)

    resp = await client.post(
        path, json={"start": iso(free), "reason": "wrong day"}, headers=bearer(staff)
    )
    assert resp.status_code == 200, resp.text
    moved = resp.json()
    assert moved["start"] == iso(free)
    assert moved["code"] == booking["code"]
    assert await remaining(client, bid, sid, old) == 1
    assert await remaining(client, bid, sid, free) == 0
    (change,) = await changes_of(pool, booking["id"])
    assert (change["action"], change["old_starts_at"], change["new_starts_at"]) == (
        "reschedule",
        old,
        free,
    )
    assert moved["changes"][0]["new_start"] == iso(free)
    # reminders moved with it; the walk-in is told the new time
    rows = await pool.fetch(
        "SELECT send_at FROM messages WHERE dedupe_key LIKE $1 AND status = 'pending' "
        "AND template IN ('reminder', 'confirm_request') ORDER BY send_at",
        f"booking:{booking['id']}:%",
    )
    assert [r["send_at"] for r in rows] == [free - timedelta(hours=24), free - timedelta(hours=2)]
    (notice,) = await notices(pool, booking["id"])
    assert notice["template"] == "booking_moved_by_branch"
    assert notice["phone"] == WALK_IN
    await invariant_holds(pool)


async def test_racing_staff_reschedules_into_the_last_seat_move_exactly_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    bid, sid, _ = await seed(pool, capacity=1)
    target = at_hour(4, 12)
    device = await kiosk(pool, module_env, bid)
    bookings = [
        (await book(client, device, bid, sid, at_hour(4, k), phone=WALK_IN)).json()
        for k in range(8)
    ]
    staff = await staff_token(client, pool, "staff", bid)

    async def move(b: dict[str, Any]) -> httpx.Response:
        return await client.post(
            f"/v1/admin/bookings/{b['id']}/reschedule",
            json={"start": iso(target), "reason": "merge"},
            headers=bearer(staff),
        )

    answers = await asyncio.gather(*(move(b) for b in bookings))
    assert sorted(r.status_code for r in answers) == [200] + [409] * 7, [r.text for r in answers]
    winner = next(b for b, r in zip(bookings, answers, strict=True) if r.status_code == 200)
    assert (
        await pool.fetchval(
            "SELECT count(*) FROM booking_changes WHERE booking_id = ANY($1)",
            [b["id"] for b in bookings],
        )
        == 1
    )
    for b, r in zip(bookings, answers, strict=True):
        view = (await client.get(f"/v1/admin/bookings/{b['id']}", headers=bearer(staff))).json()
        assert view["start"] == (iso(target) if b is winner else b["start"]), r.text
    await invariant_holds(pool)
