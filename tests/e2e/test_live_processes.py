"""The live feed across real processes: two `selfserve serve` APIs on one database and
one Redis. A board and a customer's phone are connected to process B; the counter's
call goes to process A; both hear of it (the events travel through Redis pub/sub)."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from selfserve.cli import GRACEFUL_SHUTDOWN_S
from tests.conftest import ModuleEnv, settings_with
from tests.e2e.processes import (
    api_processes,
    free_port,
    ready,
    selfserve_command,
    service_env,
    signal_group,
    stop_group,
    wait_for,
)
from tests.helpers import bearer
from tests.live_helpers import EventStream, board, receive, receive_until
from tests.queue_helpers import customer, hall, open_counters, take

pytestmark = pytest.mark.e2e

SECRET = "live-secret-" + "q" * 40


@pytest.fixture(scope="module")
def apis(module_env: ModuleEnv, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    # Pub/sub channels are global to the Redis server: a prefix of this run's own.
    env = {"SELFSERVE_LIVE_CHANNEL_PREFIX": f"e2e-live-{uuid.uuid4().hex}"}
    with api_processes(
        module_env, 2, SECRET, tmp_path_factory.mktemp("logs"), extra_env=env
    ) as urls:
        yield urls


@pytest.fixture(scope="module")
def signing_env(module_env: ModuleEnv) -> ModuleEnv:
    """The module's environment with the processes' signing key, for minting tokens."""
    return ModuleEnv(
        module_env.database_url,
        module_env.redis_url,
        module_env.admin_url,
        settings_with(module_env, jwt_secret=SECRET),
    )


async def test_a_call_made_in_process_a_reaches_clients_of_process_b(
    apis: list[str], pool: asyncpg.Pool, signing_env: ModuleEnv
) -> None:
    a, b = apis
    h = await hall(pool, signing_env)
    _, _, phone = await customer(pool, signing_env)
    async with (
        httpx.AsyncClient(base_url=a, timeout=30, trust_env=False) as in_a,
        httpx.AsyncClient(base_url=b, timeout=30, trust_env=False) as in_b,
    ):
        await open_counters(in_a, h)
        ticket = await take(in_a, phone, h.queues["A"])
        url = f"/v1/tickets/{ticket['id']}/events"
        async with (
            board(b, h.branch_id, h.kiosk) as ws,
            in_b.stream("GET", url, params={"access_token": phone}) as sse,
        ):
            snapshot = await receive(ws)
            assert snapshot["type"] == "board"
            assert snapshot["tickets"][str(ticket["id"])]["position"] == 1
            assert sse.status_code == 200
            events = EventStream(sse)
            name, first = await events.next()
            assert (name, first["status"]) == ("ticket", "waiting")

            resp = await in_a.post(
                f"/v1/counters/{h.counters[0]}/call-next", headers=bearer(h.staff)
            )
            assert resp.status_code == 200, resp.text
            assert resp.json()["id"] == ticket["id"]

            event = await receive_until(ws, lambda m: m["type"] == "ticket_called")
            assert (event["ticket_id"], event["counter_id"], event["counter"]) == (
                ticket["id"],
                h.counters[0],
                "1",
            )
            called, _ = await events.until("called")
            assert (called["ticket_id"], called["counter"]) == (ticket["id"], "1")


async def test_a_server_stops_on_sigterm_with_an_event_stream_open(
    pool: asyncpg.Pool, signing_env: ModuleEnv, tmp_path: Path
) -> None:
    """SSE streams never end by themselves; `selfserve serve` must still stop."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = service_env(
        signing_env, SECRET, url, {"SELFSERVE_LIVE_CHANNEL_PREFIX": f"e2e-{uuid.uuid4().hex}"}
    )
    log = (tmp_path / "api.log").open("wb")
    proc = subprocess.Popen(
        [*selfserve_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        wait_for("the API", ready(url), [proc])
        h = await hall(pool, signing_env)
        _, _, phone = await customer(pool, signing_env)
        async with httpx.AsyncClient(base_url=url, timeout=30, trust_env=False) as client:
            ticket = await take(client, phone, h.queues["A"])
            path = f"/v1/tickets/{ticket['id']}/events"
            async with client.stream("GET", path, params={"access_token": phone}) as sse:
                name, _ = await EventStream(sse).next()
                assert name == "ticket"
                started = time.monotonic()
                signal_group(proc, signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 30)
                stopped_after = time.monotonic() - started
        # uvicorn re-raises the signal once it has shut down gracefully
        assert code in (0, -signal.SIGTERM)
        assert stopped_after < GRACEFUL_SHUTDOWN_S + 5, stopped_after
    finally:
        stop_group(proc)
        log.close()
