"""Queue sweeps (arq cron): closing the tickets a closed branch left behind, and the
turn-near texts nobody sent because the process that committed a change died.

Closing. A ticket still waiting, called or being served on a later branch-local day
than the one it was issued on is closed only if the branch was closed at some
instant between its issue and now (its opening hours, less its closure dates, in
the branch's zone: `scheduling.availability.open_until`, DST-correct). A branch
open round the clock keeps its queue across midnight; any other branch closes a
day's leftovers after its local midnight as before. Waiting and called tickets are
cancelled and their phones texted so (an ordinary message: quiet hours hold it
until the morning); a ticket still being served is marked done (no survey: nobody
finished it).

Turn near. After each committed change the API texts "turn near" to the tickets
whose place came within `SELFSERVE_TURN_NEAR_POSITION` (`service.text_turn_near`).
A process that dies between the commit and that check leaves them untexted until
something else changes in the branch; this sweep runs the same check for every
branch with such tickets. It takes the same row locks (SKIP LOCKED) and sets the
same `turn_near_sent` flag under the same dedupe key, so sweeps and the
after-commit path may run at once: nobody is texted twice.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from typing import Any

import asyncpg
import structlog

from selfserve import db
from selfserve.db import Conn, Record
from selfserve.messaging.service import cancel_messages, queue_template
from selfserve.queueing import service as svc
from selfserve.scheduling.availability import BranchCalendar, open_until
from selfserve.settings import Settings

log = structlog.get_logger("selfserve.queue")

Clock = Callable[[], datetime]


def _now(ctx: dict[str, Any]) -> datetime:
    clock: Clock | None = ctx.get("clock")
    return clock() if clock is not None else datetime.now(UTC)


def _minute(clock: str) -> int:
    hours, _, minutes = clock.partition(":")
    return int(hours) * 60 + int(minutes)


def branch_calendar(row: Record) -> BranchCalendar:
    """Opening hours and closures of a branch row (`timezone`, `opening_hours`,
    `closures` columns)."""
    return BranchCalendar(
        timezone=row["timezone"],
        opening_hours=tuple(
            (int(h["weekday"]), _minute(h["opens"]), _minute(h["closes"]))
            for h in row["opening_hours"]
        ),
        closures=frozenset(date.fromisoformat(c["date"]) for c in row["closures"]),
    )


def closed_between(calendar: BranchCalendar, since: datetime, until: datetime) -> bool:
    """Whether the branch was closed at any instant of [since, until]."""
    at = since
    while True:
        end = open_until(calendar, at)
        if end is None:
            return True  # closed at `at`
        if end > until:
            return False  # one opening stretch covers the whole span
        # `open_until` sees a few days around `at`: a stretch that runs on past what
        # it saw is open at `end` too, and the next look carries on from there.
        at = end


# --- closing what a closed branch left open --------------------------------------

STALE_CANDIDATES = """
SELECT t.id, t.branch_id, t.issued_at, b.timezone, b.opening_hours, b.closures
FROM tickets t JOIN branches b ON b.id = t.branch_id
WHERE t.status IN ('waiting', 'called', 'serving')
  AND t.local_date < ($1::timestamptz AT TIME ZONE b.timezone)::date
ORDER BY t.branch_id, t.id
"""

CLOSE_TICKETS = """
UPDATE tickets t
SET status = CASE WHEN t.status = 'serving' THEN 'done' ELSE 'cancelled' END,
    ended_at = $2, updated_at = now()
WHERE t.id = ANY($1::bigint[]) AND t.status IN ('waiting', 'called', 'serving')
RETURNING t.id, t.status, t.branch_id, t.phone, t.customer_id, t.display_code
"""


async def _to_close(conn: Conn, now: datetime) -> list[int]:
    """Tickets of an earlier local day whose branch closed since they were issued."""
    chosen: list[int] = []
    calendars: dict[int, BranchCalendar] = {}
    for r in await conn.fetch(STALE_CANDIDATES, now):
        calendar = calendars.get(r["branch_id"])
        if calendar is None:
            calendar = calendars[r["branch_id"]] = branch_calendar(r)
        if closed_between(calendar, r["issued_at"], now):
            chosen.append(r["id"])
    return chosen


async def close_stale_tickets(ctx: dict[str, Any]) -> int:
    """arq cron: close the tickets of an earlier branch-local day when the branch
    closed in between (see the module's docstring); returns how many were closed.
    Tickets kept open are read, never locked, so calls go on undisturbed."""
    pool: asyncpg.Pool = ctx["pool"]
    now = _now(ctx)

    async def tx(conn: Conn) -> tuple[int, svc.Outbox]:
        ids = await _to_close(conn, now)
        if not ids:
            return 0, []
        outbox: svc.Outbox = []
        closed = await conn.fetch(CLOSE_TICKETS, ids, now)
        names: dict[int, str] = {}
        for t in closed:
            # Texts not yet out ("turn near", "go to counter") are moot now.
            await cancel_messages(conn, f"ticket:{t['id']}:")
            if t["status"] != "cancelled" or t["phone"] is None:
                continue
            if t["branch_id"] not in names:
                names[t["branch_id"]] = await conn.fetchval(
                    "SELECT name FROM branches WHERE id = $1", t["branch_id"]
                )
            message_id = await queue_template(
                conn,
                "ticket_closed",
                await svc.locale_of(conn, t),
                {"ticket": t["display_code"], "branch": names[t["branch_id"]]},
                phone=t["phone"],
                send_at=now,
                dedupe_key=f"ticket:{t['id']}:closed",
                branch_id=t["branch_id"],
                customer_id=t["customer_id"],
            )
            outbox.append((message_id, now))
        return len(closed), outbox

    closed, outbox = await db.in_transaction_with_retry(pool, tx)
    await svc.enqueue(ctx.get("redis"), outbox)
    if closed:
        log.info("stale_tickets_closed", count=closed, texted=len(outbox))
    return closed


# --- turn near ---------------------------------------------------------------------

UNTEXTED_BRANCHES = """
SELECT DISTINCT branch_id FROM tickets
WHERE status = 'waiting' AND phone IS NOT NULL AND NOT turn_near_sent
ORDER BY branch_id
"""


async def sweep_turn_near(ctx: dict[str, Any]) -> int:
    """arq cron: the turn-near check of every branch with a waiting ticket that has a
    phone and was not texted yet; returns how many were texted."""
    pool: asyncpg.Pool = ctx["pool"]
    settings: Settings = ctx["settings"]
    if settings.turn_near_position <= 0:
        return 0
    now = _now(ctx)
    texted = 0
    for r in await pool.fetch(UNTEXTED_BRANCHES):
        texted += await svc.text_turn_near(
            pool, ctx.get("redis"), r["branch_id"], now=now, settings=settings
        )
    if texted:
        log.info("turn_near_swept", texted=texted)
    return texted
