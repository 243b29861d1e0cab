"""An inbound SMS whose transaction PostgreSQL picks as a deadlock victim is run again:
applied once, and Twilio gets 200 with the answer (a real deadlock, real PostgreSQL).

How the deadlock is made, without timing: a test trigger on `inbound_sms` holds the
webhook, right after it claimed its MessageSid, on an advisory lock the test holds.
Meanwhile a second connection B has inserted the sender's opt-out row and then
tries to claim the same MessageSid, so B waits for the webhook. Then the gate
opens: the webhook's STOP inserts the opt-out row and waits for B. B waits with a
long `deadlock_timeout`, the webhook with the default one second, so the webhook is
the one that finds the cycle and is rolled back (40P01). B then gets the MessageSid
row and rolls back, and the webhook's second attempt goes through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlencode

import asyncpg
import httpx
import msgspec
import pytest
from arq.connections import ArqRedis
from twilio.request_validator import RequestValidator

from selfserve.app import create_app
from tests.conftest import ModuleEnv

TOKEN = "twilio-auth-token-for-tests"
PUBLIC = "https://hall.example.com"
SMS_PATH = "/v1/webhooks/twilio/sms"
GATE = 73_051_001  # the advisory lock key the test trigger waits on


@pytest.fixture(scope="module")
async def hook(
    module_env: ModuleEnv, pool: asyncpg.Pool, redis: ArqRedis
) -> AsyncIterator[httpx.AsyncClient]:
    settings = msgspec.structs.replace(
        module_env.settings, public_base_url=PUBLIC, twilio_auth_token=TOKEN
    )
    app = create_app(settings, pool=pool, redis=redis)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://10.0.0.7:8000") as c:
        yield c


@pytest.fixture
async def gate_trigger(pool: asyncpg.Pool) -> AsyncIterator[None]:
    await pool.execute(
        f"""
        CREATE FUNCTION test_inbound_gate() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_advisory_xact_lock_shared({GATE});
            RETURN NEW;
        END $$;
        CREATE TRIGGER test_inbound_gate AFTER INSERT ON inbound_sms
            FOR EACH ROW EXECUTE FUNCTION test_inbound_gate();
        """
    )
    try:
        yield
    finally:
        await pool.execute(
            "DROP TRIGGER test_inbound_gate ON inbound_sms; DROP FUNCTION test_inbound_gate()"
        )


async def until(check: Callable[[], Awaitable[bool]]) -> None:
    """Wait for a state of the database (not for time): polls, bounded."""
    async with asyncio.timeout(30):
        while not await check():
            await asyncio.sleep(0.01)


async def test_a_deadlocked_inbound_sms_is_retried_applied_once_and_answered_200(
    hook: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv, gate_trigger: None
) -> None:
    phone = "+8613800990001"
    sid = "SM" + "d" * 32
    params = {"MessageSid": sid, "From": phone, "To": "+8610690000", "Body": "STOP"}
    headers = {
        "X-Twilio-Signature": RequestValidator(TOKEN).compute_signature(PUBLIC + SMS_PATH, params),
        "Content-Type": "application/x-www-form-urlencoded",
    }
    deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    deadlocks_before = await pool.fetchval(deadlocks)

    gate = await asyncpg.connect(module_env.database_url)
    other = await asyncpg.connect(module_env.database_url)
    request: asyncio.Task[httpx.Response] | None = None
    try:
        await gate.execute("SELECT pg_advisory_lock($1)", GATE)
        b = other.transaction()
        await b.start()
        # B never runs the deadlock check in this test: the webhook does.
        await other.execute("SET LOCAL deadlock_timeout = '10min'")
        await other.execute("INSERT INTO sms_opt_outs (phone, source) VALUES ($1, 'staff')", phone)

        request = asyncio.create_task(
            hook.post(SMS_PATH, content=urlencode(params), headers=headers)
        )

        async def webhook_at_gate() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted AND objid = $1",
                    GATE,
                )
            )

        await until(webhook_at_gate)
        # B now waits for the webhook's uncommitted claim of the same MessageSid.
        b_claim = asyncio.create_task(
            other.fetchval(
                "INSERT INTO inbound_sms (message_sid, from_phone, to_phone, body) "
                "VALUES ($1, $2, '+8610690000', 'x') RETURNING id",
                sid,
                phone,
            )
        )
        b_pid = other.get_server_pid()

        async def b_waits() -> bool:
            found = await pool.fetchval(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", b_pid
            )
            return found == "Lock"

        await until(b_waits)
        # Open the gate: the webhook's STOP now waits for B's opt-out row: a cycle.
        await gate.execute("SELECT pg_advisory_unlock($1)", GATE)
        async with asyncio.timeout(30):
            b_got_the_sid = await b_claim  # the webhook was the victim, not B
        assert b_got_the_sid is not None
        await b.rollback()
        async with asyncio.timeout(30):
            resp = await request
    finally:
        if request is not None and not request.done():
            request.cancel()
        await gate.close()
        await other.close()

    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("application/xml")
    assert "no more messages" in resp.text
    assert await pool.fetchval(deadlocks) == deadlocks_before + 1  # a real deadlock
    rows = await pool.fetch("SELECT intent, reply FROM inbound_sms WHERE message_sid = $1", sid)
    assert [r["intent"] for r in rows] == ["opt_out"]
    assert await pool.fetchval("SELECT source FROM sms_opt_outs WHERE phone = $1", phone) == "sms"
