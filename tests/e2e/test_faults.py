"""Proof under faults, on real servers: PostgreSQL and Valkey of this module's own
(started, stopped and restarted by the test; the machine's shared servers are never
touched), two `selfserve serve` APIs and two `selfserve worker`s, a local Twilio, and
a mixed load of real clients (bookings, walk-in tickets, counters calling them, and
the SMS all of that sends).

After each fault the load's every answer is checked against the database: a request
answered 201 happened exactly once, one answered 4xx did not happen, and one answered
in doubt (503, or no answer) is settled by sending it again with its Idempotency-Key:
the retry replays the original if it had committed, or runs it now. No answer is a
5xx other than a 503 problem document with Retry-After, and none hangs. Every SMS
due is handed to Twilio exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from selfserve import db
from selfserve.auth.tokens import Principal
from selfserve.embedded import EmbeddedServices
from selfserve.messaging.log import masked_body
from selfserve.scheduling import ledger
from tests.conftest import ModuleEnv
from tests.e2e.faults import (
    PROBLEM,
    Answer,
    Load,
    Request,
    bearer,
    call,
    private_servers,
    seed_world,
    stack,
    twilio_env,
)
from tests.live_helpers import board, receive, receive_until
from tests.queue_helpers import open_counters
from tests.twilio_server import FakeTwilio, Reply

pytestmark = pytest.mark.e2e

SETTLE_S = 60.0  # bound on waiting for the load or the stack to reach a state
SMS_SETTLE_S = 330.0  # a send cut off mid-way waits out the lease (120 s) and a sweep


@pytest.fixture(scope="module")
def private() -> Iterator[tuple[EmbeddedServices, ModuleEnv]]:
    with private_servers() as found:
        yield found


@pytest.fixture(scope="module")
def twilio() -> Iterator[FakeTwilio]:
    fake = FakeTwilio().start()
    try:
        yield fake
    finally:
        fake.stop()


@pytest.fixture(scope="module")
async def ppool(private: tuple[EmbeddedServices, ModuleEnv]) -> AsyncIterator[asyncpg.Pool]:
    p = await db.create_pool(private[1].database_url, min_size=1, max_size=4)
    try:
        yield p
    finally:
        await p.close()


async def until(what: str, ok: Callable[[], bool], timeout: float = SETTLE_S) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


async def until_async(
    what: str, ok: Callable[[], Awaitable[bool]], timeout: float = SETTLE_S
) -> None:
    deadline = time.monotonic() + timeout
    while not await ok():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.2)


async def all_ready(urls: list[str]) -> bool:
    async with httpx.AsyncClient(timeout=5, trust_env=False) as c:
        for url in urls:
            try:
                if (await c.get(url + "/ready")).status_code != 200:
                    return False
            except httpx.HTTPError:
                return False
    return True


def unavailable(a: Answer) -> bool:
    """A well-formed 503: a problem document with a stable code and Retry-After."""
    return (
        a.status == 503
        and a.headers.get("content-type", "").startswith(PROBLEM)
        and a.code in ("database_unavailable", "service_unavailable")
        and int(a.headers.get("retry-after", "0")) >= 1
    )


# --- the checks ---------------------------------------------------------------------


def assert_answers_sound(load: Load) -> None:
    """No transport error (no hang, no dropped connection) and no 5xx but a clean 503."""
    broken = [a for a in load.answers if a.status is None]
    assert not broken, [a.error for a in broken[:5]]
    bad = [
        (a.kind, a.status, a.body) for a in load.answers if a.status >= 500 and not unavailable(a)
    ]  # type: ignore[operator]
    assert not bad, bad[:5]


async def settle(load: Load, urls: list[str], tokens: dict[int, str]) -> None:
    """Send every request answered in doubt again, with its key, until it answers."""
    async with httpx.AsyncClient(base_url=urls[0], timeout=60, trust_env=False) as client:
        for req in load.requests:
            for _ in range(30):
                if not req.final.in_doubt:
                    break
                answer = await call(
                    client,
                    req.kind,
                    "POST",
                    req.path,
                    json=req.json,
                    headers=bearer(tokens[req.owner]),
                    key=req.key,
                )
                req.answers.append(answer)
                if answer.in_doubt:
                    await asyncio.sleep(0.5)
            assert not req.final.in_doubt, (req.kind, req.final)


async def assert_requests_happened_exactly_as_answered(pool: asyncpg.Pool, load: Load) -> None:
    """One request per customer: the customer's rows tell whether it happened."""
    for kind, table in (("booking", "bookings"), ("ticket", "tickets")):
        reqs = [r for r in load.requests if r.kind == kind]
        rows = await pool.fetch(
            f"SELECT id, customer_id FROM {table} WHERE customer_id = ANY($1::bigint[])",
            [r.owner for r in reqs],
        )
        made: dict[int, list[int]] = {}
        for row in rows:
            made.setdefault(row["customer_id"], []).append(row["id"])
        for r in reqs:
            created = {a.body["id"] for a in r.answers if a.status == 201 and a.body}
            if r.final.status == 201:
                assert len(created) == 1, (kind, r.answers)  # a retry replays, never redoes
                assert made.get(r.owner) == list(created), (kind, r.owner, made.get(r.owner))
            else:
                assert r.final.status is not None
                assert 400 <= r.final.status < 500, (kind, r.final)
                assert not created, (kind, r.answers)
                assert r.owner not in made, (kind, r.owner, r.answers)


