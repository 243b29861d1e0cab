"""Liveness, readiness and the offline interactive docs page."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec
from litestar import MediaType, Response, get, head
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest


class Health(msgspec.Struct):
    status: str


class Readiness(msgspec.Struct):
    status: str
    checks: dict[str, str]


@get("/health", tags=["Operations"], summary="Liveness (no I/O)", operation_id="health")
async def health() -> Health:
    return Health(status="ok")


async def _check(coro: Any) -> str:
    try:
        await asyncio.wait_for(coro, timeout=2.0)
    except Exception as exc:  # a readiness probe reports, never raises
        return f"down: {type(exc).__name__}"
    return "ok"


@get(
    "/ready",
    tags=["Operations"],
    summary="Readiness: PostgreSQL and Redis answer",
    description="200 when both dependencies answer; 503 naming the one that is down.",
    operation_id="ready",
    responses={503: ResponseSpec(data_container=Readiness, description="A dependency is down.")},
)
async def ready(state: State) -> Response[Readiness]:
    postgres, redis = await asyncio.gather(
        _check(state.pool.fetchval("SELECT 1")), _check(state.redis.ping())
    )
    checks = {"postgres": postgres, "redis": redis}
    ok = all(v == "ok" for v in checks.values())
    return Response(
        Readiness(status="ok" if ok else "unavailable", checks=checks),
        status_code=200 if ok else 503,
    )


DOCS_HTML = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>selfserve API</title>
  <link rel="stylesheet" href="/docs/static/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="/docs/static/swagger-ui-bundle.js"></script>
  <script src="/docs/static/swagger-ui-standalone-preset.js"></script>
  <script>
    window.ui = SwaggerUIBundle({
      url: "/schema/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: true,
      validatorUrl: null,
      presets: [SwaggerUIBundle.presets.apis, SwaggerUIStandalonePreset],
      layout: "StandaloneLayout",
    });
  </script>
</body>
</html>
"""


# Without its charset: Litestar adds `; charset=utf-8` to every text/* type itself.
METRICS_MEDIA_TYPE = "; ".join(
    part.strip() for part in CONTENT_TYPE_LATEST.split(";") if "charset" not in part
)


@get(
    "/metrics",
    tags=["Operations"],
    summary="Prometheus metrics (text exposition format)",
    operation_id="metrics",
    media_type=METRICS_MEDIA_TYPE,
)
async def metrics() -> Response[bytes]:
    return Response(generate_latest(REGISTRY), media_type=METRICS_MEDIA_TYPE)


@head(
    "/metrics", operation_id="metricsHead", include_in_schema=False, media_type=METRICS_MEDIA_TYPE
)
async def metrics_head() -> None:
    """HEAD /metrics: the headers of GET without the body (probes and scrapers check it)."""


@get("/docs", include_in_schema=False, media_type=MediaType.HTML)
async def docs() -> str:
    return DOCS_HTML
