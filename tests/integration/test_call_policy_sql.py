"""The call-next order in SQL is the order of the pure policy, on real PostgreSQL.

Hypothesis fills a temporary ``tickets`` table on one connection (whose session
time zone is not UTC, to show the order does not depend on it) and checks that
``ORDER BY SQL_ORDER_BY`` returns the rows in `order`'s order and that the
counter's ``WHERE … LIMIT 1`` returns `pick_next`'s ticket, with times to the
microsecond on both sides of both cutoffs. Then several counters call at once
with the statement the application runs: each gets a different ticket, and together they
get the first tickets of the policy's order.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from selfserve.queueing import service as svc
from selfserve.queueing.policy import (
    SQL_ORDER_BY,
    PolicyConfig,
    WaitingTicket,
    cutoffs,
    order,
    pick_next,
    sql_order_by,
)
from tests.conftest import ModuleEnv
from tests.queue_helpers import hall

COLUMNS = ["id", "service_id", "issued_at", "priority", "appointment_at"]
MIN = timedelta(minutes=1)
US = timedelta(microseconds=1)
CONFIGS = st.builds(
    PolicyConfig,
    st.sampled_from([US, MIN * 5, MIN * 20, timedelta(hours=25)]),
    st.sampled_from([timedelta(0), MIN * 5, timedelta(hours=25)]),
)
NOWS = st.datetimes(
    min_value=datetime(2026, 1, 1),
    max_value=datetime(2027, 12, 31),
    timezones=st.just(UTC),
)


@st.composite
def cases(draw: st.DrawFn) -> tuple[datetime, PolicyConfig, list[WaitingTicket]]:
    """A clock, a config and up to 25 tickets with times at, next to, or around
    the two cutoffs (to the microsecond), often sharing an issue instant."""
    now = draw(NOWS)
    cfg = draw(CONFIGS)
    aged, due = cutoffs(now, cfg)
    near = st.sampled_from([aged - US, aged, aged + US, due - US, due, due + US, now])
    anywhere = st.integers(-(10**11), 10**11).map(lambda us: now + timedelta(microseconds=us))
    instants = near | anywhere
    n = draw(st.integers(0, 25))
    tids = draw(st.lists(st.integers(1, 2**62), min_size=n, max_size=n, unique=True))
    shared = draw(instants)  # many tickets issued at one instant: ids break the tie
    tickets = [
        WaitingTicket(
            id=tid,
            service_id=draw(st.integers(1, 3)),
            issued_at=draw(st.just(shared) | instants),
            priority=draw(st.sampled_from([0, 0, 1, 2, 2**31 - 1])),
            appointment_at=draw(st.none() | instants),
        )
        for tid in tids
    ]
    return now, cfg, tickets


@pytest.fixture(scope="module")
async def conn(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    async with pool.acquire() as c:
        await c.execute("SET TIME ZONE 'America/New_York'")
        await c.execute(
            "CREATE TEMP TABLE tickets (id bigint PRIMARY KEY, service_id bigint NOT NULL, "
            "issued_at timestamptz NOT NULL, priority int NOT NULL, appointment_at timestamptz)"
        )
        try:
            yield c
        finally:
            await c.execute("DROP TABLE tickets")


def rows(tickets: list[WaitingTicket]) -> list[tuple[object, ...]]:
    return [(t.id, t.service_id, t.issued_at, t.priority, t.appointment_at) for t in tickets]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=cases(), skills=st.frozensets(st.integers(1, 3)))
async def test_sql_order_is_the_policy_order(
    conn: asyncpg.Connection,
    case: tuple[datetime, PolicyConfig, list[WaitingTicket]],
    skills: frozenset[int],
) -> None:
    now, cfg, tickets = case
    async with conn.transaction():
        await conn.execute("TRUNCATE tickets")
        await conn.copy_records_to_table("tickets", records=rows(tickets), columns=COLUMNS)
        got = await conn.fetch(
            f"SELECT id FROM tickets ORDER BY {SQL_ORDER_BY}", *cutoffs(now, cfg)
        )
        assert [r["id"] for r in got] == [t.id for t in order(tickets, None, now, cfg)]
        first = await conn.fetchval(
            "SELECT id FROM tickets WHERE service_id = ANY($1::bigint[]) "
            f"ORDER BY {sql_order_by('$2', '$3')} LIMIT 1",
            sorted(skills),
            *cutoffs(now, cfg),
        )
        expected = pick_next(tickets, skills, now, cfg)
        assert first == (expected.id if expected else None)


async def test_counters_calling_at_once_get_distinct_tickets_first_in_order(
    pool: asyncpg.Pool, module_env: ModuleEnv
) -> None:
    """The statement the application runs for call-next (`svc.CALL_NEXT`), raced by
    five counters over the real `tickets` table."""
    now = datetime(2026, 6, 1, 10, 0, tzinfo=UTC)
    cfg = PolicyConfig()
    h = await hall(pool, module_env, durations=(10, 10, 10), counters=5)
    kinds = itertools.cycle([(0, None), (2, None), (0, now + MIN), (1, now + MIN * 30)])
    tickets = []
    async with pool.acquire() as c, c.transaction():
        for i in range(1, 25):
            service = h.services[i % 3]
            issued = now - MIN * ((i * 7) % 31)
            priority, appointment_at = next(kinds)
            tid = await c.fetchval(
                "INSERT INTO tickets (branch_id, queue_id, service_id, local_date, number, "
                "display_code, priority, appointment_at, channel, issued_at) "
                "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'kiosk', $9) RETURNING id",
                h.branch_id,
                h.queues["A"],
                service,
                now.date(),
                i,
                f"A{i:03d}",
                priority,
                appointment_at,
                issued,
            )
            tickets.append(WaitingTicket(tid, service, issued, priority, appointment_at))
    skills = [h.services[0], h.services[1]]
    all_selected = asyncio.Barrier(len(h.counters))

    async def call_next(counter: int) -> int:
        async with pool.acquire() as c, c.transaction():
            await c.execute("SET LOCAL lock_timeout = '5s'")
            tid: int = await c.fetchval(
                svc.CALL_NEXT, h.branch_id, skills, *cutoffs(now, cfg), counter, now
            )
            await all_selected.wait()  # every counter holds its row before any commits
            return tid

    called = await asyncio.gather(*(call_next(counter) for counter in h.counters))
    expected = [t.id for t in order(tickets, frozenset(skills), now, cfg)]
    assert len(set(called)) == len(h.counters)
    assert set(called) == set(expected[: len(h.counters)])
    stored = await pool.fetch(
        "SELECT id, status, counter_id FROM tickets WHERE branch_id = $1 AND status = 'called'",
        h.branch_id,
    )
    assert {(r["id"], r["counter_id"]) for r in stored} == set(zip(called, h.counters, strict=True))
    # the next call, with those committed, continues down the order
    async with pool.acquire() as c, c.transaction():
        following = await c.fetchval(
            svc.CALL_NEXT, h.branch_id, skills, *cutoffs(now, cfg), h.counters[0], now
        )
    assert following == expected[len(h.counters)]
