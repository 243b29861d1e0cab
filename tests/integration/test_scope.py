"""Scope: whatever lies outside a caller's reach answers exactly as a missing id (404,
same problem document), for every id-taking route and every role that may call it;
403 is left for a role that may never do the operation at all.

Also here: device kinds (a display reads boards only), token claims that must agree
with their subject, and the message log's branch scope."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import jwt
import pytest

from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.messaging.service import queue_template
from tests.booking_helpers import at_hour, book, seed
from tests.booking_helpers import customer as booking_customer
from tests.conftest import ModuleEnv
from tests.helpers import bearer
from tests.queue_helpers import Hall, customer, hall, take, token

PROBLEM = "application/problem+json"
MISSING = 10**12


@dataclass
class World:
    ids: dict[str, int]  # path parameter name -> an object of the target branches
    tokens: dict[str, str]  # role -> a caller whose scope is another branch
    target: Hall
    outsiders: Hall


@pytest.fixture(scope="module")
async def world(client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv) -> World:
    target = await hall(pool, module_env)
    outsiders = await hall(pool, module_env)
    ticket = await take(client, target.kiosk, target.queues["A"])

    bid, sid, rids = await seed(pool)
    _, _, owner = await booking_customer(pool, module_env)
    booked = await book(client, owner, bid, sid, at_hour(2))
    assert booked.status_code == 201, booked.text
    start = at_hour(3)
    entry = await client.post(
        "/v1/waitlist",
        json={
            "branch_id": bid,
            "service_id": sid,
            "date": start.date().isoformat(),
            "earliest": "00:00",
            "latest": "23:30",
        },
        headers=bearer(owner),
    )
    assert entry.status_code == 201, entry.text

    async with pool.acquire() as conn:
        device_id = await conn.fetchval(
            "SELECT id FROM devices WHERE branch_id = $1", target.branch_id
        )
        staff_id = await conn.fetchval(
            "SELECT staff_id FROM staff_branches WHERE branch_id = $1", target.branch_id
        )
        schedule_id = await conn.fetchval(
            "SELECT id FROM schedules WHERE resource_id = $1 LIMIT 1", rids[0]
        )
        manager_id = await conn.fetchval(
            "INSERT INTO staff (email, name, password_hash, role) "
            "VALUES ('far.manager@example.test', 'Far', 'x', 'manager') RETURNING id"
        )
        await conn.execute(
            "INSERT INTO staff_branches (staff_id, branch_id) VALUES ($1, $2)",
            manager_id,
            outsiders.branch_id,
        )
    _, _, stranger = await customer(pool, module_env)
    return World(
        ids={
            "ticket_id": ticket["id"],
            "counter_id": target.counters[0],
            "booking_id": booked.json()["id"],
            "entry_id": entry.json()["id"],
            "branch_id": target.branch_id,
            "service_id": target.services[0],
            "resource_id": target.counters[0],
            "schedule_id": schedule_id,
            "queue_id": target.queues["A"],
            "device_id": device_id,
            "staff_id": staff_id,
        },
        tokens={
            "kiosk": outsiders.kiosk,
            "staff": outsiders.staff,
            "manager": token(
                module_env, "staff", manager_id, "manager", "staff", (outsiders.branch_id,)
            ),
            "customer": stranger,
        },
        target=target,
        outsiders=outsiders,
    )


TICKET_READERS = ("kiosk", "staff", "manager", "customer")
STAFF = ("staff", "manager")
READERS = ("staff", "manager")  # of admin objects
WRITERS = ("manager",)

# (method, path, roles that may call it but not on another branch's object, body)
ROUTES: list[tuple[str, str, tuple[str, ...], dict[str, Any] | None]] = [
    ("GET", "/v1/tickets/{ticket_id}", TICKET_READERS, None),
    ("GET", "/v1/tickets/{ticket_id}/events", TICKET_READERS, None),
    ("POST", "/v1/tickets/{ticket_id}/cancel", TICKET_READERS, None),
    ("POST", "/v1/tickets/{ticket_id}/transfer", STAFF, {"queue_id": 1}),
    ("POST", "/v1/tickets/{ticket_id}/recall", STAFF, None),
    ("POST", "/v1/tickets/{ticket_id}/start", STAFF, None),
    ("POST", "/v1/tickets/{ticket_id}/finish", STAFF, None),
    ("POST", "/v1/tickets/{ticket_id}/no-show", STAFF, None),
    ("POST", "/v1/counters/{counter_id}/open", STAFF, None),
    ("POST", "/v1/counters/{counter_id}/close", STAFF, None),
    ("POST", "/v1/counters/{counter_id}/call-next", STAFF, None),
    ("GET", "/v1/bookings/{booking_id}", ("customer",), None),
    ("POST", "/v1/bookings/{booking_id}/cancel", ("customer",), None),
    (
        "POST",
        "/v1/bookings/{booking_id}/reschedule",
        ("customer",),
        {"start": "2031-01-01T10:00:00Z"},
    ),
    ("GET", "/v1/admin/bookings/{booking_id}", STAFF, None),
    ("POST", "/v1/admin/bookings/{booking_id}/cancel", STAFF, {"reason": "scope"}),
    (
        "POST",
        "/v1/admin/bookings/{booking_id}/reschedule",
        STAFF,
        {"start": "2031-01-01T10:00:00Z", "reason": "scope"},
    ),
    ("GET", "/v1/waitlist/{entry_id}", ("customer",), None),
    ("POST", "/v1/waitlist/{entry_id}/cancel", ("customer",), None),
    ("GET", "/v1/admin/branches/{branch_id}", READERS, None),
    ("PATCH", "/v1/admin/branches/{branch_id}", WRITERS, {}),
    # /v1/admin/branches/{id}/deactivate: admins only, who see every branch
    ("GET", "/v1/admin/services/{service_id}", READERS, None),
    ("PATCH", "/v1/admin/services/{service_id}", WRITERS, {}),
    ("POST", "/v1/admin/services/{service_id}/deactivate", WRITERS, None),
    ("GET", "/v1/admin/resources/{resource_id}", READERS, None),
    ("PATCH", "/v1/admin/resources/{resource_id}", WRITERS, {}),
    ("POST", "/v1/admin/resources/{resource_id}/deactivate", WRITERS, None),
    ("GET", "/v1/admin/schedules/{schedule_id}", READERS, None),
    ("PATCH", "/v1/admin/schedules/{schedule_id}", WRITERS, {}),
    ("POST", "/v1/admin/schedules/{schedule_id}/deactivate", WRITERS, None),
    ("GET", "/v1/admin/queues/{queue_id}", READERS, None),
    ("PATCH", "/v1/admin/queues/{queue_id}", WRITERS, {}),
    ("POST", "/v1/admin/queues/{queue_id}/deactivate", WRITERS, None),
    ("GET", "/v1/admin/devices/{device_id}", WRITERS, None),
    ("PATCH", "/v1/admin/devices/{device_id}", WRITERS, {}),
    ("POST", "/v1/admin/devices/{device_id}/deactivate", WRITERS, None),
    ("GET", "/v1/admin/staff/{staff_id}", WRITERS, None),
    ("PATCH", "/v1/admin/staff/{staff_id}", WRITERS, {}),
    ("POST", "/v1/admin/staff/{staff_id}/deactivate", WRITERS, None),
]
# Id-taking routes where scope does not apply: public reads, and an admin-only write.
UNSCOPED = {
    ("GET", "/v1/branches/{branch_id}"),
    ("GET", "/v1/branches/{branch_id}/queues"),
    ("GET", "/v1/branches/{branch_id}/services"),
    ("POST", "/v1/admin/branches/{branch_id}/deactivate"),
}
CASES = [
    pytest.param(method, path, role, body, id=f"{role}:{method} {path}")
    for method, path, roles, body in ROUTES
    for role in roles
]


def _comparable(resp: httpx.Response) -> dict[str, Any]:
    """The problem document without what names this very request."""
    assert resp.headers["content-type"].split(";")[0].strip() == PROBLEM, resp.text
    body: dict[str, Any] = resp.json()
    return {k: v for k, v in body.items() if k not in ("instance", "request_id")}


def test_every_id_taking_route_is_in_the_table(app: Any) -> None:
    schema = app.openapi_schema.to_schema()
    methods = ("get", "post", "patch", "put", "delete")
    routes = {
        (m.upper(), path)
        for path, item in schema["paths"].items()
        if "{" in path
        for m in methods
        if m in item
    }
    assert routes == {(m, p) for m, p, _, _ in ROUTES} | UNSCOPED


@pytest.mark.parametrize(("method", "path", "role", "body"), CASES)
async def test_out_of_scope_answers_as_a_missing_id(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    world: World,
    method: str,
    path: str,
    role: str,
    body: dict[str, Any] | None,
) -> None:
    name = path[path.index("{") + 1 : path.index("}")]
    headers = bearer(world.tokens[role])
    before = await _snapshot(pool)
    real = await client.request(
        method, path.format(**{name: world.ids[name]}), json=body, headers=headers
    )
    missing = await client.request(
        method, path.format(**{name: MISSING}), json=body, headers=headers
    )
    assert missing.status_code == 404, missing.text
    assert real.status_code == 404, real.text
    assert _comparable(real) == _comparable(missing)
    assert await _snapshot(pool) == before  # and nothing changed


async def _snapshot(pool: asyncpg.Pool) -> list[Any]:
    return [
        await pool.fetch(f"SELECT * FROM {table} ORDER BY 1")
        for table in (
            "tickets",
            "counter_states",
            "bookings",
            "waitlist_entries",
            "branches",
            "services",
            "resources",
            "schedules",
            "queues",
            "devices",
            "staff",
        )
    ]


async def test_a_role_that_never_may_still_gets_403(
    client: httpx.AsyncClient, world: World
) -> None:
    """403 is kept for what a role may never do, in or out of scope."""
    t = world.target
    for tok in (t.kiosk, world.tokens["kiosk"]):
        resp = await client.post(f"/v1/counters/{t.counters[0]}/open", headers=bearer(tok))
        assert (resp.status_code, resp.json()["code"]) == (403, "forbidden")
    resp = await client.patch(
        f"/v1/admin/services/{t.services[0]}", json={}, headers=bearer(world.tokens["staff"])
    )
    assert (resp.status_code, resp.json()["code"]) == (403, "forbidden")


# --- device kinds ---------------------------------------------------------------------


async def _display(pool: asyncpg.Pool, env: ModuleEnv, branch_id: int) -> tuple[int, str]:
    did = await pool.fetchval(
        "INSERT INTO devices (branch_id, name, kind, secret_hash) "
        "VALUES ($1, 'Board', 'display', '\\x00') RETURNING id",
        branch_id,
    )
    # Even a token claiming `kiosk` gets the device's current kind from the database.
    return did, token(env, "device", did, "kiosk", "kiosk", (branch_id,))


async def test_a_display_device_reads_boards_only(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env)
    bid, sid, _ = await seed(pool)
    _, display = await _display(pool, module_env, h.branch_id)
    _, booking_display = await _display(pool, module_env, bid)
    ticket = await take(client, h.kiosk, h.queues["A"])
    before = await pool.fetchval("SELECT count(*) FROM tickets")
    refused = [
        await client.post("/v1/tickets", json={"queue_id": h.queues["A"]}, headers=bearer(display)),
        await client.post(
            "/v1/holds",
            json={"branch_id": bid, "service_id": sid, "start": at_hour(1).isoformat()},
            headers=bearer(booking_display),
        ),
        await book(client, booking_display, bid, sid, at_hour(1), phone="+8613800138000"),
        await client.post("/v1/check-ins", json={"code": "ABCDEFGH"}, headers=bearer(display)),
        await client.get(f"/v1/tickets/{ticket['id']}", headers=bearer(display)),
    ]
    for resp in refused:
        assert (resp.status_code, resp.json()["code"]) == (403, "forbidden"), resp.text
    assert await pool.fetchval("SELECT count(*) FROM tickets") == before
    assert await pool.fetchval("SELECT count(*) FROM bookings WHERE branch_id = $1", bid) == 0
    # the same calls from a kiosk go through (the route is not simply closed)
    assert (
        await client.post("/v1/tickets", json={"queue_id": h.queues["A"]}, headers=bearer(h.kiosk))
    ).status_code == 201


async def test_admin_device_crud_carries_the_kind(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env)
    admin = token(module_env, "staff", await _admin(pool), "admin", "staff", ())
    made = await client.post(
        "/v1/admin/devices",
        json={"branch_id": h.branch_id, "name": "Hall board", "kind": "display"},
        headers=bearer(admin),
    )
    assert made.status_code == 201, made.text
    assert made.json()["kind"] == "display"
    plain = await client.post(
        "/v1/admin/devices", json={"branch_id": h.branch_id, "name": "K"}, headers=bearer(admin)
    )
    assert plain.json()["kind"] == "kiosk"  # the default, as for devices made before kinds
    bad = await client.post(
        "/v1/admin/devices",
        json={"branch_id": h.branch_id, "name": "K", "kind": "printer"},
        headers=bearer(admin),
    )
    assert bad.status_code == 422
    device = made.json()
    login = await client.post(
        "/v1/auth/device", json={"device_id": device["id"], "secret": device["secret"]}
    )
    assert login.status_code == 200, login.text
    assert login.json()["role"] == "display"
    display = login.json()["access_token"]
    refused = await client.post(
        "/v1/tickets", json={"queue_id": h.queues["A"]}, headers=bearer(display)
    )
    assert refused.status_code == 403
    # turned into a kiosk, the same token issues tickets at its next request
    changed = await client.patch(
        f"/v1/admin/devices/{device['id']}", json={"kind": "kiosk"}, headers=bearer(admin)
    )
    assert changed.status_code == 200, changed.text
    assert changed.json()["kind"] == "kiosk"
    listed = await client.get(f"/v1/admin/devices?branch_id={h.branch_id}", headers=bearer(admin))
    assert {d["kind"] for d in listed.json()["items"]} == {"kiosk"}
    issued = await client.post(
        "/v1/tickets", json={"queue_id": h.queues["A"]}, headers=bearer(display)
    )
    assert issued.status_code == 201, issued.text


async def _admin(pool: asyncpg.Pool) -> int:
    sid: int = await pool.fetchval(
        "INSERT INTO staff (email, name, password_hash, role) "
        "VALUES ('admin.' || gen_random_uuid() || '@example.test', 'A', 'x', 'admin') "
        "RETURNING id"
    )
    return sid


# --- token claims agree with their subject ----------------------------------------------


def _forge(env: ModuleEnv, **claims: Any) -> str:
    """A correctly signed token with a customer's subject and the given claims."""
    good = issue_access_token(
        env.settings,
        Principal(kind="customer", id=1, role="customer", channel="app", branches=()),
    )
    payload = {**jwt.decode(good, options={"verify_signature": False}), **claims}
    return jwt.encode(payload, env.settings.jwt_secret, algorithm="HS256")


