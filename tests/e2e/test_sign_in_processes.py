"""Customer sign-in across real processes: two API servers, one worker, a local Twilio.

The code is texted by the running arq worker through the real twilio library to a
local Twilio-compatible server; the customer exchanges it at the other API process;
limits kept in Redis hold across both processes.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator

import asyncpg
import httpx
import pytest

from tests.conftest import ModuleEnv
from tests.e2e.processes import DEADLINE, Process, api_processes, wait_for
from tests.twilio_server import ACCOUNT_SID, AUTH_TOKEN, FROM_NUMBER, FakeTwilio

pytestmark = pytest.mark.e2e


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
    extra_env = {
        "TWILIO_ACCOUNT_SID": ACCOUNT_SID,
        "TWILIO_AUTH_TOKEN": AUTH_TOKEN,
        "SELFSERVE_TWILIO_FROM": FROM_NUMBER,
        "SELFSERVE_TWILIO_API_BASE_URL": twilio.base_url,
        "SELFSERVE_QUIET_HOURS_START": "00:00",  # codes are time-critical anyway
        "SELFSERVE_QUIET_HOURS_END": "00:00",
    }
    with api_processes(
        module_env,
        2,
        "e2e-secret-" + "x" * 40,
        tmp_path_factory.mktemp("logs"),
        extra_env=extra_env,
        worker=True,
    ) as (a, b):
        yield a, b


_numbers = iter(range(20_000_000, 99_999_999))


def new_phone() -> str:
    return f"+86137{next(_numbers):08d}"


def texted_code(
    twilio: FakeTwilio, phone: str, count: int, procs: list[Process] | None = None
) -> str:
    def probe() -> str | None:
        sent = twilio.sent_to(phone)
        if len(sent) >= count:
            match = re.search(r"\d{6}", sent[count - 1]["body"])
            return match.group(0) if match else None
        return None

    return wait_for(f"the code for {phone}", probe, procs or [])


async def settled_status(pool: asyncpg.Pool, phone: str) -> str:
    """The status of the phone's message once it has left 'pending' and 'sending'."""
    deadline = time.monotonic() + DEADLINE
    while True:
        status: str = await pool.fetchval("SELECT status FROM messages WHERE phone = $1", phone)
        if status not in ("pending", "sending") or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.05)


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
        # The worker records 'sent' once Twilio has answered: a moment after the text
        # arrived there.
        assert await settled_status(pool, phone) == "sent"

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
