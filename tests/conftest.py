"""Test infrastructure: real PostgreSQL and Redis, one database per test module.

`DATABASE_URL` / `REDIS_URL` are used when set; otherwise embedded PostgreSQL and
Valkey are started for the session. A template database is migrated once, and each
test module gets its own database cloned from it (and its own Redis db index).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import msgspec
import pytest
from arq.connections import ArqRedis, RedisSettings, create_pool
from litestar import Litestar
from redis import Redis as SyncRedis

from selfserve import db
from selfserve.app import create_app
from selfserve.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def with_redis_db(url: str, index: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{index}", parts.query, parts.fragment))


@dataclass
class Servers:
    database_url: str  # server-level URL (maintenance database)
    redis_url: str
    template: str


async def _create_template(admin_url: str, template: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{template}"')
        await conn.execute(f'CREATE DATABASE "{template}"')
    finally:
        await conn.close()
    await db.migrate_url(with_database(admin_url, template))


async def _drop(admin_url: str, name: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    database_url = os.environ.get("DATABASE_URL")
    redis_url = os.environ.get("REDIS_URL")
    embedded = None
    tmp = None
    if not database_url or not redis_url:
        from selfserve.embedded import EmbeddedServices

        tmp = Path(tempfile.mkdtemp(prefix="selfserve-test-"))
        embedded = EmbeddedServices(tmp, persist_redis=False).start()
        database_url = database_url or embedded.admin_database_url
        redis_url = redis_url or embedded.redis_url
    template = f"selfserve_tpl_{os.getpid()}"
    asyncio.run(_create_template(database_url, template))
    try:
        yield Servers(database_url=database_url, redis_url=redis_url, template=template)
    finally:
        asyncio.run(_drop(database_url, template))
        if embedded is not None:
            embedded.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


REDIS_LEASE_S = 3600


@contextmanager
def redis_db_lease(server_url: str) -> Iterator[int]:
    """Claim a Redis db index (1-15) for one module. The claim is a key in db 0, so
    test runs sharing one Redis server (several checkouts, several runners) never
    flush each other's data. Waits while all 15 are taken."""
    token = uuid.uuid4().hex
    client = SyncRedis.from_url(with_redis_db(server_url, 0))
    start = next(_redis_start)
    try:
        while True:
            for offset in range(15):
                index = (start + offset) % 15 + 1
                if client.set(f"selfserve-test:db:{index}", token, nx=True, ex=REDIS_LEASE_S):
                    break
            else:
                time.sleep(0.2)  # every index is in use by another run: wait for one
                continue
            break
        # The index is ours alone now: start it empty (a killed run may have left keys).
        with SyncRedis.from_url(with_redis_db(server_url, index)) as fresh:
            fresh.flushdb()
        try:
            yield index
        finally:
            key = f"selfserve-test:db:{index}"
            if client.get(key) == token.encode():
                client.delete(key)
    finally:
        client.close()


_redis_start = itertools.count()


@dataclass
class ModuleEnv:
    database_url: str
    redis_url: str
    admin_url: str
    settings: Settings


@pytest.fixture(scope="module")
def module_env(servers: Servers) -> Iterator[ModuleEnv]:
    name = f"selfserve_t_{uuid.uuid4().hex[:12]}"

    async def clone() -> None:
        conn = await asyncpg.connect(servers.database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}" TEMPLATE "{servers.template}"')
        finally:
            await conn.close()

    asyncio.run(clone())
    try:
        with redis_db_lease(servers.redis_url) as index:
            redis_url = with_redis_db(servers.redis_url, index)
            settings = Settings(
                environment="test",
                database_url=with_database(servers.database_url, name),
                redis_url=redis_url,
                public_base_url="http://testserver.local",
                log_level="WARNING",
            )
            yield ModuleEnv(settings.database_url or "", redis_url, servers.database_url, settings)
    finally:
        asyncio.run(_drop(servers.database_url, name))


@pytest.fixture(scope="module")
async def pool(module_env: ModuleEnv) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(module_env.database_url, min_size=1, max_size=10)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture(scope="module")
async def redis(module_env: ModuleEnv) -> AsyncIterator[ArqRedis]:
    r = await create_pool(RedisSettings.from_dsn(module_env.redis_url))
    await r.flushdb()
    try:
        yield r
    finally:
        await r.aclose()


@pytest.fixture(scope="module")
def app(module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis) -> Litestar:
    return create_app(module_env.settings, pool=pool, redis=redis)


@pytest.fixture(scope="module")
async def client(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client driving the real app in this event loop, on the module's pool."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver.local") as c:
        yield c


def settings_with(module_env: ModuleEnv, **changes: object) -> Settings:
    return msgspec.structs.replace(module_env.settings, **changes)  # type: ignore[arg-type]
