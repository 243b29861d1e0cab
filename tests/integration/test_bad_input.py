"""Bad input anywhere is a 4xx RFC 9457 problem, and nothing is written.

Every rejected request is checked against a snapshot of all catalogue tables
(row counts and row contents) taken just before it was sent.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis
from httpx import AsyncClient

from selfserve.app import create_app
from tests.booking_helpers import at_hour, book, customer, iso, kiosk, seed
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import bearer, create_branch, create_service, login, make_staff

PROBLEM = "application/problem+json"
TABLES = (
    "branches",
    "services",
    "resources",
    "resource_skills",
    "schedules",
    "queues",
    "queue_services",
    "devices",
    "staff",
    "staff_branches",
    "customers",
    "holds",
    "bookings",
    "waitlist_entries",
    "idempotency_keys",
    "tickets",
    "messages",
    "inbound_sms",
)
INT64_MAX = 2**63 - 1
CJK = re.compile(r"[\u4e00-\u9fff]")


# --- helpers -----------------------------------------------------------------


@dataclass
class Snapshot:
    counts: dict[str, int]
    rows: dict[str, list[tuple[Any, ...]]]


async def snapshot(pool: asyncpg.Pool) -> Snapshot:
    rows: dict[str, list[tuple[Any, ...]]] = {}
    async with pool.acquire() as conn:
        for table in TABLES:
            records = await conn.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
            rows[table] = [tuple(r.values()) for r in records]
    return Snapshot(counts={t: len(r) for t, r in rows.items()}, rows=rows)


def assert_problem(resp: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """The response is an RFC 9457 problem with the given status and machine code."""
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].split(";")[0].strip() == PROBLEM
    assert "Traceback" not in resp.text
    body: dict[str, Any] = resp.json()
    assert body["status"] == status
    assert body["code"] == code
    assert isinstance(body["type"], str)
    assert body["type"].endswith(code)
    assert isinstance(body["title"], str)
    assert body["title"]
    assert isinstance(body["detail"], str)
    assert body["detail"]
    if status == 422:
        assert body["errors"], "a 422 names what is wrong in errors[]"
        for err in body["errors"]:
            assert isinstance(err["field"], str)
            assert err["field"]
            assert isinstance(err["message"], str)
            assert err["message"]
    return body


def fields_of(body: dict[str, Any]) -> list[str]:
    return [e["field"] for e in body.get("errors") or []]


@dataclass
class Ctx:
    client: AsyncClient
    pool: asyncpg.Pool
    token: str
    branch: dict[str, Any]
    other_branch: dict[str, Any]
    service: dict[str, Any]
    other_service: dict[str, Any]
    resource: dict[str, Any]
    shift: dict[str, Any]
    exception: dict[str, Any]
    queue: dict[str, Any]

    @property
    def auth(self) -> dict[str, str]:
        return bearer(self.token)

    async def rejected(
        self,
        method: str,
        url: str,
        *,
        status: int,
        code: str,
        fields: tuple[str, ...] = (),
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Send a request that must be refused and prove no table changed."""
        before = await snapshot(self.pool)
        resp = await self.client.request(
            method, url, headers={**self.auth, **(headers or {})}, **kwargs
        )
        body = assert_problem(resp, status, code)
        for field in fields:
            assert field in fields_of(body), body
        after = await snapshot(self.pool)
        assert after.counts == before.counts
        assert after.rows == before.rows
        return body


@pytest.fixture(scope="module")
async def ctx(client: AsyncClient, pool: asyncpg.Pool) -> Ctx:
    token = await login(client, await make_staff(pool, "admin"))
    auth = bearer(token)
    branch = await create_branch(client, token)
    other_branch = await create_branch(client, token, name="Other Hall")
    service = await create_service(
        client, token, branch["id"], price_minor=1000, deposit_minor=200, min_party=1, max_party=4
    )
    other_service = await create_service(client, token, other_branch["id"], name="Elsewhere")
    res = await client.post(
        "/v1/admin/resources",
        json={
            "branch_id": branch["id"],
            "kind": "counter",
            "name": "C1",
            "skills": [service["id"]],
        },
        headers=auth,
    )
    assert res.status_code == 201, res.text
    resource = res.json()
    shift = await client.post(
        "/v1/admin/schedules",
        json={
            "kind": "shift",
            "resource_id": resource["id"],
            "weekday": 1,
            "start": "09:00",
            "end": "17:00",
        },
        headers=auth,
    )
    assert shift.status_code == 201, shift.text
    exception = await client.post(
        "/v1/admin/schedules",
        json={
            "kind": "exception",
            "resource_id": resource["id"],
            "starts_at": "2026-12-01T09:00:00+08:00",
            "ends_at": "2026-12-01T12:00:00+08:00",
        },
        headers=auth,
    )
    assert exception.status_code == 201, exception.text
    queue = await client.post(
        "/v1/admin/queues",
        json={
            "branch_id": branch["id"],
            "name": "Counter queue",
            "prefix": "A",
            "service_ids": [service["id"]],
        },
        headers=auth,
    )
    assert queue.status_code == 201, queue.text
    return Ctx(
        client=client,
        pool=pool,
        token=token,
        branch=branch,
        other_branch=other_branch,
        service=service,
        other_service=other_service,
        resource=resource,
        shift=shift.json(),
        exception=exception.json(),
        queue=queue.json(),
    )


async def new_resource(ctx: Ctx, **overrides: Any) -> dict[str, Any]:
    body = {"branch_id": ctx.branch["id"], "kind": "staff", "name": "R", **overrides}
    resp = await ctx.client.post("/v1/admin/resources", json=body, headers=ctx.auth)
    assert resp.status_code == 201, resp.text
    out: dict[str, Any] = resp.json()
    return out


async def new_shift(
    ctx: Ctx, resource_id: int, weekday: int, start: str, end: str
) -> httpx.Response:
    return await ctx.client.post(
        "/v1/admin/schedules",
        json={
            "kind": "shift",
            "resource_id": resource_id,
            "weekday": weekday,
            "start": start,
            "end": end,
        },
        headers=ctx.auth,
    )


def cursor_of(value: str) -> str:
    """A cursor in the same encoding the API uses, carrying an arbitrary payload."""
    return base64.urlsafe_b64encode(value.encode()).decode().rstrip("=")


# Requests are described as functions of the fixture so ids are known at run time.
Case = Callable[[Ctx], tuple[str, str, dict[str, Any]]]


def service_body(ctx: Ctx, **fields: Any) -> dict[str, Any]:
    return {"branch_id": ctx.branch["id"], "name": "Bad", "duration_min": 30, **fields}


def resource_body(ctx: Ctx, **fields: Any) -> dict[str, Any]:
    return {"branch_id": ctx.branch["id"], "kind": "counter", "name": "Bad", **fields}


def shift_body(ctx: Ctx, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "shift",
        "resource_id": ctx.resource["id"],
        "weekday": 2,
        "start": "09:00",
        "end": "12:00",
        **fields,
    }


def exception_body(ctx: Ctx, **fields: Any) -> dict[str, Any]:
    return {
        "kind": "exception",
        "resource_id": ctx.resource["id"],
        "starts_at": "2026-12-02T09:00:00+08:00",
        "ends_at": "2026-12-02T12:00:00+08:00",
        **fields,
    }


def queue_body(ctx: Ctx, **fields: Any) -> dict[str, Any]:
    return {
        "branch_id": ctx.branch["id"],
        "name": "Bad",
        "prefix": "B",
        "service_ids": [ctx.service["id"]],
        **fields,
    }


def staff_body(**fields: Any) -> dict[str, Any]:
    return {
        "email": "new.person@example.test",
        "name": "New Person",
        "password": "a long enough password",
        "role": "admin",
        **fields,
    }


# --- malformed and oversized bodies ------------------------------------------

MALFORMED = [
    pytest.param(b'{"name": ', id="truncated"),
    pytest.param(b'{"name": x}', id="bare-word"),
    pytest.param(b'{"name": "a"} trailing', id="trailing-garbage"),
    pytest.param(b"{'name': 'a'}", id="single-quotes"),
    pytest.param(b"\xff\xfe{}", id="not-utf8"),
    pytest.param(b'{"name": "a\\ud800"}', id="lone-surrogate"),
]

WRITE_TARGETS: list[Case] = [
    lambda c: ("POST", "/v1/admin/branches", {}),
    lambda c: ("POST", "/v1/admin/services", {}),
    lambda c: ("PATCH", f"/v1/admin/services/{c.service['id']}", {}),
    lambda c: ("POST", "/v1/admin/schedules", {}),
    lambda c: ("PATCH", f"/v1/admin/branches/{c.branch['id']}", {}),
    lambda c: ("POST", "/v1/admin/queues", {}),
    lambda c: ("PATCH", f"/v1/admin/queues/{c.queue['id']}", {}),
]