async def assert_state_sound(pool: asyncpg.Pool, load: Load) -> None:
    async with pool.acquire() as conn:
        assert await ledger.overbooked(conn) == []
        # Each booking has its confirmation text: written with it, or not at all.
        lonely = await conn.fetch(
            "SELECT b.id FROM bookings b LEFT JOIN messages m "
            "ON m.dedupe_key = 'booking:' || b.id || ':confirmation' WHERE m.id IS NULL"
        )
        assert lonely == []
        # A counter holds one ticket at most; every ticket called has its text.
        busy = await conn.fetch(
            "SELECT counter_id, count(*) FROM tickets WHERE status IN ('called', 'serving') "
            "GROUP BY counter_id HAVING count(*) > 1"
        )
        assert busy == []
        untexted = await conn.fetch(
            "SELECT t.id FROM tickets t LEFT JOIN messages m "
            "ON m.dedupe_key = 'ticket:' || t.id || ':call:1' "
            "WHERE t.called_at IS NOT NULL AND t.phone IS NOT NULL AND m.id IS NULL"
        )
        assert untexted == []
        called = [t for _, t in load.calls]
        waiting = await conn.fetchval(
            "SELECT count(*) FROM tickets WHERE id = ANY($1::bigint[]) AND status = 'waiting'",
            called,
        )
        assert waiting == 0


async def assert_every_sms_sent_once(pool: asyncpg.Pool, twilio: FakeTwilio, after: int) -> None:
    """Every message due reaches Twilio, and exactly once: the provider's messages and
    the rows marked sent are the same set. (Rows up to id `after` are an earlier
    test's, sent before the fake Twilio was reset.)"""

    async def settled() -> bool:
        left = await pool.fetchval(
            "SELECT count(*) FROM messages WHERE status IN ('pending', 'sending') "
            "AND send_at <= now()"
        )
        return bool(left == 0)

    await until_async("every due SMS to be sent", settled, timeout=SMS_SETTLE_S)
    rows = await pool.fetch(
        "SELECT id, status, phone, template, body, provider_sid FROM messages WHERE id > $1",
        after,
    )
    statuses = Counter(r["status"] for r in rows)
    assert set(statuses) <= {"sent", "pending"}, statuses  # pending: reminders ahead
    sent = {r["provider_sid"]: r for r in rows if r["status"] == "sent"}
    with twilio.lock:
        provider = {m["sid"]: m for m in twilio.messages}
    assert len(sent) == statuses["sent"]  # no sid recorded twice
    assert set(sent) == set(provider), (len(sent), len(provider))
    for sid, row in sent.items():
        # a sign-in code is masked in its row once Twilio has it
        text = masked_body(row["template"], provider[sid]["body"])
        assert (provider[sid]["to"], text) == (row["phone"], row["body"])
    assert sent, "the load sent no SMS"


# --- the faults ------------------------------------------------------------------------


