"""create_app(settings) -> Litestar: plugins, routers, lifespan; nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import litestar_offline_docs
from arq.connections import ArqRedis, RedisSettings, create_pool
from litestar import Litestar, Request, Router
from litestar.config.cors import CORSConfig
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.plugins.prometheus import PrometheusConfig
from litestar.static_files import create_static_files_router

from selfserve import __version__, db
from selfserve.auth.routes import AuthController, MeController
from selfserve.bodies import StrictRequest, check_parameters
from selfserve.catalog.routes import ROUTERS as CATALOG_ROUTERS
from selfserve.context import DEPENDENCIES
from selfserve.errors import EXCEPTION_HANDLERS
from selfserve.health import docs, health, metrics, metrics_head, ready
from selfserve.logs import configure_logging
from selfserve.messaging.log import MessageLogController
from selfserve.messaging.webhooks import TwilioWebhookController
from selfserve.middleware import request_id_middleware
from selfserve.openapi_util import PolishedJsonRenderPlugin, polish
from selfserve.queueing import live
from selfserve.queueing.routes import ROUTERS as QUEUE_ROUTERS
from selfserve.scheduling.routes import ROUTERS as BOOKING_ROUTERS
from selfserve.settings import ConfigError, Settings, load_settings

TAGS = [
    Tag(name="Operations", description="Health, readiness and metrics."),
    Tag(name="Identity", description="Sign-in, tokens and the caller's profile."),
    Tag(name="Catalogue", description="Branches and services, readable by anyone."),
    Tag(name="Booking", description="Availability, holds and bookings, at any hour."),
    Tag(
        name="Walk-in queue",
        description="Tickets, check-in, counters and call-next; live board over WebSocket.",
    ),
    Tag(name="Admin: branches", description="Create and manage branches."),
    Tag(name="Admin: services", description="Create and manage services."),
    Tag(name="Admin: resources", description="Counters, staff and rooms with skills."),
    Tag(name="Admin: schedules", description="Weekly shifts and dated exceptions."),
    Tag(name="Admin: queues", description="Walk-in queues: ticket prefix and services."),
    Tag(name="Admin: devices", description="Kiosk devices and their secrets."),
    Tag(name="Admin: staff", description="Staff, manager and admin accounts."),
    Tag(
        name="Admin: bookings",
        description="The day sheet and search; staff cancel and reschedule with a reason.",
    ),
    Tag(name="SMS (Twilio)", description="Signed Twilio webhooks: inbound SMS and delivery."),
]


class LocalSwaggerRenderPlugin(SwaggerRenderPlugin):
    """Swagger UI without its validator badge, which would call validator.swagger.io."""

    def render(self, request: Request[Any, Any, Any], openapi_schema: dict[str, Any]) -> bytes:
        page = super().render(request, polish(openapi_schema))
        return page.replace(b"deepLinking: true,", b"deepLinking: true,\n validatorUrl: null,", 1)


async def schema_pages_only(connection: ASGIConnection[Any, Any, Any, Any], handler: Any) -> None:
    if getattr(handler.fn, "__name__", "") == "handle_schema_path_not_found":
        raise NotFoundException()


def openapi_config() -> OpenAPIConfig:
    return OpenAPIConfig(
        title="selfserve API",
        version=__version__,
        description="24/7 self-service for service halls: appointments, walk-in queues and "
        "SMS. Online payments and reporting are not part of this API yet. Errors are RFC "
        "9457 problem documents with a stable `code`.",
        path="/schema",
        # Every renderer uses the assets this app serves itself: no CDN, works offline.
        # The schema router's catch-all answers an unknown /schema/* path with an HTML
        # page; a guard turns that into the API's problem document like any other path.
        openapi_router=Router(
            "/schema", route_handlers=[], guards=[schema_pages_only], include_in_schema=False
        ),
        render_plugins=[
            LocalSwaggerRenderPlugin(
                js_url="/docs/static/swagger-ui-bundle.js",
                css_url="/docs/static/swagger-ui.css",
                standalone_preset_js_url="/docs/static/swagger-ui-standalone-preset.js",
                favicon="",
                path="/swagger",
            ),
            PolishedJsonRenderPlugin(),
        ],
        tags=TAGS,
        components=Components(
            security_schemes={
                "BearerToken": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    bearer_format="JWT",
                    description="Access token from /v1/auth/*",
                )
            }
        ),
        use_handler_docstrings=False,
    )


def create_app(
    settings: Settings | None = None,
    *,
    pool: asyncpg.Pool | None = None,
    redis: ArqRedis | None = None,
) -> Litestar:
    """Build the API. Collaborators passed in are used (and not closed) as they are."""
    settings = settings or load_settings()
    if settings.jwt_algorithm == "ES256" and settings.otp_secret is None:
        raise ConfigError("ES256 needs SELFSERVE_OTP_SECRET (the sign-in code key)")
    configure_logging(settings.log_format, settings.log_level)

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        own_pool = own_redis = None
        try:
            if pool is None:
                if not settings.database_url:
                    raise ConfigError("DATABASE_URL is not set")
                own_pool = await db.create_pool(
                    settings.database_url,
                    min_size=settings.db_pool_min,
                    max_size=settings.db_pool_max,
                    acquire_timeout=settings.db_acquire_timeout_s,
                    command_timeout=settings.db_command_timeout_s,
                )
            if redis is None:
                if not settings.redis_url:
                    raise ConfigError("REDIS_URL is not set")
                own_redis = await create_pool(RedisSettings.from_dsn(settings.redis_url))
            if own_pool is not None:
                app.state.pool = own_pool
            if own_redis is not None:
                app.state.redis = own_redis
            yield
        finally:
            if own_redis is not None:
                await own_redis.aclose()
            if own_pool is not None:
                await own_pool.close()

    prometheus = PrometheusConfig(
        app_name="selfserve", prefix="selfserve", group_path=True, exclude=["/metrics"]
    )
    static_dir = Path(litestar_offline_docs.__file__).parent / "static"
    state: dict[str, Any] = {"settings": settings, "pool": pool, "redis": redis}
    # Live events across processes: the channels plugin on Redis pub/sub. Its backend
    # has a Redis client of its own, opened and closed by the plugin's lifespan (which
    # runs inside `lifespan` above: started after it, stopped before it).
    channels = live.channels_plugin(settings)
    app = Litestar(
        route_handlers=[
            health,
            ready,
            docs,
            metrics,
            metrics_head,
            create_static_files_router(
                path="/docs/static",
                directories=[static_dir],
                include_in_schema=False,
                name="docs-static",
            ),
            AuthController,
            MeController,
            TwilioWebhookController,
            MessageLogController,
            *CATALOG_ROUTERS,
            *BOOKING_ROUTERS,
            *QUEUE_ROUTERS,
        ],
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        middleware=[prometheus.middleware],
        lifespan=[lifespan],
        plugins=[channels] if channels is not None else [],
        openapi_config=openapi_config(),
        cors_config=CORSConfig(allow_origins=list(settings.cors_origins))
        if settings.cors_origins
        else None,
        request_max_body_size=settings.max_body_bytes,
        # Bodies decoded strictly and totally into the handler's type (selfserve.bodies);
        # instants and dates in the query string checked against the supported range.
        request_class=StrictRequest,
        before_request=check_parameters,
        state=State(state),
        debug=False,
    )
    # Outermost: every request, also one no route matches (404/405 from the router),
    # gets a request id in its problem document and one access-log line.
    app.asgi_handler = request_id_middleware(app.asgi_handler)
    return app


def app_factory() -> Litestar:
    """Entry point for ASGI servers (`uvicorn --factory selfserve.app:app_factory`)."""
    return create_app(load_settings())