@pytest.mark.parametrize("raw", MALFORMED)
@pytest.mark.parametrize(
    "target",
    WRITE_TARGETS,
    ids=["branch", "service", "patch-service", "schedule", "patch-branch", "queue", "patch-queue"],
)
async def test_malformed_json_is_400_malformed_body(ctx: Ctx, target: Case, raw: bytes) -> None:
    method, url, _ = target(ctx)
    await ctx.rejected(
        method,
        url,
        status=400,
        code="malformed_body",
        content=raw,
        headers={"content-type": "application/json"},
    )


@pytest.mark.parametrize("raw", [b"", b"null"], ids=["empty", "null"])
async def test_missing_body_is_422_naming_the_body(ctx: Ctx, raw: bytes) -> None:
    body = await ctx.rejected(
        "POST",
        "/v1/admin/branches",
        status=422,
        code="validation_error",
        fields=("body",),
        content=raw,
        headers={"content-type": "application/json"},
    )
    # the message speaks of the request, not of a handler's parameter name
    assert all("'data'" not in e["message"] for e in body["errors"])


def _big_json(size: int) -> bytes:
    # Well-formed JSON whose only problem is its size.
    filler = b"x" * (size - len(b'{"name": "", "timezone": "UTC"}'))
    return b'{"name": "' + filler + b'", "timezone": "UTC"}'


async def _chunks(data: bytes, size: int = 64 * 1024) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("streamed", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize("method", ["POST", "PATCH"])
async def test_two_megabyte_body_is_413(ctx: Ctx, method: str, streamed: bool) -> None:
    url = "/v1/admin/branches" + (f"/{ctx.branch['id']}" if method == "PATCH" else "")
    data = _big_json(2 * 1024 * 1024)
    content: Any = _chunks(data) if streamed else data
    await ctx.rejected(
        method,
        url,
        status=413,
        code="body_too_large",
        content=content,
        headers={"content-type": "application/json"},
    )


async def test_body_just_under_the_limit_is_read_and_validated(ctx: Ctx) -> None:
    # 1 MiB is the default limit: a slightly smaller body is parsed, and refused
    # for what it says (a 200-character name limit), not for its size.
    body = await ctx.rejected(
        "POST",
        "/v1/admin/branches",
        status=422,
        code="validation_error",
        fields=("name",),
        content=_big_json(1024 * 1024 - 1024),
        headers={"content-type": "application/json"},
    )
    assert body["status"] == 422


async def test_body_limit_comes_from_settings(
    module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, ctx: Ctx
) -> None:
    app = create_app(settings_with(module_env, max_body_bytes=2048), pool=pool, redis=redis)
    data = _big_json(4096)
    before = await snapshot(pool)
    async with AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver.local"
    ) as small:
        resp = await small.post(
            "/v1/admin/branches",
            content=data,
            headers={**ctx.auth, "content-type": "application/json"},
        )
    assert_problem(resp, 413, "body_too_large")
    assert (await snapshot(pool)).rows == before.rows
    # the same body under the default limit is read (and refused for its too-long name)
    await ctx.rejected(
        "POST",
        "/v1/admin/branches",
        status=422,
        code="validation_error",
        fields=("name",),
        content=data,
        headers={"content-type": "application/json"},
    )


# --- field-level validation --------------------------------------------------

WRONG_TYPES: list[tuple[str, Case, str]] = [
    (
        "duration-as-word",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, duration_min="thirty")}),
        "duration_min",
    ),
    (
        "capacity-fraction",
        lambda c: ("POST", "/v1/admin/resources", {"json": resource_body(c, capacity=1.5)}),
        "capacity",
    ),
    (
        "skills-as-string",
        lambda c: ("POST", "/v1/admin/resources", {"json": resource_body(c, skills="x")}),
        "skills",
    ),
    (
        "skills-item-as-string",
        lambda c: ("POST", "/v1/admin/resources", {"json": resource_body(c, skills=["x"])}),
        "skills[0]",
    ),
    (
        "weekday-as-word",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {
                "json": {
                    "name": "B",
                    "timezone": "UTC",
                    "opening_hours": [{"weekday": "mon", "opens": "09:00", "closes": "17:00"}],
                }
            },
        ),
        "opening_hours[0].weekday",
    ),
    (
        "reserve-as-word",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {"json": {"name": "B", "timezone": "UTC", "walk_in_reserve": "half"}},
        ),
        "walk_in_reserve",
    ),
    (
        "reserve-above-one",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {"json": {"name": "B", "timezone": "UTC", "walk_in_reserve": 1.5}},
        ),
        "walk_in_reserve",
    ),
    (
        "patch-duration-as-word",
        lambda c: (
            "PATCH",
            f"/v1/admin/services/{c.service['id']}",
            {"json": {"duration_min": "thirty"}},
        ),
        "duration_min",
    ),
    (
        "patch-name-null",
        lambda c: ("PATCH", f"/v1/admin/branches/{c.branch['id']}", {"json": {"name": None}}),
        "name",
    ),
    (
        "weekday-eight",
        lambda c: ("POST", "/v1/admin/schedules", {"json": shift_body(c, weekday=8)}),
        "weekday",
    ),
    (
        "clock-25h",
        lambda c: ("POST", "/v1/admin/schedules", {"json": shift_body(c, start="25:00")}),
        "start",
    ),
    (
        "schedule-kind",
        lambda c: ("POST", "/v1/admin/schedules", {"json": shift_body(c, kind="holiday")}),
        "kind",
    ),
    (
        "device-kind",
        lambda c: (
            "POST",
            "/v1/admin/devices",
            {"json": {"branch_id": c.branch["id"], "name": "K", "kind": "tablet"}},
        ),
        "kind",
    ),
    (
        "staff-role",
        lambda c: ("POST", "/v1/admin/staff", {"json": staff_body(role="root")}),
        "role",
    ),
    (
        "staff-short-password",
        lambda c: ("POST", "/v1/admin/staff", {"json": staff_body(password="short")}),
        "password",
    ),
    (
        "currency-lowercase",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, currency="cny")}),
        "currency",
    ),
    (
        "closure-impossible-date",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {"json": {"name": "B", "timezone": "UTC", "closures": [{"date": "2027-02-30"}]}},
        ),
        "closures[0].date",
    ),
    (
        "queue-prefix-lowercase",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, prefix="a")}),
        "prefix",
    ),
    (
        "queue-prefix-three-letters",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, prefix="ABC")}),
        "prefix",
    ),
    (
        "queue-prefix-digit",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, prefix="1")}),
        "prefix",
    ),
    (
        "queue-prefix-trailing-newline",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, prefix="A\n")}),
        "prefix",
    ),
    (
        "queue-services-empty",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, service_ids=[])}),
        "service_ids",
    ),
    (
        "queue-services-as-string",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, service_ids="x")}),
        "service_ids",
    ),
    (
        "queue-service-item-as-string",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, service_ids=["x"])}),
        "service_ids[0]",
    ),
    (
        "patch-queue-prefix-lowercase",
        lambda c: ("PATCH", f"/v1/admin/queues/{c.queue['id']}", {"json": {"prefix": "b"}}),
        "prefix",
    ),
    (
        "patch-queue-services-empty",
        lambda c: ("PATCH", f"/v1/admin/queues/{c.queue['id']}", {"json": {"service_ids": []}}),
        "service_ids",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in WRONG_TYPES], ids=[i for i, _, _ in WRONG_TYPES]
)
async def test_wrong_types_are_422_naming_the_field(ctx: Ctx, case: Case, field: str) -> None:
    method, url, kwargs = case(ctx)
    await ctx.rejected(method, url, status=422, code="validation_error", fields=(field,), **kwargs)


