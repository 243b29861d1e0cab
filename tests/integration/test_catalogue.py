"""Catalogue behaviour through the real app: admin CRUD, soft deactivation, public
reads, cursor pagination and who may call what."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest
from httpx import AsyncClient

from tests.helpers import PASSWORD, bearer, create_branch, create_service, login, make_staff

PROBLEM = "application/problem+json"
ADMIN_COLLECTIONS = ("branches", "services", "resources", "schedules", "devices", "staff")


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0].strip() == PROBLEM
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["code"] == code
    for key in ("type", "title", "detail"):
        assert isinstance(body[key], str)
        assert body[key]
    return body


def utc(value: str) -> datetime:
    """Parse a response instant, insisting it is given in UTC with a `Z`."""
    assert value.endswith("Z"), value
    parsed = datetime.fromisoformat(value)
    assert parsed.utcoffset() is not None
    assert parsed.utcoffset().total_seconds() == 0  # type: ignore[union-attr]
    return parsed


async def row_count(pool: asyncpg.Pool, table: str) -> int:
    count: int = await pool.fetchval(f"SELECT count(*) FROM {table}")
    return count


async def all_pages(
    client: AsyncClient, url: str, limit: int, headers: dict[str, str] | None = None
) -> list[list[dict[str, Any]]]:
    """Follow `next_cursor` from the first page to the end; return each page's items."""
    pages: list[list[dict[str, Any]]] = []
    cursor: str | None = None
    sep = "&" if "?" in url else "?"
    while True:
        query = f"{sep}limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        resp = await client.get(url + query, headers=headers or {})
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {"items", "next_cursor"}
        pages.append(body["items"])
        cursor = body["next_cursor"]
        if cursor is None:
            return pages
        assert isinstance(cursor, str)
        assert cursor
        assert len(pages) < 100, "pagination does not terminate"


def ids(items: list[dict[str, Any]]) -> list[int]:
    return [item["id"] for item in items]


def without(record: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in keys}


