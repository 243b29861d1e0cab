"""Property-based fuzzing of every documented operation against a live server.

schemathesis generates requests from the committed OpenAPI document (valid and
invalid bodies, parameters and headers) and sends them, authenticated as an admin,
to a real `selfserve serve` process. Whatever it sends, the answer is never a 5xx.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from selfserve.auth.passwords import hash_password
from tests.conftest import ModuleEnv
from tests.e2e.processes import api_processes

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
schema = schemathesis.openapi.from_path(ROOT / "openapi" / "openapi.json")
ADMIN, PASSWORD = "fuzz-admin@example.test", "fuzz admin password"


async def _seed(database_url: str) -> None:
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
def live(
    module_env: ModuleEnv, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    asyncio.run(_seed(module_env.database_url))
    with api_processes(
        module_env, 1, "fuzz-secret-" + "y" * 40, tmp_path_factory.mktemp("logs")
    ) as (base,):
        token = httpx.post(
            base + "/v1/auth/staff/login", json={"email": ADMIN, "password": PASSWORD}
        ).json()["access_token"]
        yield base, token


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