UNKNOWN_FIELDS: list[tuple[str, Case, str]] = [
    (
        "branch-active",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {"json": {"name": "B", "timezone": "UTC", "active": False}},
        ),
        "active",
    ),
    (
        "service-id",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, id=5)}),
        "id",
    ),
    (
        "service-price",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, price=1)}),
        "price",
    ),
    (
        "resource-active",
        lambda c: ("POST", "/v1/admin/resources", {"json": resource_body(c, active=False)}),
        "active",
    ),
    (
        "shift-id",
        lambda c: ("POST", "/v1/admin/schedules", {"json": shift_body(c, id=5)}),
        "id",
    ),
    (
        "device-secret",
        lambda c: (
            "POST",
            "/v1/admin/devices",
            {"json": {"branch_id": c.branch["id"], "name": "K", "secret": "chosen"}},
        ),
        "secret",
    ),
    (
        "staff-active",
        lambda c: ("POST", "/v1/admin/staff", {"json": staff_body(active=True)}),
        "active",
    ),
    (
        "patch-service-price",
        lambda c: ("PATCH", f"/v1/admin/services/{c.service['id']}", {"json": {"price": 1}}),
        "price",
    ),
    (
        "patch-branch-active",
        lambda c: ("PATCH", f"/v1/admin/branches/{c.branch['id']}", {"json": {"active": False}}),
        "active",
    ),
    (
        "patch-service-branch",
        lambda c: (
            "PATCH",
            f"/v1/admin/services/{c.service['id']}",
            {"json": {"branch_id": c.other_branch["id"]}},
        ),
        "branch_id",
    ),
    (
        "nested-opening-hours",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {
                "json": {
                    "name": "B",
                    "timezone": "UTC",
                    "opening_hours": [
                        {"weekday": 1, "opens": "09:00", "closes": "17:00", "lunch": "12:00"}
                    ],
                }
            },
        ),
        "opening_hours[0].lunch",
    ),
    (
        "queue-active",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, active=False)}),
        "active",
    ),
    (
        "patch-queue-branch",
        lambda c: (
            "PATCH",
            f"/v1/admin/queues/{c.queue['id']}",
            {"json": {"branch_id": c.other_branch["id"]}},
        ),
        "branch_id",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in UNKNOWN_FIELDS], ids=[i for i, _, _ in UNKNOWN_FIELDS]
)
async def test_unknown_fields_are_422_naming_the_field(ctx: Ctx, case: Case, field: str) -> None:
    method, url, kwargs = case(ctx)
    await ctx.rejected(method, url, status=422, code="validation_error", fields=(field,), **kwargs)


NAIVE: list[tuple[str, Case, str]] = [
    (
        "starts-at-naive",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {
                "json": exception_body(
                    c, starts_at="2026-12-01T09:00:00", ends_at="2026-12-01T12:00:00+08:00"
                )
            },
        ),
        "starts_at",
    ),
    (
        "ends-at-naive",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {"json": exception_body(c, ends_at="2026-12-02T12:00:00")},
        ),
        "ends_at",
    ),
    (
        "date-only",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {"json": exception_body(c, starts_at="2026-12-02")},
        ),
        "starts_at",
    ),
    (
        "patch-naive",
        lambda c: (
            "PATCH",
            f"/v1/admin/schedules/{c.exception['id']}",
            {"json": {"ends_at": "2026-12-01T13:00:00"}},
        ),
        "ends_at",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in NAIVE], ids=[i for i, _, _ in NAIVE]
)
async def test_datetime_without_offset_is_422(ctx: Ctx, case: Case, field: str) -> None:
    method, url, kwargs = case(ctx)
    await ctx.rejected(method, url, status=422, code="validation_error", fields=(field,), **kwargs)


@pytest.mark.parametrize(
    "zone",
    [
        "Mars/Olympus",
        "../../etc/passwd",
        "",
        "Asia/Nowhere",
        # files of a system's zoneinfo folder that are not IANA zone names
        "localtime",
        "posixrules",
        "Factory",
        "posix/Europe/London",
        "right/UTC",
        "europe/london",
        "Europe/London/",
        "/Europe/London",
    ],
)
async def test_unknown_timezone_is_422_on_create_and_update(ctx: Ctx, zone: str) -> None:
    await ctx.rejected(
        "POST",
        "/v1/admin/branches",
        status=422,
        code="validation_error",
        fields=("timezone",),
        json={"name": "Tz", "timezone": zone},
    )
    body = await ctx.rejected(
        "PATCH",
        f"/v1/admin/branches/{ctx.branch['id']}",
        status=422,
        code="validation_error",
        fields=("timezone",),
        json={"timezone": zone, "name": "Renamed with a bad zone"},
    )
    if zone:  # the message says what is expected
        assert any("IANA" in e["message"] for e in body["errors"]), body
    # a real IANA zone is accepted by the same route
    ok = await ctx.client.post(
        "/v1/admin/branches", json={"name": "Tz", "timezone": "Europe/London"}, headers=ctx.auth
    )
    assert ok.status_code == 201, ok.text
    assert ok.json()["timezone"] == "Europe/London"


ORDER: list[tuple[str, Case, str]] = [
    (
        "shift-end-before-start",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {"json": shift_body(c, start="17:00", end="09:00")},
        ),
        "end",
    ),
    (
        "shift-empty",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {"json": shift_body(c, start="09:00", end="09:00")},
        ),
        "end",
    ),
    (
        "shift-at-midnight-end",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {"json": shift_body(c, start="24:00", end="24:00")},
        ),
        "end",
    ),
    (
        "exception-ends-first",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {
                "json": exception_body(
                    c, starts_at="2026-12-03T12:00:00+08:00", ends_at="2026-12-03T09:00:00+08:00"
                )
            },
        ),
        "ends_at",
    ),
    (
        "exception-ends-first-across-offsets",
        # 10:00+08:00 is 02:00Z; 03:00+02:00 is 01:00Z: the end is earlier in real time
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {
                "json": exception_body(
                    c, starts_at="2026-12-03T10:00:00+08:00", ends_at="2026-12-03T03:00:00+02:00"
                )
            },
        ),
        "ends_at",
    ),
    (
        "hours-close-before-open",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {
                "json": {
                    "name": "B",
                    "timezone": "UTC",
                    "opening_hours": [{"weekday": 2, "opens": "17:00", "closes": "09:00"}],
                }
            },
        ),
        "opening_hours[0].closes",
    ),
    (
        "patch-hours-close-before-open",
        lambda c: (
            "PATCH",
            f"/v1/admin/branches/{c.branch['id']}",
            {"json": {"opening_hours": [{"weekday": 2, "opens": "17:00", "closes": "09:00"}]}},
        ),
        "opening_hours[0].closes",
    ),
    (
        "patch-shift-end-before-start",
        lambda c: ("PATCH", f"/v1/admin/schedules/{c.shift['id']}", {"json": {"end": "08:00"}}),
        "end",
    ),
    (
        "patch-exception-end-before-start",
        lambda c: (
            "PATCH",
            f"/v1/admin/schedules/{c.exception['id']}",
            {"json": {"ends_at": "2026-12-01T08:00:00+08:00"}},
        ),
        "ends_at",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in ORDER], ids=[i for i, _, _ in ORDER]
)
async def test_end_before_start_is_422(ctx: Ctx, case: Case, field: str) -> None:
    method, url, kwargs = case(ctx)
    await ctx.rejected(method, url, status=422, code="validation_error", fields=(field,), **kwargs)


async def test_overlapping_hours_and_repeated_closures_are_422(ctx: Ctx) -> None:
    await ctx.rejected(
        "POST",
        "/v1/admin/branches",
        status=422,
        code="validation_error",
        fields=("opening_hours",),
        json={
            "name": "B",
            "timezone": "UTC",
            "opening_hours": [
                {"weekday": 3, "opens": "09:00", "closes": "13:00"},
                {"weekday": 3, "opens": "12:00", "closes": "18:00"},
            ],
        },
    )
    await ctx.rejected(
        "PATCH",
        f"/v1/admin/branches/{ctx.branch['id']}",
        status=422,
        code="validation_error",
        fields=("closures[1].date",),
        json={"closures": [{"date": "2027-05-01"}, {"date": "2027-05-01", "reason": "again"}]},
    )


MONEY: list[tuple[str, Case, str]] = [
    (
        "negative-price",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, price_minor=-1)}),
        "price_minor",
    ),
    (
        "negative-deposit",
        lambda c: (
            "POST",
            "/v1/admin/services",
            {"json": service_body(c, price_minor=100, deposit_minor=-1)},
        ),
        "deposit_minor",
    ),
    (
        "deposit-above-price",
        lambda c: (
            "POST",
            "/v1/admin/services",
            {"json": service_body(c, price_minor=100, deposit_minor=101)},
        ),
        "deposit_minor",
    ),
    (
        "max-below-min-party",
        lambda c: (
            "POST",
            "/v1/admin/services",
            {"json": service_body(c, min_party=3, max_party=2)},
        ),
        "max_party",
    ),
    (
        "price-beyond-int64",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, price_minor=2**63)}),
        "price_minor",
    ),
    (
        "patch-deposit-above-stored-price",
        lambda c: (
            "PATCH",
            f"/v1/admin/services/{c.service['id']}",
            {"json": {"deposit_minor": 1001}},
        ),
        "deposit_minor",
    ),
    (
        "patch-price-below-stored-deposit",
        lambda c: (
            "PATCH",
            f"/v1/admin/services/{c.service['id']}",
            {"json": {"price_minor": 199}},
        ),
        "deposit_minor",
    ),
    (
        "patch-min-above-stored-max",
        lambda c: ("PATCH", f"/v1/admin/services/{c.service['id']}", {"json": {"min_party": 5}}),
        "max_party",
    ),
    (
        "patch-negative-price",
        lambda c: ("PATCH", f"/v1/admin/services/{c.service['id']}", {"json": {"price_minor": -5}}),
        "price_minor",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in MONEY], ids=[i for i, _, _ in MONEY]
)
async def test_price_deposit_and_party_rules_are_422(ctx: Ctx, case: Case, field: str) -> None:
    method, url, kwargs = case(ctx)
    await ctx.rejected(method, url, status=422, code="validation_error", fields=(field,), **kwargs)