async def test_postgres_restart_under_mixed_load(
    private: tuple[EmbeddedServices, ModuleEnv],
    ppool: asyncpg.Pool,
    twilio: FakeTwilio,
    tmp_path: Path,
) -> None:
    embedded, env = private
    twilio.reset()
    earlier = await ppool.fetchval("SELECT coalesce(max(id), 0) FROM messages")
    world = await seed_world(ppool, env)
    tokens = dict(world.customers)
    with stack(env, tmp_path, extra_env=twilio_env(twilio)) as s:
        urls = s.api_urls()
        pids = {name: p.pid for name, p in s.procs.items()}
        async with httpx.AsyncClient(base_url=urls[0], timeout=60, trust_env=False) as c:
            await open_counters(c, world.hall)
        load = Load(world, urls, ppool)
        load.start()
        try:
            await until(
                "the load to get going",
                lambda: (
                    load.count("booking", 201) >= 10
                    and load.count("ticket", 201) >= 5
                    and len(load.calls) >= 2
                ),
            )
            await asyncio.to_thread(embedded.stop_postgres)

            # While PostgreSQL is down every API answers at once, with a clean 503.
            async with httpx.AsyncClient(timeout=30, trust_env=False) as c:
                for url in urls:
                    customer_id, token = load.next_customer()
                    req = Request(
                        "booking",
                        customer_id,
                        "/v1/bookings",
                        {
                            "branch_id": world.branch_id,
                            "service_id": world.service_id,
                            "start": world.starts[0].isoformat(),
                        },
                        f"probe-{customer_id}",
                    )
                    answer = await call(
                        c,
                        "booking",
                        "POST",
                        url + req.path,
                        json=req.json,
                        headers=bearer(token),
                        key=req.key,
                    )
                    req.answers.append(answer)
                    load.requests.append(req)
                    load.answers.append(answer)
                    assert unavailable(answer), answer
                    assert answer.code == "database_unavailable"
                    for path in (
                        f"/v1/availability?branch_id={world.branch_id}"
                        f"&service_id={world.service_id}&from=2030-01-01T00:00:00Z"
                        "&to=2030-01-02T00:00:00Z",
                        f"/v1/tickets/{load.calls[0][1]}",
                    ):
                        got = await call(
                            c, "probe", "GET", url + path, headers=bearer(world.hall.staff)
                        )
                        load.answers.append(got)
                        assert unavailable(got), got
                    assert (await c.get(url + "/ready")).status_code == 503
            await until("the load to meet the outage", lambda: load.count("booking", 503) >= 3)

            await asyncio.to_thread(embedded.start_postgres)
            # The same processes recover by themselves and the load goes on.
            await until_async("the APIs to be ready again", lambda: all_ready(urls))
            after = load.count("booking", 201), load.count("ticket", 201), len(load.calls)
            await until(
                "the load to go on after the restart",
                lambda: (
                    load.count("booking", 201) >= after[0] + 10
                    and load.count("ticket", 201) >= after[1] + 5
                    and len(load.calls) >= after[2] + 2
                ),
            )
        finally:
            await load.stop()
        assert {name: p.pid for name, p in s.procs.items()} == pids
        assert sorted(s.alive()) == sorted(pids), s.tail()

        assert_answers_sound(load)
        await settle(load, urls, tokens)
        await assert_requests_happened_exactly_as_answered(ppool, load)
        await assert_state_sound(ppool, load)
        await assert_every_sms_sent_once(ppool, twilio, earlier)


def _called_or_waiting(ticket_id: int) -> Callable[[dict[str, Any]], bool]:
    def wanted(m: dict[str, Any]) -> bool:
        if m.get("type") == "board":
            return str(ticket_id) in m.get("tickets", {})
        return m.get("type") == "ticket_called" and m.get("ticket_id") == ticket_id

    return wanted


