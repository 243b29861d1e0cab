"""The live feed in one process, over real sockets: the app (on the module's database
and Redis) served by uvicorn in this event loop, a board on the WebSocket feed and
customers on their tickets' Server-Sent Events.

Redis pub/sub channels are global to the server, and test modules run in parallel
on one: this module's app publishes under a prefix of its own."""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import pytest
import uvicorn
from arq.connections import ArqRedis
from litestar import Litestar
from websockets.exceptions import ConnectionClosed

from selfserve.app import create_app
from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.queueing.live import branch_channel
from selfserve.settings import Settings
from tests.conftest import ModuleEnv, settings_with
from tests.helpers import bearer
from tests.live_helpers import EventStream, board, close_code, receive, receive_until
from tests.queue_helpers import Hall, customer, hall, open_counters, staff_post, take, token


@pytest.fixture(scope="module")
def live_settings(module_env: ModuleEnv) -> Settings:
    return settings_with(module_env, live_channel_prefix=f"test-live-{uuid.uuid4().hex}")


async def serve(app: Litestar) -> AsyncIterator[str]:
    """Serve `app` with uvicorn in this event loop; yield its base URL. The socket
    listens before the server starts, so clients may connect at once."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    config = uvicorn.Config(
        app, lifespan="on", log_config=None, log_level="warning", timeout_graceful_shutdown=10
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)  # a clean, prompt shutdown is part of the test
        sock.close()


@pytest.fixture(scope="module")
async def base_url(
    live_settings: Settings, pool: asyncpg.Pool, redis: ArqRedis
) -> AsyncIterator[str]:
    # The module's pool and Redis are handed in; the live feed opens its own client.
    async for url in serve(create_app(live_settings, pool=pool, redis=redis)):
        yield url


@pytest.fixture
async def http(base_url: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=base_url, timeout=30, trust_env=False) as client:
        yield client


async def subscribers(redis: ArqRedis, settings: Settings, branch_id: int) -> int:
    name = f"{settings.live_channel_prefix}:{branch_channel(branch_id)}"
    [(_, count)] = await redis.pubsub_numsub(name)
    return int(count)


async def wait_subscribers(
    redis: ArqRedis, settings: Settings, branch_id: int, expected: int
) -> None:
    """Unsubscribing follows a disconnect asynchronously: wait for Redis to agree."""
    deadline = time.monotonic() + 10
    while (count := await subscribers(redis, settings, branch_id)) != expected:
        assert time.monotonic() < deadline, f"{count} subscribers, expected {expected}"
        await asyncio.sleep(0.02)


async def call_next(http: httpx.AsyncClient, h: Hall, counter: int) -> dict[str, Any]:
    resp = await staff_post(http, h, f"/v1/counters/{counter}/call-next")
    assert resp.status_code == 200, resp.text
    out: dict[str, Any] = resp.json()
    return out


# --- the board feed ----------------------------------------------------------------


async def test_a_board_gets_the_snapshot_at_once_then_each_call(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, base_url: str
) -> None:
    h = await hall(pool, module_env)
    await open_counters(http, h)
    ticket = await take(http, h.kiosk, h.queues["A"])

    async with board(base_url, h.branch_id, h.kiosk) as ws:
        snapshot = await receive(ws)
        assert snapshot["type"] == "board"
        assert snapshot["branch_id"] == h.branch_id
        assert snapshot["tickets"][str(ticket["id"])]["position"] == 1
        [queue] = snapshot["queues"]
        assert (queue["id"], queue["waiting"], queue["open_counters"]) == (h.queues["A"], 1, 2)
        assert snapshot["calls"] == []

        called = await call_next(http, h, h.counters[0])
        assert called["id"] == ticket["id"]
        event = await receive_until(ws, lambda m: m["type"] == "ticket_called")
        assert {k: event[k] for k in ("branch_id", "ticket_id", "display_code")} == {
            "branch_id": h.branch_id,
            "ticket_id": ticket["id"],
            "display_code": ticket["display_code"],
        }
        assert (event["counter_id"], event["counter"], event["recalls"]) == (h.counters[0], "1", 0)
        after = await receive(ws)  # the board of the same change comes right after
        assert after["type"] == "board"
        assert str(ticket["id"]) not in after["tickets"]
        assert [(c["ticket_id"], c["counter"], c["status"]) for c in after["calls"]] == [
            (ticket["id"], "1", "called")
        ]

        recall = await staff_post(http, h, f"/v1/tickets/{ticket['id']}/recall")
        assert recall.status_code == 200, recall.text
        again = await receive_until(ws, lambda m: m["type"] == "ticket_called")
        assert (again["ticket_id"], again["recalls"]) == (ticket["id"], 1)


async def test_staff_use_the_authorization_header_and_any_branch_in_scope(
    pool: asyncpg.Pool, module_env: ModuleEnv, base_url: str
) -> None:
    h = await hall(pool, module_env)
    async with board(base_url, h.branch_id, headers=bearer(h.staff)) as ws:
        assert (await receive(ws))["branch_id"] == h.branch_id
    admin_id = await pool.fetchval(
        "INSERT INTO staff (email, name, password_hash, role) "
        "VALUES ($1, 'Admin', 'x', 'admin') RETURNING id",
        f"admin-{uuid.uuid4().hex[:8]}@example.test",
    )
    admin = token(module_env, "staff", admin_id, "admin", "staff", ())
    async with board(base_url, h.branch_id, admin) as ws:
        assert (await receive(ws))["branch_id"] == h.branch_id
    # an admin may watch any branch, but one that does not exist is refused
    assert await close_code(base_url, 2**40, admin) == 4404


async def test_a_board_needs_a_valid_token_for_its_own_branch(
    pool: asyncpg.Pool, module_env: ModuleEnv, base_url: str
) -> None:
    h = await hall(pool, module_env)
    other = await hall(pool, module_env)
    _, _, customer_token = await customer(pool, module_env)
    assert await close_code(base_url, h.branch_id) == 4401
    assert await close_code(base_url, h.branch_id, "not-a-jwt") == 4401
    assert await close_code(base_url, h.branch_id, headers={"Authorization": "Bearer x"}) == 4401
    foreign = issue_access_token(  # well formed, signed with another key
        settings_with(module_env, jwt_secret="another-secret-" + "x" * 32),
        Principal(kind="staff", id=1, role="admin", channel="staff", branches=None),
    )
    assert await close_code(base_url, h.branch_id, foreign) == 4401
    # out of scope looks like a missing branch; a role that never reads boards is 4403
    assert await close_code(base_url, h.branch_id, other.kiosk) == 4404  # another branch's kiosk
    assert await close_code(base_url, h.branch_id, other.staff) == 4404  # staff out of scope
    assert await close_code(base_url, 2**40, other.staff) == 4404  # as a missing branch
    assert await close_code(base_url, h.branch_id, customer_token) == 4403
    # a revoked kiosk stops at once, whatever its token says
    await pool.execute("UPDATE devices SET active = false WHERE branch_id = $1", h.branch_id)
    assert await close_code(base_url, h.branch_id, h.kiosk) == 4401


async def test_boards_come_and_go_without_leaving_subscriptions(
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    module_env: ModuleEnv,
    live_settings: Settings,
    base_url: str,
) -> None:
    h = await hall(pool, module_env)
    await open_counters(http, h)
    await take(http, h.kiosk, h.queues["A"])
    async with board(base_url, h.branch_id, h.kiosk) as staying:
        await receive(staying)
        async with board(base_url, h.branch_id, h.kiosk) as leaving:
            await receive(leaving)
            # two boards, one Redis subscription for the process
            assert await subscribers(redis, live_settings, h.branch_id) == 1
        await call_next(http, h, h.counters[0])
        await receive_until(staying, lambda m: m["type"] == "ticket_called")
        assert await subscribers(redis, live_settings, h.branch_id) == 1
    await wait_subscribers(redis, live_settings, h.branch_id, 0)


# --- a ticket's events -------------------------------------------------------------


async def test_a_customer_follows_their_ticket_until_it_is_done(
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    module_env: ModuleEnv,
    live_settings: Settings,
) -> None:
    h = await hall(pool, module_env)
    await open_counters(http, h)
    _, _, first_token = await customer(pool, module_env)
    _, _, mine = await customer(pool, module_env)
    ahead = await take(http, first_token, h.queues["A"])
    ticket = await take(http, mine, h.queues["A"])
    assert ticket["position"] == 2

    url = f"/v1/tickets/{ticket['id']}/events"
    async with http.stream("GET", url, params={"access_token": mine}) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["cache-control"] == "no-cache"
        events = EventStream(resp)
        name, first = await events.next()
        assert name == "ticket"
        assert (first["id"], first["status"], first["position"]) == (ticket["id"], "waiting", 2)

        assert (await call_next(http, h, h.counters[0]))["id"] == ahead["id"]
        position, skipped = await events.until("position")
        assert position["position"] == 1
        assert set(position["eta"]) == {"low_min", "high_min", "text"}
        assert skipped == []  # nothing about the ticket called ahead

        assert (await call_next(http, h, h.counters[1]))["id"] == ticket["id"]
        called, skipped = await events.until("called")
        assert {k for k, _ in skipped} <= {"position"}
        assert called == {
            "ticket_id": ticket["id"],
            "display_code": ticket["display_code"],
            "counter_id": h.counters[1],
            "counter": "2",
            "recalls": 0,
            "at": called["at"],
        }

        for step in ("start", "finish"):
            done = await staff_post(http, h, f"/v1/tickets/{ticket['id']}/{step}")
            assert done.status_code == 200, done.text
        last, skipped = await events.until("ticket")
        assert skipped == []
        assert (last["id"], last["status"], last["counter_id"]) == (
            ticket["id"],
            "done",
            h.counters[1],
        )
        assert await events.ended() == []
    await wait_subscribers(redis, live_settings, h.branch_id, 0)


async def test_a_cancelled_ticket_ends_its_stream_and_a_final_one_ends_at_once(
    http: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env)
    _, _, mine = await customer(pool, module_env)
    ticket = await take(http, mine, h.queues["A"])
    url = f"/v1/tickets/{ticket['id']}/events"
    async with http.stream("GET", url, headers=bearer(mine)) as resp:
        events = EventStream(resp)
        assert (await events.next())[0] == "ticket"
        cancelled = await http.post(f"/v1/tickets/{ticket['id']}/cancel", headers=bearer(mine))
        assert cancelled.status_code == 200, cancelled.text
        last, _ = await events.until("ticket")
        assert last["status"] == "cancelled"
        assert await events.ended() == []
    async with http.stream("GET", url, headers=bearer(mine)) as resp:
        events = EventStream(resp)
        name, again = await events.next()
        assert (name, again["status"]) == ("ticket", "cancelled")
        assert await events.ended() == []


async def test_only_the_owner_and_the_branch_see_a_tickets_events(
    http: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    module_env: ModuleEnv,
    live_settings: Settings,
) -> None:
    h = await hall(pool, module_env)
    other = await hall(pool, module_env)
    _, _, mine = await customer(pool, module_env)
    _, _, stranger = await customer(pool, module_env)
    ticket = await take(http, mine, h.queues["A"])
    url = f"/v1/tickets/{ticket['id']}/events"

    for params, headers in (({"access_token": stranger}, {}), ({}, bearer(stranger))):
        resp = await http.get(url, params=params, headers=headers)
        assert resp.status_code == 404, resp.text
        assert resp.json()["code"] == "not_found"
    assert (await http.get(f"/v1/tickets/{2**40}/events", headers=bearer(mine))).status_code == 404
    resp = await http.get(url)
    assert (resp.status_code, resp.json()["code"]) == (401, "unauthorized")
    resp = await http.get(url, params={"access_token": "nope"})
    assert (resp.status_code, resp.json()["code"]) == (401, "invalid_token")
    # as for GET /v1/tickets/{id}: to another branch's kiosk it looks missing
    assert (await http.get(url, headers=bearer(other.kiosk))).status_code == 404
    # a header wins over the query
    resp = await http.get(url, params={"access_token": mine}, headers=bearer(stranger))
    assert resp.status_code == 404

    for tok in (h.kiosk, h.staff):  # the branch's kiosk and staff may follow it
        async with http.stream("GET", url, params={"access_token": tok}) as resp:
            assert resp.status_code == 200
            name, data = await EventStream(resp).next()
            assert (name, data["id"]) == ("ticket", ticket["id"])
    # leaving mid-stream ends the subscription too
    await wait_subscribers(redis, live_settings, h.branch_id, 0)


# --- without Redis -----------------------------------------------------------------


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_writes_succeed_and_boards_connect_while_the_live_redis_is_down(
    pool: asyncpg.Pool, redis: ArqRedis, module_env: ModuleEnv
) -> None:
    # The live feed's Redis refuses connections; the app's own (jobs) is the module's.
    settings = settings_with(
        module_env,
        redis_url=f"redis://127.0.0.1:{closed_port()}/0",
        live_channel_prefix=f"test-live-down-{uuid.uuid4().hex}",
    )
    h = await hall(pool, module_env)
    async for url in serve(create_app(settings, pool=pool, redis=redis)):
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
            await open_counters(client, h)
            ticket = await take(client, h.kiosk, h.queues["A"])
            async with board(url, h.branch_id, h.kiosk) as ws:
                snapshot = await receive(ws)  # from PostgreSQL, Redis or not
                assert str(ticket["id"]) in snapshot["tickets"]
                called = await call_next(client, h, h.counters[0])
                assert called["id"] == ticket["id"]
            async with client.stream(
                "GET", f"/v1/tickets/{ticket['id']}/events", headers=bearer(h.kiosk)
            ) as resp:
                assert resp.status_code == 200
                name, data = await EventStream(resp).next()
                assert (name, data["status"]) == ("ticket", "called")


class CuttableProxy:
    """A TCP proxy to Redis whose connections can all be cut at once, as when Redis
    restarts."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self.writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    def cut(self) -> None:
        for writer in list(self.writers):
            writer.close()

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def test_a_board_hears_again_after_the_live_redis_connection_drops(
    pool: asyncpg.Pool, redis: ArqRedis, module_env: ModuleEnv
) -> None:
    parts = urlsplit(module_env.redis_url)
    proxy = CuttableProxy(parts.hostname or "127.0.0.1", parts.port or 6379)
    port = await proxy.start()
    settings = settings_with(
        module_env,
        redis_url=f"redis://127.0.0.1:{port}{parts.path}",
        live_channel_prefix=f"test-live-cut-{uuid.uuid4().hex}",
    )
    h = await hall(pool, module_env)
    try:
        async for url in serve(create_app(settings, pool=pool, redis=redis)):
            async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
                await open_counters(client, h)
                first = await take(client, h.kiosk, h.queues["A"])
                second = await take(client, h.kiosk, h.queues["A"])
                async with board(url, h.branch_id, h.kiosk) as ws:
                    await receive(ws)
                    await wait_subscribers(redis, settings, h.branch_id, 1)
                    proxy.cut()  # every connection of the live feed to Redis drops
                    await wait_subscribers(redis, settings, h.branch_id, 0)
                    # the listener reconnects and subscribes again by itself
                    await wait_subscribers(redis, settings, h.branch_id, 1)
                    await call_next(client, h, h.counters[0])
                    event = await receive_until(ws, lambda m: m["type"] == "ticket_called")
                    assert event["ticket_id"] == first["id"]
                    await call_next(client, h, h.counters[1])
                    event = await receive_until(ws, lambda m: m["type"] == "ticket_called")
                    assert event["ticket_id"] == second["id"]
    finally:
        await proxy.stop()