async def test_deposit_equal_to_price_and_equal_party_limits_are_fine(ctx: Ctx) -> None:
    resp = await ctx.client.post(
        "/v1/admin/services",
        json=service_body(ctx, price_minor=500, deposit_minor=500, min_party=2, max_party=2),
        headers=ctx.auth,
    )
    assert resp.status_code == 201, resp.text


# --- overlapping shifts (database exclusion constraint) ----------------------


async def test_overlapping_shift_is_422_only_on_same_resource_and_weekday(ctx: Ctx) -> None:
    first = await new_resource(ctx, name="Overlap A")
    second = await new_resource(ctx, name="Overlap B")
    base = await new_shift(ctx, first["id"], 1, "09:00", "12:00")
    assert base.status_code == 201, base.text

    for start, end in [
        ("10:00", "11:00"),
        ("08:00", "09:30"),
        ("11:59", "13:00"),
        ("08:00", "13:00"),
    ]:
        body = await ctx.rejected(
            "POST",
            "/v1/admin/schedules",
            status=422,
            code="overlapping_shift",
            json={
                "kind": "shift",
                "resource_id": first["id"],
                "weekday": 1,
                "start": start,
                "end": end,
            },
        )
        assert body["errors"]

    # same hours on another weekday, or on another resource, are fine; touching is not overlapping
    assert (await new_shift(ctx, first["id"], 2, "09:00", "12:00")).status_code == 201
    assert (await new_shift(ctx, second["id"], 1, "09:00", "12:00")).status_code == 201
    adjacent = await new_shift(ctx, first["id"], 1, "12:00", "13:00")
    assert adjacent.status_code == 201, adjacent.text

    # moving an existing shift onto a taken slot is refused the same way, and leaves it as it was
    tuesday = (await new_shift(ctx, first["id"], 2, "14:00", "15:00")).json()
    await ctx.rejected(
        "PATCH",
        f"/v1/admin/schedules/{tuesday['id']}",
        status=422,
        code="overlapping_shift",
        json={"weekday": 1, "start": "11:00", "end": "12:30"},
    )

    # a deactivated shift no longer blocks its hours
    off = await ctx.client.post(
        f"/v1/admin/schedules/{base.json()['id']}/deactivate", headers=ctx.auth
    )
    assert off.status_code == 200, off.text
    again = await new_shift(ctx, first["id"], 1, "10:00", "11:00")
    assert again.status_code == 201, again.text


# --- references --------------------------------------------------------------


async def test_skills_must_be_active_services_of_the_same_branch(ctx: Ctx) -> None:
    retired = await create_service(ctx.client, ctx.token, ctx.branch["id"], name="Retired")
    off = await ctx.client.post(f"/v1/admin/services/{retired['id']}/deactivate", headers=ctx.auth)
    assert off.status_code == 200, off.text

    for skills in ([ctx.other_service["id"]], [ctx.service["id"], 999_999], [retired["id"]]):
        await ctx.rejected(
            "POST",
            "/v1/admin/resources",
            status=422,
            code="validation_error",
            fields=("skills",),
            json=resource_body(ctx, skills=skills),
        )
        await ctx.rejected(
            "PATCH",
            f"/v1/admin/resources/{ctx.resource['id']}",
            status=422,
            code="validation_error",
            fields=("skills",),
            json={"skills": skills, "name": "Renamed alongside bad skills"},
        )


async def test_queue_services_must_be_active_services_of_the_same_branch(ctx: Ctx) -> None:
    retired = await create_service(ctx.client, ctx.token, ctx.branch["id"], name="Retired Q")
    off = await ctx.client.post(f"/v1/admin/services/{retired['id']}/deactivate", headers=ctx.auth)
    assert off.status_code == 200, off.text

    for service_ids in (
        [ctx.other_service["id"]],
        [ctx.service["id"], ctx.other_service["id"]],
        [ctx.service["id"], 999_999],
        [retired["id"]],
    ):
        await ctx.rejected(
            "POST",
            "/v1/admin/queues",
            status=422,
            code="validation_error",
            fields=("service_ids",),
            json=queue_body(ctx, service_ids=service_ids),
        )
        await ctx.rejected(
            "PATCH",
            f"/v1/admin/queues/{ctx.queue['id']}",
            status=422,
            code="validation_error",
            fields=("service_ids",),
            json={"service_ids": service_ids, "name": "Renamed alongside bad services"},
        )


async def test_duplicate_active_queue_prefix_is_409(ctx: Ctx) -> None:
    await ctx.rejected(
        "POST",
        "/v1/admin/queues",
        status=409,
        code="already_exists",
        fields=("prefix",),
        json=queue_body(ctx, prefix=ctx.queue["prefix"]),
    )
    second = await ctx.client.post(
        "/v1/admin/queues", json=queue_body(ctx, prefix="DQ"), headers=ctx.auth
    )
    assert second.status_code == 201, second.text
    await ctx.rejected(
        "PATCH",
        f"/v1/admin/queues/{second.json()['id']}",
        status=409,
        code="already_exists",
        fields=("prefix",),
        json={"prefix": ctx.queue["prefix"], "name": "Renamed alongside a taken prefix"},
    )


MISSING_REFS: list[tuple[str, Case, str]] = [
    (
        "service-branch",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, branch_id=999_999)}),
        "branch_id",
    ),
    (
        "resource-branch",
        lambda c: ("POST", "/v1/admin/resources", {"json": resource_body(c, branch_id=999_999)}),
        "branch_id",
    ),
    (
        "device-branch",
        lambda c: (
            "POST",
            "/v1/admin/devices",
            {"json": {"branch_id": 999_999, "name": "K"}},
        ),
        "branch_id",
    ),
    (
        "staff-branches",
        lambda c: (
            "POST",
            "/v1/admin/staff",
            {"json": staff_body(role="manager", branch_ids=[c.branch["id"], 999_999])},
        ),
        "branch_ids",
    ),
    (
        "manager-without-branch",
        lambda c: ("POST", "/v1/admin/staff", {"json": staff_body(role="manager")}),
        "branch_ids",
    ),
    (
        "schedule-resource",
        lambda c: ("POST", "/v1/admin/schedules", {"json": shift_body(c, resource_id=999_999)}),
        "resource_id",
    ),
    (
        "queue-branch",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, branch_id=999_999)}),
        "branch_id",
    ),
    (
        "queue-service",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, service_ids=[999_999])}),
        "service_ids",
    ),
    (
        "branch-id-zero",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, branch_id=0)}),
        "branch_id",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in MISSING_REFS], ids=[i for i, _, _ in MISSING_REFS]
)
async def test_reference_to_missing_record_is_422(ctx: Ctx, case: Case, field: str) -> None:
    method, url, kwargs = case(ctx)
    await ctx.rejected(method, url, status=422, code="validation_error", fields=(field,), **kwargs)


async def test_reference_to_deactivated_branch_is_422_inactive_reference(ctx: Ctx) -> None:
    closed = await create_branch(ctx.client, ctx.token, name="Closed Hall")
    off = await ctx.client.post(f"/v1/admin/branches/{closed['id']}/deactivate", headers=ctx.auth)
    assert off.status_code == 200, off.text
    await ctx.rejected(
        "POST",
        "/v1/admin/services",
        status=422,
        code="inactive_reference",
        fields=("branch_id",),
        json=service_body(ctx, branch_id=closed["id"]),
    )
    await ctx.rejected(
        "POST",
        "/v1/admin/devices",
        status=422,
        code="inactive_reference",
        fields=("branch_id",),
        json={"branch_id": closed["id"], "name": "K"},
    )
    await ctx.rejected(
        "POST",
        "/v1/admin/queues",
        status=422,
        code="inactive_reference",
        fields=("branch_id",),
        json=queue_body(ctx, branch_id=closed["id"]),
    )