async def test_redis_restarted_and_flushed_under_mixed_load(
    private: tuple[EmbeddedServices, ModuleEnv],
    ppool: asyncpg.Pool,
    twilio: FakeTwilio,
    tmp_path: Path,
) -> None:
    """Valkey shut down without saving (every job, limit counter and subscription is
    gone) and started again, empty, while the load runs."""
    embedded, env = private
    twilio.reset()
    earlier = await ppool.fetchval("SELECT coalesce(max(id), 0) FROM messages")
    world = await seed_world(ppool, env)
    tokens = dict(world.customers)
    kiosk = bearer(world.hall.kiosk)
    queue_id = world.hall.queues["A"]
    with stack(env, tmp_path, extra_env=twilio_env(twilio)) as s:
        urls = s.api_urls()
        pids = {name: p.pid for name, p in s.procs.items()}
        async with httpx.AsyncClient(base_url=urls[0], timeout=60, trust_env=False) as a:
            await open_counters(a, world.hall)
            load = Load(world, urls, ppool)
            load.start()
            try:
                # A board on the second process; changes go through the first.
                async with board(urls[1], world.hall.branch_id, world.hall.kiosk) as ws:
                    assert (await receive(ws))["type"] == "board"
                    await until(
                        "the load to get going",
                        lambda: (
                            load.count("booking", 201) >= 10
                            and load.count("ticket", 201) >= 5
                            and len(load.calls) >= 2
                        ),
                    )
                    otp = await a.post("/v1/auth/otp", json={"phone": "+8613700000001"})
                    assert otp.status_code == 202, otp.text

                    await asyncio.to_thread(embedded.stop_redis)
                    # Rate limits cannot be counted: sign-in codes are refused (503),
                    # as README says; bookings, tickets and calls go on.
                    otp = await a.post("/v1/auth/otp", json={"phone": "+8613700000002"})
                    assert otp.status_code == 503, otp.text
                    assert otp.headers["content-type"].startswith(PROBLEM)
                    assert (await a.get("/ready")).status_code == 503
                    before = load.count("booking", 201), load.count("ticket", 201), len(load.calls)
                    await until(
                        "the load to go on without Redis",
                        lambda: (
                            load.count("booking", 201) >= before[0] + 5
                            and load.count("ticket", 201) >= before[1] + 3
                            and len(load.calls) >= before[2] + 1
                        ),
                    )

                    await asyncio.to_thread(embedded.start_redis)
                    restarted = datetime.now(UTC)
                    await until_async("the APIs to be ready again", lambda: all_ready(urls))
                    # The board's process subscribes again by itself (with a backoff):
                    # boards made after the restart reach it; then so does a ticket
                    # issued through the other process (waiting on a board, or its call).
                    await receive_until(
                        ws,
                        lambda m: (
                            m.get("type") == "board" and datetime.fromisoformat(m["at"]) > restarted
                        ),
                        2 * SETTLE_S,
                    )
                    taken = await a.post("/v1/tickets", json={"queue_id": queue_id}, headers=kiosk)
                    assert taken.status_code == 201, taken.text
                    await receive_until(ws, _called_or_waiting(taken.json()["id"]), SETTLE_S)
                    otp = await a.post("/v1/auth/otp", json={"phone": "+8613700000003"})
                    assert otp.status_code == 202, otp.text
                after = load.count("booking", 201), load.count("ticket", 201), len(load.calls)
                await until(
                    "the load to go on after the restart",
                    lambda: (
                        load.count("booking", 201) >= after[0] + 5
                        and load.count("ticket", 201) >= after[1] + 3
                        and len(load.calls) >= after[2] + 1
                    ),
                )
            finally:
                await load.stop()
        assert {name: p.pid for name, p in s.procs.items()} == pids
        assert sorted(s.alive()) == sorted(pids), s.tail()

        assert_answers_sound(load)
        await settle(load, urls, tokens)
        await assert_requests_happened_exactly_as_answered(ppool, load)
        await assert_state_sound(ppool, load)
        await assert_every_sms_sent_once(ppool, twilio, earlier)


def holding_connection_to(pids: dict[str, int], port: int) -> str | None:
    """The name of the process with a TCP connection open to `port`, if any."""
    import psutil

    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.raddr and conn.raddr.port == port:
                    return name
    return None


async def test_a_worker_killed_mid_send_neither_loses_nor_doubles_the_sms(
    private: tuple[EmbeddedServices, ModuleEnv],
    ppool: asyncpg.Pool,
    twilio: FakeTwilio,
    tmp_path: Path,
) -> None:
    """Twilio accepts the message and holds its answer; the worker sending it is killed
    (SIGKILL) meanwhile. The row stays claimed; after the lease the other worker asks
    Twilio, finds the message and records it: handed over once, recorded once."""
    _, env = private
    twilio.reset()
    # texts an earlier test of this module left due (reminders) must not be the send held
    await ppool.execute(
        "UPDATE messages SET status = 'canceled' WHERE status IN ('pending', 'sending')"
    )
    world = await seed_world(ppool, env, customers=1)
    customer_id, token = world.customers[0]
    phone = await ppool.fetchval("SELECT phone FROM customers WHERE id = $1", customer_id)
    twilio.reply(Reply(hold=True))
    with stack(env, tmp_path, apis=1, workers=2, extra_env=twilio_env(twilio)) as s:
        async with httpx.AsyncClient(base_url=s.api_urls()[0], timeout=60) as c:
            resp = await c.post(
                "/v1/bookings",
                json={
                    "branch_id": world.branch_id,
                    "service_id": world.service_id,
                    "start": world.starts[0].isoformat(),
                },
                headers=bearer(token),
            )
        assert resp.status_code == 201, resp.text
        await until("Twilio to hold the send", twilio.held.is_set)
        port = int(twilio.base_url.rsplit(":", 1)[1])
        workers = {n: p.pid for n, p in s.procs.items() if n.startswith("worker")}
        found: list[str] = []

        def sender() -> bool:
            name = holding_connection_to(workers, port)
            if name is not None:
                found.append(name)
            return name is not None

        await until("the sending worker's connection", sender)
        s.kill(found[0])
        twilio.release.set()  # Twilio answers; nobody is there to hear it
        # the message Twilio holds (the booking's confirmation, or a reminder due now):
        # claimed by the dead worker, left 'sending'
        claimed = await ppool.fetch(
            "SELECT id, body FROM messages WHERE phone = $1 AND status = 'sending'", phone
        )
        assert len(claimed) == 1, claimed
        mid, body = claimed[0]["id"], claimed[0]["body"]

        async def recorded() -> bool:
            status = await ppool.fetchval("SELECT status FROM messages WHERE id = $1", mid)
            return bool(status == "sent")

        # arq runs the dead worker's job again once its in-progress mark lapses (the
        # claim is still leased: nothing happens); after the lease the sweep enqueues it.
        await until_async("the other worker to settle the send", recorded, 2 * SMS_SETTLE_S)
    row = await ppool.fetchrow("SELECT provider_sid FROM messages WHERE id = $1", mid)
    assert row is not None
    creates = [r for r in twilio.creates if r.fields.get("To") == phone]
    bodies = [r.fields.get("Body") for r in creates]
    assert bodies.count(body) == 1, bodies  # sent once, not twice
    assert row["provider_sid"] in [m["sid"] for m in twilio.sent_to(phone)]
    assert twilio.lookups, "the second attempt asked Twilio first"


