"""Property-based fuzzing of every documented operation against a live server.

schemathesis generates requests from the committed OpenAPI document (valid and
invalid bodies, parameters and headers) and sends them, authenticated as an admin,
to a real `selfserve serve` process. Whatever it sends, the answer is never a 5xx.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from selfserve.auth.passwords import hash_password
from tests.conftest import ModuleEnv

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")
ADMIN, PASSWORD = "fuzz-admin@example.test", "fuzz admin password"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def _seed(database_url: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO staff (email, name, password_hash, role) VALUES ($1, 'Fuzz', $2, 'admin')",
            ADMIN,
            hash_password(PASSWORD),
        )
        await conn.execute(
            "INSERT INTO branches (name, timezone) VALUES ('Fuzz Hall', 'Europe/London')"
        )
    finally:
        await conn.close()


@pytest.fixture(scope="module")
def live(module_env: ModuleEnv) -> Iterator[tuple[str, str]]:
    asyncio.run(_seed(module_env.database_url))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFSERVE_", "TWILIO_"))}
    env.update(
        DATABASE_URL=module_env.database_url,
        REDIS_URL=module_env.redis_url,
        SELFSERVE_ENV="production",
        SELFSERVE_JWT_SECRET="fuzz-secret-" + "y" * 40,
        SELFSERVE_PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        SELFSERVE_LOG_LEVEL="WARNING",
        TWILIO_AUTH_TOKEN="fuzz-twilio-token",
    )
    script = Path(sys.executable).with_name("selfserve")
    proc = subprocess.Popen(
        [str(script), "serve", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(base + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, "selfserve serve exited"
            assert time.monotonic() < deadline, "selfserve serve did not become ready"
            time.sleep(0.05)
        token = httpx.post(
            base + "/v1/auth/staff/login", json={"email": ADMIN, "password": PASSWORD}
        ).json()["access_token"]
        yield base, token
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        text = output.decode(errors="replace")
        assert "Traceback" not in text, text[-4000:]


@schema.parametrize()
@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_request_makes_the_server_fail(case: schemathesis.Case, live: tuple[str, str]) -> None:
    base, token = live
    response = case.call(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    case.validate_response(response, checks=[not_a_server_error])