async def test_duplicate_staff_email_is_409_whatever_its_case(ctx: Ctx) -> None:
    first = await ctx.client.post(
        "/v1/admin/staff", json=staff_body(email="Dup.Person@Example.test"), headers=ctx.auth
    )
    assert first.status_code == 201, first.text
    await ctx.rejected(
        "POST",
        "/v1/admin/staff",
        status=409,
        code="already_exists",
        json=staff_body(email="dup.person@example.test"),
    )


# --- values PostgreSQL cannot hold ---------------------------------------------

UNSTORABLE: list[tuple[str, Case, str]] = [
    (
        "service-branch-beyond-int64",
        lambda c: ("POST", "/v1/admin/services", {"json": service_body(c, branch_id=2**63)}),
        "branch_id",
    ),
    (
        "skill-beyond-int64",
        lambda c: ("POST", "/v1/admin/resources", {"json": resource_body(c, skills=[2**63])}),
        "skills[0]",
    ),
    (
        "staff-branch-beyond-int64",
        lambda c: (
            "POST",
            "/v1/admin/staff",
            {"json": staff_body(role="manager", branch_ids=[2**63])},
        ),
        "branch_ids[0]",
    ),
    (
        "schedule-resource-beyond-int64",
        lambda c: ("POST", "/v1/admin/schedules", {"json": shift_body(c, resource_id=2**63)}),
        "resource_id",
    ),
    (
        "queue-service-beyond-int64",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, service_ids=[2**63])}),
        "service_ids[0]",
    ),
    (
        "nul-in-queue-name",
        lambda c: ("POST", "/v1/admin/queues", {"json": queue_body(c, name="a\x00b")}),
        "body",
    ),
    (
        "nul-in-name",
        lambda c: ("POST", "/v1/admin/branches", {"json": {"name": "a\x00b", "timezone": "UTC"}}),
        "body",
    ),
    (
        "nul-in-closure-reason",
        lambda c: (
            "POST",
            "/v1/admin/branches",
            {
                "json": {
                    "name": "B",
                    "timezone": "UTC",
                    "closures": [{"date": "2027-03-01", "reason": "x\x00"}],
                }
            },
        ),
        "body",
    ),
    (
        "nul-in-email",
        lambda c: ("POST", "/v1/admin/staff", {"json": staff_body(email="nul\x00@example.test")}),
        "body",
    ),
    (
        "nul-in-patch",
        lambda c: (
            "PATCH",
            f"/v1/admin/services/{c.service['id']}",
            {"json": {"description": "x\x00y"}},
        ),
        "body",
    ),
    (
        "instant-before-year-one",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {"json": exception_body(c, starts_at="0001-01-01T00:00:00+14:00")},
        ),
        "starts_at",
    ),
    (
        "instant-after-year-9999",
        lambda c: (
            "POST",
            "/v1/admin/schedules",
            {"json": exception_body(c, ends_at="9999-12-31T23:00:00-14:00")},
        ),
        "ends_at",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in UNSTORABLE], ids=[i for i, _, _ in UNSTORABLE]
)
async def test_values_the_database_cannot_hold_are_422(ctx: Ctx, case: Case, field: str) -> None:
    method, url, kwargs = case(ctx)
    await ctx.rejected(method, url, status=422, code="validation_error", fields=(field,), **kwargs)


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/branches/99999999999999999999", "branch_id"),
        ("/v1/branches/9223372036854775808/services", "branch_id"),
        ("/v1/admin/branches/9223372036854775808", "branch_id"),
        ("/v1/admin/services/9223372036854775808", "service_id"),
        ("/v1/admin/resources/9223372036854775808", "resource_id"),
        ("/v1/admin/schedules/9223372036854775808", "schedule_id"),
        ("/v1/admin/queues/9223372036854775808", "queue_id"),
        ("/v1/admin/devices/9223372036854775808", "device_id"),
        ("/v1/admin/staff/9223372036854775808", "staff_id"),
    ],
)
async def test_ids_beyond_int64_in_the_path_are_422(ctx: Ctx, path: str, field: str) -> None:
    resp = await ctx.client.get(path, headers=ctx.auth)
    assert field in fields_of(assert_problem(resp, 422, "validation_error"))
    if path.startswith("/v1/admin/"):
        await ctx.rejected(
            "PATCH", path, status=422, code="validation_error", fields=(field,), json={}
        )
        await ctx.rejected(
            "POST", f"{path}/deactivate", status=422, code="validation_error", fields=(field,)
        )
    # the largest id PostgreSQL can hold is simply not there
    largest = path.replace("9223372036854775808", str(INT64_MAX)).replace(
        "99999999999999999999", str(INT64_MAX)
    )
    assert_problem(await ctx.client.get(largest, headers=ctx.auth), 404, "not_found")


# --- query parameters ----------------------------------------------------------

QUERY_CASES: list[tuple[str, str, str]] = [
    ("limit-zero", "limit=0", "limit"),
    ("limit-500", "limit=500", "limit"),
    ("limit-negative", "limit=-1", "limit"),
    ("limit-word", "limit=ten", "limit"),
    ("cursor-garbage", "cursor=garbage", "cursor"),
    ("cursor-punctuation", "cursor=%21%21%21", "cursor"),
    ("cursor-negative", f"cursor={cursor_of('-5')}", "cursor"),
    ("cursor-not-a-number", f"cursor={cursor_of('ten')}", "cursor"),
    ("cursor-beyond-int64", f"cursor={cursor_of(str(INT64_MAX + 1))}", "cursor"),
    ("cursor-huge", f"cursor={cursor_of('9' * 40)}", "cursor"),
]
ADMIN_ONLY_QUERY: list[tuple[str, str, str]] = [
    ("branch-filter-zero", "branch_id=0", "branch_id"),
    ("branch-filter-word", "branch_id=main", "branch_id"),
    ("branch-filter-beyond-int64", f"branch_id={INT64_MAX + 1}", "branch_id"),
    ("include-inactive-word", "include_inactive=maybe", "include_inactive"),
]
PUBLIC_LISTS: list[Callable[[Ctx], str]] = [
    lambda c: "/v1/branches",
    lambda c: f"/v1/branches/{c.branch['id']}/services",
]
ADMIN_LISTS = [
    "/v1/admin/services",
    "/v1/admin/resources",
    "/v1/admin/schedules",
    "/v1/admin/queues",
    "/v1/admin/devices",
    "/v1/admin/staff",
]


@pytest.mark.parametrize(
    ("query", "field"), [(q, f) for _, q, f in QUERY_CASES], ids=[i for i, _, _ in QUERY_CASES]
)
async def test_bad_paging_parameters_are_422_on_every_list(
    ctx: Ctx, query: str, field: str
) -> None:
    urls = [u(ctx) for u in PUBLIC_LISTS] + ["/v1/admin/branches", *ADMIN_LISTS]
    for url in urls:
        resp = await ctx.client.get(f"{url}?{query}", headers=ctx.auth)
        body = assert_problem(resp, 422, "validation_error")
        assert field in fields_of(body), (url, body)


@pytest.mark.parametrize(
    ("query", "field"),
    [(q, f) for _, q, f in ADMIN_ONLY_QUERY],
    ids=[i for i, _, _ in ADMIN_ONLY_QUERY],
)
async def test_bad_filters_are_422(ctx: Ctx, query: str, field: str) -> None:
    for url in ADMIN_LISTS:
        resp = await ctx.client.get(f"{url}?{query}", headers=ctx.auth)
        body = assert_problem(resp, 422, "validation_error")
        assert field in fields_of(body), (url, body)


async def test_paging_bounds_are_inclusive(ctx: Ctx) -> None:
    for query in ("limit=1", "limit=200", "cursor="):
        resp = await ctx.client.get(f"/v1/branches?{query}")
        assert resp.status_code == 200, resp.text


# --- language of the detail ------------------------------------------------------


async def _error_responses(ctx: Ctx, headers: dict[str, str]) -> list[httpx.Response]:
    c = ctx.client
    json_headers = {**headers, "content-type": "application/json"}
    return [
        await c.post(
            "/v1/admin/branches",
            json={"name": "Tz", "timezone": "Mars/Olympus"},
            headers={**ctx.auth, **headers},
        ),
        await c.post(
            "/v1/admin/branches", content=b'{"name": ', headers={**ctx.auth, **json_headers}
        ),
        await c.get("/v1/branches/999999", headers=headers),
        await c.get("/v1/admin/branches", headers=headers),
        await c.delete(f"/v1/admin/branches/{ctx.branch['id']}", headers={**ctx.auth, **headers}),
        await c.post(
            "/v1/admin/branches",
            content=_big_json(2 * 1024 * 1024),
            headers={**ctx.auth, **json_headers},
        ),
    ]