@dataclass
class Admin:
    client: AsyncClient
    pool: asyncpg.Pool
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)

    async def post(self, url: str, body: dict[str, Any] | None = None) -> httpx.Response:
        return await self.client.post(url, json=body, headers=self.auth)

    async def patch(self, url: str, body: dict[str, Any]) -> httpx.Response:
        return await self.client.patch(url, json=body, headers=self.auth)

    async def get(self, url: str) -> httpx.Response:
        return await self.client.get(url, headers=self.auth)

    async def created(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        resp = await self.post(url, body)
        assert resp.status_code == 201, resp.text
        out: dict[str, Any] = resp.json()
        return out

    async def ok(self, resp: httpx.Response) -> dict[str, Any]:
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = resp.json()
        return out


@pytest.fixture(scope="module")
async def admin(client: AsyncClient, pool: asyncpg.Pool) -> Admin:
    return Admin(client, pool, await login(client, await make_staff(pool, "admin")))


# --- who may call what ---------------------------------------------------------


async def test_public_reads_need_no_token(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Open Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    anonymous = admin.client
    listed = await anonymous.get("/v1/branches")
    assert listed.status_code == 200, listed.text
    assert branch["id"] in ids(listed.json()["items"])
    one = await anonymous.get(f"/v1/branches/{branch['id']}")
    assert one.status_code == 200, one.text
    assert one.json() == branch
    services = await anonymous.get(f"/v1/branches/{branch['id']}/services")
    assert services.status_code == 200, services.text
    assert services.json()["items"] == [service]


@dataclass
class Targets:
    """One existing record of every admin collection, for routes that take an id."""

    ids: dict[str, int]
    bodies: dict[str, dict[str, Any]]


@pytest.fixture(scope="module")
async def targets(admin: Admin) -> Targets:
    branch = await create_branch(admin.client, admin.token, name="Guarded Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    resource = await admin.created(
        "/v1/admin/resources", {"branch_id": branch["id"], "kind": "counter", "name": "G1"}
    )
    schedule = await admin.created(
        "/v1/admin/schedules",
        {
            "kind": "shift",
            "resource_id": resource["id"],
            "weekday": 3,
            "start": "09:00",
            "end": "10:00",
        },
    )
    device = await admin.created("/v1/admin/devices", {"branch_id": branch["id"], "name": "K"})
    staff = await admin.created(
        "/v1/admin/staff",
        {
            "email": "guarded@example.test",
            "name": "Guarded",
            "password": PASSWORD,
            "role": "staff",
            "branch_ids": [branch["id"]],
        },
    )
    # valid bodies: without a token the only thing wrong is the missing token
    bodies = {
        "branches": {"name": "Sneaky", "timezone": "UTC"},
        "services": {"branch_id": branch["id"], "name": "Sneaky", "duration_min": 10},
        "resources": {"branch_id": branch["id"], "kind": "room", "name": "Sneaky"},
        "schedules": {
            "kind": "shift",
            "resource_id": resource["id"],
            "weekday": 4,
            "start": "09:00",
            "end": "10:00",
        },
        "devices": {"branch_id": branch["id"], "name": "Sneaky"},
        "staff": {
            "email": "sneaky@example.test",
            "name": "Sneaky",
            "password": PASSWORD,
            "role": "admin",
        },
    }
    return Targets(
        ids={
            "branches": branch["id"],
            "services": service["id"],
            "resources": resource["id"],
            "schedules": schedule["id"],
            "devices": device["id"],
            "staff": staff["id"],
        },
        bodies=bodies,
    )


def admin_calls() -> Iterator[Any]:
    for name in ADMIN_COLLECTIONS:
        yield pytest.param(name, "GET", "", id=f"{name}-list")
        yield pytest.param(name, "GET", "/{id}", id=f"{name}-get")
        yield pytest.param(name, "POST", "", id=f"{name}-create")
        yield pytest.param(name, "PATCH", "/{id}", id=f"{name}-patch")
        yield pytest.param(name, "POST", "/{id}/deactivate", id=f"{name}-deactivate")


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, "unauthorized"), ("not-a-jwt", "invalid_token"), ("a.b.c", "invalid_token")],
    ids=["no-token", "garbage-token", "forged-token"],
)
@pytest.mark.parametrize(("name", "method", "suffix"), list(admin_calls()))
async def test_admin_routes_without_a_valid_token_are_401(
    admin: Admin,
    targets: Targets,
    name: str,
    method: str,
    suffix: str,
    token: str | None,
    code: str,
) -> None:
    url = f"/v1/admin/{name}" + suffix.format(id=targets.ids[name])
    table = name
    before = await row_count(admin.pool, table)
    active_before = await admin.pool.fetchval(f"SELECT count(*) FILTER (WHERE active) FROM {table}")
    body: dict[str, Any] | None = None
    if method == "POST" and not suffix:
        body = targets.bodies[name]
    elif method == "PATCH":
        body = {"note": "x"} if name == "schedules" else {"name": "Hijacked"}
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    resp = await admin.client.request(method, url, json=body, headers=headers)
    assert_problem(resp, 401, code)
    assert resp.headers["www-authenticate"].lower().startswith("bearer")
    assert await row_count(admin.pool, table) == before
    assert (
        await admin.pool.fetchval(f"SELECT count(*) FILTER (WHERE active) FROM {table}")
        == active_before
    )
    if method == "GET":
        # the same read with the admin's token is answered
        allowed = await admin.client.get(url, headers=admin.auth)
        assert allowed.status_code == 200, allowed.text


@pytest.mark.parametrize("name", ADMIN_COLLECTIONS)
async def test_there_is_no_delete(admin: Admin, targets: Targets, name: str) -> None:
    record_id = targets.ids[name]
    before = await row_count(admin.pool, name)
    for url in (f"/v1/admin/{name}/{record_id}", f"/v1/admin/{name}"):
        resp = await admin.client.delete(url, headers=admin.auth)
        assert_problem(resp, 405, "method_not_allowed")
        assert "DELETE" not in resp.headers.get("allow", "")
    assert await row_count(admin.pool, name) == before
    assert await admin.pool.fetchval(f"SELECT 1 FROM {name} WHERE id = $1", record_id) == 1
    public = await admin.client.delete(f"/v1/branches/{targets.ids['branches']}")
    assert_problem(public, 405, "method_not_allowed")


