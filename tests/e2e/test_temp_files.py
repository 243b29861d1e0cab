"""A test run leaves nothing behind in the temporary directory.

A small pytest run is started the way CI runs the suite (no DATABASE_URL or REDIS_URL:
embedded PostgreSQL and Valkey in a `selfserve-test-*` folder; API processes logging
into pytest's temporary folders), with TMPDIR pointing at a folder of its own so that
nothing else on the machine writes there. When it has exited, that folder must be
empty but for pytest's per-user root (`pytest-of-<user>`), itself empty: a passing
run keeps no folder of its own (pytest keeps them only for failing runs).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.e2e

# Embedded servers and two API processes with their logs, and pytest's own folders.
SAMPLE = [
    "tests/integration/test_smoke.py",
    "tests/e2e/test_live_processes.py::test_a_server_stops_on_sigterm_with_an_event_stream_open",
]


def leftovers(root: Path) -> list[str]:
    found = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    # pytest's per-user root holds the numbered folders of runs; empty, it is no leftover
    return [p for p in found if not (p.startswith("pytest-of-") and "/" not in p)]


def test_a_pytest_run_leaves_nothing_in_the_temporary_directory() -> None:
    # In /tmp itself (short socket paths), not under pytest's per-user root: the embedded
    # PostgreSQL, run as another user when we are root, opens up the folders above it.
    scratch = Path(tempfile.mkdtemp(prefix="selfserve-tmpcheck-"))
    try:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in {"DATABASE_URL", "REDIS_URL", "XDG_RUNTIME_DIR", "PYTEST_ADDOPTS"}
            and not k.startswith("SELFSERVE_")
        }
        env["TMPDIR"] = str(scratch)
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SAMPLE],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
        assert "3 passed" in run.stdout, run.stdout[-2000:]
        left = leftovers(scratch)
        assert left == [], left
        users = list(scratch.glob("pytest-of-*"))
        assert users, "pytest did not use TMPDIR: the check proves nothing"
        assert [p for u in users for p in u.iterdir()] == []
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