async def read_until_closed(ws: Any) -> None:
    """Read on (a board still on its way may come first) until the server closes."""
    while True:
        await receive(ws)


async def test_the_server_stops_with_boards_and_streams_open(
    pool: asyncpg.Pool, redis: ArqRedis, module_env: ModuleEnv, live_settings: Settings
) -> None:
    """Boards are closed with 1012 (server restart) at once; an event stream knows of
    no shutdown, so the server's graceful-shutdown timeout cancels it, and its
    subscription still ends."""
    h = await hall(pool, module_env)
    _, _, mine = await customer(pool, module_env)
    app = create_app(live_settings, pool=pool, redis=redis)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(
        uvicorn.Config(
            app, lifespan="on", log_config=None, log_level="critical", timeout_graceful_shutdown=1
        )
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
            ticket = await take(client, mine, h.queues["A"])
            events_url = f"/v1/tickets/{ticket['id']}/events"
            async with (
                board(url, h.branch_id, h.kiosk) as ws,
                client.stream("GET", events_url, headers=bearer(mine)) as resp,
            ):
                await receive(ws)
                events = EventStream(resp)
                assert (await events.next())[0] == "ticket"
                await wait_subscribers(redis, live_settings, h.branch_id, 1)
                server.should_exit = True
                with pytest.raises(ConnectionClosed) as closed:
                    await read_until_closed(ws)
                assert closed.value.rcvd is not None
                assert closed.value.rcvd.code == 1012
                with pytest.raises(httpx.HTTPError):  # cut off mid-stream
                    await events.ended()
                await asyncio.wait_for(task, 30)
        assert await subscribers(redis, live_settings, h.branch_id) == 0
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
        sock.close()
