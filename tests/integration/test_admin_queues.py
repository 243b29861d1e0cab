"""Admin CRUD of walk-in queues through the real app: create, list, get, patch and
soft deactivation; services of the queue's own branch only; one active queue per
prefix and branch; who may call what."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from httpx import AsyncClient

from tests.helpers import bearer, create_branch, create_service, login, make_staff

PROBLEM = "application/problem+json"
URL = "/v1/admin/queues"


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


def fields_of(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body.get("errors") or []]


def ids(items: list[dict[str, Any]]) -> list[int]:
    return [item["id"] for item in items]


def without(record: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in keys}


Rows = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]


async def queue_rows(pool: asyncpg.Pool) -> Rows:
    """Every stored queue and queue-service pair, to prove a refusal wrote nothing."""
    queues = await pool.fetch("SELECT * FROM queues ORDER BY id")
    links = await pool.fetch("SELECT * FROM queue_services ORDER BY queue_id, service_id")
    return [tuple(r.values()) for r in queues], [tuple(r.values()) for r in links]


@dataclass
class Admin:
    client: AsyncClient
    pool: asyncpg.Pool
    token: str

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)

    async def post(
        self, url: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post(
            url, json=body, headers=self.auth if headers is None else headers
        )

    async def patch(
        self, url: str, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.patch(
            url, json=body, headers=self.auth if headers is None else headers
        )

    async def get(self, url: str, headers: dict[str, str] | None = None) -> httpx.Response:
        return await self.client.get(url, headers=self.auth if headers is None else headers)

    async def ok(self, resp: httpx.Response) -> dict[str, Any]:
        assert resp.status_code == 200, resp.text
        out: dict[str, Any] = resp.json()
        return out

    async def queue(self, branch_id: int, prefix: str, service_ids: list[int]) -> dict[str, Any]:
        resp = await self.post(
            URL,
            {
                "branch_id": branch_id,
                "name": f"Queue {prefix}",
                "prefix": prefix,
                "service_ids": service_ids,
            },
        )
        assert resp.status_code == 201, resp.text
        out: dict[str, Any] = resp.json()
        return out

    async def refused(
        self,
        method: str,
        url: str,
        *,
        status: int,
        code: str,
        fields: tuple[str, ...] = (),
        headers: dict[str, str] | None = None,
        body: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send a request that must be refused, and prove no queue or link changed."""
        before = await queue_rows(self.pool)
        resp = await self.client.request(
            method, url, json=body, headers=self.auth if headers is None else headers
        )
        problem = assert_problem(resp, status, code)
        for field in fields:
            assert field in fields_of(problem), problem
        assert await queue_rows(self.pool) == before
        return problem


@pytest.fixture(scope="module")
async def admin(client: AsyncClient, pool: asyncpg.Pool) -> Admin:
    return Admin(client, pool, await login(client, await make_staff(pool, "admin")))


# --- the life of a queue -----------------------------------------------------------


