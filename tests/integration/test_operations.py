"""Operations endpoints, request ids, access log, CORS and readiness failures."""

from __future__ import annotations

import socket

import asyncpg
import httpx
import msgspec
from arq.connections import ArqRedis
from structlog.testing import capture_logs

from selfserve.app import create_app
from tests.conftest import ModuleEnv


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_request_id_is_echoed_or_generated_and_logged(
    module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    app = create_app(
        msgspec.structs.replace(module_env.settings, log_level="INFO"), pool=pool, redis=redis
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        with capture_logs() as logs:
            given = await client.get("/health", headers={"x-request-id": "abc-123"})
            made = await client.get("/health", headers={"x-request-id": "bad id with spaces"})
    assert given.headers["x-request-id"] == "abc-123"
    assert made.headers["x-request-id"] != "bad id with spaces"
    assert len(made.headers["x-request-id"]) == 32
    access = [entry for entry in logs if entry["event"] == "request"]
    assert [entry["request_id"] for entry in access] == ["abc-123", made.headers["x-request-id"]]
    assert all(entry["status"] == 200 and entry["route"] == "/health" for entry in access)
    assert all(isinstance(entry["duration_ms"], float) for entry in access)


async def test_problem_carries_request_id(client: httpx.AsyncClient) -> None:
    resp = await client.get("/v1/admin/branches", headers={"x-request-id": "req-77"})
    assert resp.status_code == 401
    assert resp.headers["content-type"] == "application/problem+json"
    assert resp.json()["request_id"] == "req-77"


async def test_metrics_are_prometheus_text(client: httpx.AsyncClient) -> None:
    await client.get("/health")
    resp = await client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    assert "selfserve_requests_total" in resp.text
    # one charset, and HEAD answers with the same headers and no body
    assert resp.headers["content-type"].count("charset") == 1, resp.headers["content-type"]
    head = await client.head("/metrics")
    assert head.status_code == 200
    assert head.headers["content-type"] == resp.headers["content-type"]
    assert head.content == b""


async def test_swagger_ui_calls_no_outside_validator(client: httpx.AsyncClient) -> None:
    for path in ("/docs", "/schema/swagger", "/schema"):
        page = await client.get(path)
        assert page.status_code == 200, path
        assert "validatorUrl: null" in page.text, path


async def test_served_document_is_the_committed_one(client: httpx.AsyncClient) -> None:
    import json
    from pathlib import Path

    committed = json.loads(
        (Path(__file__).resolve().parents[2] / "openapi" / "openapi.json").read_text()
    )
    served = (await client.get("/schema/openapi.json")).json()
    assert served == committed


async def test_ready_names_redis_when_it_is_down(module_env: ModuleEnv, pool: asyncpg.Pool) -> None:
    dead = ArqRedis(host="127.0.0.1", port=_dead_port(), socket_connect_timeout=1)
    app = create_app(module_env.settings, pool=pool, redis=dead)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        resp = await c.get("/ready")
    await dead.aclose()
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["postgres"] == "ok"
    assert checks["redis"].startswith("down")


async def test_ready_names_postgres_when_it_is_down(
    module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    broken = await asyncpg.create_pool(module_env.database_url, min_size=0, max_size=1)
    await broken.close()  # a closed pool answers nothing
    app = create_app(module_env.settings, pool=broken, redis=redis)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        resp = await c.get("/ready")
    assert resp.status_code == 503
    checks = resp.json()["checks"]
    assert checks["redis"] == "ok"
    assert checks["postgres"].startswith("down")


async def test_cors_origins_come_from_settings(
    module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> None:
    settings = msgspec.structs.replace(
        module_env.settings, cors_origins=("https://app.example.com",)
    )
    app = create_app(settings, pool=pool, redis=redis)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        allowed = await c.options(
            "/v1/branches",
            headers={
                "origin": "https://app.example.com",
                "access-control-request-method": "GET",
            },
        )
        other = await c.get("/v1/branches", headers={"origin": "https://evil.example"})
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-origin" not in other.headers


async def test_every_docs_page_uses_only_local_assets(client: httpx.AsyncClient) -> None:
    import re

    for path in ("/docs", "/schema", "/schema/swagger"):
        page = await client.get(path)
        assert page.status_code == 200, path
        urls = re.findall(r"""(?:src|href)=["']([^"']+)""", page.text)
        assert urls, path
        for url in urls:
            assert url.startswith("/"), (path, url)
            assert (await client.get(url)).status_code == 200, url
    # Renderers that would pull scripts from a CDN are not served at all: their paths
    # answer like any unknown path, a problem document with a request id.
    for path in ("/schema/redoc", "/schema/elements", "/schema/rapidoc"):
        resp = await client.get(path)
        assert resp.status_code == 404
        assert resp.headers["content-type"] == "application/problem+json"
        assert resp.json()["request_id"]
