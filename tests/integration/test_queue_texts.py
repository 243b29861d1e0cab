"""Queue texts and sweeps against real PostgreSQL: one "go to counter" text per call
(across transfers and recalls), deadlines on queue texts and sign-in codes, closing
a day's tickets only when the branch closed, and the turn-near sweep."""

from __future__ import annotations

import asyncio
import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest
from arq.connections import ArqRedis, RedisSettings
from arq.worker import Worker

from selfserve import worker as worker_module
from selfserve.auth.tokens import Principal
from selfserve.messaging.templates import render
from selfserve.queueing import service as svc
from selfserve.queueing.models import TicketCreate
from selfserve.queueing.sweeps import close_stale_tickets, sweep_turn_near
from tests.conftest import ModuleEnv
from tests.queue_helpers import Hall, hall, open_counters, staff_post, take

_seq = itertools.count(1)


def phone() -> str:
    return f"+8613911{next(_seq):06d}"


def kiosk(h: Hall) -> Principal:
    return Principal(kind="device", id=1, role="kiosk", channel="kiosk", branches=(h.branch_id,))


def clerk(h: Hall) -> Principal:
    return Principal(kind="staff", id=1, role="staff", channel="staff", branches=(h.branch_id,))


async def texts(pool: asyncpg.Pool, template: str, to: str) -> list[asyncpg.Record]:
    """Texts of `template` to one phone; "turn_near" includes its "you are next" form."""
    templates = [template, "turn_near_next"] if template == "turn_near" else [template]
    return await pool.fetch(
        "SELECT body, status, dedupe_key, send_at, expires_at FROM messages "
        "WHERE template = ANY($1::text[]) AND phone = $2 ORDER BY id",
        templates,
        to,
    )


# --- one text per call --------------------------------------------------------------


async def test_every_call_is_texted_once_across_a_transfer_and_recalls(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, durations=(10, 20), counters=2, counter_skills=[[0], [1]])
    await open_counters(client, h)
    to = phone()
    t = await take(client, h.kiosk, h.queues["A"], phone=to)
    first, second = h.counters

    called = (await staff_post(client, h, f"/v1/counters/{first}/call-next")).json()
    assert called["id"] == t["id"]
    resp = await staff_post(client, h, f"/v1/tickets/{t['id']}/transfer", queue_id=h.queues["B"])
    assert resp.status_code == 200, resp.text
    called = (await staff_post(client, h, f"/v1/counters/{second}/call-next")).json()
    assert (called["id"], called["recalls"]) == (t["id"], 0)
    resp = await staff_post(client, h, f"/v1/tickets/{t['id']}/recall")
    assert resp.json()["recalls"] == 1

    sent = await texts(pool, "ticket_called", to)
    names = {r["id"]: r["name"] for r in await pool.fetch("SELECT id, name FROM resources")}

    def go_to(counter: int) -> str:
        return render("ticket_called", "en", ticket=t["display_code"], counter=names[counter]).body

    assert [(r["body"], r["status"]) for r in sent] == [
        # not yet out when the ticket moved: it named a counter the ticket had left
        (go_to(first), "canceled"),
        (go_to(second), "pending"),
        (go_to(second), "pending"),
    ]
    assert len({r["dedupe_key"] for r in sent}) == 3


async def test_a_call_clicked_many_times_at_once_is_one_call_and_one_text(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, counters=1)
    await open_counters(client, h)
    phones = [phone() for _ in range(3)]
    for p in phones:
        await take(client, h.kiosk, h.queues["A"], phone=p)
    (counter,) = h.counters

    answers = await asyncio.gather(
        *(staff_post(client, h, f"/v1/counters/{counter}/call-next") for _ in range(6))
    )

    codes = sorted(r.status_code for r in answers)
    assert codes == [200] + [409] * 5
    assert {r.json()["code"] for r in answers if r.status_code == 409} == {"counter_busy"}
    assert [len(await texts(pool, "ticket_called", p)) for p in phones] == [1, 0, 0]


# --- deadlines ---------------------------------------------------------------------------


