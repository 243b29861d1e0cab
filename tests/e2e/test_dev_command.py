"""`selfserve dev` as a newcomer runs it: a real process, real sockets, nothing installed.

DATABASE_URL and REDIS_URL are removed from its environment, so it starts embedded
PostgreSQL and Valkey under a temporary data directory, migrates, loads the demo
data, starts the arq worker and serves the API. The test drives it over HTTP, stops
it the way a person does (Ctrl-C to the process group) and checks that it exits 0
and that nothing it started is left running; a second start on the same directory
must find the data again, and stops the way a supervisor does (SIGTERM).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx
import psutil
import pytest
import redis

from selfserve.demo import DEMO_ADMIN_EMAIL, DEMO_ADMIN_PASSWORD
from tests.e2e import processes
from tests.e2e.processes import free_port, selfserve_command, stop_group

pytestmark = pytest.mark.e2e

START_TIMEOUT = 180.0  # first start runs initdb; later starts take a few seconds
STOP_TIMEOUT = 60.0
DEMO_TIMEZONES = {"Shanghai Pudong Hall": "Asia/Shanghai", "London Holborn Centre": "Europe/London"}

T = TypeVar("T")


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, dev: Dev) -> T:
    """Poll `probe` until it returns a value, the process dies, or the deadline passes."""
    return processes.wait_for(what, probe, [dev.proc], timeout=timeout, interval=0.1, logs=dev.logs)


def gone(pid: int) -> bool:
    """True once the process has exited (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@dataclass
class Dev:
    """One `selfserve dev` process and what it started."""

    proc: subprocess.Popen[bytes]
    base_url: str
    data_dir: Path
    out_path: Path
    err_path: Path
    pids: dict[str, int] = field(default_factory=dict)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def logs(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"


def start_dev(data_dir: Path, log_dir: Path, name: str) -> Dev:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "XDG_RUNTIME_DIR"}
        and not k.startswith("SELFSERVE_")
    }
    env["SELFSERVE_DATA_DIR"] = str(data_dir)
    env["PYTHONUNBUFFERED"] = "1"
    port = free_port()
    out_path, err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [*selfserve_command(), "dev", "--port", str(port)],
            env=env,
            cwd=log_dir,
            stdout=out,
            stderr=err,
            # its own process group, so a Ctrl-C can be sent the way a terminal sends it
            start_new_session=True,
        )
    return Dev(proc, f"http://127.0.0.1:{port}", data_dir, out_path, err_path)


def wait_ready(dev: Dev, client: httpx.Client, timeout: float = START_TIMEOUT) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        try:
            resp = client.get("/ready", timeout=5)
        except httpx.TransportError:
            return None
        body: dict[str, Any] = resp.json()
        return body if resp.status_code == 200 else None

    return wait_for("GET /ready to answer 200", probe, timeout, dev)


def record_processes(dev: Dev) -> None:
    """Note the pids of the embedded servers and the worker while they run."""
    pg_pid = int((dev.data_dir / "pg" / "postmaster.pid").read_text().splitlines()[0])
    valkey_pid = int((dev.data_dir / "redis" / "valkey.pid").read_text().strip())
    assert psutil.Process(pg_pid).is_running()
    assert psutil.Process(valkey_pid).is_running()

    def worker_pid() -> int | None:
        for child in psutil.Process(dev.proc.pid).children():
            if "worker" in child.cmdline():
                return child.pid
        return None

    dev.pids = {
        "postgres": pg_pid,
        "valkey": valkey_pid,
        "worker": wait_for("the worker process", worker_pid, 30, dev),
    }


def wait_worker_polling(dev: Dev) -> None:
    """The arq worker writes its health-check key into Redis once its loop runs."""
    conf = (dev.data_dir / "redis" / "valkey.conf").read_text()
    match = re.search(r"^port (\d+)$", conf, re.MULTILINE)
    assert match, conf
    client = redis.Redis(host="127.0.0.1", port=int(match[1]), socket_timeout=5)
    try:
        wait_for(
            "the arq worker to report healthy in Redis",
            lambda: client.get("arq:queue:health-check"),
            60,
            dev,
        )
    finally:
        client.close()
    assert not gone(dev.pids["worker"])