@pytest.mark.parametrize(
    "claims",
    [
        {"role": "admin", "branches": "*"},
        {"role": "manager", "branches": [1]},
        {"role": "staff", "branches": [1]},
        {"role": "kiosk", "branches": [1]},
        {"branches": [1]},  # a customer with a branch scope
        {"sub": "device:1", "role": "admin", "branches": "*"},
        {"sub": "device:1", "role": "kiosk", "branches": [1, 2]},
        {"sub": "staff:1", "role": "customer", "branches": []},
        {"sub": "staff:1", "role": "kiosk", "branches": [1]},
        {"channel": "staff"},  # a customer acting on the staff channel
        {"channel": "kiosk"},
        {"sub": "device:1", "role": "kiosk", "branches": [1], "channel": "app"},
    ],
    ids=json.dumps,
)
async def test_claims_that_disagree_with_the_subject_are_refused(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, claims: dict[str, Any]
) -> None:
    await pool.execute(
        "INSERT INTO customers (id, phone) OVERRIDING SYSTEM VALUE VALUES (1, '+8613900000001') "
        "ON CONFLICT DO NOTHING"
    )
    forged = _forge(module_env, **claims)
    for path in ("/v1/me", "/v1/admin/branches", "/v1/admin/messages"):
        resp = await client.get(path, headers=bearer(forged))
        assert (resp.status_code, resp.json()["code"]) == (401, "invalid_token"), path
    # the untouched token works: the refusal is about the claims
    resp = await client.get("/v1/me", headers=bearer(_forge(module_env)))
    assert resp.status_code == 200, resp.text