async def test_queue_texts_and_sign_in_codes_carry_their_deadline(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    settings = module_env.settings
    h = await hall(pool, module_env, counters=1)
    await open_counters(client, h)
    phones = [phone() for _ in range(3)]
    for p in phones:
        await take(client, h.kiosk, h.queues["A"], phone=p)
    now = datetime.now(UTC).replace(microsecond=0)

    await svc.call_next(pool, clerk(h), h.counters[0], now=now, settings=settings, locale="en")
    await svc.text_turn_near(pool, None, h.branch_id, now=now, settings=settings)

    ttl = timedelta(minutes=settings.queue_text_ttl_min)
    [called] = await texts(pool, "ticket_called", phones[0])
    [near] = await texts(pool, "turn_near", phones[1])
    assert (called["send_at"], called["expires_at"]) == (now, now + ttl)
    assert (near["send_at"], near["expires_at"]) == (now, now + ttl)

    otp_phone = phone()
    resp = await client.post("/v1/auth/otp", json={"phone": otp_phone})
    assert resp.status_code == 202, resp.text
    code_expires = await pool.fetchval(
        "SELECT expires_at FROM otp_codes WHERE phone = $1", otp_phone
    )
    [code] = await texts(pool, "sign_in_code", otp_phone)
    assert code["expires_at"] == code_expires  # a code is not sent once it is dead


# --- closing a day's tickets -----------------------------------------------------------------


async def day_of_tickets(
    pool: asyncpg.Pool,
    env: ModuleEnv,
    client: httpx.AsyncClient,
    h: Hall,
    *,
    zone: str,
    evening: datetime,
) -> dict[str, dict[str, Any]]:
    """Tickets taken in the evening (branch wall time): one served, one called, one
    waiting, each with a phone."""
    settings = env.settings
    await open_counters(client, h)
    out: dict[str, dict[str, Any]] = {}
    for i, name in enumerate(("serving", "called", "waiting")):
        to = phone()
        at = (evening + timedelta(minutes=i)).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)
        ticket, _, _ = await svc.issue_ticket(
            pool,
            kiosk(h),
            TicketCreate(queue_id=h.queues["A"], phone=to),
            idempotency_key=None,
            now=at,
            settings=settings,
            locale="en",
        )
        out[name] = {"id": ticket.id, "phone": to, "code": ticket.display_code}
    at = (evening + timedelta(minutes=5)).replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)
    first, second = h.counters
    await svc.call_next(pool, clerk(h), first, now=at, settings=settings, locale="en")
    await svc.act(
        pool, clerk(h), out["serving"]["id"], "start", now=at, settings=settings, locale="en"
    )
    await svc.call_next(pool, clerk(h), second, now=at, settings=settings, locale="en")
    return out


async def states(pool: asyncpg.Pool, h: Hall) -> dict[int, str]:
    rows = await pool.fetch("SELECT id, status FROM tickets WHERE branch_id = $1", h.branch_id)
    return {r["id"]: r["status"] for r in rows}


def at(zone: str, wall: datetime) -> dict[str, Any]:
    """A sweep's context whose clock reads `wall` in `zone`."""
    instant = wall.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)
    return {"clock": lambda: instant}