async def test_manager_writes_only_inside_own_branch(admin: Admin) -> None:
    mine = await create_branch(admin.client, admin.token, name="Mine")
    theirs = await create_branch(admin.client, admin.token, name="Theirs")
    their_service = await create_service(admin.client, admin.token, theirs["id"])
    manager = bearer(
        await login(admin.client, await make_staff(admin.pool, "manager", [mine["id"]]))
    )
    c = admin.client

    ok = await c.post(
        "/v1/admin/services",
        json={"branch_id": mine["id"], "name": "Local", "duration_min": 20},
        headers=manager,
    )
    assert ok.status_code == 201, ok.text

    before = await row_count(admin.pool, "services")
    denied = await c.post(
        "/v1/admin/services",
        json={"branch_id": theirs["id"], "name": "Foreign", "duration_min": 20},
        headers=manager,
    )
    assert_problem(denied, 422, "validation_error")  # as a missing branch
    assert await row_count(admin.pool, "services") == before

    # another branch's records look missing, and stay unchanged
    hidden = await c.patch(
        f"/v1/admin/services/{their_service['id']}", json={"name": "Taken"}, headers=manager
    )
    assert_problem(hidden, 404, "not_found")
    assert (await admin.get(f"/v1/admin/services/{their_service['id']}")).json() == their_service
    listed = await c.get("/v1/admin/services", headers=manager)
    assert {s["branch_id"] for s in listed.json()["items"]} == {mine["id"]}

    # only an admin creates or deactivates a branch
    before = await row_count(admin.pool, "branches")
    assert_problem(
        await c.post("/v1/admin/branches", json={"name": "M", "timezone": "UTC"}, headers=manager),
        403,
        "forbidden",
    )
    assert_problem(
        await c.post(f"/v1/admin/branches/{mine['id']}/deactivate", headers=manager),
        403,
        "forbidden",
    )
    assert await row_count(admin.pool, "branches") == before
    assert (await c.get(f"/v1/branches/{mine['id']}")).status_code == 200

    # staff read the admin catalogue but change nothing
    staff = bearer(await login(admin.client, await make_staff(admin.pool, "staff", [mine["id"]])))
    assert (await c.get("/v1/admin/services", headers=staff)).status_code == 200
    assert_problem(
        await c.post(
            "/v1/admin/services",
            json={"branch_id": mine["id"], "name": "S", "duration_min": 5},
            headers=staff,
        ),
        403,
        "forbidden",
    )


# --- branches ------------------------------------------------------------------

FULL_BRANCH = {
    "name": "Harbour Hall",
    "timezone": "Asia/Shanghai",
    "address": "8 Harbour Road",
    "phone": "+862100000000",
    "opening_hours": [
        {"weekday": 1, "opens": "09:00", "closes": "12:00"},
        {"weekday": 1, "opens": "13:00", "closes": "17:30"},
        {"weekday": 6, "opens": "10:00", "closes": "24:00"},
    ],
    "closures": [
        {"date": "2027-02-10", "reason": "Spring Festival"},
        {"date": "2027-01-01", "reason": "New Year"},
    ],
    "walk_in_reserve": 0.25,
}


async def test_branch_create_read_patch_deactivate(admin: Admin) -> None:
    created = await admin.created("/v1/admin/branches", FULL_BRANCH)
    assert created["id"] >= 1
    assert created["name"] == "Harbour Hall"
    assert created["timezone"] == "Asia/Shanghai"
    assert created["address"] == "8 Harbour Road"
    assert created["phone"] == "+862100000000"
    assert created["opening_hours"] == FULL_BRANCH["opening_hours"]
    # closures come back in date order
    assert created["closures"] == [
        {"date": "2027-01-01", "reason": "New Year"},
        {"date": "2027-02-10", "reason": "Spring Festival"},
    ]
    assert created["walk_in_reserve"] == 0.25
    assert created["active"] is True
    utc(created["created_at"])
    assert created["updated_at"] == created["created_at"]

    bid = created["id"]
    assert await admin.ok(await admin.get(f"/v1/admin/branches/{bid}")) == created
    assert await admin.ok(await admin.client.get(f"/v1/branches/{bid}")) == created

    # PATCH changes only what it names
    renamed = await admin.ok(await admin.patch(f"/v1/admin/branches/{bid}", {"name": "Quay Hall"}))
    assert renamed["name"] == "Quay Hall"
    assert without(renamed, "name", "updated_at") == without(created, "name", "updated_at")
    assert utc(renamed["updated_at"]) > utc(created["updated_at"])

    cleared = await admin.ok(
        await admin.patch(
            f"/v1/admin/branches/{bid}",
            {"phone": None, "opening_hours": [{"weekday": 2, "opens": "08:00", "closes": "16:00"}]},
        )
    )
    assert cleared["phone"] is None
    assert cleared["opening_hours"] == [{"weekday": 2, "opens": "08:00", "closes": "16:00"}]
    assert without(cleared, "phone", "opening_hours", "updated_at") == without(
        renamed, "phone", "opening_hours", "updated_at"
    )

    moved = await admin.ok(
        await admin.patch(f"/v1/admin/branches/{bid}", {"timezone": "Europe/London"})
    )
    assert moved["timezone"] == "Europe/London"
    assert moved["closures"] == cleared["closures"]

    # an empty PATCH changes nothing it would show
    same = await admin.ok(await admin.patch(f"/v1/admin/branches/{bid}", {}))
    assert without(same, "updated_at") == without(moved, "updated_at")

    # deactivation is soft
    count = await row_count(admin.pool, "branches")
    off = await admin.ok(await admin.post(f"/v1/admin/branches/{bid}/deactivate"))
    assert off["active"] is False
    assert without(off, "active", "updated_at") == without(moved, "active", "updated_at")
    assert await row_count(admin.pool, "branches") == count
    assert await admin.pool.fetchval("SELECT active FROM branches WHERE id = $1", bid) is False

    assert (await admin.ok(await admin.get(f"/v1/admin/branches/{bid}")))["active"] is False
    assert_problem(await admin.client.get(f"/v1/branches/{bid}"), 404, "not_found")
    assert_problem(await admin.client.get(f"/v1/branches/{bid}/services"), 404, "not_found")
    public_ids = [
        i for page in await all_pages(admin.client, "/v1/branches", 200) for i in ids(page)
    ]
    assert bid not in public_ids
    admin_default = [
        i
        for page in await all_pages(admin.client, "/v1/admin/branches", 200, admin.auth)
        for i in ids(page)
    ]
    assert bid not in admin_default
    admin_all = [
        i
        for page in await all_pages(
            admin.client, "/v1/admin/branches?include_inactive=true", 200, admin.auth
        )
        for i in ids(page)
    ]
    assert bid in admin_all

    # deactivating again is harmless
    again = await admin.ok(await admin.post(f"/v1/admin/branches/{bid}/deactivate"))
    assert again["active"] is False
    assert_problem(await admin.post("/v1/admin/branches/999999/deactivate"), 404, "not_found")
    assert_problem(await admin.patch("/v1/admin/branches/999999", {"name": "x"}), 404, "not_found")