async def test_queue_create_read_patch_deactivate(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Queue Hall")
    accounts = await create_service(admin.client, admin.token, branch["id"], name="Accounts")
    cards = await create_service(admin.client, admin.token, branch["id"], name="Cards")
    loans = await create_service(admin.client, admin.token, branch["id"], name="Loans")

    resp = await admin.post(
        URL,
        {
            "branch_id": branch["id"],
            "name": "Accounts and cards",
            "prefix": "AC",
            # repeated and unordered: stored once each, answered in id order
            "service_ids": [cards["id"], accounts["id"], cards["id"]],
        },
    )
    assert resp.status_code == 201, resp.text
    created = resp.json()
    assert set(created) == {
        "id",
        "branch_id",
        "name",
        "prefix",
        "service_ids",
        "active",
        "created_at",
        "updated_at",
    }
    assert created["branch_id"] == branch["id"]
    assert created["name"] == "Accounts and cards"
    assert created["prefix"] == "AC"
    assert created["service_ids"] == sorted([accounts["id"], cards["id"]])
    assert created["active"] is True
    assert created["created_at"].endswith("Z")
    assert created["updated_at"] == created["created_at"]
    qid = created["id"]
    stored = await admin.pool.fetch(
        "SELECT service_id FROM queue_services WHERE queue_id = $1 ORDER BY service_id", qid
    )
    assert [r["service_id"] for r in stored] == created["service_ids"]

    assert await admin.ok(await admin.get(f"{URL}/{qid}")) == created
    listed = await admin.ok(await admin.get(f"{URL}?branch_id={branch['id']}"))
    assert listed == {"items": [created], "next_cursor": None}

    # PATCH changes only what it names
    renamed = await admin.ok(await admin.patch(f"{URL}/{qid}", {"name": "Everyday banking"}))
    assert renamed["name"] == "Everyday banking"
    assert without(renamed, "name", "updated_at") == without(created, "name", "updated_at")
    assert renamed["updated_at"] > created["updated_at"]

    # service_ids replaces the whole set
    moved = await admin.ok(
        await admin.patch(f"{URL}/{qid}", {"service_ids": [loans["id"], cards["id"]]})
    )
    assert moved["service_ids"] == sorted([cards["id"], loans["id"]])
    assert (moved["name"], moved["prefix"]) == ("Everyday banking", "AC")
    stored = await admin.pool.fetch(
        "SELECT service_id FROM queue_services WHERE queue_id = $1 ORDER BY service_id", qid
    )
    assert [r["service_id"] for r in stored] == moved["service_ids"]

    relettered = await admin.ok(await admin.patch(f"{URL}/{qid}", {"prefix": "E"}))
    assert relettered["prefix"] == "E"
    assert relettered["service_ids"] == moved["service_ids"]

    # an empty PATCH changes nothing it would show
    same = await admin.ok(await admin.patch(f"{URL}/{qid}", {}))
    assert without(same, "updated_at") == without(relettered, "updated_at")

    # the walk-in side sees the queue as configured
    public = await admin.ok(await admin.client.get(f"/v1/branches/{branch['id']}/queues"))
    assert [(q["id"], q["prefix"]) for q in public["items"]] == [(qid, "E")]

    # deactivation is soft
    count = await admin.pool.fetchval("SELECT count(*) FROM queues")
    off = await admin.ok(await admin.post(f"{URL}/{qid}/deactivate"))
    assert off["active"] is False
    assert without(off, "active", "updated_at") == without(same, "active", "updated_at")
    assert await admin.pool.fetchval("SELECT count(*) FROM queues") == count
    assert await admin.pool.fetchval("SELECT active FROM queues WHERE id = $1", qid) is False
    assert (await admin.ok(await admin.get(f"{URL}/{qid}")))["active"] is False
    listed = await admin.ok(await admin.get(f"{URL}?branch_id={branch['id']}"))
    assert listed["items"] == []
    listed = await admin.ok(
        await admin.get(f"{URL}?branch_id={branch['id']}&include_inactive=true")
    )
    assert ids(listed["items"]) == [qid]
    public = await admin.ok(await admin.client.get(f"/v1/branches/{branch['id']}/queues"))
    assert public["items"] == []

    # deactivating again is harmless
    again = await admin.ok(await admin.post(f"{URL}/{qid}/deactivate"))
    assert again["active"] is False

    # unknown ids are 404, and there is no hard delete
    assert_problem(await admin.get(f"{URL}/999999"), 404, "not_found")
    await admin.refused("PATCH", f"{URL}/999999", status=404, code="not_found", body={"name": "x"})
    await admin.refused("POST", f"{URL}/999999/deactivate", status=404, code="not_found")
    for url in (f"{URL}/{qid}", URL):
        await admin.refused("DELETE", url, status=405, code="method_not_allowed")


async def test_list_filters_by_branch_and_pages_by_cursor(admin: Admin) -> None:
    north = await create_branch(admin.client, admin.token, name="North Queues")
    south = await create_branch(admin.client, admin.token, name="South Queues")
    n_service = await create_service(admin.client, admin.token, north["id"])
    s_service = await create_service(admin.client, admin.token, south["id"])
    made = [(await admin.queue(north["id"], p, [n_service["id"]]))["id"] for p in "ABCDE"]
    theirs = await admin.queue(south["id"], "A", [s_service["id"]])

    pages: list[list[int]] = []
    cursor: str | None = None
    while True:
        query = f"?branch_id={north['id']}&limit=2" + (f"&cursor={cursor}" if cursor else "")
        body = await admin.ok(await admin.get(URL + query))
        assert set(body) == {"items", "next_cursor"}
        pages.append(ids(body["items"]))
        cursor = body["next_cursor"]
        if cursor is None:
            break
        assert len(pages) < 10, "pagination does not terminate"
    assert [len(p) for p in pages] == [2, 2, 1]
    walked = [i for p in pages for i in p]
    assert walked == made
    assert all(a < b for a, b in itertools.pairwise(walked))

    south_only = await admin.ok(await admin.get(f"{URL}?branch_id={south['id']}"))
    assert ids(south_only["items"]) == [theirs["id"]]
    everything = await admin.ok(await admin.get(f"{URL}?limit=200"))
    assert set(made) | {theirs["id"]} <= set(ids(everything["items"]))

    assert_problem(await admin.get(f"{URL}?cursor=garbage"), 422, "validation_error")
    assert_problem(await admin.get(f"{URL}?branch_id=0"), 422, "validation_error")


# --- services of the same branch ---------------------------------------------------


async def test_services_must_be_active_services_of_the_same_branch(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Own Services Hall")
    other = await create_branch(admin.client, admin.token, name="Foreign Services Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    foreign = await create_service(admin.client, admin.token, other["id"], name="Foreign")
    retired = await create_service(admin.client, admin.token, branch["id"], name="Retired")
    await admin.ok(await admin.post(f"/v1/admin/services/{retired['id']}/deactivate"))
    queue = await admin.queue(branch["id"], "S", [service["id"]])

    for bad in (
        [foreign["id"]],
        [service["id"], foreign["id"]],
        [service["id"], 999_999],
        [retired["id"]],
    ):
        problem = await admin.refused(
            "POST",
            URL,
            status=422,
            code="validation_error",
            fields=("service_ids",),
            body={"branch_id": branch["id"], "name": "Bad", "prefix": "X", "service_ids": bad},
        )
        assert fields_of(problem) == ["service_ids"]
        # a PATCH that also renames changes nothing at all
        await admin.refused(
            "PATCH",
            f"{URL}/{queue['id']}",
            status=422,
            code="validation_error",
            fields=("service_ids",),
            body={"service_ids": bad, "name": "Renamed alongside bad services", "prefix": "Z"},
        )
    assert await admin.ok(await admin.get(f"{URL}/{queue['id']}")) == queue

    # the foreign service is fine in a queue of its own branch
    theirs = await admin.queue(other["id"], "S", [foreign["id"]])
    assert theirs["service_ids"] == [foreign["id"]]


async def test_branch_must_exist_and_be_active(admin: Admin) -> None:
    closed = await create_branch(admin.client, admin.token, name="Closed Queue Hall")
    service = await create_service(admin.client, admin.token, closed["id"])
    await admin.ok(await admin.post(f"/v1/admin/branches/{closed['id']}/deactivate"))
    body = {"branch_id": closed["id"], "name": "Q", "prefix": "A", "service_ids": [service["id"]]}
    await admin.refused(
        "POST", URL, status=422, code="inactive_reference", fields=("branch_id",), body=body
    )
    await admin.refused(
        "POST",
        URL,
        status=422,
        code="validation_error",
        fields=("branch_id",),
        body={**body, "branch_id": 999_999},
    )


# --- prefixes ------------------------------------------------------------------------


async def test_duplicate_active_prefix_is_409_until_deactivated(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Prefix Hall")
    other = await create_branch(admin.client, admin.token, name="Other Prefix Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    other_service = await create_service(admin.client, admin.token, other["id"])
    first = await admin.queue(branch["id"], "A", [service["id"]])
    second = await admin.queue(branch["id"], "B", [service["id"]])

    taken = {"branch_id": branch["id"], "name": "Again", "prefix": "A"}
    problem = await admin.refused(
        "POST",
        URL,
        status=409,
        code="already_exists",
        fields=("prefix",),
        body={**taken, "service_ids": [service["id"]]},
    )
    assert problem["status"] == 409
    await admin.refused(
        "PATCH",
        f"{URL}/{second['id']}",
        status=409,
        code="already_exists",
        fields=("prefix",),
        body={"prefix": "A", "name": "Renamed alongside a taken prefix"},
    )
    assert await admin.ok(await admin.get(f"{URL}/{second['id']}")) == second

    # another branch may use the same letters; a queue may keep its own
    elsewhere = await admin.queue(other["id"], "A", [other_service["id"]])
    assert elsewhere["prefix"] == "A"
    kept = await admin.ok(await admin.patch(f"{URL}/{first['id']}", {"prefix": "A"}))
    assert kept["prefix"] == "A"

    # deactivation frees the prefix, for a new queue or for an existing one
    await admin.ok(await admin.post(f"{URL}/{first['id']}/deactivate"))
    reused = await admin.queue(branch["id"], "A", [service["id"]])
    assert reused["prefix"] == "A"
    assert reused["id"] != first["id"]
    await admin.ok(await admin.post(f"{URL}/{reused['id']}/deactivate"))
    moved = await admin.ok(await admin.patch(f"{URL}/{second['id']}", {"prefix": "A"}))
    assert moved["prefix"] == "A"
    # and a deactivated queue's prefix is not checked against the active ones
    old = await admin.ok(await admin.patch(f"{URL}/{first['id']}", {"name": "Old A"}))
    assert (old["prefix"], old["active"]) == ("A", False)


@pytest.mark.parametrize("prefix", ["a", "ABC", "1", "", "A1", " A", "A\n", "Ä"])
async def test_bad_prefix_is_422(admin: Admin, prefix: str) -> None:
    branch = await create_branch(admin.client, admin.token, name=f"Bad Prefix Hall {prefix!r}")
    service = await create_service(admin.client, admin.token, branch["id"])
    queue = await admin.queue(branch["id"], "OK", [service["id"]])
    body = {
        "branch_id": branch["id"],
        "name": "Q",
        "prefix": prefix,
        "service_ids": [service["id"]],
    }
    await admin.refused(
        "POST", URL, status=422, code="validation_error", fields=("prefix",), body=body
    )
    await admin.refused(
        "PATCH",
        f"{URL}/{queue['id']}",
        status=422,
        code="validation_error",
        fields=("prefix",),
        body={"prefix": prefix},
    )


BAD_BODIES = [
    pytest.param({"service_ids": []}, "service_ids", id="no-services"),
    pytest.param({"service_ids": None}, "service_ids", id="null-services"),
    pytest.param({"service_ids": ["x"]}, "service_ids[0]", id="service-as-string"),
    pytest.param({"service_ids": [0]}, "service_ids[0]", id="service-zero"),
    pytest.param({"service_ids": [2**63]}, "service_ids[0]", id="service-beyond-int64"),
    pytest.param({"name": ""}, "name", id="empty-name"),
    pytest.param({"name": "x" * 201}, "name", id="long-name"),
    pytest.param({"active": False}, "active", id="unknown-active"),
    pytest.param({"id": 5}, "id", id="unknown-id"),
]


@pytest.mark.parametrize(("change", "field"), BAD_BODIES)
async def test_bad_bodies_are_422(admin: Admin, change: dict[str, Any], field: str) -> None:
    branch = await create_branch(admin.client, admin.token, name="Bad Body Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    body = {"branch_id": branch["id"], "name": "Q", "prefix": "A", "service_ids": [service["id"]]}
    await admin.refused(
        "POST",
        URL,
        status=422,
        code="validation_error",
        fields=(field,),
        body={**body, **change},
    )
    queue = await admin.queue(branch["id"], "A", [service["id"]])
    await admin.refused(
        "PATCH",
        f"{URL}/{queue['id']}",
        status=422,
        code="validation_error",
        fields=(field,),
        body=change,
    )


@pytest.mark.parametrize("missing", ["branch_id", "name", "prefix", "service_ids"])
async def test_required_fields(admin: Admin, missing: str) -> None:
    body = {"branch_id": 1, "name": "Q", "prefix": "A", "service_ids": [1]}
    del body[missing]
    problem = await admin.refused("POST", URL, status=422, code="validation_error", body=body)
    # a missing field is reported on the body, its message naming the field
    assert any(missing in e["message"] for e in problem["errors"]), problem


async def test_patch_cannot_move_a_queue_to_another_branch(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Fixed Hall")
    other = await create_branch(admin.client, admin.token, name="Elsewhere Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    queue = await admin.queue(branch["id"], "F", [service["id"]])
    await admin.refused(
        "PATCH",
        f"{URL}/{queue['id']}",
        status=422,
        code="validation_error",
        fields=("branch_id",),
        body={"branch_id": other["id"]},
    )


# --- who may call what -------------------------------------------------------------


async def test_manager_writes_only_inside_own_branch(admin: Admin) -> None:
    mine = await create_branch(admin.client, admin.token, name="Manager Queue Hall")
    theirs = await create_branch(admin.client, admin.token, name="Foreign Queue Hall")
    my_service = await create_service(admin.client, admin.token, mine["id"])
    their_service = await create_service(admin.client, admin.token, theirs["id"])
    their_queue = await admin.queue(theirs["id"], "T", [their_service["id"]])
    manager = bearer(
        await login(admin.client, await make_staff(admin.pool, "manager", [mine["id"]]))
    )

    # inside the own branch: the whole life of a queue
    resp = await admin.post(
        URL,
        {"branch_id": mine["id"], "name": "Mine", "prefix": "M", "service_ids": [my_service["id"]]},
        headers=manager,
    )
    assert resp.status_code == 201, resp.text
    own = resp.json()
    assert own["branch_id"] == mine["id"]
    renamed = await admin.ok(await admin.patch(f"{URL}/{own['id']}", {"name": "M2"}, manager))
    assert renamed["name"] == "M2"
    assert (await admin.ok(await admin.get(f"{URL}/{own['id']}", manager)))["name"] == "M2"
    listed = await admin.ok(await admin.get(URL, manager))
    assert {q["branch_id"] for q in listed["items"]} == {mine["id"]}
    assert their_queue["id"] not in ids(listed["items"])
    assert (await admin.ok(await admin.get(f"{URL}?branch_id={theirs['id']}", manager)))[
        "items"
    ] == []

    # another branch is refused as a missing one, whichever services it names
    for service_ids in ([their_service["id"]], [my_service["id"]]):
        await admin.refused(
            "POST",
            URL,
            status=422,
            code="validation_error",
            fields=("branch_id",),
            headers=manager,
            body={
                "branch_id": theirs["id"],
                "name": "Foreign",
                "prefix": "F",
                "service_ids": service_ids,
            },
        )
    # another branch's queues look missing, and stay unchanged
    assert_problem(await admin.get(f"{URL}/{their_queue['id']}", manager), 404, "not_found")
    await admin.refused(
        "PATCH",
        f"{URL}/{their_queue['id']}",
        status=404,
        code="not_found",
        headers=manager,
        body={"name": "Taken"},
    )
    await admin.refused(
        "POST",
        f"{URL}/{their_queue['id']}/deactivate",
        status=404,
        code="not_found",
        headers=manager,
    )
    assert await admin.ok(await admin.get(f"{URL}/{their_queue['id']}")) == their_queue

    off = await admin.ok(await admin.post(f"{URL}/{own['id']}/deactivate", headers=manager))
    assert off["active"] is False


async def test_manager_of_two_branches_cannot_mix_their_services(admin: Admin) -> None:
    one = await create_branch(admin.client, admin.token, name="Managed One")
    two = await create_branch(admin.client, admin.token, name="Managed Two")
    s_one = await create_service(admin.client, admin.token, one["id"])
    s_two = await create_service(admin.client, admin.token, two["id"])
    manager = bearer(
        await login(admin.client, await make_staff(admin.pool, "manager", [one["id"], two["id"]]))
    )
    await admin.refused(
        "POST",
        URL,
        status=422,
        code="validation_error",
        fields=("service_ids",),
        headers=manager,
        body={
            "branch_id": one["id"],
            "name": "Mixed",
            "prefix": "X",
            "service_ids": [s_one["id"], s_two["id"]],
        },
    )


async def test_staff_read_but_cannot_write(admin: Admin) -> None:
    branch = await create_branch(admin.client, admin.token, name="Staff Queue Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    queue = await admin.queue(branch["id"], "R", [service["id"]])
    staff = bearer(await login(admin.client, await make_staff(admin.pool, "staff", [branch["id"]])))

    listed = await admin.ok(await admin.get(URL, staff))
    assert ids(listed["items"]) == [queue["id"]]
    assert await admin.ok(await admin.get(f"{URL}/{queue['id']}", staff)) == queue

    body = {"branch_id": branch["id"], "name": "S", "prefix": "S", "service_ids": [service["id"]]}
    await admin.refused("POST", URL, status=403, code="forbidden", headers=staff, body=body)
    await admin.refused(
        "PATCH",
        f"{URL}/{queue['id']}",
        status=403,
        code="forbidden",
        headers=staff,
        body={"name": "Hijacked"},
    )
    await admin.refused(
        "POST", f"{URL}/{queue['id']}/deactivate", status=403, code="forbidden", headers=staff
    )
    assert await admin.ok(await admin.get(f"{URL}/{queue['id']}")) == queue


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, "unauthorized"), ("not-a-jwt", "invalid_token")],
    ids=["no-token", "garbage-token"],
)
@pytest.mark.parametrize(
    ("method", "suffix"),
    [
        ("GET", ""),
        ("GET", "/{id}"),
        ("POST", ""),
        ("PATCH", "/{id}"),
        ("POST", "/{id}/deactivate"),
    ],
    ids=["list", "get", "create", "patch", "deactivate"],
)
async def test_every_route_needs_a_valid_token(
    admin: Admin, method: str, suffix: str, token: str | None, code: str
) -> None:
    branch = await create_branch(admin.client, admin.token, name="Token Hall")
    service = await create_service(admin.client, admin.token, branch["id"])
    queue = await admin.queue(branch["id"], "K", [service["id"]])
    body: dict[str, Any] | None = None
    if method == "POST" and not suffix:
        body = {
            "branch_id": branch["id"],
            "name": "N",
            "prefix": "N",
            "service_ids": [service["id"]],
        }
    elif method == "PATCH":
        body = {"name": "Hijacked"}
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    await admin.refused(
        method,
        URL + suffix.format(id=queue["id"]),
        status=401,
        code=code,
        headers=headers,
        body=body,
    )
