"""Booking under contention across real processes: two `selfserve serve` APIs, 200
concurrent POST /v1/bookings over separate connections for a slot of 5 seats."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import msgspec
import pytest

from selfserve.auth.tokens import Principal, issue_access_token
from selfserve.scheduling import ledger
from tests.conftest import ModuleEnv
from tests.e2e.test_sign_in_processes import command, free_port, wait_for

pytestmark = pytest.mark.e2e
SECRET = "race-secret-" + "z" * 40
CAPACITY = 5
CLIENTS = 200


@pytest.fixture(scope="module")
def apis(
    module_env: ModuleEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFSERVE_", "TWILIO_"))}
    env.update(
        DATABASE_URL=module_env.database_url,
        REDIS_URL=module_env.redis_url,
        SELFSERVE_ENV="production",
        SELFSERVE_JWT_SECRET=SECRET,
        SELFSERVE_PUBLIC_BASE_URL=f"http://127.0.0.1:{ports[0]}",
        SELFSERVE_LOG_LEVEL="WARNING",
        TWILIO_AUTH_TOKEN="race-twilio-token",
    )
    logs = tmp_path_factory.mktemp("logs")
    procs: list[subprocess.Popen[bytes]] = []
    files = []
    try:
        for i, port in enumerate(ports):
            out = (logs / f"api{i}.log").open("wb")
            files.append(out)
            procs.append(
                subprocess.Popen(
                    [*command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        for url in urls:

            def probe(url: str = url) -> bool | None:
                try:
                    return True if httpx.get(url + "/ready", timeout=1).status_code == 200 else None
                except httpx.HTTPError:
                    return None

            wait_for(f"{url}/ready", probe, procs)
        yield urls[0], urls[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fh in files:
            fh.close()
        for f in logs.iterdir():
            text = f.read_text(errors="replace")
            assert "Traceback" not in text, f"{f.name}:\n{text[-3000:]}"


async def _seed(database_url: str) -> tuple[int, int, list[int]]:
    conn = await asyncpg.connect(database_url)
    try:
        bid = await conn.fetchval(
            "INSERT INTO branches (name, timezone, opening_hours) "
            "VALUES ('Race Hall', 'Asia/Shanghai', $1::text::jsonb) RETURNING id",
            msgspec.json.encode(
                [{"weekday": d, "opens": "00:00", "closes": "24:00"} for d in range(1, 8)]
            ).decode(),
        )
        sid = await conn.fetchval(
            "INSERT INTO services (branch_id, name, duration_min, slot_interval_min) "
            "VALUES ($1, 'Race', 30, 30) RETURNING id",
            bid,
        )
        rid = await conn.fetchval(
            "INSERT INTO resources (branch_id, kind, name, capacity) "
            "VALUES ($1, 'room', 'Room', $2) RETURNING id",
            bid,
            CAPACITY,
        )
        await conn.execute(
            "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)", rid, sid
        )
        for day in range(1, 8):
            await conn.execute(
                "INSERT INTO schedules (resource_id, kind, weekday, start_minute, end_minute) "
                "VALUES ($1, 'shift', $2, 0, 1440)",
                rid,
                day,
            )
        customers = [
            await conn.fetchval(
                "INSERT INTO customers (phone, locale) VALUES ($1, 'en') RETURNING id",
                f"+86136{i:08d}",
            )
            for i in range(CLIENTS)
        ]
        return bid, sid, customers
    finally:
        await conn.close()


async def _overbooked(database_url: str) -> list[ledger.Violation]:
    conn = await asyncpg.connect(database_url)
    try:
        return await ledger.overbooked(conn)
    finally:
        await conn.close()


async def test_200_concurrent_bookings_for_5_seats_across_two_processes(
    apis: tuple[str, str], module_env: ModuleEnv
) -> None:
    bid, sid, customers = await _seed(module_env.database_url)
    settings = msgspec.structs.replace(module_env.settings, jwt_secret=SECRET)
    start = (datetime.now(UTC) + timedelta(days=2)).replace(minute=0, second=0, microsecond=0)
    body = {"branch_id": bid, "service_id": sid, "start": start.isoformat()}

    async def one(i: int, cid: int) -> httpx.Response:
        token = issue_access_token(
            settings,
            Principal(kind="customer", id=cid, role="customer", channel="app", branches=()),
        )
        # A client of its own: every request on its own connection.
        async with httpx.AsyncClient(base_url=apis[i % 2], timeout=60) as client:
            return await client.post(
                "/v1/bookings", json=body, headers={"Authorization": f"Bearer {token}"}
            )

    responses = await asyncio.gather(*(one(i, cid) for i, cid in enumerate(customers)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses.count(201) == CAPACITY, [r.text for r in responses if r.status_code >= 500][:3]
    assert statuses.count(409) == CLIENTS - CAPACITY
    assert {r.json()["code"] for r in responses if r.status_code == 409} == {"slot_full"}
    assert await _overbooked(module_env.database_url) == []
