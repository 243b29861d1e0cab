"""The walk-in queue against real PostgreSQL: tickets and their daily numbers,
closing, call-next under concurrency, the ticket's life, check-in, ETAs and SMS."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import httpx
import pytest

from selfserve.auth.tokens import Principal
from selfserve.messaging.templates import render
from selfserve.queueing import policy as call_policy
from selfserve.queueing import service as svc
from selfserve.queueing.models import TicketCreate
from selfserve.queueing.sweeps import close_stale_tickets
from selfserve.scheduling import ledger
from tests.booking_helpers import sms
from tests.conftest import ModuleEnv
from tests.helpers import bearer
from tests.queue_helpers import customer, hall, open_counters, staff_post, take


def kiosk_principal(branch_id: int) -> Principal:
    return Principal(kind="device", id=1, role="kiosk", channel="kiosk", branches=(branch_id,))


# --- tickets and numbers --------------------------------------------------------------


async def test_tickets_get_daily_codes_places_and_clear_refusals(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, durations=(10, 20))
    other = await hall(pool, module_env)
    first = await take(client, h.kiosk, h.queues["A"])
    second = await take(client, h.kiosk, h.queues["A"], phone="+8613900000001", priority=0)
    other_queue = await take(client, h.kiosk, h.queues["B"])
    assert (first["display_code"], first["position"], first["status"]) == ("A001", 1, "waiting")
    assert (second["display_code"], second["position"]) == ("A002", 2)
    assert (other_queue["display_code"], other_queue["position"]) == ("B001", 1)
    assert first["eta"] is None  # no counter open: the wait is unknown

    _, _, remote = await customer(pool, module_env)
    joined = await take(client, remote, h.queues["A"])
    assert (joined["display_code"], joined["channel"]) == ("A003", "app")
    seen = await client.get(f"/v1/tickets/{joined['id']}", headers=bearer(remote))
    assert seen.status_code == 200
    _, _, stranger = await customer(pool, module_env)
    assert (
        await client.get(f"/v1/tickets/{joined['id']}", headers=bearer(stranger))
    ).status_code == 404

    cases: list[tuple[str, dict[str, Any], int, str]] = [
        (remote, {"queue_id": h.queues["A"], "priority": 2}, 422, "validation_error"),
        (remote, {"queue_id": h.queues["A"], "phone": "+8613900000002"}, 422, "validation_error"),
        (
            h.kiosk,
            {"queue_id": h.queues["A"], "service_id": h.services[1]},
            422,
            "validation_error",
        ),
        (h.kiosk, {"queue_id": 10**12}, 404, "not_found"),
        (other.kiosk, {"queue_id": h.queues["A"]}, 404, "not_found"),
        (h.kiosk, {"queue_id": h.queues["A"], "priority": 10}, 422, "validation_error"),
        (h.kiosk, {"queue_id": h.queues["A"], "phone": "12345"}, 422, "validation_error"),
    ]
    before = await pool.fetchval("SELECT count(*) FROM tickets")
    for tok, body, status, code in cases:
        resp = await client.post("/v1/tickets", json=body, headers=bearer(tok))
        assert (resp.status_code, resp.json()["code"]) == (status, code), body
    assert await pool.fetchval("SELECT count(*) FROM tickets") == before

    # leaving the queue moves everyone behind up
    resp = await client.post(f"/v1/tickets/{first['id']}/cancel", headers=bearer(h.kiosk))
    assert resp.json()["status"] == "cancelled"
    assert (await client.get(f"/v1/tickets/{second['id']}", headers=bearer(h.kiosk))).json()[
        "position"
    ] == 1
    resp = await client.post(f"/v1/tickets/{first['id']}/cancel", headers=bearer(h.kiosk))
    assert (resp.status_code, resp.json()["code"]) == (409, "ticket_not_active")


async def test_300_concurrent_issues_get_300_distinct_numbers_without_gaps(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env)
    results = await asyncio.gather(*(take(client, h.kiosk, h.queues["A"]) for _ in range(300)))
    codes = sorted(r["display_code"] for r in results)
    assert codes == [f"A{n:03d}" for n in range(1, 301)]
    numbers = await pool.fetch(
        "SELECT number FROM tickets WHERE queue_id = $1 ORDER BY number", h.queues["A"]
    )
    assert [r["number"] for r in numbers] == list(range(1, 301))


@pytest.mark.parametrize("zone", ["Asia/Shanghai", "Europe/London"])
async def test_numbers_restart_at_branch_midnight(
    pool: asyncpg.Pool, module_env: ModuleEnv, zone: str
) -> None:
    h = await hall(pool, module_env, timezone=zone)
    tz = ZoneInfo(zone)
    # a night this winter and one in summer (London on +01:00): 23:58, 23:59, 00:00, 00:01
    for day in (datetime(2026, 12, 14), datetime(2027, 7, 14)):
        midnight = datetime(day.year, day.month, day.day + 1, tzinfo=tz).astimezone(UTC)
        codes = []
        for offset in (-2, -1, 0, 1):
            out, _, _ = await svc.issue_ticket(
                pool,
                kiosk_principal(h.branch_id),
                TicketCreate(queue_id=h.queues["A"]),
                idempotency_key=None,
                now=midnight + timedelta(minutes=offset),
                settings=module_env.settings,
                locale="en",
            )
            codes.append(out.display_code)
        assert codes == ["A001", "A002", "A001", "A002"], (zone, day)
    dates = await pool.fetch(
        "SELECT local_date, count(*) FROM tickets WHERE queue_id = $1 GROUP BY 1 ORDER BY 1",
        h.queues["A"],
    )
    assert [(str(r["local_date"]), r["count"]) for r in dates] == [
        ("2026-12-14", 2),
        ("2026-12-15", 2),
        ("2027-07-14", 2),
        ("2027-07-15", 2),
    ]


async def test_a_closed_branch_or_a_wait_past_closing_refuses_tickets(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    shut = await hall(pool, module_env, opening_hours=[])
    resp = await client.post(
        "/v1/tickets", json={"queue_id": shut.queues["A"]}, headers=bearer(shut.kiosk)
    )
    assert (resp.status_code, resp.json()["code"]) == (409, "queue_closed")
    assert resp.json()["reason"] == "branch_closed"

    # open until 30 minutes from now; one counter, 10-minute service
    now = datetime.now(UTC).astimezone(ZoneInfo("Asia/Shanghai"))
    closes = now + timedelta(minutes=30)
    # just before local midnight the day ends at 24:00
    closes_text = "24:00" if closes.date() != now.date() else closes.strftime("%H:%M")
    hours = [{"weekday": now.isoweekday(), "opens": "00:00", "closes": closes_text}]
    h = await hall(pool, module_env, opening_hours=hours, counters=1)
    await open_counters(client, h)
    taken = 0
    while True:
        resp = await client.post(
            "/v1/tickets", json={"queue_id": h.queues["A"]}, headers=bearer(h.kiosk)
        )
        if resp.status_code != 201:
            break
        taken += 1
        assert taken < 20
    assert (resp.status_code, resp.json()["code"], resp.json()["reason"]) == (
        409,
        "queue_closed",
        "wait_past_closing",
    )
    assert 1 <= taken <= 4  # ~3 ten-minute services fit in the half hour left


# --- call-next ---------------------------------------------------------------------


async def seed_waiting(pool: asyncpg.Pool, h: Any, count: int, *, priorities: list[int]) -> None:
    """`count` waiting tickets issued over the last minutes (none aged yet)."""
    now = datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        for n in range(count):
            await conn.execute(
                """
                INSERT INTO tickets (branch_id, queue_id, service_id, local_date, number,
                                     display_code, priority, channel, issued_at)
                VALUES ($1, $2, $3, $4, $5, $6, $7, 'kiosk', $8)
                """,
                h.branch_id,
                h.queues["A"],
                h.services[0],
                now.date(),
                n + 1,
                f"A{n + 1:03d}",
                priorities[n % len(priorities)],
                now - timedelta(minutes=5) + timedelta(milliseconds=n),
            )


async def test_ten_counters_calling_at_once_call_every_ticket_once_in_policy_order(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, counters=10)
    await open_counters(client, h)
    await seed_waiting(pool, h, 500, priorities=[0, 0, 0, 1, 0, 2, 0])
    rows = await pool.fetch(
        "SELECT id, service_id, issued_at, priority, appointment_at FROM tickets "
        "WHERE branch_id = $1",
        h.branch_id,
    )
    expected = call_policy.order(
        [call_policy.WaitingTicket(**dict(r)) for r in rows], None, datetime.now(UTC)
    )
    calls: list[int] = []

    async def counter(cid: int) -> None:
        while True:
            resp = await staff_post(client, h, f"/v1/counters/{cid}/call-next")
            if resp.status_code == 409:
                assert resp.json()["code"] == "no_ticket_waiting"
                return
            assert resp.status_code == 200, resp.text
            ticket = resp.json()
            calls.append(ticket["id"])
            for step in ("start", "finish"):
                done = await staff_post(client, h, f"/v1/tickets/{ticket['id']}/{step}")
                assert done.status_code == 200, done.text

    await asyncio.gather(*(counter(c) for c in h.counters))
    assert sorted(calls) == sorted(r["id"] for r in rows)  # each exactly once
    by_counter = await pool.fetch(
        "SELECT counter_id, count(*) FROM tickets WHERE branch_id = $1 GROUP BY 1", h.branch_id
    )
    assert len(by_counter) == 10  # every counter worked
    # in policy order: with 10 counters racing, a call can overtake at most the 9
    # calls in flight beside it
    rank = {t.id: i for i, t in enumerate(expected)}
    called_order = await pool.fetch(
        "SELECT id FROM tickets WHERE branch_id = $1 ORDER BY called_at, id", h.branch_id
    )
    drift = [abs(i - rank[r["id"]]) for i, r in enumerate(called_order)]
    assert max(drift) < 10, max(drift)


async def test_a_counter_gets_only_what_its_staff_can_serve_and_appointments_first(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, durations=(10, 20), counters=2, counter_skills=[[1], [0, 1]])
    await open_counters(client, h)
    a = await take(client, h.kiosk, h.queues["A"])
    b = await take(client, h.kiosk, h.queues["B"])
    elderly = await take(client, h.kiosk, h.queues["A"], priority=2)
    only_b, both = h.counters
    resp = await staff_post(client, h, f"/v1/counters/{only_b}/call-next")
    assert resp.json()["id"] == b["id"]
    resp = await staff_post(client, h, f"/v1/counters/{only_b}/call-next")
    assert (resp.status_code, resp.json()["code"]) == (409, "counter_busy")
    await staff_post(client, h, f"/v1/tickets/{b['id']}/start")
    await staff_post(client, h, f"/v1/tickets/{b['id']}/finish")
    resp = await staff_post(client, h, f"/v1/counters/{only_b}/call-next")
    assert (resp.status_code, resp.json()["code"]) == (409, "no_ticket_waiting")
    # the priority class goes before the earlier walk-in
    resp = await staff_post(client, h, f"/v1/counters/{both}/call-next")
    assert resp.json()["id"] == elderly["id"]
    await staff_post(client, h, f"/v1/tickets/{elderly['id']}/start")
    await staff_post(client, h, f"/v1/tickets/{elderly['id']}/finish")
    resp = await staff_post(client, h, f"/v1/counters/{both}/call-next")
    assert resp.json()["id"] == a["id"]
    # a closed counter calls nobody
    await staff_post(client, h, f"/v1/counters/{only_b}/close")
    resp = await staff_post(client, h, f"/v1/counters/{only_b}/call-next")
    assert (resp.status_code, resp.json()["code"]) == (409, "counter_closed")
    # a kiosk or a customer cannot call
    resp = await client.post(f"/v1/counters/{both}/call-next", headers=bearer(h.kiosk))
    assert resp.status_code == 403


# --- a ticket's life ----------------------------------------------------------------


async def test_recall_no_show_start_finish_and_transfer(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, durations=(10, 20), counters=1)
    await open_counters(client, h)
    first = await take(client, h.kiosk, h.queues["A"])
    second = await take(client, h.kiosk, h.queues["A"])
    late = await take(client, h.kiosk, h.queues["B"])
    (counter,) = h.counters
    called = (await staff_post(client, h, f"/v1/counters/{counter}/call-next")).json()
    assert called["id"] == first["id"]
    resp = await staff_post(client, h, f"/v1/tickets/{first['id']}/no-show")
    assert (resp.status_code, resp.json()["code"]) == (409, "recall_first")
    for n in (1, 2):
        resp = await staff_post(client, h, f"/v1/tickets/{first['id']}/recall")
        assert resp.json()["recalls"] == n
    resp = await staff_post(client, h, f"/v1/tickets/{first['id']}/no-show")
    assert resp.json()["status"] == "no_show"
    resp = await staff_post(client, h, f"/v1/tickets/{first['id']}/start")
    assert (resp.status_code, resp.json()["code"]) == (409, "ticket_state")

    # the B ticket moves to queue A and, issued before nobody else waiting there but
    # after `second`, keeps its place by issue time: behind `second`
    resp = await staff_post(client, h, f"/v1/tickets/{late['id']}/transfer", queue_id=h.queues["A"])
    moved = resp.json()
    assert (moved["queue_id"], moved["display_code"], moved["issued_at"]) == (
        h.queues["A"],
        late["display_code"],
        late["issued_at"],
    )
    assert moved["position"] == 2
    nxt = (await staff_post(client, h, f"/v1/counters/{counter}/call-next")).json()
    assert nxt["id"] == second["id"]
    resp = await staff_post(client, h, f"/v1/tickets/{second['id']}/finish")
    assert (resp.status_code, resp.json()["code"]) == (409, "ticket_state")
    await staff_post(client, h, f"/v1/tickets/{second['id']}/start")
    done = (await staff_post(client, h, f"/v1/tickets/{second['id']}/finish")).json()
    assert done["status"] == "done"
    # the finished service taught the EWMA
    assert (
        await pool.fetchval(
            "SELECT samples FROM service_time_stats WHERE service_id = $1", h.services[0]
        )
        == 1
    )


# --- check-in -----------------------------------------------------------------------


async def booking_at(
    pool: asyncpg.Pool, h: Any, starts_at: datetime, **extra: Any
) -> dict[str, Any]:
    async with pool.acquire() as conn, conn.transaction():
        rid = await conn.fetchval(
            "INSERT INTO resources (branch_id, kind, name) VALUES ($1, 'room', 'Room') RETURNING id",
            h.branch_id,
        )
        await conn.execute(
            "INSERT INTO resource_skills (resource_id, service_id) VALUES ($1, $2)",
            rid,
            h.services[0],
        )
        booking = await ledger.create_booking(
            conn,
            service_id=h.services[0],
            resource_id=rid,
            starts_at=starts_at,
            party_size=1,
            channel="app",
            now=starts_at - timedelta(days=1),
            **extra,
        )
    return {"id": booking.id, "code": booking.code}


async def test_check_in_inside_the_window_joins_the_queue_first(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, counters=1)
    await open_counters(client, h)
    walk_in = await take(client, h.kiosk, h.queues["A"])
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    soon = await booking_at(pool, h, now + timedelta(minutes=5))
    early = await booking_at(pool, h, now + timedelta(hours=3))
    late = await booking_at(pool, h, now - timedelta(hours=1))

    resp = await client.post("/v1/check-ins", json={"code": early["code"]}, headers=bearer(h.kiosk))
    assert (resp.status_code, resp.json()["code"]) == (409, "check_in_too_early")
    opens = datetime.fromisoformat(resp.json()["window_opens_at"])
    assert opens == now + timedelta(hours=3) - timedelta(minutes=30)
    resp = await client.post("/v1/check-ins", json={"code": late["code"]}, headers=bearer(h.kiosk))
    assert (resp.status_code, resp.json()["code"]) == (409, "check_in_too_late")
    resp = await client.post("/v1/check-ins", json={"code": "ZZZZZZ"}, headers=bearer(h.kiosk))
    assert resp.status_code == 404
    other = await hall(pool, module_env)
    resp = await client.post(
        "/v1/check-ins", json={"code": soon["code"]}, headers=bearer(other.kiosk)
    )
    assert resp.status_code == 404

    resp = await client.post(
        "/v1/check-ins", json={"code": soon["code"].lower()}, headers=bearer(h.kiosk)
    )
    assert resp.status_code == 201, resp.text
    ticket = resp.json()
    assert (ticket["kind"], ticket["booking_id"], ticket["position"]) == (
        "appointment",
        soon["id"],
        1,
    )
    resp = await client.post("/v1/check-ins", json={"code": soon["code"]}, headers=bearer(h.kiosk))
    assert (resp.status_code, resp.json()["code"]) == (409, "already_checked_in")
    resp = await client.post(
        "/v1/check-ins", json={"booking_id": soon["id"]}, headers=bearer(h.kiosk)
    )
    assert (resp.status_code, resp.json()["code"]) == (409, "already_checked_in")
    # the appointment due now goes before the walk-in who came earlier
    (counter,) = h.counters
    called = (await staff_post(client, h, f"/v1/counters/{counter}/call-next")).json()
    assert called["id"] == ticket["id"]
    assert walk_in["id"] != called["id"]


async def test_a_customer_checks_in_from_the_app_with_their_own_booking_only(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env)
    cid, _, tok = await customer(pool, module_env)
    _, _, other = await customer(pool, module_env)
    start = datetime.now(UTC).replace(second=0, microsecond=0) + timedelta(minutes=10)
    mine = await booking_at(pool, h, start, customer_id=cid)
    resp = await client.post(
        "/v1/check-ins", json={"booking_id": mine["id"]}, headers=bearer(other)
    )
    assert resp.status_code == 404
    resp = await client.post(
        "/v1/check-ins", json={"booking_id": mine["id"], "code": mine["code"]}, headers=bearer(tok)
    )
    assert resp.status_code == 422
    resp = await client.post("/v1/check-ins", json={"booking_id": mine["id"]}, headers=bearer(tok))
    assert resp.status_code == 201, resp.text
    assert (
        await client.get(f"/v1/tickets/{resp.json()['id']}", headers=bearer(tok))
    ).status_code == 200


# --- ETA and SMS --------------------------------------------------------------------


async def test_eta_follows_open_counters_and_the_work_ahead(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, durations=(10,), counters=2)
    tickets = [await take(client, h.kiosk, h.queues["A"]) for _ in range(4)]
    assert all(t["eta"] is None for t in tickets)
    await open_counters(client, h, h.counters[:1])
    one = (await client.get(f"/v1/tickets/{tickets[3]['id']}", headers=bearer(h.kiosk))).json()
    await open_counters(client, h, h.counters[1:])
    two = (await client.get(f"/v1/tickets/{tickets[3]['id']}", headers=bearer(h.kiosk))).json()
    # 3 ten-minute services ahead: ~30 min with one counter, ~10-20 with two
    assert one["eta"]["low_min"] <= 30 <= one["eta"]["high_min"]
    assert two["eta"]["high_min"] < one["eta"]["low_min"] + 5
    assert "min" in one["eta"]["text"]
    zh = await client.get(
        f"/v1/tickets/{tickets[3]['id']}",
        headers={**bearer(h.kiosk), "Accept-Language": "zh-CN"},
    )
    assert "分钟" in zh.json()["eta"]["text"]
    board = (await client.get(f"/v1/branches/{h.branch_id}/queues")).json()["items"]
    assert [(q["prefix"], q["waiting"], q["open_counters"]) for q in board] == [("A", 4, 2)]
    assert board[0]["estimated_wait"] is not None


async def test_sms_called_turn_near_status_and_survey(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, counters=1)
    await open_counters(client, h)
    phones = [f"+8613700{n:05d}{h.branch_id % 10}" for n in range(5)]
    tickets = [await take(client, h.kiosk, h.queues["A"], phone=p) for p in phones]
    (counter,) = h.counters

    reply = await sms(pool, phones[4], "STATUS", module_env.settings)
    assert tickets[4]["display_code"] in reply
    assert "4 ahead" in reply

    # the counter's display name is said as it is, in either language
    await pool.execute("UPDATE resources SET name = 'Counter 1' WHERE id = $1", counter)
    called = (await staff_post(client, h, f"/v1/counters/{counter}/call-next")).json()
    assert called["id"] == tickets[0]["id"]
    texts = await pool.fetch(
        "SELECT phone, template, body FROM messages WHERE dedupe_key LIKE 'ticket:%' "
        "AND branch_id = $1 ORDER BY id",
        h.branch_id,
    )
    by_template: dict[str, list[str]] = {}
    for t in texts:
        by_template.setdefault(t["template"], []).append(t["phone"])
    assert by_template["ticket_called"] == [phones[0]]
    # 3rd in line or nearer (turn_near_position = 3): tickets 1-3 now, each once; the
    # first of them is next, and told so
    assert by_template["turn_near_next"] == [phones[1]]
    assert sorted(by_template["turn_near"]) == sorted(phones[2:4])
    bodies = {t["phone"]: t["body"] for t in texts}
    assert bodies[phones[0]] == f"Ticket {tickets[0]['display_code']}: please go to Counter 1 now."
    assert bodies[phones[1]].startswith(f"Ticket {tickets[1]['display_code']}: you are next.")
    assert f"{tickets[2]['display_code']}: 1 ahead of you" in bodies[phones[2]]
    assert not any("0 ahead" in b or "counter Counter" in b for b in bodies.values())
    reply = await sms(pool, phones[0], "查询", module_env.settings)
    counter_name = await pool.fetchval("SELECT name FROM resources WHERE id = $1", counter)
    expected = render(
        "ticket_called", "zh-CN", ticket=tickets[0]["display_code"], counter=counter_name
    ).body
    assert f"<Message>{expected}</Message>" in reply
    assert "Counter 1" in reply
    assert "Counter 1号" not in reply
    reply = await sms(pool, phones[1], "STATUS", module_env.settings)
    assert f"Ticket {tickets[1]['display_code']}: you are next, about " in reply
    reply = await sms(pool, phones[2], "STATUS", module_env.settings)
    assert "1 ahead of you" in reply

    await staff_post(client, h, f"/v1/tickets/{called['id']}/start")
    finished_at = datetime.now(UTC)
    await staff_post(client, h, f"/v1/tickets/{called['id']}/finish")
    survey = await pool.fetchrow(
        "SELECT s.id, s.counter_id, m.send_at, m.template FROM surveys s "
        "JOIN messages m ON m.id = s.message_id WHERE s.ticket_id = $1",
        called["id"],
    )
    assert survey["template"] == "survey"
    assert survey["counter_id"] == counter
    delay = timedelta(minutes=module_env.settings.survey_delay_min)
    assert (
        finished_at + delay - timedelta(seconds=5) <= survey["send_at"] <= datetime.now(UTC) + delay
    )
    # a rating before the survey went out is no answer to it; after, it is stored
    await sms(pool, phones[0], "5", module_env.settings)
    assert await pool.fetchval("SELECT rating FROM surveys WHERE id = $1", survey["id"]) is None
    await pool.execute(
        "UPDATE surveys SET send_at = now() - interval '1 minute' WHERE id = $1", survey["id"]
    )
    reply = await sms(pool, phones[0], "4", module_env.settings)
    assert "Thank you" in reply
    assert await pool.fetchval("SELECT rating FROM surveys WHERE id = $1", survey["id"]) == 4

    # a second visit the same day gets no second survey
    again = await take(client, h.kiosk, h.queues["A"], phone=phones[0])
    await pool.execute(
        "UPDATE tickets SET status = 'cancelled' WHERE branch_id = $1 AND id <> $2 "
        "AND status = 'waiting'",
        h.branch_id,
        again["id"],
    )
    nxt = (await staff_post(client, h, f"/v1/counters/{counter}/call-next")).json()
    assert nxt["id"] == again["id"]
    await staff_post(client, h, f"/v1/tickets/{again['id']}/start")
    await staff_post(client, h, f"/v1/tickets/{again['id']}/finish")
    assert await pool.fetchval("SELECT count(*) FROM surveys WHERE phone = $1", phones[0]) == 1


async def test_someone_leaving_ahead_brings_the_turn_near_text(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, counters=1)
    phones = [f"+8613600{n:05d}{h.branch_id % 10}" for n in range(5)]
    tickets = [await take(client, h.kiosk, h.queues["A"], phone=p) for p in phones]

    async def near() -> list[str]:
        rows = await pool.fetch(
            "SELECT phone FROM messages WHERE template IN ('turn_near', 'turn_near_next') AND branch_id = $1",
            h.branch_id,
        )
        return sorted(r["phone"] for r in rows)

    assert await near() == []  # no call yet: nobody told
    resp = await client.post(f"/v1/tickets/{tickets[0]['id']}/cancel", headers=bearer(h.kiosk))
    assert resp.status_code == 200
    # now 4 wait; places 1-3 (0-2 ahead) are near, the 4th is not
    assert await near() == sorted(phones[1:4])
    resp = await client.post(f"/v1/tickets/{tickets[1]['id']}/cancel", headers=bearer(h.kiosk))
    assert await near() == sorted(phones[1:5])  # each told once


async def test_tickets_left_open_from_an_earlier_day_are_closed(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, counters=1)
    await open_counters(client, h)
    old = [await take(client, h.kiosk, h.queues["A"]) for _ in range(3)]
    serving = (await staff_post(client, h, f"/v1/counters/{h.counters[0]}/call-next")).json()
    await staff_post(client, h, f"/v1/tickets/{serving['id']}/start")
    # Taken two days ago; the branch (open round the clock) was closed yesterday.
    await pool.execute(
        "UPDATE tickets SET local_date = local_date - 2, issued_at = issued_at - interval '2 days' "
        "WHERE branch_id = $1",
        h.branch_id,
    )
    today = await take(client, h.kiosk, h.queues["A"])
    yesterday = datetime.now(ZoneInfo("Asia/Shanghai")).date() - timedelta(days=1)
    await pool.execute(
        "UPDATE branches SET closures = $2 WHERE id = $1",
        h.branch_id,
        [{"date": yesterday.isoformat(), "reason": "Holiday"}],
    )
    assert await close_stale_tickets({"pool": pool}) >= 3
    states = dict(
        await pool.fetch("SELECT id, status FROM tickets WHERE branch_id = $1", h.branch_id)
    )
    assert states == {
        old[0]["id"]: "done",
        old[1]["id"]: "cancelled",
        old[2]["id"]: "cancelled",
        today["id"]: "waiting",
    }
    now = (await client.get(f"/v1/tickets/{today['id']}", headers=bearer(h.kiosk))).json()
    assert now["position"] == 1


async def test_concurrent_calls_texting_turn_near_never_deadlock(
    client: httpx.AsyncClient, pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    h = await hall(pool, module_env, counters=10)
    await open_counters(client, h)
    phones = [f"+8613500{n:05d}{h.branch_id % 10}" for n in range(60)]
    for p in phones:
        await take(client, h.kiosk, h.queues["A"], phone=p)
    await pool.execute(
        "UPDATE tickets SET turn_near_sent = false WHERE branch_id = $1", h.branch_id
    )
    await pool.execute(
        "DELETE FROM messages WHERE template IN ('turn_near', 'turn_near_next') AND branch_id = $1",
        h.branch_id,
    )
    deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
    before = await pool.fetchval(deadlocks)
    for _ in range(3):  # three waves of ten counters calling at once
        calls = await asyncio.gather(
            *(staff_post(client, h, f"/v1/counters/{c}/call-next") for c in h.counters)
        )
        assert [r.status_code for r in calls] == [200] * 10
        for r in calls:
            tid = r.json()["id"]
            await staff_post(client, h, f"/v1/tickets/{tid}/start")
            await staff_post(client, h, f"/v1/tickets/{tid}/finish")
    texted = await pool.fetch(
        "SELECT phone, count(*) FROM messages WHERE template IN ('turn_near', 'turn_near_next') AND branch_id = $1 "
        "GROUP BY phone",
        h.branch_id,
    )
    assert texted
    assert all(r["count"] == 1 for r in texted)  # nobody twice
    # whoever waits within the first three now has been told
    head = await pool.fetch(
        "SELECT phone FROM tickets WHERE branch_id = $1 AND status = 'waiting' "
        "ORDER BY issued_at LIMIT 3",
        h.branch_id,
    )
    assert {r["phone"] for r in head} <= {r["phone"] for r in texted}
    assert await pool.fetchval(deadlocks) == before