def stop(dev: Dev, *, group: bool, sig: signal.Signals) -> int:
    if group:  # what a terminal does on Ctrl-C: the whole foreground process group
        os.killpg(dev.proc.pid, sig)
    else:  # what a supervisor does: the main process only
        dev.proc.send_signal(sig)
    try:
        return dev.proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"selfserve dev did not stop within {STOP_TIMEOUT:.0f}s\n{dev.logs()}")


def assert_stopped_cleanly(dev: Dev, code: int) -> None:
    assert code == 0, dev.logs()
    assert "Traceback" not in dev.stderr(), dev.logs()
    assert "embedded services stopped" in dev.stdout()
    for name, pid in dev.pids.items():
        assert gone(pid), f"{name} (pid {pid}) still running after selfserve dev exited"
    assert not (dev.data_dir / "pg" / "postmaster.pid").exists()
    assert not (dev.data_dir / "redis" / "valkey.pid").exists()


def cleanup(dev: Dev) -> None:
    """After a failure: leave nothing running."""
    stop_group(dev.proc, timeout=STOP_TIMEOUT)
    for pid in dev.pids.values():
        if not gone(pid):
            psutil.Process(pid).kill()


def printed_credentials(dev: Dev) -> dict[str, str]:
    out = dev.stdout()
    admin = re.search(r"admin:\s+(\S+) / (\S+)", out)
    kiosk = re.search(r"kiosk:\s+device_id (\d+) / secret (\S+)", out)
    docs = re.search(r"API docs:\s+(\S+)", out)
    assert admin, out
    assert kiosk, out
    assert docs, out
    return {
        "email": admin[1],
        "password": admin[2],
        "device_id": kiosk[1],
        "secret": kiosk[2],
        "docs": docs[1],
    }


def all_kiosks(dev: Dev) -> list[dict[str, str]]:
    found = re.findall(r"kiosk:\s+device_id (\d+) / secret (\S+)", dev.stdout())
    return [{"device_id": d, "secret": s} for d, s in found]


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "script" and found.get("src"):
            self.urls.append(found["src"] or "")
        if tag == "link" and found.get("href") and "stylesheet" in (found.get("rel") or ""):
            self.urls.append(found["href"] or "")


def staff_login(client: httpx.Client, email: str, password: str) -> dict[str, str]:
    resp = client.post("/v1/auth/staff/login", json={"email": email, "password": password})
    assert resp.status_code == 200, resp.text
    return {"Authorization": f"Bearer {resp.json()['access_token']}"}


def kiosk_login(client: httpx.Client, creds: dict[str, str]) -> None:
    resp = client.post(
        "/v1/auth/device",
        json={"device_id": int(creds["device_id"]), "secret": creds["secret"]},
    )
    assert resp.status_code == 200, resp.text


def public_branches(client: httpx.Client) -> list[dict[str, Any]]:
    resp = client.get("/v1/branches", params={"limit": 200})
    assert resp.status_code == 200, resp.text
    items: list[dict[str, Any]] = resp.json()["items"]
    return items


