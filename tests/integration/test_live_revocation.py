"""Open boards (WebSocket) and ticket streams (SSE) end when their caller's rights go:
a revoked device or staff account, lost branch scope, a device turned display, an
expired token. Real sockets (uvicorn in this event loop), PostgreSQL and Redis; the
re-check interval is one second, and every wait is on the stream's own end, bounded."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest
from arq.connections import ArqRedis
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from selfserve.app import create_app
from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.settings import Settings
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import bearer
from tests.integration.test_live import serve
from tests.live_helpers import TIMEOUT, EventStream, board, receive, receive_until
from tests.queue_helpers import Hall, customer, hall, open_counters, staff_post, take, token


@pytest.fixture(scope="module")
def live_settings(module_env: ModuleEnv) -> Settings:
    return settings_with(
        module_env, live_channel_prefix=f"test-revoke-{uuid.uuid4().hex}", live_recheck_s=1
    )


@pytest.fixture(scope="module")
async def base_url(
    live_settings: Settings, pool: asyncpg.Pool, redis: ArqRedis
) -> AsyncIterator[str]:
    async for url in serve(create_app(live_settings, pool=pool, redis=redis)):
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False) as client:
        yield client


@pytest.fixture(scope="module")
async def admin(pool: asyncpg.Pool, module_env: ModuleEnv) -> str:
    admin_id = await pool.fetchval(
        "INSERT INTO staff (email, name, password_hash, role) "
        "VALUES ('revoker@example.test', 'Admin', 'x', 'admin') RETURNING id"
    )
    return token(module_env, "staff", admin_id, "admin", "staff", ())


async def closed_with(ws: ClientConnection, timeout: float = TIMEOUT) -> int:
    """Read whatever the board still sends until the server closes it; its code."""

    async def drain() -> None:
        while True:
            await ws.recv()

    with pytest.raises(ConnectionClosed) as closed:
        await asyncio.wait_for(drain(), timeout)
    assert closed.value.rcvd is not None, "the server did not close the connection"
    return closed.value.rcvd.code


async def ids(pool: asyncpg.Pool, h: Hall) -> tuple[int, int]:
    """The hall's kiosk device and staff account."""
    device = await pool.fetchval("SELECT id FROM devices WHERE branch_id = $1", h.branch_id)
    staff = await pool.fetchval(
        "SELECT staff_id FROM staff_branches WHERE branch_id = $1", h.branch_id
    )
    return device, staff


