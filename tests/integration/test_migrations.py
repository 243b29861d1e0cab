"""Migrations as an operator runs them: `selfserve db migrate` on fresh databases.

- run twice in a row, the second run applies nothing;
- every file is recorded once in `schema_migrations` with its checksum;
- two runs started at the same moment both succeed and build the schema once,
  identical to the template database the rest of the suite uses;
- an applied migration whose text changed stops the run with a clear message.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from selfserve import cli, db
from tests.conftest import Servers, with_database

CATALOG_QUERIES = {
    "columns": """
        SELECT table_name, column_name, data_type, is_nullable, column_default,
               is_identity, identity_generation
        FROM information_schema.columns
        WHERE table_schema = 'public'
        ORDER BY table_name, column_name
    """,
    "constraints": """
        SELECT conrelid::regclass::text AS tbl, conname, contype, pg_get_constraintdef(oid) AS def
        FROM pg_constraint
        WHERE connamespace = 'public'::regnamespace
        ORDER BY tbl, conname
    """,
    "indexes": """
        SELECT tablename, indexname, indexdef
        FROM pg_indexes WHERE schemaname = 'public'
        ORDER BY tablename, indexname
    """,
    "triggers": """
        SELECT tgrelid::regclass::text AS tbl, tgname, pg_get_triggerdef(oid) AS def
        FROM pg_trigger WHERE NOT tgisinternal
        ORDER BY tbl, tgname
    """,
    "functions": """
        SELECT p.proname, pg_get_function_identity_arguments(p.oid) AS args
        FROM pg_proc p LEFT JOIN pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
        WHERE p.pronamespace = 'public'::regnamespace AND d.objid IS NULL
        ORDER BY 1, 2
    """,
    "types": """
        SELECT t.typname, coalesce(string_agg(e.enumlabel, ',' ORDER BY e.enumsortorder), '')
        FROM pg_type t LEFT JOIN pg_enum e ON e.enumtypid = t.oid
        WHERE t.typnamespace = 'public'::regnamespace AND t.typtype IN ('e', 'd')
        GROUP BY t.typname ORDER BY t.typname
    """,
    "extensions": "SELECT extname FROM pg_extension ORDER BY extname",
    "migrations": "SELECT version, name, checksum FROM schema_migrations ORDER BY version",
}


async def catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """What the migrations built, in a form two databases can be compared by."""
    conn = await asyncpg.connect(url)
    try:
        return {
            name: [tuple(r.values()) for r in await conn.fetch(sql)]
            for name, sql in CATALOG_QUERIES.items()
        }
    finally:
        await conn.close()


def cli_env(database_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SELFSERVE_")}
    env.pop("REDIS_URL", None)
    env["DATABASE_URL"] = database_url
    return env


def start_migrate(database_url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "selfserve", "db", "migrate"],
        env=cli_env(database_url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


FreshDb = Callable[[], Awaitable[str]]


@pytest.fixture(scope="module")
async def fresh_database(servers: Servers) -> AsyncIterator[FreshDb]:
    """Make empty databases (no template, no migrations) on the test server."""
    names: list[str] = []

    async def make() -> str:
        name = f"selfserve_m_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(servers.database_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        names.append(name)
        return with_database(servers.database_url, name)

    yield make
    conn = await asyncpg.connect(servers.database_url)
    try:
        for name in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def test_migrate_twice_applies_once_and_records_checksums(fresh_database: FreshDb) -> None:
    url = await fresh_database()
    files = db.load_migrations()
    assert files, "no migration files found"

    code, out, err = finish(start_migrate(url))
    assert code == 0, err
    assert f"applied {len(files)} migration(s)" in out

    code, out, err = finish(start_migrate(url))
    assert code == 0, err
    assert "applied 0 migration(s)" in out

    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT version, name, checksum, applied_at FROM schema_migrations ORDER BY version"
        )
    finally:
        await conn.close()
    expected = [
        (m.version, m.name, hashlib.sha256(m.sql.encode()).hexdigest())
        for m in sorted(files, key=lambda m: m.version)
    ]
    assert [(r["version"], r["name"], r["checksum"]) for r in rows] == expected
    assert all(r["applied_at"] is not None for r in rows)


async def test_concurrent_migrate_runs_build_the_schema_once(
    servers: Servers, fresh_database: FreshDb
) -> None:
    url = await fresh_database()
    # Hold the migration lock so both runs are certainly waiting on it together,
    # then let them race for it.
    holder = await asyncpg.connect(url)
    procs: list[subprocess.Popen[str]] = []
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", db.MIGRATION_LOCK_KEY)
        procs = [start_migrate(url), start_migrate(url)]
        deadline = time.monotonic() + 60
        waiting = 0
        while waiting < 2:
            assert all(p.poll() is None for p in procs), [finish(p) for p in procs]
            assert time.monotonic() < deadline, "both runs never waited on the migration lock"
            await asyncio.sleep(0.05)
            waiting = await holder.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        await holder.execute("SELECT pg_advisory_unlock($1)", db.MIGRATION_LOCK_KEY)
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        await holder.close()

    assert [code for code, _, _ in results] == [0, 0], results
    outputs = sorted(out.strip().splitlines()[-1] for _, out, _ in results)
    assert outputs[0] == "applied 0 migration(s)", outputs
    assert outputs[1].startswith(f"applied {len(db.load_migrations())} migration(s)"), outputs

    built = await catalog(url)
    reference = await catalog(with_database(servers.database_url, servers.template))
    assert reference["columns"], "the template database has no tables"
    assert reference["constraints"]
    assert built == reference


def write_migrations(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")


async def test_changed_applied_migration_is_refused(
    fresh_database: FreshDb, tmp_path: Path
) -> None:
    url = await fresh_database()
    migrations = tmp_path / "migrations"
    write_migrations(
        migrations,
        {
            "0001_first.sql": "CREATE TABLE first (id int PRIMARY KEY);",
            "0002_second.sql": "CREATE TABLE second (id int PRIMARY KEY);",
        },
    )
    conn = await asyncpg.connect(url)
    try:
        assert await db.migrate(conn, migrations) == [1, 2]
        assert await db.migrate(conn, migrations) == []

        # someone edits an applied file and adds a new one
        write_migrations(
            migrations,
            {
                "0001_first.sql": "CREATE TABLE first (id int PRIMARY KEY, extra text);",
                "0003_third.sql": "CREATE TABLE third (id int PRIMARY KEY);",
            },
        )
        with pytest.raises(db.MigrationError, match=r"0001_first changed after it was applied"):
            await db.migrate(conn, migrations)

        # nothing after the bad file ran, and the lock was released for the next run
        assert await conn.fetchval("SELECT to_regclass('third')") is None
        assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == 2
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
            )
            == 0
        )
    finally:
        await conn.close()


async def test_cli_reports_a_changed_migration_without_a_traceback(
    fresh_database: FreshDb,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    migrations = tmp_path / "migrations"
    write_migrations(migrations, {"0001_first.sql": "CREATE TABLE first (id int);"})
    monkeypatch.setattr(db, "migrations_dir", lambda: migrations)
    monkeypatch.setenv("DATABASE_URL", await fresh_database())

    def run_cli() -> int | str | None:
        # the command runs its own event loop, so it gets a thread of its own
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["db", "migrate"])
        return exit_info.value.code

    assert await asyncio.to_thread(run_cli) == 0
    write_migrations(migrations, {"0001_first.sql": "CREATE TABLE first (id bigint);"})
    capsys.readouterr()
    assert await asyncio.to_thread(run_cli) == 2
    err = capsys.readouterr().err
    assert "migration 0001_first changed after it was applied" in err
    assert "Traceback" not in err