# --- services ------------------------------------------------------------------


async def test_service_create_read_patch_deactivate(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Service Hall")
    body = {
        "branch_id": branch["id"],
        "name": "Passport renewal",
        "description": "Bring your old passport",
        "duration_min": 20,
        "buffer_before_min": 5,
        "buffer_after_min": 10,
        "price_minor": 12050,
        "deposit_minor": 2000,
        "currency": "HKD",
        "min_party": 1,
        "max_party": 3,
        "lead_time_min": 60,
        "horizon_days": 45,
        "cancellation_window_min": 1440,
        "slot_interval_min": 20,
    }
    created = await admin.created("/v1/admin/services", body)
    for key, value in body.items():
        assert created[key] == value, key
    assert created["active"] is True
    utc(created["created_at"])

    defaults = await admin.created(
        "/v1/admin/services", {"branch_id": branch["id"], "name": "Enquiry", "duration_min": 10}
    )
    assert without(
        defaults, "id", "branch_id", "name", "duration_min", "created_at", "updated_at"
    ) == {
        "description": "",
        "buffer_before_min": 0,
        "buffer_after_min": 0,
        "price_minor": 0,
        "deposit_minor": 0,
        "currency": "CNY",
        "min_party": 1,
        "max_party": 1,
        "lead_time_min": 0,
        "horizon_days": 30,
        "cancellation_window_min": 0,
        "slot_interval_min": 15,
        "active": True,
    }

    sid = created["id"]
    assert await admin.ok(await admin.get(f"/v1/admin/services/{sid}")) == created
    public = await admin.ok(await admin.client.get(f"/v1/branches/{branch['id']}/services"))
    assert public["items"] == [created, defaults]

    repriced = await admin.ok(
        await admin.patch(f"/v1/admin/services/{sid}", {"price_minor": 15000})
    )
    assert repriced["price_minor"] == 15000
    assert without(repriced, "price_minor", "updated_at") == without(
        created, "price_minor", "updated_at"
    )
    rules = await admin.ok(
        await admin.patch(
            f"/v1/admin/services/{sid}", {"lead_time_min": 0, "max_party": 5, "deposit_minor": 0}
        )
    )
    assert (rules["lead_time_min"], rules["max_party"], rules["deposit_minor"]) == (0, 5, 0)
    assert rules["price_minor"] == 15000
    assert rules["horizon_days"] == 45

    count = await row_count(admin.pool, "services")
    off = await admin.ok(await admin.post(f"/v1/admin/services/{sid}/deactivate"))
    assert off["active"] is False
    assert await row_count(admin.pool, "services") == count
    assert (await admin.ok(await admin.get(f"/v1/admin/services/{sid}")))["active"] is False
    public = await admin.ok(await admin.client.get(f"/v1/branches/{branch['id']}/services"))
    assert ids(public["items"]) == [defaults["id"]]
    listed = await admin.ok(await admin.get(f"/v1/admin/services?branch_id={branch['id']}"))
    assert ids(listed["items"]) == [defaults["id"]]
    listed_all = await admin.ok(
        await admin.get(f"/v1/admin/services?branch_id={branch['id']}&include_inactive=true")
    )
    assert ids(listed_all["items"]) == [sid, defaults["id"]]
    assert_problem(await admin.get("/v1/admin/services/999999"), 404, "not_found")


async def test_lists_filter_by_branch(admin: Admin) -> None:
    north = await create_branch(admin.client, admin.token, name="North")
    south = await create_branch(admin.client, admin.token, name="South")
    n = await create_service(admin.client, admin.token, north["id"], name="N")
    s = await create_service(admin.client, admin.token, south["id"], name="S")
    rn = await admin.created(
        "/v1/admin/resources", {"branch_id": north["id"], "kind": "room", "name": "RN"}
    )
    await admin.created(
        "/v1/admin/resources", {"branch_id": south["id"], "kind": "room", "name": "RS"}
    )
    dn = await admin.created("/v1/admin/devices", {"branch_id": north["id"], "name": "DN"})
    await admin.created("/v1/admin/devices", {"branch_id": south["id"], "name": "DS"})

    async def listed(url: str) -> list[int]:
        return ids((await admin.ok(await admin.get(url)))["items"])

    assert await listed(f"/v1/admin/services?branch_id={north['id']}") == [n["id"]]
    assert await listed(f"/v1/admin/services?branch_id={south['id']}") == [s["id"]]
    assert await listed(f"/v1/admin/resources?branch_id={north['id']}") == [rn["id"]]
    assert await listed(f"/v1/admin/devices?branch_id={north['id']}") == [dn["id"]]
    public = await admin.ok(await admin.client.get(f"/v1/branches/{north['id']}/services"))
    assert ids(public["items"]) == [n["id"]]
    assert await listed("/v1/admin/services?branch_id=999999") == []


# --- resources -------------------------------------------------------------------


async def test_resource_with_skills(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Skill Hall")
    a = await create_service(admin.client, admin.token, branch["id"], name="A")
    b = await create_service(admin.client, admin.token, branch["id"], name="B")
    created = await admin.created(
        "/v1/admin/resources",
        {
            "branch_id": branch["id"],
            "kind": "staff",
            "name": "Ms Chan",
            "capacity": 2,
            "skills": [b["id"], a["id"], b["id"]],
        },
    )
    assert created["kind"] == "staff"
    assert created["name"] == "Ms Chan"
    assert created["capacity"] == 2
    assert created["skills"] == sorted([a["id"], b["id"]])
    assert created["active"] is True
    rid = created["id"]
    assert await admin.ok(await admin.get(f"/v1/admin/resources/{rid}")) == created

    renamed = await admin.ok(await admin.patch(f"/v1/admin/resources/{rid}", {"name": "Mrs Chan"}))
    assert renamed["skills"] == created["skills"]
    assert without(renamed, "name", "updated_at") == without(created, "name", "updated_at")

    narrowed = await admin.ok(
        await admin.patch(f"/v1/admin/resources/{rid}", {"skills": [b["id"]]})
    )
    assert narrowed["skills"] == [b["id"]]
    assert narrowed["capacity"] == 2
    stored = await admin.pool.fetch(
        "SELECT service_id FROM resource_skills WHERE resource_id = $1", rid
    )
    assert [r["service_id"] for r in stored] == [b["id"]]

    emptied = await admin.ok(await admin.patch(f"/v1/admin/resources/{rid}", {"skills": []}))
    assert emptied["skills"] == []

    kinds = set()
    for kind in ("counter", "room"):
        made = await admin.created(
            "/v1/admin/resources", {"branch_id": branch["id"], "kind": kind, "name": kind}
        )
        kinds.add(made["kind"])
        assert made["capacity"] == 1
        assert made["skills"] == []
    assert kinds == {"counter", "room"}

    count = await row_count(admin.pool, "resources")
    off = await admin.ok(await admin.post(f"/v1/admin/resources/{rid}/deactivate"))
    assert off["active"] is False
    assert await row_count(admin.pool, "resources") == count
    assert (await admin.ok(await admin.get(f"/v1/admin/resources/{rid}")))["active"] is False
    active_ids = ids(
        (await admin.ok(await admin.get(f"/v1/admin/resources?branch_id={branch['id']}")))["items"]
    )
    assert rid not in active_ids
    assert len(active_ids) == 2
    every = await admin.ok(
        await admin.get(f"/v1/admin/resources?branch_id={branch['id']}&include_inactive=true")
    )
    assert rid in ids(every["items"])


# --- schedules -------------------------------------------------------------------


async def test_shift_and_exception_schedules(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Rota Hall")
    resource = await admin.created(
        "/v1/admin/resources", {"branch_id": branch["id"], "kind": "counter", "name": "Rota"}
    )
    shift = await admin.created(
        "/v1/admin/schedules",
        {
            "kind": "shift",
            "resource_id": resource["id"],
            "weekday": 5,
            "start": "08:30",
            "end": "24:00",
            "note": "late",
        },
    )
    assert shift["kind"] == "shift"
    assert (shift["weekday"], shift["start"], shift["end"]) == (5, "08:30", "24:00")
    assert shift["starts_at"] is None
    assert shift["ends_at"] is None
    assert shift["resource_id"] == resource["id"]
    assert shift["branch_id"] == branch["id"]
    assert shift["note"] == "late"
    assert shift["active"] is True

    exception = await admin.created(
        "/v1/admin/schedules",
        {
            "kind": "exception",
            "resource_id": resource["id"],
            "starts_at": "2026-12-01T09:00:00+08:00",
            "ends_at": "2026-12-01T12:00:00+08:00",
            "note": "training",
        },
    )
    # instants are answered in UTC
    assert exception["starts_at"] == "2026-12-01T01:00:00Z"
    assert exception["ends_at"] == "2026-12-01T04:00:00Z"
    assert exception["available"] is False
    assert exception["weekday"] is None
    assert exception["start"] is None

    for item in (shift, exception):
        assert await admin.ok(await admin.get(f"/v1/admin/schedules/{item['id']}")) == item

    noted = await admin.ok(
        await admin.patch(f"/v1/admin/schedules/{shift['id']}", {"note": "evening"})
    )
    assert without(noted, "note", "updated_at") == without(shift, "note", "updated_at")
    earlier = await admin.ok(
        await admin.patch(f"/v1/admin/schedules/{shift['id']}", {"end": "20:00"})
    )
    assert (earlier["weekday"], earlier["start"], earlier["end"], earlier["note"]) == (
        5,
        "08:30",
        "20:00",
        "evening",
    )
    extended = await admin.ok(
        await admin.patch(
            f"/v1/admin/schedules/{exception['id']}",
            {"ends_at": "2026-12-01T06:00:00Z", "available": True},
        )
    )
    assert extended["starts_at"] == exception["starts_at"]
    assert extended["ends_at"] == "2026-12-01T06:00:00Z"
    assert extended["available"] is True

    # fields of the other kind do not apply, and nothing changes
    wrong = await admin.patch(
        f"/v1/admin/schedules/{shift['id']}", {"starts_at": "2026-12-01T06:00:00Z"}
    )
    body = assert_problem(wrong, 422, "validation_error")
    assert [e["field"] for e in body["errors"]] == ["starts_at"]
    assert await admin.ok(await admin.get(f"/v1/admin/schedules/{shift['id']}")) == earlier

    listed = await admin.ok(await admin.get(f"/v1/admin/schedules?resource_id={resource['id']}"))
    assert ids(listed["items"]) == [shift["id"], exception["id"]]
    by_branch = await admin.ok(await admin.get(f"/v1/admin/schedules?branch_id={branch['id']}"))
    assert ids(by_branch["items"]) == [shift["id"], exception["id"]]

    count = await row_count(admin.pool, "schedules")
    off = await admin.ok(await admin.post(f"/v1/admin/schedules/{shift['id']}/deactivate"))
    assert off["active"] is False
    assert await row_count(admin.pool, "schedules") == count
    assert (await admin.ok(await admin.get(f"/v1/admin/schedules/{shift['id']}")))[
        "active"
    ] is False
    listed = await admin.ok(await admin.get(f"/v1/admin/schedules?resource_id={resource['id']}"))
    assert ids(listed["items"]) == [exception["id"]]
    listed = await admin.ok(
        await admin.get(f"/v1/admin/schedules?resource_id={resource['id']}&include_inactive=true")
    )
    assert ids(listed["items"]) == [shift["id"], exception["id"]]

    # a deactivated resource takes no new schedule entries
    await admin.ok(await admin.post(f"/v1/admin/resources/{resource['id']}/deactivate"))
    before = await row_count(admin.pool, "schedules")
    refused = await admin.post(
        "/v1/admin/schedules",
        {
            "kind": "shift",
            "resource_id": resource["id"],
            "weekday": 1,
            "start": "09:00",
            "end": "10:00",
        },
    )
    assert_problem(refused, 422, "inactive_reference")
    assert await row_count(admin.pool, "schedules") == before


# --- devices -----------------------------------------------------------------------


async def test_device_register_rename_revoke(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Kiosk Hall")
    created = await admin.created(
        "/v1/admin/devices", {"branch_id": branch["id"], "name": "Lobby kiosk"}
    )
    secret = created.pop("secret")
    assert isinstance(secret, str)
    assert len(secret) >= 32
    assert created["kind"] == "kiosk"
    assert created["active"] is True
    assert created["revoked_at"] is None
    did = created["id"]
    stored = await admin.pool.fetchval("SELECT secret_hash FROM devices WHERE id = $1", did)
    assert secret.encode() not in bytes(stored)

    fetched = await admin.ok(await admin.get(f"/v1/admin/devices/{did}"))
    assert "secret" not in fetched
    assert fetched == created
    listed = await admin.ok(await admin.get(f"/v1/admin/devices?branch_id={branch['id']}"))
    assert listed["items"] == [created]

    display = await admin.created(
        "/v1/admin/devices", {"branch_id": branch["id"], "name": "Board", "kind": "display"}
    )
    assert display["kind"] == "display"

    login_body = {"device_id": did, "secret": secret}
    assert (await admin.client.post("/v1/auth/device", json=login_body)).status_code == 200

    renamed = await admin.ok(await admin.patch(f"/v1/admin/devices/{did}", {"name": "Door kiosk"}))
    assert renamed["name"] == "Door kiosk"
    assert without(renamed, "name", "updated_at", "last_seen_at") == without(
        created, "name", "updated_at", "last_seen_at"
    )

    count = await row_count(admin.pool, "devices")
    off = await admin.ok(await admin.post(f"/v1/admin/devices/{did}/deactivate"))
    assert off["active"] is False
    utc(off["revoked_at"])
    assert await row_count(admin.pool, "devices") == count
    assert (await admin.ok(await admin.get(f"/v1/admin/devices/{did}")))["active"] is False
    assert_problem(
        await admin.client.post("/v1/auth/device", json=login_body), 401, "invalid_credentials"
    )
    listed = await admin.ok(await admin.get(f"/v1/admin/devices?branch_id={branch['id']}"))
    assert ids(listed["items"]) == [display["id"]]


# --- staff accounts --------------------------------------------------------------


async def test_staff_account_create_update_deactivate(admin: Admin) -> None:
    one = await create_branch(admin.client, admin.token, name="Staff Hall 1")
    two = await create_branch(admin.client, admin.token, name="Staff Hall 2")
    created = await admin.created(
        "/v1/admin/staff",
        {
            "email": "lead@example.test",
            "name": "Lead",
            "password": PASSWORD,
            "role": "manager",
            "branch_ids": [two["id"], one["id"]],
        },
    )
    assert set(created) == {
        "id",
        "email",
        "name",
        "role",
        "branch_ids",
        "active",
        "created_at",
        "updated_at",
    }
    assert created["role"] == "manager"
    assert created["branch_ids"] == sorted([one["id"], two["id"]])
    sid = created["id"]
    assert (
        await admin.pool.fetchval("SELECT password_hash FROM staff WHERE id = $1", sid) != PASSWORD
    )
    assert await admin.ok(await admin.get(f"/v1/admin/staff/{sid}")) == created
    token = await login(admin.client, "lead@example.test")
    assert (await admin.client.get("/v1/admin/services", headers=bearer(token))).status_code == 200

    renamed = await admin.ok(await admin.patch(f"/v1/admin/staff/{sid}", {"name": "Team lead"}))
    assert renamed["name"] == "Team lead"
    assert without(renamed, "name", "updated_at") == without(created, "name", "updated_at")
    moved = await admin.ok(await admin.patch(f"/v1/admin/staff/{sid}", {"branch_ids": [one["id"]]}))
    assert moved["branch_ids"] == [one["id"]]
    assert moved["role"] == "manager"
    listed = await admin.ok(await admin.get(f"/v1/admin/staff?branch_id={two['id']}"))
    assert sid not in ids(listed["items"])
    listed = await admin.ok(await admin.get(f"/v1/admin/staff?branch_id={one['id']}"))
    assert sid in ids(listed["items"])
    back = await admin.ok(
        await admin.patch(f"/v1/admin/staff/{sid}", {"branch_ids": [two["id"], one["id"]]})
    )
    assert back["branch_ids"] == sorted([one["id"], two["id"]])
    stored = await admin.pool.fetch(
        "SELECT branch_id FROM staff_branches WHERE staff_id = $1 ORDER BY branch_id", sid
    )
    assert [r["branch_id"] for r in stored] == back["branch_ids"]

    count = await row_count(admin.pool, "staff")
    off = await admin.ok(await admin.post(f"/v1/admin/staff/{sid}/deactivate"))
    assert off["active"] is False
    assert await row_count(admin.pool, "staff") == count
    assert (await admin.ok(await admin.get(f"/v1/admin/staff/{sid}")))["active"] is False
    refused = await admin.client.post(
        "/v1/auth/staff/login", json={"email": "lead@example.test", "password": PASSWORD}
    )
    assert refused.status_code == 401
    listed = await admin.ok(await admin.get(f"/v1/admin/staff?branch_id={one['id']}"))
    assert sid not in ids(listed["items"])
    listed = await admin.ok(
        await admin.get(f"/v1/admin/staff?branch_id={one['id']}&include_inactive=true")
    )
    assert sid in ids(listed["items"])


async def test_admin_cannot_deactivate_own_account(admin: Admin) -> None:
    email = await make_staff(admin.pool, "admin")
    me = await admin.pool.fetchval("SELECT id FROM staff WHERE email = $1", email)
    resp = await admin.client.post(
        f"/v1/admin/staff/{me}/deactivate", headers=bearer(await login(admin.client, email))
    )
    assert_problem(resp, 409, "conflict")
    assert await admin.pool.fetchval("SELECT active FROM staff WHERE id = $1", me) is True
    # another admin may
    off = await admin.ok(await admin.post(f"/v1/admin/staff/{me}/deactivate"))
    assert off["active"] is False


# --- pagination ------------------------------------------------------------------


async def test_cursor_pagination_walks_every_item_once(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Paged Hall")
    made = [
        (await create_service(admin.client, admin.token, branch["id"], name=f"S{i}"))["id"]
        for i in range(7)
    ]
    for url, headers in (
        (f"/v1/admin/services?branch_id={branch['id']}", admin.auth),
        (f"/v1/branches/{branch['id']}/services", {}),
    ):
        pages = await all_pages(admin.client, url, 3, headers)
        assert [len(p) for p in pages] == [3, 3, 1]
        walked = [i for page in pages for i in ids(page)]
        assert walked == sorted(walked)
        assert len(set(walked)) == len(walked)
        assert all(a < b for a, b in itertools.pairwise(walked))
        assert walked == made

        # a page that ends exactly at the last item has no next page
        exact = await all_pages(admin.client, url, 7, headers)
        assert [len(p) for p in exact] == [7]
        assert [len(p) for p in await all_pages(admin.client, url, 200, headers)] == [7]
        assert [len(p) for p in await all_pages(admin.client, url, 1, headers)] == [1] * 7

    # a deactivated item drops out of the public walk without disturbing the pages
    await admin.ok(await admin.post(f"/v1/admin/services/{made[3]}/deactivate"))
    pages = await all_pages(admin.client, f"/v1/branches/{branch['id']}/services", 3)
    assert [len(p) for p in pages] == [3, 3]
    assert [i for p in pages for i in ids(p)] == made[:3] + made[4:]
    pages = await all_pages(
        admin.client,
        f"/v1/admin/services?branch_id={branch['id']}&include_inactive=true",
        3,
        admin.auth,
    )
    assert [i for p in pages for i in ids(p)] == made


async def test_branch_list_pagination(admin: Admin) -> None:
    made = [(await create_branch(admin.client, admin.token, name=f"B{i}"))["id"] for i in range(5)]
    for url, headers in (("/v1/branches", {}), ("/v1/admin/branches", admin.auth)):
        pages = await all_pages(admin.client, url, 2, headers)
        assert all(len(p) == 2 for p in pages[:-1])
        assert 1 <= len(pages[-1]) <= 2
        walked = [i for page in pages for i in ids(page)]
        assert all(a < b for a, b in itertools.pairwise(walked))
        assert set(made) <= set(walked)
        assert all(item["active"] for page in pages for item in page)