async def test_a_24_hour_branch_keeps_its_queue_across_midnight(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    zone = "Asia/Shanghai"
    h = await hall(pool, module_env, timezone=zone, counters=2)  # open 00:00-24:00 daily
    day = await day_of_tickets(
        pool, module_env, client, h, zone=zone, evening=datetime(2026, 3, 10, 23, 52)
    )
    before = await states(pool, h)
    assert sorted(before.values()) == ["called", "serving", "waiting"]

    for wall in (datetime(2026, 3, 11, 0, 3), datetime(2026, 3, 14, 12, 0)):
        await close_stale_tickets({"pool": pool, **at(zone, wall)})
        assert await states(pool, h) == before  # still open, days later too
    assert [len(await texts(pool, "ticket_closed", t["phone"])) for t in day.values()] == [0] * 3


async def test_a_24_hour_branch_across_the_autumn_clock_change(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    zone = "Europe/London"  # 2026-10-25 01:00 GMT: clocks go back, the day has 25 hours
    h = await hall(pool, module_env, timezone=zone, counters=2)
    await day_of_tickets(
        pool, module_env, client, h, zone=zone, evening=datetime(2026, 10, 24, 23, 50)
    )
    before = await states(pool, h)

    await close_stale_tickets({"pool": pool, **at(zone, datetime(2026, 10, 25, 3, 0))})
    assert await states(pool, h) == before

    # Closed for one day: the next sweep after that midnight closes the queue.
    await pool.execute(
        """UPDATE branches SET closures = '[{"date": "2026-10-26", "reason": "Holiday"}]'
        WHERE id = $1""",
        h.branch_id,
    )
    await close_stale_tickets({"pool": pool, **at(zone, datetime(2026, 10, 25, 23, 59))})
    assert await states(pool, h) == before
    await close_stale_tickets({"pool": pool, **at(zone, datetime(2026, 10, 26, 0, 5))})
    assert sorted((await states(pool, h)).values()) == ["cancelled", "cancelled", "done"]


async def test_a_branch_that_closed_overnight_closes_the_days_leftovers_and_says_so(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    zone = "Asia/Shanghai"
    hours = [{"weekday": d, "opens": "09:00", "closes": "17:00"} for d in range(1, 8)]
    h = await hall(pool, module_env, timezone=zone, opening_hours=hours, counters=2)
    day = await day_of_tickets(
        pool, module_env, client, h, zone=zone, evening=datetime(2026, 3, 10, 16, 30)
    )
    before = await states(pool, h)

    # Closing time has passed, but it is still the same local day.
    await close_stale_tickets({"pool": pool, **at(zone, datetime(2026, 3, 10, 23, 55))})
    assert await states(pool, h) == before

    closed = await close_stale_tickets({"pool": pool, **at(zone, datetime(2026, 3, 11, 0, 3))})
    assert closed >= 3
    after = await states(pool, h)
    assert {name: after[t["id"]] for name, t in day.items()} == {
        "serving": "done",
        "called": "cancelled",
        "waiting": "cancelled",
    }
    for name, t in day.items():
        told = await texts(pool, "ticket_closed", t["phone"])
        if name == "serving":
            assert told == []
            continue
        [text] = told
        assert t["code"] in text["body"]
        assert "cancelled" in text["body"]
        # Its pending "go to counter" text is not sent after the queue closed.
        assert {r["status"] for r in await texts(pool, "ticket_called", t["phone"])} <= {"canceled"}
    # Once closed, nothing more happens.
    await close_stale_tickets({"pool": pool, **at(zone, datetime(2026, 3, 11, 0, 13))})
    assert await states(pool, h) == after
    assert [len(await texts(pool, "ticket_closed", t["phone"])) for t in day.values()] == [0, 1, 1]


# --- the turn-near sweep ----------------------------------------------------------------------


async def test_the_turn_near_sweep_texts_what_a_dead_process_left_once_under_concurrency(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    settings = module_env.settings
    h = await hall(pool, module_env, counters=1)
    await open_counters(client, h)
    phones = [phone() for _ in range(6)]
    for p in phones:
        await take(client, h.kiosk, h.queues["A"], phone=p)
    ctx = {"pool": pool, "settings": settings}

    async def near() -> list[str]:
        rows = await pool.fetch(
            "SELECT phone FROM messages WHERE template IN ('turn_near', 'turn_near_next') AND branch_id = $1",
            h.branch_id,
        )
        return sorted(r["phone"] for r in rows)

    # A call commits, and its process dies before its turn-near check.
    now = datetime.now(UTC)
    await svc.call_next(pool, clerk(h), h.counters[0], now=now, settings=settings, locale="en")
    assert await near() == []

    # Eight sweeps and the after-commit check, all at once: each phone texted once.
    await asyncio.gather(
        *(sweep_turn_near(ctx) for _ in range(8)),
        svc.text_turn_near(pool, None, h.branch_id, now=now, settings=settings),
    )
    assert await near() == sorted(phones[1:4])

    # The next call dies the same way: the 5th ticket is now 3rd.
    first = await ticket_at(pool, h, "called")
    await svc.act(pool, clerk(h), first, "start", now=now, settings=settings, locale="en")
    await svc.act(pool, clerk(h), first, "finish", now=now, settings=settings, locale="en")
    await svc.call_next(pool, clerk(h), h.counters[0], now=now, settings=settings, locale="en")
    assert await near() == sorted(phones[1:4])
    await asyncio.gather(*(sweep_turn_near(ctx) for _ in range(4)))
    assert await near() == sorted(phones[1:5])
    await sweep_turn_near(ctx)
    assert await near() == sorted(phones[1:5])


async def ticket_at(pool: asyncpg.Pool, h: Hall, status: str) -> int:
    found: int = await pool.fetchval(
        "SELECT id FROM tickets WHERE branch_id = $1 AND status = $2", h.branch_id, status
    )
    return found


async def test_the_worker_runs_the_turn_near_sweep_every_minute(
    client: httpx.AsyncClient,
    pool: asyncpg.Pool,
    redis: ArqRedis,
    module_env: ModuleEnv,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    by_name = {c.name: c for c in worker_module.WorkerSettings.cron_jobs}
    assert by_name["cron:sweep_turn_near"].second == 50  # once a minute
    assert by_name["cron:sweep_turn_near"].run_at_startup

    monkeypatch.setenv("DATABASE_URL", module_env.database_url)
    monkeypatch.setenv("REDIS_URL", module_env.redis_url)
    monkeypatch.setenv("SELFSERVE_LOG_LEVEL", "WARNING")
    h = await hall(pool, module_env, counters=1)
    await open_counters(client, h)
    phones = [phone() for _ in range(3)]
    for p in phones:
        await take(client, h.kiosk, h.queues["A"], phone=p)
    now = datetime.now(UTC)
    await svc.call_next(
        pool, clerk(h), h.counters[0], now=now, settings=module_env.settings, locale="en"
    )

    assert await redis.enqueue_job("sweep_turn_near") is not None
    w = Worker(
        functions=worker_module.WorkerSettings.functions,
        on_startup=worker_module.startup,
        on_shutdown=worker_module.shutdown,
        redis_settings=RedisSettings.from_dsn(module_env.redis_url),
        burst=True,
        poll_delay=0,
        handle_signals=False,
    )
    try:
        async with asyncio.timeout(60):
            await w.main()
    finally:
        await w.close()

    assert w.jobs_failed == 0
    for p in phones[1:]:
        [text] = await texts(pool, "turn_near", p)
        assert text["status"] == "sent"  # the sweep's texts went out (console transport)
