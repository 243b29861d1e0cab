"""What a booking write needs to know about a slot: the branch calendar and service
rules (`Context`), the slots of a range computed from the rows, and the resources
that can take a party at a start, least loaded first."""

from __future__ import annotations

import sys
from array import array
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar
from zoneinfo import ZoneInfo

import asyncpg

from selfserve.db import Conn
from selfserve.errors import FieldError, InvalidInput, NotFound, SlotFull, SlotUnavailable
from selfserve.scheduling import queries as q
from selfserve.scheduling.availability import (
    BranchCalendar,
    ResourceSchedule,
    ServiceRules,
    Slot,
    available_slots_from_rows,
)
from selfserve.scheduling.models import SlotOut

MAX_RANGE = timedelta(days=31)
# The commitments read, packed: per column one byte string of big-endian int8, as
# PostgreSQL sends them (resource ids; starts and ends as its own binary timestamptz,
# microseconds since 2000-01-01 UTC; seats) instead of some 14,000 records. Decoding
# records with two datetimes each cost the API more CPU than computing the slots from
# them (the datetimes, the records, and the garbage collections that thousands of
# live records set off); the packed columns cost it a few milliseconds, exactly the
# same values, and PostgreSQL some 2-3 ms more.
_PACKED_COMMITMENTS = f"""
SELECT count(*) AS n,
       string_agg(int8send(c.resource_id), '') AS resource_ids,
       string_agg(timestamptz_send(c.starts_at), '') AS starts_at,
       string_agg(timestamptz_send(c.ends_at), '') AS ends_at,
       string_agg(int8send(c.seats), '') AS seats
FROM ({q.COMMITMENTS}) AS c
"""
_PACKED_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_INFINITE = (-(2**63), 2**63 - 1)  # -infinity and infinity as a timestamptz
_TINY = timedelta(microseconds=1)
T = TypeVar("T")
# Outbox rows written in a transaction, to enqueue after commit: (id, send_at).
Outbox = list[tuple[int | None, datetime]]


def utcnow() -> datetime:
    return datetime.now(UTC)


# --- context -------------------------------------------------------------------


@dataclass(frozen=True)
class Context:
    branch_id: int
    service_id: int
    timezone: str
    branch_name: str
    service_name: str
    deposit_minor: int
    cancellation_window_min: int
    calendar: BranchCalendar
    rules: ServiceRules


def _minute(clock: str) -> int:
    hours, _, minutes = clock.partition(":")
    return int(hours) * 60 + int(minutes)


async def load_context(conn: Conn, branch_id: int, service_id: int) -> Context:
    """The branch calendar and the service rules; a missing or inactive one is a 404."""
    row = await conn.fetchrow(q.BRANCH_SERVICE, service_id, branch_id)
    if row is None or not row["branch_active"] or not row["service_active"]:
        raise NotFound()
    hours = tuple(
        (int(h["weekday"]), _minute(h["opens"]), _minute(h["closes"])) for h in row["opening_hours"]
    )
    closures = frozenset(date.fromisoformat(c["date"]) for c in row["closures"])
    return Context(
        branch_id=branch_id,
        service_id=service_id,
        timezone=row["timezone"],
        branch_name=row["branch_name"],
        service_name=row["service_name"],
        deposit_minor=row["deposit_minor"],
        cancellation_window_min=row["cancellation_window_min"],
        calendar=BranchCalendar(
            timezone=row["timezone"],
            opening_hours=hours,
            closures=closures,
            walk_in_reserve=float(row["walk_in_reserve"]),
        ),
        rules=ServiceRules(
            duration_min=row["duration_min"],
            buffer_before_min=row["buffer_before_min"],
            buffer_after_min=row["buffer_after_min"],
            slot_interval_min=row["slot_interval_min"],
            lead_time_min=row["lead_time_min"],
            horizon_days=row["horizon_days"],
            min_party=row["min_party"],
            max_party=row["max_party"],
        ),
    )


def check_party(ctx: Context, party_size: int) -> None:
    if not ctx.rules.min_party <= party_size <= ctx.rules.max_party:
        raise InvalidInput.field(
            "party_size",
            f"must lie between {ctx.rules.min_party} and {ctx.rules.max_party} for this service",
        )


