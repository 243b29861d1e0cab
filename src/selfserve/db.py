"""PostgreSQL access: pool, transactions, migrations."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

import asyncpg
import msgspec
import structlog
from asyncpg.pool import PoolConnectionProxy

from selfserve.errors import DatabaseUnavailable
from selfserve.paths import project_dir

log = structlog.get_logger("selfserve.db")

Pool = asyncpg.Pool
Record = asyncpg.Record
# A plain connection or one borrowed from a pool: what SQL helpers accept.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

# Any constant will do; it only has to be the same for every process that migrates.
MIGRATION_LOCK_KEY = 7_305_822_914_001
MIGRATION_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


async def _init_connection(conn: asyncpg.Connection) -> None:
    for typ in ("json", "jsonb"):
        await conn.set_type_codec(typ, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


# While PostgreSQL is down or restarting, a request waits at most this long for a
# connection (connecting included) before it is answered 503 `database_unavailable`.
ACQUIRE_TIMEOUT_S = 10.0
COMMAND_TIMEOUT_S = 30.0

# Failures that mean "the database cannot be reached right now", not "this request is
# wrong": the connection was refused, lost or timed out, or the server is starting up
# or shutting down (SQLSTATE classes 08 and 57).
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


class BoundedPool(asyncpg.Pool):
    """An asyncpg pool whose `acquire()` (and so `pool.fetch()` & co.) never waits
    unboundedly: without a timeout of its own it uses the pool's, and a connection that
    cannot be had in time, or cannot be opened at all, is `DatabaseUnavailable`."""

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout = acquire_timeout

    async def _acquire(self, timeout: float | None) -> PoolConnectionProxy[Any]:  # noqa: ASYNC109 (asyncpg's own signature)
        try:
            proxy: PoolConnectionProxy[Any] = await super()._acquire(  # type: ignore[misc]
                self._acquire_timeout if timeout is None else timeout
            )
        except UNAVAILABLE as exc:
            raise DatabaseUnavailable() from exc
        return proxy

    async def release(
        self,
        connection: PoolConnectionProxy[Any],
        *,
        timeout: float | None = None,  # noqa: ASYNC109 (asyncpg's own signature)
    ) -> None:
        """Give a connection back. If the server went away meanwhile, resetting it
        fails; asyncpg then closes it (the pool opens a new one when needed) and
        re-raises. That error is not the request's: its work was already committed
        or rolled back, so it is logged, not raised over a good answer."""
        try:
            await super().release(connection, timeout=timeout)
        except (*UNAVAILABLE, asyncpg.InterfaceError, asyncpg.InternalClientError) as exc:
            if "received invalid connection" in str(exc):
                raise  # not one of ours: a bug, not an outage
            log.warning("db_release_failed", error=type(exc).__name__, detail=str(exc))


async def create_pool(
    dsn: str,
    *,
    min_size: int = 1,
    max_size: int = 10,
    acquire_timeout: float = ACQUIRE_TIMEOUT_S,
    command_timeout: float = COMMAND_TIMEOUT_S,
) -> asyncpg.Pool:
    """A pool that recovers by itself after PostgreSQL restarts: a connection found
    dead is replaced on its next acquire; meanwhile requests fail fast (503)."""
    pool = BoundedPool(
        dsn,
        acquire_timeout=acquire_timeout,
        min_size=min_size,
        max_size=max_size,
        max_queries=50_000,
        max_inactive_connection_lifetime=300.0,
        init=_init_connection,
        loop=None,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        command_timeout=command_timeout,
        timeout=acquire_timeout,  # connecting
        server_settings={"application_name": "selfserve", "timezone": "UTC"},
    )
    await pool
    return pool


@asynccontextmanager
async def transaction(pool: asyncpg.Pool) -> AsyncIterator[Conn]:
    """One connection, one transaction: commit on success, roll back on any error."""
    async with pool.acquire() as conn, conn.transaction():
        yield conn


# Transient failures worth running the whole transaction again for.
RETRYABLE = (
    asyncpg.exceptions.DeadlockDetectedError,  # 40P01
    asyncpg.exceptions.SerializationError,  # 40001
)
T = TypeVar("T")


async def in_transaction_with_retry(
    pool: asyncpg.Pool, fn: Callable[[Conn], Awaitable[T]], *, attempts: int = 5
) -> T:
    """Run `fn(conn)` in one transaction; on 40P01/40001 roll back and run it again.

    `fn` must do all its work through `conn` (it may run more than once). After
    `attempts` tries the last error propagates. Domain errors are not retried.
    """
    for attempt in range(1, attempts + 1):
        try:
            async with pool.acquire() as conn, conn.transaction():
                return await fn(conn)
        except RETRYABLE as exc:
            if attempt == attempts:
                raise
            log.info("transaction_retry", attempt=attempt, sqlstate=exc.sqlstate)
            # A little jitter so the transactions that collided do not collide again.
            await asyncio.sleep(random.uniform(0, 0.002 * 2**attempt))  # noqa: S311
    raise AssertionError("unreachable")


# --- migrations -------------------------------------------------------------


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(Exception):
    pass


def migrations_dir() -> Path:
    return project_dir("migrations")


def load_migrations(directory: Path | None = None) -> list[Migration]:
    directory = directory or migrations_dir()
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = MIGRATION_FILE.match(path.name)
        if not match:
            raise MigrationError(f"migration file name not understood: {path.name}")
        found.append(Migration(int(match[1]), match[2], path.read_text(encoding="utf-8")))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise MigrationError("two migration files share a version number")
    return found


async def migrate(conn: Conn, directory: Path | None = None) -> list[int]:
    """Apply pending migrations, each in its own transaction; return versions applied.

    A session-level advisory lock serialises concurrent runners: the second waits,
    then finds nothing left to do. An applied file whose text changed is an error.
    """
    pending = load_migrations(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        rows = await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        applied = {r["version"]: r for r in rows}
        done: list[int] = []
        for mig in pending:
            if mig.version in applied:
                if applied[mig.version]["checksum"] != mig.checksum:
                    raise MigrationError(
                        f"migration {mig.version:04d}_{mig.name} changed after it was applied"
                    )
                continue
            async with conn.transaction():
                await conn.execute(mig.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    mig.version,
                    mig.name,
                    mig.checksum,
                )
            log.info("migration_applied", version=mig.version, name=mig.name)
            done.append(mig.version)
        return done
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def migrate_url(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn)
    finally:
        await conn.close()


def to_struct(row: asyncpg.Record | None, typ: type[T]) -> T:
    """Convert a row to a Struct; a row that vanished is a LookupError (a bug, not input)."""
    if row is None:
        raise LookupError(f"expected a {typ.__name__} row")
    return msgspec.convert(dict(row), typ)


def constraint_of(exc: BaseException) -> str | None:
    name = getattr(exc, "constraint_name", None)
    return name if isinstance(name, str) else None


def rows(records: list[asyncpg.Record]) -> list[dict[str, Any]]:
    return [dict(r) for r in records]