# --- the message log's scope --------------------------------------------------------------


async def test_staff_see_only_their_branches_messages(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    mine = await hall(pool, module_env)
    theirs = await hall(pool, module_env)
    phone = "+8613911112222"
    async with pool.acquire() as conn, conn.transaction():
        at = (await conn.fetchval("SELECT now()")) + timedelta(days=1)
        ids = {}
        for label, branch_id, template, params in (
            ("mine", mine.branch_id, "ticket_called", {"ticket": "A001", "counter": "1"}),
            ("theirs", theirs.branch_id, "ticket_called", {"ticket": "A002", "counter": "2"}),
            ("none", None, "sign_in_code", {"code": "123456", "minutes": 5}),
        ):
            ids[label] = await queue_template(
                conn,
                template,
                "en",
                params,
                phone=phone,
                send_at=at,
                dedupe_key=f"scope-test:{label}",
                branch_id=branch_id,
            )
    admin = token(module_env, "staff", await _admin(pool), "admin", "staff", ())
    manager_id = await pool.fetchval(
        "INSERT INTO staff (email, name, password_hash, role) "
        "VALUES ('log.manager@example.test', 'M', 'x', 'manager') RETURNING id"
    )
    await pool.execute(
        "INSERT INTO staff_branches (staff_id, branch_id) VALUES ($1, $2)",
        manager_id,
        mine.branch_id,
    )
    manager = token(module_env, "staff", manager_id, "manager", "staff", (mine.branch_id,))

    async def seen(tok: str) -> set[int]:
        resp = await client.get(f"/v1/admin/messages?phone=%2B{phone[1:]}", headers=bearer(tok))
        assert resp.status_code == 200, resp.text
        return {m["id"] for m in resp.json()["items"]}

    assert await seen(mine.staff) == {ids["mine"]}
    assert await seen(manager) == {ids["mine"]}
    assert await seen(theirs.staff) == {ids["theirs"]}
    assert await seen(admin) == set(ids.values())
