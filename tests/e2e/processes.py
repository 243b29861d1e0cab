"""Real `selfserve` processes for the end-to-end tests: started on free ports with an
environment of their own, polled until ready, and always stopped (their whole process
group), whether the test passed or not."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

import httpx
import pytest

from tests.conftest import ModuleEnv

T = TypeVar("T")
DEADLINE = 60.0  # seconds a process may take to become ready
STOP_TIMEOUT = 20.0
LOG_TAIL = 3000

Process = subprocess.Popen[bytes]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def selfserve_command() -> list[str]:
    """The installed `selfserve` script next to this interpreter, else `python -m selfserve`."""
    script = Path(sys.executable).with_name("selfserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "selfserve"]


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    procs: Sequence[Process] = (),
    *,
    timeout: float = DEADLINE,
    interval: float = 0.05,
    logs: Callable[[], str] | None = None,
) -> T:
    """Poll `probe` until it returns a value; fail when one of `procs` exits first or
    the deadline passes (with `logs()` in the message, when given)."""
    deadline = time.monotonic() + timeout
    while True:
        result = probe()
        if result is not None:
            return result
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args!r} exited with {p.returncode} before {what}{_tail(logs)}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}{_tail(logs)}")
        time.sleep(interval)


def _tail(logs: Callable[[], str] | None) -> str:
    return f"\n{logs()}" if logs is not None else ""


def ready(url: str) -> Callable[[], bool | None]:
    """A probe for `wait_for`: True once GET {url}/ready answers 200."""

    def probe() -> bool | None:
        try:
            return True if httpx.get(url + "/ready", timeout=1).status_code == 200 else None
        except httpx.HTTPError:
            return None

    return probe


def service_env(
    module_env: ModuleEnv,
    secret: str,
    public_base_url: str,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a production-mode process on the module's database and Redis;
    nothing of the caller's SELFSERVE_* / TWILIO_* settings leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFSERVE_", "TWILIO_"))}
    env.update(
        DATABASE_URL=module_env.database_url,
        REDIS_URL=module_env.redis_url,
        SELFSERVE_ENV="production",
        SELFSERVE_JWT_SECRET=secret,
        SELFSERVE_PUBLIC_BASE_URL=public_base_url,
        SELFSERVE_LOG_LEVEL="WARNING",
        TWILIO_AUTH_TOKEN="e2e-twilio-token",
    )
    env.update(extra_env or {})
    return env


def signal_group(proc: Process, sig: signal.Signals) -> None:
    """Send `sig` to the process group `proc` leads (started with start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, sig)


def stop_group(
    proc: Process, *, sig: signal.Signals = signal.SIGTERM, timeout: float = STOP_TIMEOUT
) -> int:
    """Stop the process group of `proc`: `sig`, then SIGKILL if it outlives `timeout`."""
    if proc.poll() is None:
        signal_group(proc, sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_group(proc, signal.SIGKILL)
        return proc.wait()


@contextlib.contextmanager
def api_processes(
    module_env: ModuleEnv,
    n: int,
    secret: str,
    tmp_dir: Path,
    *,
    extra_env: Mapping[str, str] | None = None,
    worker: bool = False,
) -> Iterator[list[str]]:
    """`n` API processes (`selfserve serve`), and an arq worker if `worker`, on the
    module's database and Redis; yields their base URLs once every API answers
    /ready 200. Each runs in its own process group, logging to `tmp_dir`; all are
    stopped on the way out, even when starting them or the body failed. After a clean
    run no log may hold a traceback. (The module's Redis db starts empty: conftest.)"""
    ports = [free_port() for _ in range(n)]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    env = service_env(module_env, secret, urls[0], extra_env)
    procs: list[Process] = []
    files: list[IO[bytes]] = []
    paths: list[Path] = []

    def start(name: str, args: list[str]) -> None:
        path = tmp_dir / f"{name}.log"
        out = path.open("wb")
        files.append(out)
        paths.append(path)
        procs.append(
            subprocess.Popen(
                [*selfserve_command(), *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )
        )

    def logs() -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-LOG_TAIL:]}" for p in paths
        )

    clean = False
    try:
        for i, port in enumerate(ports):
            start(f"api{i}", ["serve", "--host", "127.0.0.1", "--port", str(port)])
        if worker:
            start("worker", ["worker"])
        for url in urls:
            wait_for(f"{url}/ready", ready(url), procs, logs=logs)
        yield urls
        clean = True
    finally:
        for p in procs:
            if p.poll() is None:
                signal_group(p, signal.SIGTERM)
        for p in procs:
            stop_group(p)
        for fh in files:
            fh.close()
    if clean:
        for path in paths:
            text = path.read_text(errors="replace")
            assert "Traceback" not in text, f"{path.name}:\n{text[-LOG_TAIL:]}"