async def test_detail_follows_accept_language(ctx: Ctx) -> None:
    before = await snapshot(ctx.pool)
    english = await _error_responses(ctx, {})
    chinese = await _error_responses(ctx, {"Accept-Language": "zh-CN"})
    assert [r.status_code for r in english] == [422, 400, 404, 401, 405, 413]
    assert [r.status_code for r in chinese] == [422, 400, 404, 401, 405, 413]
    for en, zh in zip(english, chinese, strict=True):
        en_body = assert_problem(en, en.status_code, en.json()["code"])
        zh_body = assert_problem(zh, zh.status_code, en_body["code"])
        assert en.headers["content-language"] == "en"
        assert zh.headers["content-language"] == "zh-CN"
        assert en_body["detail"].isascii()
        assert CJK.search(zh_body["detail"]), zh_body
        assert zh_body["detail"] != en_body["detail"]
        # only the human text changes; the machine-readable parts stay put
        assert zh_body["code"] == en_body["code"]
        assert zh_body["type"] == en_body["type"]
        assert zh_body.get("errors") == en_body.get("errors")
    assert (await snapshot(ctx.pool)).rows == before.rows


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("zh-CN", "zh-CN"),
        ("zh", "zh-CN"),
        ("zh-Hans-CN,zh;q=0.9,en;q=0.8", "zh-CN"),
        ("en-US,zh-CN;q=0.5", "en"),
        ("fr-FR,zh-CN;q=0.3", "zh-CN"),
        ("fr-FR", "en"),
        ("en", "en"),
        ("garbage;;q=x", "en"),
    ],
)
async def test_accept_language_negotiation(ctx: Ctx, header: str, expected: str) -> None:
    resp = await ctx.client.get("/v1/branches/999999", headers={"Accept-Language": header})
    body = assert_problem(resp, 404, "not_found")
    assert resp.headers["content-language"] == expected
    assert bool(CJK.search(body["detail"])) == (expected == "zh-CN")


# --- hostile input on the booking side, before and after sign-in -------------------------


