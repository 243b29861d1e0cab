"""Customer sign-in across real processes: two API servers, one worker, a local Twilio.

The code is texted by the running arq worker through the real twilio library to a
local Twilio-compatible server; the customer exchanges it at the other API process;
limits kept in Redis hold across both processes.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import asyncpg
import httpx
import pytest

from tests.conftest import ModuleEnv
from tests.twilio_server import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio

pytestmark = pytest.mark.e2e
T = TypeVar("T")
DEADLINE = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def command() -> list[str]:
    script = Path(sys.executable).with_name("selfserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "selfserve"]


def wait_for(what: str, probe: Callable[[], T | None], procs: list[subprocess.Popen[bytes]]) -> T:
    deadline = time.monotonic() + DEADLINE
    while True:
        result = probe()
        if result is not None:
            return result
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"{p.args} exited with {p.returncode} before {what}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def twilio() -> Iterator[FakeTwilio]:
    fake = FakeTwilio().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
def stack(
    module_env: ModuleEnv, twilio: FakeTwilio, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    ports = [free_port(), free_port()]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SELFSERVE_", "TWILIO_"))}
    env.update(
        DATABASE_URL=module_env.database_url,
        REDIS_URL=module_env.redis_url,
        SELFSERVE_ENV="production",
        SELFSERVE_JWT_SECRET="e2e-secret-" + "x" * 40,
        SELFSERVE_PUBLIC_BASE_URL=f"http://127.0.0.1:{ports[0]}",
        SELFSERVE_LOG_LEVEL="WARNING",
        TWILIO_ACCOUNT_SID=ACCOUNT_SID,
        TWILIO_AUTH_TOKEN=AUTH_TOKEN,
        SELFSERVE_TWILIO_FROM=FROM_NUMBER,
        SELFSERVE_TWILIO_API_BASE_URL=twilio.base_url,
        SELFSERVE_QUIET_HOURS_START="00:00",  # codes are time-critical anyway
        SELFSERVE_QUIET_HOURS_END="00:00",
    )
    logs = tmp_path_factory.mktemp("logs")
    procs: list[subprocess.Popen[bytes]] = []
    files = []
    try:
        for i, port in enumerate(ports):
            out = (logs / f"api{i}.log").open("wb")
            files.append(out)
            procs.append(
                subprocess.Popen(
                    [*command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                    env=env,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        out = (logs / "worker.log").open("wb")
        files.append(out)
        procs.append(
            subprocess.Popen(
                [*command(), "worker"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        urls = [f"http://127.0.0.1:{p}" for p in ports]

        def ready(url: str) -> Callable[[], bool | None]:
            def probe() -> bool | None:
                try:
                    return True if httpx.get(url + "/ready", timeout=1).status_code == 200 else None
                except httpx.HTTPError:
                    return None

            return probe

        for url in urls:
            wait_for(f"{url}/ready", ready(url), procs)
        yield urls[0], urls[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for fh in files:
            fh.close()
        for f in logs.iterdir():
            text = f.read_text(errors="replace")
            assert "Traceback" not in text, f"{f.name}:\n{text[-3000:]}"


_numbers = iter(range(20_000_000, 99_999_999))


def new_phone() -> str:
    return f"+86137{next(_numbers):08d}"


def texted_code(
    twilio: FakeTwilio, phone: str, count: int, procs: list[subprocess.Popen[bytes]] | None = None
) -> str:
    def probe() -> str | None:
        sent = twilio.sent_to(phone)
        if len(sent) >= count:
            match = re.search(r"\d{6}", sent[count - 1]["body"])
            return match.group(0) if match else None
        return None

    return wait_for(f"the code for {phone}", probe, procs or [])


async def test_sign_in_through_the_worker_and_two_api_processes(
    stack: tuple[str, str], twilio: FakeTwilio, pool: asyncpg.Pool
) -> None:
    a, b = stack
    phone = new_phone()
    async with httpx.AsyncClient(timeout=10) as http:
        asked = await http.post(f"{a}/v1/auth/otp", json={"phone": phone})
        assert asked.status_code == 202, asked.text
        code = texted_code(twilio, phone, 1)
        sent = twilio.sent_to(phone)[0]
        assert sent["from"] == FROM_NUMBER
        assert await pool.fetchval("SELECT status FROM messages WHERE phone = $1", phone) == "sent"

        # The limit is shared: the other process refuses a second code at once.
        again = await http.post(f"{b}/v1/auth/otp", json={"phone": phone})
        assert again.status_code == 429
        assert int(again.headers["retry-after"]) >= 1

        wrong = "000000" if code != "000000" else "999999"
        refused = await http.post(
            f"{b}/v1/auth/token", json={"phone": phone, "code": wrong, "channel": "app"}
        )
        assert refused.status_code == 401
        tokens = await http.post(
            f"{b}/v1/auth/token", json={"phone": phone, "code": code, "channel": "app"}
        )
        assert tokens.status_code == 200, tokens.text
        me = await http.get(
            f"{a}/v1/me", headers={"Authorization": f"Bearer {tokens.json()['access_token']}"}
        )
        assert me.json()["phone"] == phone
        reused = await http.post(
            f"{a}/v1/auth/token", json={"phone": phone, "code": code, "channel": "app"}
        )
        assert reused.status_code == 401

        # Five wrong tries across both processes lock the code: the sixth fails even if right.
        locked_phone = new_phone()
        await http.post(f"{b}/v1/auth/otp", json={"phone": locked_phone})
        locked_code = texted_code(twilio, locked_phone, 1)
        bad = "000000" if locked_code != "000000" else "999999"
        for i in range(5):
            url = a if i % 2 else b
            resp = await http.post(
                f"{url}/v1/auth/token",
                json={"phone": locked_phone, "code": bad, "channel": "web"},
            )
            assert resp.status_code == 401
        sixth = await http.post(
            f"{a}/v1/auth/token",
            json={"phone": locked_phone, "code": locked_code, "channel": "web"},
        )
        assert sixth.json()["code"] == "code_locked"

        # An expired code is refused.
        late_phone = new_phone()
        await http.post(f"{a}/v1/auth/otp", json={"phone": late_phone})
        late_code = texted_code(twilio, late_phone, 1)
        await pool.execute(
            "UPDATE otp_codes SET expires_at = now() - interval '1 second' WHERE phone = $1",
            late_phone,
        )
        expired = await http.post(
            f"{b}/v1/auth/token", json={"phone": late_phone, "code": late_code, "channel": "app"}
        )
        assert expired.json()["code"] == "code_expired"
