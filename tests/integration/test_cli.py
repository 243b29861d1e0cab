"""The `selfserve` command as an operator runs it: real subprocesses, real database."""

from __future__ import annotations

import os
import subprocess
import sys

import asyncpg
import httpx
import pytest

from selfserve.app import create_app
from tests.conftest import ModuleEnv


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "selfserve", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFSERVE_")}
    env.pop("DATABASE_URL", None)
    env.pop("REDIS_URL", None)
    env.update(extra)
    return env


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"SELFSERVE_ENV": "production"}, "SELFSERVE_JWT_SECRET"),
        ({}, "SELFSERVE_JWT_SECRET"),  # serve and worker are production unless told otherwise
        ({"SELFSERVE_JWT_SECRET": "x" * 40}, "DATABASE_URL"),
        (
            {"SELFSERVE_JWT_ALGORITHM": "ES256", "DATABASE_URL": "postgresql://h/db"},
            "SELFSERVE_JWT_PRIVATE_KEY",
        ),
        (  # ES256 has no shared secret for sign-in codes to fall back on
            {
                "SELFSERVE_JWT_ALGORITHM": "ES256",
                "SELFSERVE_JWT_PRIVATE_KEY": "private-pem",
                "SELFSERVE_JWT_PUBLIC_KEY": "public-pem",
                "DATABASE_URL": "postgresql://h/db",
                "REDIS_URL": "redis://h:6379/0",
                "SELFSERVE_PUBLIC_BASE_URL": "https://q.example",
            },
            "SELFSERVE_OTP_SECRET",
        ),
    ],
)
def test_production_start_refuses_missing_secret_and_names_it(
    extra: dict[str, str], named: str
) -> None:
    env = base_env(**extra)
    for command in (["serve", "--port", "1"], ["worker"]):
        result = run_cli(*command, env=env)
        assert result.returncode == 2, result.stderr
        assert named in result.stderr
        assert "Traceback" not in result.stderr


async def test_admin_create_bootstraps_a_working_admin_once(
    module_env: ModuleEnv, pool: asyncpg.Pool
) -> None:
    env = base_env(DATABASE_URL=module_env.database_url)
    created = run_cli(
        "admin",
        "create",
        "--email",
        "Boss@Example.test",
        "--password",
        "a long password 1",
        env=env,
    )
    assert created.returncode == 0, created.stderr
    again = run_cli(
        "admin",
        "create",
        "--email",
        "boss@example.test",
        "--password",
        "another password",
        env=env,
    )
    assert again.returncode == 2
    assert "already registered" in again.stderr
    short = run_cli("admin", "create", "--email", "x@example.test", "--password", "short", env=env)
    assert short.returncode == 2
    assert (
        await pool.fetchval("SELECT count(*) FROM staff WHERE lower(email) = 'boss@example.test'")
        == 1
    )
    assert await pool.fetchval("SELECT count(*) FROM staff WHERE email = 'x@example.test'") == 0

    app = create_app(module_env.settings, pool=pool, redis=None)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        resp = await c.post(
            "/v1/auth/staff/login",
            json={"email": "boss@example.test", "password": "a long password 1"},
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["role"] == "admin"
    assert resp.json()["branch_ids"] is None


def test_migrate_without_database_url_says_so() -> None:
    result = run_cli("db", "migrate", env=base_env())
    assert result.returncode == 2
    assert "DATABASE_URL" in result.stderr