@dataclass
class Booker:
    """A bookable service, a customer with one booking, a kiosk and staff."""

    ctx: Ctx
    branch_id: int
    service_id: int
    customer: str
    kiosk: str
    booking_id: int
    queue_id: int

    async def rejected(
        self,
        method: str,
        url: str,
        token: str | None,
        *,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        headers = {**(headers or {}), **({"Authorization": f"Bearer {token}"} if token else {})}
        before = await snapshot(self.ctx.pool)
        resp = await self.ctx.client.request(method, url, headers=headers, **kwargs)
        assert resp.status_code < 500, resp.text
        body = assert_problem(resp, resp.status_code, resp.json()["code"])
        after = await snapshot(self.ctx.pool)
        assert after.rows == before.rows, (method, url)
        return body


@pytest.fixture(scope="module")
async def booker(ctx: Ctx, module_env: ModuleEnv) -> Booker:
    bid, sid, _ = await seed(ctx.pool, max_party=4)
    _, _, customer_token = await customer(ctx.pool, module_env)
    kiosk_token = await kiosk(ctx.pool, module_env, bid)
    made = await book(ctx.client, customer_token, bid, sid, at_hour(2))
    assert made.status_code == 201, made.text
    queue = await ctx.client.post(
        "/v1/admin/queues",
        json={"branch_id": bid, "name": "Walk-ins", "prefix": "W", "service_ids": [sid]},
        headers=ctx.auth,
    )
    assert queue.status_code == 201, queue.text
    return Booker(ctx, bid, sid, customer_token, kiosk_token, made.json()["id"], queue.json()["id"])


# Every JSON-reading operation, as (id, method, url, who): who is "none", "customer",
# "kiosk" or "admin". Deep nesting is refused before the body is looked at.
BODY_TARGETS: list[tuple[str, str, Callable[[Booker], str], str]] = [
    ("staff-login", "POST", lambda b: "/v1/auth/staff/login", "none"),
    ("device-login", "POST", lambda b: "/v1/auth/device", "none"),
    ("refresh", "POST", lambda b: "/v1/auth/refresh", "none"),
    ("otp", "POST", lambda b: "/v1/auth/otp", "none"),
    ("token", "POST", lambda b: "/v1/auth/token", "none"),
    ("hold", "POST", lambda b: "/v1/holds", "customer"),
    ("booking", "POST", lambda b: "/v1/bookings", "customer"),
    ("reschedule", "POST", lambda b: f"/v1/bookings/{b.booking_id}/reschedule", "customer"),
    ("waitlist", "POST", lambda b: "/v1/waitlist", "customer"),
    ("ticket", "POST", lambda b: "/v1/tickets", "kiosk"),
    ("check-in", "POST", lambda b: "/v1/check-ins", "kiosk"),
    ("branch", "POST", lambda b: "/v1/admin/branches", "admin"),
    ("patch-service", "PATCH", lambda b: f"/v1/admin/services/{b.service_id}", "admin"),
]


def _token(b: Booker, who: str) -> str | None:
    return {"none": None, "customer": b.customer, "kiosk": b.kiosk, "admin": b.ctx.token}[who]


DEEP_BODIES = [
    pytest.param(b"[" * 1000 + b"]" * 1000, id="array-1000"),
    pytest.param(b'{"a":' * 1000 + b"1" + b"}" * 1000, id="object-1000"),
    pytest.param(b'{"name": ' + b"[" * 33 + b"]" * 33 + b"}", id="array-33-in-a-field"),
    pytest.param(b'{"x": ' + b'[{"a": ' * 20 + b"1" + b"}]" * 20 + b"}", id="mixed-41"),
    pytest.param(b"[" * 100_000, id="unclosed-100000"),
]


@pytest.mark.parametrize("raw", DEEP_BODIES)
@pytest.mark.parametrize(
    ("method", "url", "who"),
    [(m, u, w) for _, m, u, w in BODY_TARGETS],
    ids=[i for i, _, _, _ in BODY_TARGETS],
)
async def test_deeply_nested_json_is_400_everywhere(
    booker: Booker, method: str, url: Callable[[Booker], str], who: str, raw: bytes
) -> None:
    body = await booker.rejected(
        method,
        url(booker),
        _token(booker, who),
        content=raw,
        headers={"content-type": "application/json"},
    )
    assert (body["status"], body["code"]) == (400, "body_too_deep"), body


async def test_brackets_inside_strings_do_not_count_as_nesting(booker: Booker) -> None:
    # 40 levels of brackets, all inside a string: an ordinary (too long) password
    body = await booker.rejected(
        "POST",
        "/v1/auth/staff/login",
        None,
        json={"email": "x@example.test", "password": "[{" * 20 + '\\"' + "}]" * 20},
    )
    assert body["code"] != "body_too_deep"
    # and 32 levels are still read (then refused for what they say)
    nested = b'{"name": "B", "timezone": "UTC", "x": ' + b"[" * 31 + b"]" * 31 + b"}"
    body = await booker.rejected(
        "POST",
        "/v1/admin/branches",
        booker.ctx.token,
        content=nested,
        headers={"content-type": "application/json"},
    )
    assert (body["status"], fields_of(body)) == (422, ["x"]), body


EDGE_INSTANTS = [
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T00:00:00Z",
    "0001-01-01T23:59:59-14:00",
    "9999-12-31T23:59:59-14:00",
    "9999-12-31T23:59:59Z",
    "9999-12-31T00:00:00+14:00",
    "1969-12-31T23:59:59Z",
    "3000-01-01T00:00:00Z",
]
EDGE_DATES = ["0001-01-01", "9999-12-31", "1969-12-31", "3000-01-01"]


def _instant_targets(
    b: Booker, value: str
) -> list[tuple[str, str, str | None, dict[str, Any], str]]:
    start = {"branch_id": b.branch_id, "service_id": b.service_id, "start": value}
    exc = {
        "kind": "exception",
        "resource_id": b.ctx.resource["id"],
        "starts_at": "2030-01-01T09:00:00Z",
        "ends_at": "2030-01-01T10:00:00Z",
    }
    return [
        ("POST", "/v1/holds", b.customer, start, "start"),
        ("POST", "/v1/holds", b.kiosk, {**start, "party_size": 2}, "start"),
        ("POST", "/v1/bookings", b.customer, start, "start"),
        ("POST", "/v1/bookings", b.kiosk, {**start, "phone": "+447911123456"}, "start"),
        ("POST", f"/v1/bookings/{b.booking_id}/reschedule", b.customer, {"start": value}, "start"),
        ("POST", "/v1/admin/schedules", b.ctx.token, {**exc, "starts_at": value}, "starts_at"),
        ("POST", "/v1/admin/schedules", b.ctx.token, {**exc, "ends_at": value}, "ends_at"),
        (
            "PATCH",
            f"/v1/admin/schedules/{b.ctx.exception['id']}",
            b.ctx.token,
            {"ends_at": value},
            "ends_at",
        ),
    ]


@pytest.mark.parametrize("value", EDGE_INSTANTS)
async def test_instants_at_the_edges_of_the_calendar_are_422_naming_the_field(
    booker: Booker, value: str
) -> None:
    for method, url, token, json_body, field in _instant_targets(booker, value):
        body = await booker.rejected(method, url, token, json=json_body)
        assert body["status"] == 422, (url, body)
        errors = {e["field"]: e["message"] for e in body["errors"]}
        assert field in errors, (url, body)
        assert "1970-01-01T00:00:00Z" in errors[field], errors
        assert "2999-12-31T23:59:59Z" in errors[field], errors
    # the same instants as availability's query parameters
    for name in ("from", "to"):
        query = {
            "branch_id": booker.branch_id,
            "service_id": booker.service_id,
            "from": "2030-01-01T00:00:00Z",
            "to": "2030-01-02T00:00:00Z",
            name: value,
        }
        resp = await booker.ctx.client.get("/v1/availability", params=query)
        body = assert_problem(resp, 422, "validation_error")
        assert name in fields_of(body), body


@pytest.mark.parametrize("value", EDGE_DATES)
async def test_dates_at_the_edges_of_the_calendar_are_422_naming_the_field(
    booker: Booker, value: str
) -> None:
    wait = {
        "branch_id": booker.branch_id,
        "service_id": booker.service_id,
        "date": value,
        "earliest": "09:00",
        "latest": "10:00",
    }
    body = await booker.rejected("POST", "/v1/waitlist", booker.customer, json=wait)
    assert (body["status"], fields_of(body)) == (422, ["date"]), body
    assert "between 1970-01-01 and 2999-12-31" in body["errors"][0]["message"]
    closure = {"name": "B", "timezone": "UTC", "closures": [{"date": value}]}
    body = await booker.rejected("POST", "/v1/admin/branches", booker.ctx.token, json=closure)
    assert (body["status"], fields_of(body)) == (422, ["closures[0].date"]), body


async def test_the_last_supported_instant_is_not_a_server_error(booker: Booker) -> None:
    # inside the range but beyond the booking horizon: refused for that, not for overflow
    for value in ("2999-12-31T23:59:59Z", "2999-12-31T09:59:59-14:00", "1970-01-01T00:00:00Z"):
        start = {"branch_id": booker.branch_id, "service_id": booker.service_id, "start": value}
        for url in ("/v1/holds", "/v1/bookings"):
            body = await booker.rejected("POST", url, booker.customer, json=start)
            assert body["status"] in (409, 422), body
        body = await booker.rejected(
            "POST",
            f"/v1/bookings/{booker.booking_id}/reschedule",
            booker.customer,
            json={"start": value},
        )
        assert body["status"] in (409, 422), body
    # availability over the last and first days of the range, and the waitlist there
    for start, end in (
        ("2999-12-01T00:00:00+14:00", "2999-12-31T23:59:59Z"),
        ("1970-01-01T00:00:00Z", "1970-01-31T00:00:00-14:00"),
    ):
        resp = await booker.ctx.client.get(
            "/v1/availability",
            params={
                "branch_id": booker.branch_id,
                "service_id": booker.service_id,
                "from": start,
                "to": end,
            },
        )
        assert resp.status_code in (200, 422), resp.text
    for day in ("2999-12-31", "1970-01-01"):
        wait = {
            "branch_id": booker.branch_id,
            "service_id": booker.service_id,
            "date": day,
            "earliest": "00:00",
            "latest": "23:59",
        }
        body = await booker.rejected("POST", "/v1/waitlist", booker.customer, json=wait)
        assert body["status"] in (409, 422), body


# JSON types are strict: a string is not a number, a number not a boolean.
STRICT: list[tuple[str, Callable[[Booker], tuple[str, str, str | None, dict[str, Any]]], str]] = [
    (
        "party-size-string",
        lambda b: (
            "POST",
            "/v1/holds",
            b.customer,
            {
                "branch_id": b.branch_id,
                "service_id": b.service_id,
                "start": iso(at_hour(3)),
                "party_size": "2",
            },
        ),
        "party_size",
    ),
    (
        "branch-id-string",
        lambda b: (
            "POST",
            "/v1/bookings",
            b.customer,
            {"branch_id": str(b.branch_id), "service_id": b.service_id, "start": iso(at_hour(3))},
        ),
        "branch_id",
    ),
    ("hold-id-string", lambda b: ("POST", "/v1/bookings", b.customer, {"hold_id": "1"}), "hold_id"),
    (
        "party-size-float",
        lambda b: (
            "POST",
            "/v1/waitlist",
            b.customer,
            {
                "branch_id": b.branch_id,
                "service_id": b.service_id,
                "date": "2030-01-01",
                "earliest": "09:00",
                "latest": "10:00",
                "party_size": 2.0,
            },
        ),
        "party_size",
    ),
    (
        "queue-id-string",
        lambda b: ("POST", "/v1/tickets", b.kiosk, {"queue_id": str(b.queue_id)}),
        "queue_id",
    ),
    (
        "available-string",
        lambda b: (
            "PATCH",
            f"/v1/admin/schedules/{b.ctx.exception['id']}",
            b.ctx.token,
            {"available": "true"},
        ),
        "available",
    ),
    (
        "weekday-string",
        lambda b: (
            "POST",
            "/v1/admin/branches",
            b.ctx.token,
            {
                "name": "B",
                "timezone": "UTC",
                "opening_hours": [{"weekday": "1", "opens": "09:00", "closes": "10:00"}],
            },
        ),
        "opening_hours[0].weekday",
    ),
    (
        "capacity-bool",
        lambda b: (
            "PATCH",
            f"/v1/admin/resources/{b.ctx.resource['id']}",
            b.ctx.token,
            {"capacity": True},
        ),
        "capacity",
    ),
    (
        "reserve-string",
        lambda b: (
            "PATCH",
            f"/v1/admin/branches/{b.branch_id}",
            b.ctx.token,
            {"walk_in_reserve": "0.5"},
        ),
        "walk_in_reserve",
    ),
]


@pytest.mark.parametrize(
    ("case", "field"), [(c, f) for _, c, f in STRICT], ids=[i for i, _, _ in STRICT]
)
async def test_json_bodies_are_typed_strictly(
    booker: Booker,
    case: Callable[[Booker], tuple[str, str, str | None, dict[str, Any]]],
    field: str,
) -> None:
    method, url, token, json_body = case(booker)
    body = await booker.rejected(method, url, token, json=json_body)
    assert body["status"] == 422, body
    assert field in fields_of(body), body


async def test_a_422_lists_every_bad_field_of_a_body(booker: Booker) -> None:
    body = await booker.rejected(
        "POST",
        "/v1/holds",
        booker.customer,
        json={"branch_id": "1", "start": "2030-03-04", "party_size": 0, "colour": "red"},
    )
    assert sorted(fields_of(body)) == ["branch_id", "colour", "party_size", "service_id", "start"]
    by_field = {e["field"]: e["message"] for e in body["errors"]}
    assert "service_id" in by_field["service_id"]  # names the missing field
    # a date without a time says what is expected, with an example
    assert "2030-03-04T10:00:00+08:00" in by_field["start"], by_field
    body = await booker.rejected("POST", "/v1/admin/queues", booker.ctx.token, json={})
    assert sorted(fields_of(body)) == ["branch_id", "name", "prefix", "service_ids"]
    body = await booker.rejected(
        "POST",
        "/v1/admin/schedules",
        booker.ctx.token,
        json={"kind": "exception", "starts_at": "2030-01-01T09:00:00", "available": 1},
    )
    assert sorted(fields_of(body)) == ["available", "ends_at", "resource_id", "starts_at"]
    # a missing tag, and a missing field of a nested object, are named where they belong
    body = await booker.rejected(
        "POST", "/v1/admin/schedules", booker.ctx.token, json={"resource_id": 1}
    )
    assert fields_of(body) == ["kind"], body
    body = await booker.rejected(
        "POST",
        "/v1/admin/branches",
        booker.ctx.token,
        json={"name": "B", "timezone": "UTC", "opening_hours": [{"weekday": 1, "opens": "09:00"}]},
    )
    assert fields_of(body) == ["opening_hours[0].closes"], body


async def test_a_422_lists_every_bad_query_parameter_by_its_public_name(booker: Booker) -> None:
    c = booker.ctx.client
    body = assert_problem(await c.get("/v1/availability"), 422, "validation_error")
    assert sorted(fields_of(body)) == ["branch_id", "from", "service_id", "to"]
    body = assert_problem(
        await c.get(
            "/v1/availability",
            params={"branch_id": "x", "service_id": 0, "from": "2030-03-04", "party_size": 0},
        ),
        422,
        "validation_error",
    )
    assert sorted(fields_of(body)) == ["branch_id", "from", "party_size", "service_id", "to"]
    by_field = {e["field"]: e["message"] for e in body["errors"]}
    assert "2030-03-04T10:00:00+08:00" in by_field["from"]
    assert "window_from" not in str(body)
    assert "window_to" not in str(body)
    # present but without an offset
    body = assert_problem(
        await c.get(
            "/v1/availability",
            params={
                "branch_id": booker.branch_id,
                "service_id": booker.service_id,
                "from": "2030-03-04T10:00:00",
                "to": "2030-03-05T10:00:00",
            },
        ),
        422,
        "validation_error",
    )
    assert sorted(fields_of(body)) == ["from", "to"]
    assert all("offset" in e["message"] for e in body["errors"]), body


# Cursors are opaque: only what the API issued is accepted, anything else a 422.
ODD_CURSORS = [
    pytest.param("\u0662\u0663", id="arabic-indic-digits"),
    pytest.param(cursor_of("\u0662\u0663"), id="encoded-arabic-indic-digits"),
    pytest.param("\u00b2", id="superscript-two"),
    pytest.param(cursor_of("\u00b2"), id="encoded-superscript"),
    pytest.param("9" * 5000, id="five-thousand-digits"),
    pytest.param(cursor_of("9" * 5000), id="encoded-five-thousand-digits"),
    pytest.param(cursor_of(" 12"), id="encoded-space"),
    pytest.param(cursor_of("+12"), id="encoded-plus"),
    pytest.param(cursor_of("1_000"), id="encoded-underscore"),
    pytest.param(cursor_of("012"), id="encoded-leading-zero"),
    pytest.param(cursor_of("12") + "==", id="padded"),
    pytest.param("MTI", id="plain-twelve-is-not-a-cursor-of-bookings"),
    pytest.param("%00", id="nul"),
    pytest.param("\udcff", id="lone-surrogate"),
    pytest.param("12", id="bare-number"),
]


@pytest.mark.parametrize("cursor", ODD_CURSORS)
async def test_odd_cursors_are_422_on_every_list(booker: Booker, cursor: str) -> None:
    c = booker.ctx.client
    lists = [
        ("/v1/bookings", booker.customer),
        ("/v1/waitlist", booker.customer),
        ("/v1/branches", None),
        (f"/v1/branches/{booker.branch_id}/services", None),
        ("/v1/admin/branches", booker.ctx.token),
        ("/v1/admin/services", booker.ctx.token),
        ("/v1/admin/staff", booker.ctx.token),
        ("/v1/admin/messages", booker.ctx.token),
    ]
    for url, token in lists:
        headers = bearer(token) if token else {}
        try:
            resp = await c.get(url, params={"cursor": cursor}, headers=headers)
        except UnicodeEncodeError:  # a lone surrogate cannot even be sent
            return
        if cursor == "MTI" and resp.status_code == 200:
            continue  # a well-formed cursor of id 12: fine anywhere
        body = assert_problem(resp, 422, "validation_error")
        assert fields_of(body) == ["cursor"], (url, body)


async def test_cursors_of_bookings_and_waitlist_are_opaque_and_round_trip(booker: Booker) -> None:
    c = booker.ctx.client
    for n in range(2):
        made = await book(c, booker.customer, booker.branch_id, booker.service_id, at_hour(3 + n))
        assert made.status_code == 201, made.text
    seen: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 1, **({"cursor": cursor} if cursor else {})}
        page = await c.get("/v1/bookings", params=params, headers=bearer(booker.customer))
        assert page.status_code == 200, page.text
        seen += [item["id"] for item in page.json()["items"]]
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
        assert not cursor.isdigit(), "a cursor is not the bare id"
    assert seen == sorted(seen, reverse=True)
    assert len(seen) == len(set(seen)) >= 3