def test_dev_runs_everything_stops_cleanly_and_keeps_its_data(tmp_path: Path) -> None:
    workdir = tmp_path
    data_dir = workdir / "data"

    # --- first start: fresh directory, embedded servers initialised ------------------
    dev = start_dev(data_dir, workdir, "first")
    try:
        with httpx.Client(base_url=dev.base_url, timeout=30) as client:
            ready = wait_ready(dev, client)
            assert ready == {"status": "ok", "checks": {"postgres": "ok", "redis": "ok"}}
            record_processes(dev)
            wait_worker_polling(dev)

            creds = printed_credentials(dev)
            assert (creds["email"], creds["password"]) == (DEMO_ADMIN_EMAIL, DEMO_ADMIN_PASSWORD)
            assert creds["docs"] == f"{dev.base_url}/docs"

            # interactive docs that work offline: every asset is served by the app itself
            page = client.get("/docs")
            assert page.status_code == 200
            assert page.headers["content-type"].startswith("text/html")
            parser = _Assets()
            parser.feed(page.text)
            assert parser.urls, page.text
            for url in parser.urls:
                absolute = urljoin(f"{dev.base_url}/docs", url)
                assert urlsplit(absolute).netloc == urlsplit(dev.base_url).netloc, url
                asset = client.get(absolute)
                assert asset.status_code == 200, url
                assert asset.content, url

            schema = client.get("/schema/openapi.json")
            assert schema.status_code == 200
            assert schema.json()["openapi"].startswith("3.1")

            # the demo data: two branches in two time zones
            demo = public_branches(client)
            assert {b["name"]: b["timezone"] for b in demo} == DEMO_TIMEZONES

            # the printed admin and kiosk credentials work, and those of every branch
            kiosk_login(client, creds)
            kiosks = all_kiosks(dev)
            assert len(kiosks) == len(DEMO_TIMEZONES)
            for kiosk in kiosks:
                kiosk_login(client, kiosk)
            accounts = re.findall(r"(?:manager|staff):\s+(\S+) / (\S+)", dev.stdout())
            assert len(accounts) == 2 * len(DEMO_TIMEZONES), dev.stdout()
            for email, password in accounts:
                staff_login(client, email, password)
            admin = staff_login(client, creds["email"], creds["password"])
            branch = client.post(
                "/v1/admin/branches",
                json={
                    "name": "E2E Hall",
                    "timezone": "Europe/Berlin",
                    "address": "1 Teststrasse, Berlin",
                    "opening_hours": [{"weekday": 1, "opens": "09:00", "closes": "17:00"}],
                },
                headers=admin,
            )
            assert branch.status_code == 201, branch.text
            branch_id = branch.json()["id"]
            service = client.post(
                "/v1/admin/services",
                json={"branch_id": branch_id, "name": "Passport renewal", "duration_min": 20},
                headers=admin,
            )
            assert service.status_code == 201, service.text
            resource = client.post(
                "/v1/admin/resources",
                json={
                    "branch_id": branch_id,
                    "kind": "counter",
                    "name": "Counter A",
                    "skills": [service.json()["id"]],
                },
                headers=admin,
            )
            assert resource.status_code == 201, resource.text
            resource_id = resource.json()["id"]

        # Ctrl-C in the terminal
        assert_stopped_cleanly(dev, stop(dev, group=True, sig=signal.SIGINT))
    finally:
        cleanup(dev)

    # --- second start: same directory, the data is still there, demo not loaded twice
    dev = start_dev(data_dir, workdir, "second")
    try:
        with httpx.Client(base_url=dev.base_url, timeout=30) as client:
            wait_ready(dev, client)
            record_processes(dev)
            wait_worker_polling(dev)

            branches = public_branches(client)
            names = sorted(b["name"] for b in branches)
            assert names == sorted([*DEMO_TIMEZONES, "E2E Hall"])
            assert next(b for b in branches if b["id"] == branch_id)["timezone"] == "Europe/Berlin"

            again = printed_credentials(dev)
            assert again["secret"] == creds["secret"]
            assert all_kiosks(dev) == kiosks
            kiosk_login(client, again)
            admin = staff_login(client, again["email"], again["password"])
            kept = client.get(f"/v1/admin/resources/{resource_id}", headers=admin)
            assert kept.status_code == 200, kept.text
            assert kept.json()["name"] == "Counter A"

        # a supervisor's stop: SIGTERM to the main process only
        assert_stopped_cleanly(dev, stop(dev, group=False, sig=signal.SIGTERM))
    finally:
        cleanup(dev)
    shutil.rmtree(data_dir)  # kept after a failure, for the logs in it