async def ok(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 200, resp.text
    body: dict[str, Any] = resp.json()
    return body


async def test_a_revoked_kiosk_board_ends_with_4401_and_others_stay(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, base_url: str, admin: str
) -> None:
    h = await hall(pool, module_env)
    await open_counters(http, h)
    device, _ = await ids(pool, h)
    async with (
        board(base_url, h.branch_id, h.kiosk) as revoked,
        board(base_url, h.branch_id, h.staff) as staying,
    ):
        await receive(revoked)
        await receive(staying)
        await ok(await http.post(f"/v1/admin/devices/{device}/deactivate", headers=bearer(admin)))
        assert await closed_with(revoked) == 4401
        # the staff board was re-checked too (same interval) and still hears the branch
        await take(http, h.staff, h.queues["A"])
        await staff_post(http, h, f"/v1/counters/{h.counters[0]}/call-next")
        await receive_until(staying, lambda m: m["type"] == "ticket_called")


async def test_staff_moved_to_another_branch_lose_the_board_with_4403(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, base_url: str, admin: str
) -> None:
    h = await hall(pool, module_env)
    other = await hall(pool, module_env)
    _, staff = await ids(pool, h)
    async with board(base_url, h.branch_id, h.staff) as ws:
        await receive(ws)
        await ok(
            await http.patch(
                f"/v1/admin/staff/{staff}",
                json={"branch_ids": [other.branch_id]},
                headers=bearer(admin),
            )
        )
        assert await closed_with(ws) == 4403


async def test_a_deactivated_staff_account_loses_the_board_with_4401(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, base_url: str, admin: str
) -> None:
    h = await hall(pool, module_env)
    _, staff = await ids(pool, h)
    async with board(base_url, h.branch_id, headers=bearer(h.staff)) as ws:
        await receive(ws)
        await ok(await http.post(f"/v1/admin/staff/{staff}/deactivate", headers=bearer(admin)))
        assert await closed_with(ws) == 4401


async def test_a_board_ends_when_its_token_expires(
    pool: asyncpg.Pool, module_env: ModuleEnv, live_settings: Settings, base_url: str
) -> None:
    h = await hall(pool, module_env)
    device, _ = await ids(pool, h)
    ttl = live_settings.access_token_ttl_s
    expiring = issue_access_token(  # valid for two more seconds
        live_settings,
        Principal(kind="device", id=device, role="kiosk", channel="kiosk", branches=(h.branch_id,)),
        now=time.time() - ttl + 2,
    )
    async with board(base_url, h.branch_id, expiring) as ws:
        assert (await receive(ws))["type"] == "board"
        assert await closed_with(ws) == 4401


async def test_a_display_device_reads_the_board_but_not_tickets(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, base_url: str, admin: str
) -> None:
    h = await hall(pool, module_env)
    made = await http.post(
        "/v1/admin/devices",
        json={"branch_id": h.branch_id, "name": "Hall board", "kind": "display"},
        headers=bearer(admin),
    )
    assert made.status_code == 201, made.text
    login = await http.post(
        "/v1/auth/device", json={"device_id": made.json()["id"], "secret": made.json()["secret"]}
    )
    display = (await ok(login))["access_token"]
    ticket = await take(http, h.kiosk, h.queues["A"])
    async with board(base_url, h.branch_id, display) as ws:
        snapshot = await receive(ws)
        assert snapshot["tickets"][str(ticket["id"])]["position"] == 1
    resp = await http.get(f"/v1/tickets/{ticket['id']}/events", headers=bearer(display))
    assert (resp.status_code, resp.json()["code"]) == (403, "forbidden")


# --- ticket streams (SSE) --------------------------------------------------------------


async def follow_until_closed(
    http: httpx.AsyncClient, ticket_id: int, tok: str, revoke: Any
) -> dict[str, Any]:
    """Follow a ticket, call `revoke` once the stream is open, and read on to the
    end: the `closed` event's data (the stream must end right after it)."""
    async with http.stream("GET", f"/v1/tickets/{ticket_id}/events", headers=bearer(tok)) as resp:
        assert resp.status_code == 200
        events = EventStream(resp)
        name, _ = await events.next()
        assert name == "ticket"
        await revoke()
        closed, _ = await events.until("closed")
        assert await events.ended() == []
    data: dict[str, Any] = closed
    return data


async def test_a_revoked_kiosk_stops_following_a_ticket(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin: str
) -> None:
    h = await hall(pool, module_env)
    device, _ = await ids(pool, h)
    ticket = await take(http, h.kiosk, h.queues["A"])

    async def revoke() -> None:
        await ok(await http.post(f"/v1/admin/devices/{device}/deactivate", headers=bearer(admin)))

    closed = await follow_until_closed(http, ticket["id"], h.kiosk, revoke)
    assert closed == {"code": 4401, "reason": "revoked"}


async def test_a_kiosk_turned_display_stops_following_a_ticket(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, admin: str
) -> None:
    h = await hall(pool, module_env)
    device, _ = await ids(pool, h)
    ticket = await take(http, h.kiosk, h.queues["A"])

    async def demote() -> None:
        await ok(
            await http.patch(
                f"/v1/admin/devices/{device}", json={"kind": "display"}, headers=bearer(admin)
            )
        )

    closed = await follow_until_closed(http, ticket["id"], h.kiosk, demote)
    assert closed == {"code": 4403, "reason": "forbidden"}


async def test_a_customers_stream_ends_when_the_token_expires(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, live_settings: Settings
) -> None:
    h = await hall(pool, module_env)
    cid, _, _ = await customer(pool, module_env)
    expiring = issue_access_token(
        live_settings,
        Principal(kind="customer", id=cid, role="customer", channel="app", branches=()),
        now=time.time() - live_settings.access_token_ttl_s + 2,
    )
    ticket = await take(http, expiring, h.queues["A"])

    async def nothing() -> None:
        return None

    closed = await follow_until_closed(http, ticket["id"], expiring, nothing)
    assert closed == {"code": 4401, "reason": "token expired"}


# --- announced at once, without waiting for the periodic check -----------------------


@pytest.fixture(scope="module")
async def slow_check_url(
    live_settings: Settings, pool: asyncpg.Pool, redis: ArqRedis
) -> AsyncIterator[str]:
    """The app re-checking only hourly: whatever ends a stream promptly here is the
    announcement (over Redis pub/sub, as between processes)."""
    settings = msgspec.structs.replace(live_settings, live_recheck_s=3600)
    async for url in serve(create_app(settings, pool=pool, redis=redis)):
        yield url


async def test_a_revocation_is_announced_and_ends_the_board_at_once(
    pool: asyncpg.Pool, module_env: ModuleEnv, slow_check_url: str, admin: str
) -> None:
    h = await hall(pool, module_env)
    other = await hall(pool, module_env)
    device, staff = await ids(pool, h)
    async with (
        httpx.AsyncClient(base_url=slow_check_url, timeout=30, trust_env=False) as http,
        board(slow_check_url, h.branch_id, h.kiosk) as kiosk_board,
        board(slow_check_url, h.branch_id, h.staff) as staff_board,
    ):
        await receive(kiosk_board)
        await receive(staff_board)
        await ok(await http.post(f"/v1/admin/devices/{device}/deactivate", headers=bearer(admin)))
        assert await closed_with(kiosk_board) == 4401
        await ok(
            await http.patch(
                f"/v1/admin/staff/{staff}",
                json={"branch_ids": [other.branch_id]},
                headers=bearer(admin),
            )
        )
        assert await closed_with(staff_board) == 4403