# --- webhooks: the signature is checked before the form is read --------------------------

HOOK_BODIES = [
    pytest.param(b"\xff\xfe\x00\x01", id="not-utf8"),
    pytest.param(b"From=%FF%FE&Body=x&MessageSid=SM1", id="percent-not-utf8"),
    pytest.param(b"From=" + "é".encode("latin-1") + b"&MessageSid=SM1", id="latin1"),
    pytest.param(b"MessageSid=SM1&MessageSid=SM2&From=%2B447911123456", id="repeated"),
    pytest.param(b"", id="empty"),
    pytest.param(b'{"From": "+447911123456"}', id="json"),
    pytest.param(b"a=" + b"[" * 5000, id="brackets"),
    pytest.param(b"&" * 100_000, id="many-separators"),
]


@pytest.mark.parametrize("raw", HOOK_BODIES)
@pytest.mark.parametrize("path", ["/v1/webhooks/twilio/sms", "/v1/webhooks/twilio/status"])
@pytest.mark.parametrize(
    "signature",
    [None, "", "bm90IGEgc2lnbmF0dXJl", "\u00e9"],
    ids=["none", "empty", "wrong", "latin1"],
)
async def test_unsigned_or_badly_signed_webhooks_are_403_whatever_the_body(
    module_env: ModuleEnv,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    ctx: Ctx,
    path: str,
    raw: bytes,
    signature: str | None,
) -> None:
    settings = settings_with(
        module_env, twilio_auth_token="hook-token", public_base_url="https://hall.example"
    )
    app = create_app(settings, pool=pool, redis=redis)
    headers: dict[str, Any] = {"content-type": "application/x-www-form-urlencoded"}
    if signature is not None:
        headers["x-twilio-signature"] = signature.encode("latin-1")
    before = await snapshot(pool)
    async with AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver.local"
    ) as c:
        resp = await c.post(path, content=raw, headers=headers)
    assert_problem(resp, 403, "invalid_signature")
    assert (await snapshot(pool)).rows == before.rows


async def test_a_signed_webhook_with_a_non_utf8_body_is_403(
    module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis, ctx: Ctx
) -> None:
    from twilio.request_validator import RequestValidator

    url = "https://hall.example/v1/webhooks/twilio/sms"
    settings = settings_with(
        module_env, twilio_auth_token="hook-token", public_base_url="https://hall.example"
    )
    app = create_app(settings, pool=pool, redis=redis)
    raw = b"MessageSid=SM9&From=%2B447911123456&Body=caf\xe9"
    # what a sender would sign if it read the bytes as Latin-1
    params = {"MessageSid": "SM9", "From": "+447911123456", "Body": "caf\u00e9"}
    signature = RequestValidator("hook-token").compute_signature(url, params)
    before = await snapshot(pool)
    async with AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://testserver.local"
    ) as c:
        resp = await c.post(
            "/v1/webhooks/twilio/sms",
            content=raw,
            headers={
                "content-type": "application/x-www-form-urlencoded",
                "x-twilio-signature": signature,
            },
        )
    assert_problem(resp, 403, "invalid_signature")
    assert (await snapshot(pool)).rows == before.rows


# --- unknown paths ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/schema/redoc", 404, "not_found"),
        ("GET", "/schema/elements", 404, "not_found"),
        ("GET", "/schema/rapidoc", 404, "not_found"),
        ("GET", "/schema/openapi.yaml", 404, "not_found"),
        ("GET", "/schema/nothing/here", 404, "not_found"),
        ("GET", "/nope", 404, "not_found"),
        ("GET", "/v1/nope", 404, "not_found"),
        ("GET", "/docs/static/nothing.js", 404, "not_found"),
        ("POST", "/health", 405, "method_not_allowed"),
        ("DELETE", "/v1/branches", 405, "method_not_allowed"),
        ("GET", "/v1/branches/%FF", 404, "not_found"),
    ],
)
async def test_unknown_paths_answer_problem_json_with_a_request_id(
    ctx: Ctx, method: str, path: str, status: int, code: str
) -> None:
    resp = await ctx.client.request(method, path, headers={"x-request-id": "probe-1"})
    body = assert_problem(resp, status, code)
    assert body["request_id"] == "probe-1"
    assert resp.headers["x-request-id"] == "probe-1"
    made = await ctx.client.request(method, path)
    assert len(assert_problem(made, status, code)["request_id"]) == 32