async def test_an_api_killed_mid_request_leaves_nothing_half_done(
    private: tuple[EmbeddedServices, ModuleEnv],
    ppool: asyncpg.Pool,
    twilio: FakeTwilio,
    tmp_path: Path,
) -> None:
    """A ticket request is held inside its transaction (the test holds a row its last
    statement needs) and its API process is killed (SIGKILL). The client gets no
    answer; sending it again with its Idempotency-Key to the other process (after 409
    `idempotency_key_in_progress` while a reservation the dead request made lasts) takes
    the ticket exactly once."""
    _, env = private
    twilio.reset()
    world = await seed_world(ppool, env, customers=1)
    customer_id, token = world.customers[0]
    key = "kill-" + uuid.uuid4().hex
    subject = Principal(
        kind="customer", id=customer_id, role="customer", channel="app", branches=()
    ).subject
    body = {"queue_id": world.hall.queues["A"]}
    with stack(env, tmp_path, apis=2, workers=1, extra_env=twilio_env(twilio)) as s:
        a, b = s.api_urls()
        blocker = await asyncpg.connect(env.database_url)
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute(
                "INSERT INTO idempotency_keys (principal, key, request_hash, status_code, "
                "response) VALUES ($1, $2, '\\x00', 201, '{}')",
                subject,
                key,
            )
            async with httpx.AsyncClient(base_url=a, timeout=60, trust_env=False) as c:
                request = asyncio.create_task(
                    call(
                        c,
                        "ticket",
                        "POST",
                        "/v1/tickets",
                        json=body,
                        headers=bearer(token),
                        key=key,
                    )
                )

                async def waiting() -> bool:
                    n = await ppool.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND application_name = 'selfserve'"
                    )
                    return bool(n >= 1)

                await until_async("the request to wait inside its transaction", waiting)
                s.kill("api0")
                answer = await request
            assert answer.status is None, answer  # no answer at all
        finally:
            await tx.rollback()
            await blocker.close()

        async with httpx.AsyncClient(base_url=b, timeout=60, trust_env=False) as c:
            # The dead request may have reserved the key before it died (its database
            # session outlives the process a moment): the retry is told the key is in
            # progress, with Retry-After, until the reservation lapses, and never runs twice.
            async with asyncio.timeout(SETTLE_S):
                while True:
                    first = await call(
                        c,
                        "ticket",
                        "POST",
                        "/v1/tickets",
                        json=body,
                        headers=bearer(token),
                        key=key,
                    )
                    if first.code != "idempotency_key_in_progress":
                        break
                    await asyncio.sleep(float(first.headers.get("retry-after", "1")))
            again = await call(
                c, "ticket", "POST", "/v1/tickets", json=body, headers=bearer(token), key=key
            )
    assert first.status == 201, first
    assert again.status == 201, again
    assert first.body is not None
    assert again.body == first.body
    assert again.headers.get("idempotent-replayed") == "true"
    tickets = await ppool.fetch("SELECT id FROM tickets WHERE customer_id = $1", customer_id)
    assert [t["id"] for t in tickets] == [first.body["id"]]