async def compute_slots(
    conn: Conn,
    ctx: Context,
    *,
    party_size: int,
    window_from: datetime,
    window_to: datetime,
    now: datetime,
    ignore_booking: int = 0,
    with_commitments: bool = True,
) -> list[Slot]:
    """Slots in [window_from, window_to), reading only what overlaps that range."""
    rules = ctx.rules
    lo = max(window_from, now + timedelta(minutes=rules.lead_time_min))
    hi = min(window_to, now + timedelta(days=rules.horizon_days))
    if lo >= hi:
        return []
    resources = await conn.fetch(q.RESOURCES, ctx.service_id, ctx.branch_id)
    if not resources:
        return []
    ids = [r["id"] for r in resources]
    span_lo = lo - timedelta(minutes=rules.buffer_before_min)
    span_hi = hi + timedelta(minutes=rules.duration_min + rules.buffer_after_min)
    shifts: dict[int, list[tuple[int, int, int]]] = {i: [] for i in ids}
    exceptions: dict[int, list[tuple[datetime, datetime, bool]]] = {i: [] for i in ids}
    for s in await conn.fetch(q.SCHEDULES, ids, span_lo, span_hi):
        if s["kind"] == "shift":
            shifts[s["resource_id"]].append((s["weekday"], s["start_minute"], s["end_minute"]))
        else:
            exceptions[s["resource_id"]].append((s["starts_at"], s["ends_at"], s["available"]))
    commitments: Iterable[tuple[int, int, int, int]] = ()
    if with_commitments:
        packed = await conn.fetchrow(
            _PACKED_COMMITMENTS, ids, span_lo, span_hi, now, ignore_booking
        )
        if packed is not None and packed["n"]:
            commitments = _unpack(packed)
    schedules = [
        ResourceSchedule(
            resource_id=r["id"],
            kind=r["kind"],
            capacity=r["capacity"],
            shifts=tuple(shifts[r["id"]]),
            exceptions=tuple(exceptions[r["id"]]),
        )
        for r in resources
    ]
    return available_slots_from_rows(
        ctx.calendar,
        rules,
        schedules,
        commitments,
        party_size=party_size,
        window_from=lo,
        window_to=hi,
        now=now,
        epoch=_PACKED_EPOCH,
    )


def _unpack(packed: asyncpg.Record) -> Iterable[tuple[int, int, int, int]]:
    """(resource_id, starts_at, ends_at, seats) rows from `_PACKED_COMMITMENTS`."""
    columns: list[array[int]] = []
    for name in ("resource_ids", "starts_at", "ends_at", "seats"):
        column = array("q", packed[name] or b"")
        if sys.byteorder == "little":
            column.byteswap()
        if len(column) != packed["n"]:  # string_agg skipped a NULL
            raise ValueError(f"a commitment without {name}")
        columns.append(column)
    for column in columns[1:3]:
        if min(column) in _INFINITE or max(column) in _INFINITE:
            raise ValueError("commitment times must be finite")
    return zip(*columns, strict=True)


def local_iso(instant: datetime, timezone: str) -> str:
    return instant.astimezone(ZoneInfo(timezone)).isoformat()


async def availability(
    pool: asyncpg.Pool,
    *,
    branch_id: int,
    service_id: int,
    window_from: datetime,
    window_to: datetime,
    party_size: int,
    now: datetime,
) -> list[SlotOut]:
    errors: list[FieldError] = []
    for name, value in (("from", window_from), ("to", window_to)):
        if value.tzinfo is None or value.utcoffset() is None:
            errors.append(FieldError(name, "must carry a UTC offset (RFC 3339)"))
    if errors:
        raise InvalidInput(errors=errors)
    if window_to <= window_from:
        raise InvalidInput.field("to", "must be after from")
    if window_to - window_from > MAX_RANGE:
        raise InvalidInput.field("to", "the range may span at most 31 days")
    async with pool.acquire() as conn:
        ctx = await load_context(conn, branch_id, service_id)
        check_party(ctx, party_size)
        slots = await compute_slots(
            conn,
            ctx,
            party_size=party_size,
            window_from=window_from,
            window_to=window_to,
            now=now,
        )
    return [
        SlotOut(
            start=s.start,
            end=s.end,
            local_start=s.local_start.isoformat(),
            timezone=ctx.timezone,
            remaining=s.remaining,
        )
        for s in slots
    ]


async def find_resources(
    conn: Conn,
    ctx: Context,
    start: datetime,
    party_size: int,
    now: datetime,
    *,
    ignore_booking: int = 0,
) -> list[int]:
    """Resources that can take the party at `start`, least loaded first.

    `SlotUnavailable` when `start` is no slot at all, `SlotFull` when no seats are left."""
    start = start.astimezone(UTC)
    end = start + _TINY
    slots = await compute_slots(
        conn,
        ctx,
        party_size=party_size,
        window_from=start,
        window_to=end,
        now=now,
        ignore_booking=ignore_booking,
    )
    slot = next((s for s in slots if s.start == start), None)
    if slot is None:
        empty = await compute_slots(
            conn,
            ctx,
            party_size=party_size,
            window_from=start,
            window_to=end,
            now=now,
            with_commitments=False,
        )
        if any(s.start == start for s in empty):
            raise SlotFull()
        raise SlotUnavailable()
    return fitting_resources(slot, party_size)


def fitting_resources(slot: Slot, party_size: int) -> list[int]:
    """Resources with room for the party at this slot, least loaded first."""
    fits = [(free, rid) for rid, free in slot.free_by_resource if free >= party_size]
    # The first is what `pick_resource` picks: most free seats, then lowest id.
    return [rid for _, rid in sorted(fits, key=lambda f: (-f[0], f[1]))]


async def first_that_fits(resource_ids: Sequence[int], attempt: Callable[[int], Awaitable[T]]) -> T:
    """Try each candidate resource; the ledger is unchanged after a refusal."""
    for rid in resource_ids:
        try:
            return await attempt(rid)
        except SlotFull:
            continue
    raise SlotFull()
