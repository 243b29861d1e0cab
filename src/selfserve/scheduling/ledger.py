"""The capacity ledger: holds and bookings take and give back seats in PostgreSQL.

Time is cut into 5-minute units aligned to the UTC epoch; `resource_capacity_units`
has one row per (resource, unit) with `used` and `capacity` (migration 0006 says
how spans that are not multiples of 5 minutes are rounded: outward).

Every change of seats goes through `_apply`, inside the caller's transaction:

1. `SET LOCAL lock_timeout`, so a stuck lock holder turns into an error, not a hang;
2. create the unit rows that do not exist yet (`INSERT ... ON CONFLICT DO NOTHING`,
   `used` 0, `capacity` copied from the resource), in sorted order;
3. lock every unit row involved, of every resource, with ONE
   `SELECT ... ORDER BY resource_id, unit_start FOR UPDATE`: all writers take the
   locks in the same global order, so two transactions over overlapping spans
   (whatever their lengths, whichever moves first) queue instead of deadlocking;
4. ONE guarded statement `UPDATE ... SET used = used + delta WHERE used + delta <=
   capacity`, all-or-nothing: it changes every unit or none. None means some unit
   lacks the seats, and `SlotFull` (409 `slot_full`) is raised. The ledger is then
   unchanged, so a caller may even catch it and try another resource in the same
   transaction; normally it propagates and the transaction rolls back.

The row that records the commitment (hold or booking) is written in the same
transaction, so the ledger and the rows always agree; `overbooked()` recomputes the
seats from the rows and checks both capacity and the ledger.

Lock order across tables: a transaction first locks the one hold or booking row it
changes (or claims expired holds with SKIP LOCKED), then the resource row
`FOR SHARE` (only when it may create unit rows: the capacity it copies must not be
changing under it), then the unit rows in sorted order. A capacity change takes the
resource row `FOR UPDATE` and then the future unit rows in sorted order.
Deadlocks (40P01) and serialization failures (40001) that still happen are retried
by `db.in_transaction_with_retry`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Literal, NamedTuple

import msgspec

from selfserve.db import Conn, Pool, Record, in_transaction_with_retry
from selfserve.errors import (
    BookingNotActive,
    CapacityInUse,
    HoldExpired,
    InvalidInput,
    NotFound,
    SlotFull,
)
from selfserve.scheduling.availability import ResourceSchedule, on_shift, reserve_share
from selfserve.scheduling.queries import SCHEDULES

UNIT = timedelta(minutes=5)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
LOCK_TIMEOUT = "5s"
HOLD_TTL = timedelta(minutes=5)

# Booking statuses whose seats count in the ledger, and those whose code is reserved.
CAPACITY_STATUSES = ("pending_payment", "confirmed", "completed")
ACTIVE_STATUSES = ("pending_payment", "confirmed")

CODE_ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I/L
CODE_LENGTH = 6
CODE_ATTEMPTS = 8

Channel = Literal["app", "mini_program", "kiosk", "sms", "web", "staff"]
BookingStatus = Literal["pending_payment", "confirmed"]


class LedgerError(RuntimeError):
    """The ledger disagrees with itself (a bug, never a user error)."""


class Hold(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    branch_id: int
    service_id: int
    resource_id: int
    party_size: int
    starts_at: datetime
    ends_at: datetime
    expires_at: datetime


class Booking(msgspec.Struct, frozen=True, kw_only=True):
    id: int
    code: str
    branch_id: int
    service_id: int
    resource_id: int
    party_size: int
    starts_at: datetime
    ends_at: datetime
    status: str
    channel: str


class Violation(msgspec.Struct, frozen=True, kw_only=True):
    """One (resource, unit) where the rows, the ledger and the capacity disagree."""

    resource_id: int
    unit_start: datetime
    seats: int  # recomputed from live holds and counting bookings
    used: int | None  # what the ledger says (None: no ledger row)
    capacity: int | None  # the ledger row's
    resource_capacity: int  # the resource's own


class Change(NamedTuple):
    """Seats to take (positive) or give back (negative) over an occupied span."""

    resource_id: int
    capacity: int  # copied into unit rows created for this change
    occupied_from: datetime
    occupied_to: datetime
    seats: int


# --- units -------------------------------------------------------------------


def unit_starts(occupied_from: datetime, occupied_to: datetime) -> list[datetime]:
    """The starts of the 5-minute units covering [from, to), rounded outward."""
    if occupied_from.tzinfo is None or occupied_to.tzinfo is None:
        raise ValueError("instants must be timezone-aware")
    if occupied_to <= occupied_from:
        raise ValueError("an occupied span must not be empty")
    first = (occupied_from - EPOCH) // UNIT
    last = -((EPOCH - occupied_to) // UNIT)  # ceiling
    return [EPOCH + i * UNIT for i in range(first, last)]


# --- the primitive -----------------------------------------------------------

SET_LOCK_TIMEOUT = f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"

CREATE_UNITS = """
INSERT INTO resource_capacity_units (resource_id, unit_start, used, capacity)
SELECT k.resource_id, k.unit_start, 0, k.capacity
FROM unnest($1::bigint[], $2::timestamptz[], $3::integer[]) AS k(resource_id, unit_start, capacity)
ORDER BY k.resource_id, k.unit_start
ON CONFLICT (resource_id, unit_start) DO NOTHING
"""

LOCK_UNITS = """
SELECT u.resource_id, u.unit_start
FROM resource_capacity_units u
JOIN unnest($1::bigint[], $2::timestamptz[]) AS k(resource_id, unit_start)
  ON u.resource_id = k.resource_id AND u.unit_start = k.unit_start
ORDER BY u.resource_id, u.unit_start
FOR UPDATE OF u
"""

# All or nothing: `fit` counts the units that can take their delta (values are
# current: every row is locked by this transaction), and the UPDATE runs only
# when that is every unit. The per-row guard stays as a second line of defence.
APPLY_DELTAS = """
WITH d AS (
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::integer[])
        AS d(resource_id, unit_start, delta)
), fit AS (
    SELECT count(*) AS n
    FROM resource_capacity_units u
    JOIN d ON u.resource_id = d.resource_id AND u.unit_start = d.unit_start
    WHERE d.delta <= 0 OR u.used + d.delta <= u.capacity
)
UPDATE resource_capacity_units u
SET used = u.used + d.delta
FROM d, fit
WHERE fit.n = cardinality($1::bigint[])
  AND u.resource_id = d.resource_id AND u.unit_start = d.unit_start
  AND (d.delta <= 0 OR u.used + d.delta <= u.capacity)
RETURNING u.resource_id, u.unit_start
"""


# The same, when the walk-in reserve applies: also none of the units $4 may then hold
# more counter seats at once (summed over the counters $7 of the pool, all locked)
# than its limit $6, once their net change $5 is made.
APPLY_DELTAS_RESERVED = """
WITH d AS (
    SELECT * FROM unnest($1::bigint[], $2::timestamptz[], $3::integer[])
        AS d(resource_id, unit_start, delta)
), fit AS (
    SELECT count(*) AS n
    FROM resource_capacity_units u
    JOIN d ON u.resource_id = d.resource_id AND u.unit_start = d.unit_start
    WHERE d.delta <= 0 OR u.used + d.delta <= u.capacity
), p AS (
    SELECT * FROM unnest($4::timestamptz[], $5::integer[], $6::integer[])
        AS p(unit_start, delta, seats_max)
), over AS (
    SELECT count(*) AS n
    FROM p
    WHERE p.seats_max < p.delta + (
        SELECT coalesce(sum(u.used), 0) FROM resource_capacity_units u
        WHERE u.resource_id = ANY($7::bigint[]) AND u.unit_start = p.unit_start)
)
UPDATE resource_capacity_units u
SET used = u.used + d.delta
FROM d, fit, over
WHERE fit.n = cardinality($1::bigint[]) AND over.n = 0
  AND u.resource_id = d.resource_id AND u.unit_start = d.unit_start
  AND (d.delta <= 0 OR u.used + d.delta <= u.capacity)
RETURNING u.resource_id, u.unit_start
"""


class CounterPool(NamedTuple):
    """The walk-in reserve where a counter takes seats: the counters of the branch that
    offer the service (`capacity` read `FOR SHARE`), and per unit of the span the most
    counter seats they may hold at once, floor(C * (1 - reserve)), C the summed
    capacity of those on shift over that unit."""

    capacity: dict[int, int]
    seats_max: dict[datetime, int]


def _require_transaction(conn: Conn) -> None:
    if not conn.is_in_transaction():
        raise RuntimeError("capacity changes must run inside the caller's transaction")


async def _apply(conn: Conn, changes: Iterable[Change], reserve: CounterPool | None = None) -> None:
    """Apply all `changes` at once (net per unit), or raise `SlotFull` changing nothing.

    With `reserve`, the unit rows of every counter of the pool over the units where a
    counter grows are created and locked too (in the same sorted order), so the
    summed counter seats the guarded statement checks cannot change under it."""
    _require_transaction(conn)
    deltas: dict[tuple[int, datetime], int] = {}
    capacity: dict[int, int] = {}
    for ch in changes:
        if ch.seats > 0:
            capacity[ch.resource_id] = ch.capacity
        for unit in unit_starts(ch.occupied_from, ch.occupied_to):
            key = (ch.resource_id, unit)
            deltas[key] = deltas.get(key, 0) + ch.seats
    keys = sorted(k for k, d in deltas.items() if d != 0)
    if not keys:
        return
    rids = [k[0] for k in keys]
    units = [k[1] for k in keys]
    await conn.execute(SET_LOCK_TIMEOUT)
    create = {k: capacity[k[0]] for k in keys if deltas[k] > 0}
    lock = set(keys)
    checks: list[tuple[datetime, int, int]] = []
    if reserve is not None:
        members = reserve.capacity
        pooled = sorted({u for (r, u) in create if r in members})
        for unit in pooled:
            net = sum(deltas.get((m, unit), 0) for m in members)
            if net > 0:
                checks.append((unit, net, reserve.seats_max[unit]))
            for m, cap in members.items():
                create.setdefault((m, unit), cap)
                lock.add((m, unit))
    if create:
        made = sorted(create)
        await conn.execute(
            CREATE_UNITS, [k[0] for k in made], [k[1] for k in made], [create[k] for k in made]
        )
    locking = sorted(lock)
    locked = await conn.fetch(LOCK_UNITS, [k[0] for k in locking], [k[1] for k in locking])
    if len(locked) != len(locking):
        raise LedgerError("seats given back from units the ledger never recorded")
    if checks and reserve is not None:
        applied = await conn.fetch(
            APPLY_DELTAS_RESERVED,
            rids,
            units,
            [deltas[k] for k in keys],
            [c[0] for c in checks],
            [c[1] for c in checks],
            [c[2] for c in checks],
            sorted(reserve.capacity),
        )
    else:
        applied = await conn.fetch(APPLY_DELTAS, rids, units, [deltas[k] for k in keys])
    if not applied:
        full = [k for k in keys if deltas[k] > 0]
        raise SlotFull(extra={"resource_id": full[0][0], "unit_start": full[0][1].isoformat()})
    if len(applied) != len(keys):
        raise LedgerError("a guarded capacity update changed only some units")


async def take_capacity(
    conn: Conn,
    resource_id: int,
    capacity: int,
    occupied_from: datetime,
    occupied_to: datetime,
    seats: int,
    reserve: CounterPool | None = None,
) -> None:
    """Take `seats` on every unit of the span or raise `SlotFull` (ledger unchanged).

    `capacity` is copied into unit rows created now; read it from the resource row
    `FOR SHARE` in the same transaction (`_slot_context` does) so a concurrent
    `resize_capacity` cannot slip between the read and the insert.
    """
    if seats < 1:
        raise ValueError("seats must be positive")
    await _apply(conn, [Change(resource_id, capacity, occupied_from, occupied_to, seats)], reserve)


async def release_capacity(
    conn: Conn,
    resource_id: int,
    occupied_from: datetime,
    occupied_to: datetime,
    seats: int,
) -> None:
    """Give back `seats` on every unit of the span (taken earlier by the same commitment)."""
    if seats < 1:
        raise ValueError("seats must be positive")
    await _apply(conn, [Change(resource_id, 0, occupied_from, occupied_to, -seats)])


# Live commitments of a resource over its units where `used` exceeds a capacity
# ($3) from a unit ($2) on: what a capacity change would no longer fit. A unit and a
# commitment meet exactly when the span overlaps the unit (spans round outward).
CONFLICTS = """
WITH over AS (
    SELECT tstzrange(unit_start, unit_start + interval '5 minutes') AS unit
    FROM resource_capacity_units
    WHERE resource_id = $1 AND unit_start >= $2 AND used > $3
)
SELECT
    ARRAY(SELECT b.id FROM bookings b
          WHERE b.resource_id = $1
            AND b.status IN ('pending_payment', 'confirmed', 'completed')
            AND EXISTS (SELECT 1 FROM over WHERE over.unit && b.occupied)
          ORDER BY b.starts_at, b.id LIMIT $4) AS booking_ids,
    (SELECT count(*) FROM bookings b
     WHERE b.resource_id = $1
       AND b.status IN ('pending_payment', 'confirmed', 'completed')
       AND EXISTS (SELECT 1 FROM over WHERE over.unit && b.occupied)) AS bookings,
    (SELECT count(*) FROM holds h
     WHERE h.resource_id = $1 AND h.released_at IS NULL
       AND EXISTS (SELECT 1 FROM over WHERE over.unit && h.occupied)) AS holds,
    (SELECT count(*) FROM over) AS units,
    (SELECT min(lower(unit)) FROM over) AS first_unit
"""
CONFLICTS_LISTED = 50  # booking ids named in a refusal, at most


def _current_unit(now: datetime) -> datetime:
    return EPOCH + ((now - EPOCH) // UNIT) * UNIT


async def _in_use(
    conn: Conn, resource_id: int, from_unit: datetime, capacity: int, *, used: int
) -> CapacityInUse:
    row = await conn.fetchrow(CONFLICTS, resource_id, from_unit, capacity, CONFLICTS_LISTED)
    assert row is not None
    return CapacityInUse(
        extra={
            "resource_id": resource_id,
            "capacity": capacity,
            "used": used,
            "units": row["units"],
            "from": row["first_unit"].isoformat() if row["first_unit"] else None,
            "bookings": row["bookings"],
            "holds": row["holds"],
            "booking_ids": list(row["booking_ids"]),
        }
    )


async def resize_capacity(conn: Conn, resource_id: int, new_capacity: int, now: datetime) -> None:
    """Change a resource's capacity and that of its unit rows from the current unit on.

    Units that ended before `now` keep the capacity they had (history). Refuses with
    `CapacityInUse` (naming and counting the commitments that would not fit) when
    some current or future unit already uses more seats.

    Race-free with concurrent takes: the resource row is updated (locked) first, and
    every take reads the resource `FOR SHARE` before it creates or locks units, so a
    take either committed before (its seats are seen here) or waits and then copies
    the new capacity.
    """
    _require_transaction(conn)
    if new_capacity < 1:
        raise InvalidInput.field("capacity", "must be at least 1")
    await conn.execute(SET_LOCK_TIMEOUT)
    found = await conn.fetchval(
        "UPDATE resources SET capacity = $2, updated_at = now() WHERE id = $1 RETURNING id",
        resource_id,
        new_capacity,
    )
    if found is None:
        raise NotFound()
    from_unit = _current_unit(now)
    await conn.execute(
        "SELECT 1 FROM resource_capacity_units WHERE resource_id = $1 AND unit_start >= $2 "
        "ORDER BY unit_start FOR UPDATE",
        resource_id,
        from_unit,
    )
    worst = await conn.fetchval(
        "SELECT max(used) FROM resource_capacity_units WHERE resource_id = $1 AND unit_start >= $2",
        resource_id,
        from_unit,
    )
    if worst is not None and worst > new_capacity:
        raise await _in_use(conn, resource_id, from_unit, new_capacity, used=worst)
    await conn.execute(
        "UPDATE resource_capacity_units SET capacity = $3 "
        "WHERE resource_id = $1 AND unit_start >= $2 AND capacity <> $3",
        resource_id,
        from_unit,
        new_capacity,
    )


async def retire_resource(conn: Conn, resource_id: int, now: datetime) -> None:
    """Check that a resource about to be deactivated has no seats taken from the current
    unit on; `CapacityInUse` (naming the commitments) otherwise.

    The caller holds the resource row `FOR UPDATE`: takes read it `FOR SHARE` first, so
    none is under way, and once the row says inactive none can start."""
    _require_transaction(conn)
    from_unit = _current_unit(now)
    worst = await conn.fetchval(
        "SELECT max(used) FROM resource_capacity_units "
        "WHERE resource_id = $1 AND unit_start >= $2 AND used > 0",
        resource_id,
        from_unit,
    )
    if worst is not None:
        raise await _in_use(conn, resource_id, from_unit, 0, used=worst)


# Live commitments of a resource that have not ended by $2: what a schedule change
# must leave on shift.
LIVE_AHEAD = """
SELECT 'booking' AS kind, id, lower(occupied) AS f, upper(occupied) AS t
FROM bookings
WHERE resource_id = $1 AND status IN ('pending_payment', 'confirmed') AND upper(occupied) > $2
UNION ALL
SELECT 'hold', id, lower(occupied), upper(occupied)
FROM holds
WHERE resource_id = $1 AND released_at IS NULL AND expires_at > $2 AND upper(occupied) > $2
"""


async def _on_shift(
    conn: Conn, resource_id: int, timezone: str, lo: datetime, hi: datetime
) -> list[tuple[datetime, datetime]]:
    """The resource's on-shift time around [lo, hi), from its stored schedules."""
    shifts: list[tuple[int, int, int]] = []
    exceptions: list[tuple[datetime, datetime, bool]] = []
    for s in await conn.fetch(SCHEDULES, [resource_id], lo, hi):
        if s["kind"] == "shift":
            shifts.append((s["weekday"], s["start_minute"], s["end_minute"]))
        else:
            exceptions.append((s["starts_at"], s["ends_at"], s["available"]))
    schedule = ResourceSchedule(resource_id, "", 0, tuple(shifts), tuple(exceptions))
    return on_shift(timezone, schedule, lo, hi)


def _covered(intervals: list[tuple[datetime, datetime]], lo: datetime, hi: datetime) -> bool:
    return any(a <= lo and hi <= b for a, b in intervals)


async def commitments_on_shift(conn: Conn, resource_id: int, now: datetime) -> set[tuple[str, int]]:
    """The live commitments of a resource whose span (what is left of it after `now`)
    lies inside one stretch of its on-shift time, as ('booking' | 'hold', id)."""
    rows = await conn.fetch(LIVE_AHEAD, resource_id, now)
    if not rows:
        return set()
    timezone = await conn.fetchval(
        "SELECT b.timezone FROM resources r JOIN branches b ON b.id = r.branch_id WHERE r.id = $1",
        resource_id,
    )
    lo = max(now, min(r["f"] for r in rows))
    hi = max(r["t"] for r in rows)
    intervals = await _on_shift(conn, resource_id, timezone, lo, hi)
    return {(r["kind"], r["id"]) for r in rows if _covered(intervals, max(r["f"], now), r["t"])}


def shift_conflicts(
    resource_id: int, before: set[tuple[str, int]], after: set[tuple[str, int]]
) -> CapacityInUse | None:
    """`CapacityInUse` naming the commitments a schedule change took off shift, if any."""
    lost = before - after
    if not lost:
        return None
    bookings = sorted(i for kind, i in lost if kind == "booking")
    return CapacityInUse(
        extra={
            "resource_id": resource_id,
            "bookings": len(bookings),
            "holds": len(lost) - len(bookings),
            "booking_ids": bookings[:CONFLICTS_LISTED],
        }
    )


# --- holds and bookings --------------------------------------------------------


class _Slot(NamedTuple):
    branch_id: int
    service_id: int
    resource_id: int
    capacity: int
    starts_at: datetime
    ends_at: datetime
    occupied_from: datetime
    occupied_to: datetime
    reserve: CounterPool | None


SLOT_CONTEXT = """
SELECT s.branch_id, s.duration_min, s.buffer_before_min, s.buffer_after_min,
       s.min_party, s.max_party, s.active AS service_active,
       r.branch_id AS resource_branch_id, r.capacity, r.active AS resource_active,
       r.kind, b.walk_in_reserve::float8 AS walk_in_reserve, b.timezone,
       EXISTS (SELECT 1 FROM resource_skills k
               WHERE k.resource_id = r.id AND k.service_id = s.id) AS skilled
FROM services s
JOIN branches b ON b.id = s.branch_id
CROSS JOIN resources r
WHERE s.id = $1 AND r.id = $2
FOR SHARE OF r
"""

# The counters of a branch that offer a service (availability's counter pool),
# share-locked like the resource a take copies its capacity from.
POOL_COUNTERS = """
SELECT r.id, r.capacity
FROM resources r JOIN resource_skills k ON k.resource_id = r.id
WHERE k.service_id = $1 AND r.branch_id = $2 AND r.active AND r.kind = 'counter'
ORDER BY r.id
FOR SHARE OF r
"""


async def _counter_pool(
    conn: Conn,
    service_id: int,
    branch_id: int,
    timezone: str,
    reserve: float,
    occupied_from: datetime,
    occupied_to: datetime,
) -> CounterPool:
    """The walk-in reserve over a counter's occupied span (see `CounterPool`); the same
    rule as availability's counter pool, per 5-minute unit: a counter counts towards
    C over a unit when it is on shift over all of the unit's part of the span."""
    rows = await conn.fetch(POOL_COUNTERS, service_id, branch_id)
    capacity = {r["id"]: r["capacity"] for r in rows}
    shifts: dict[int, list[tuple[int, int, int]]] = {m: [] for m in capacity}
    exceptions: dict[int, list[tuple[datetime, datetime, bool]]] = {m: [] for m in capacity}
    for s in await conn.fetch(SCHEDULES, list(capacity), occupied_from, occupied_to):
        if s["kind"] == "shift":
            shifts[s["resource_id"]].append((s["weekday"], s["start_minute"], s["end_minute"]))
        else:
            exceptions[s["resource_id"]].append((s["starts_at"], s["ends_at"], s["available"]))
    on = {
        m: on_shift(
            timezone,
            ResourceSchedule(m, "counter", cap, tuple(shifts[m]), tuple(exceptions[m])),
            occupied_from,
            occupied_to,
        )
        for m, cap in capacity.items()
    }
    share = reserve_share(reserve)
    seats_max: dict[datetime, int] = {}
    for unit in unit_starts(occupied_from, occupied_to):
        lo, hi = max(unit, occupied_from), min(unit + UNIT, occupied_to)
        total = sum(
            cap for m, cap in capacity.items() if any(a <= lo and hi <= b for a, b in on[m])
        )
        seats_max[unit] = total * share.numerator // share.denominator
    return CounterPool(capacity=capacity, seats_max=seats_max)


async def _slot_context(
    conn: Conn,
    service_id: int,
    resource_id: int,
    starts_at: datetime,
    party_size: int,
    *,
    check_shift: bool = False,
) -> _Slot:
    """The span a service booked at `starts_at` occupies; the resource row share-locked."""
    if starts_at.tzinfo is None:
        raise InvalidInput.field("starts_at", "must carry a time zone")
    row = await conn.fetchrow(SLOT_CONTEXT, service_id, resource_id)
    if row is None or not row["service_active"] or not row["resource_active"]:
        raise NotFound()
    if row["resource_branch_id"] != row["branch_id"] or not row["skilled"]:
        raise InvalidInput.field("resource_id", "does not offer this service")
    if not row["min_party"] <= party_size <= row["max_party"]:
        raise InvalidInput.field("party_size", "is outside what the service allows")
    ends_at = starts_at + timedelta(minutes=row["duration_min"])
    occupied_from = starts_at - timedelta(minutes=row["buffer_before_min"])
    occupied_to = ends_at + timedelta(minutes=row["buffer_after_min"])
    if check_shift:
        # Read again under the share lock: a schedule change (which writes the row)
        # that committed since the caller computed its slots is seen here.
        intervals = await _on_shift(conn, resource_id, row["timezone"], occupied_from, occupied_to)
        if not _covered(intervals, occupied_from, occupied_to):
            raise SlotFull(extra={"resource_id": resource_id, "reason": "off_shift"})
    reserve = None
    if row["kind"] == "counter" and row["walk_in_reserve"] > 0:
        reserve = await _counter_pool(
            conn,
            service_id,
            row["branch_id"],
            row["timezone"],
            row["walk_in_reserve"],
            occupied_from,
            occupied_to,
        )
    return _Slot(
        branch_id=row["branch_id"],
        service_id=service_id,
        resource_id=resource_id,
        capacity=row["capacity"],
        starts_at=starts_at,
        ends_at=ends_at,
        occupied_from=occupied_from,
        occupied_to=occupied_to,
        reserve=reserve,
    )


def new_code() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))


def _hold(row: Record) -> Hold:
    return msgspec.convert({f: row[f] for f in Hold.__struct_fields__}, Hold)


def _booking(row: Record) -> Booking:
    return msgspec.convert({f: row[f] for f in Booking.__struct_fields__}, Booking)


async def create_hold(
    conn: Conn,
    *,
    service_id: int,
    resource_id: int,
    starts_at: datetime,
    party_size: int,
    channel: Channel,
    now: datetime,
    ttl: timedelta = HOLD_TTL,
    customer_id: int | None = None,
    check_shift: bool = False,
) -> Hold:
    """Take the seats until `now + ttl`; `SlotFull` when they are not free (or, with
    `check_shift`, when the resource is not on shift over the span any more)."""
    slot = await _slot_context(
        conn, service_id, resource_id, starts_at, party_size, check_shift=check_shift
    )
    await take_capacity(
        conn,
        resource_id,
        slot.capacity,
        slot.occupied_from,
        slot.occupied_to,
        party_size,
        slot.reserve,
    )
    row = await conn.fetchrow(
        """
        INSERT INTO holds (branch_id, service_id, resource_id, party_size, starts_at, ends_at,
                           occupied, expires_at, channel, customer_id)
        VALUES ($1, $2, $3, $4, $5, $6, tstzrange($7, $8), $9, $10, $11)
        RETURNING *
        """,
        slot.branch_id,
        service_id,
        resource_id,
        party_size,
        slot.starts_at,
        slot.ends_at,
        slot.occupied_from,
        slot.occupied_to,
        now + ttl,
        channel,
        customer_id,
    )
    assert row is not None
    return _hold(row)


INSERT_BOOKING = """
INSERT INTO bookings (code, branch_id, service_id, resource_id, hold_id, party_size,
                      starts_at, ends_at, occupied, status, channel, customer_id, phone)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, tstzrange($9, $10), $11, $12, $13, $14)
ON CONFLICT (code) WHERE status IN ('pending_payment', 'confirmed') DO NOTHING
RETURNING *
"""


async def _insert_booking(
    conn: Conn,
    *,
    branch_id: int,
    service_id: int,
    resource_id: int,
    hold_id: int | None,
    party_size: int,
    starts_at: datetime,
    ends_at: datetime,
    occupied_from: datetime,
    occupied_to: datetime,
    status: BookingStatus,
    channel: str,
    customer_id: int | None,
    phone: str | None,
) -> Booking:
    # A code taken by an active booking is skipped without aborting the transaction.
    for _ in range(CODE_ATTEMPTS):
        row = await conn.fetchrow(
            INSERT_BOOKING,
            new_code(),
            branch_id,
            service_id,
            resource_id,
            hold_id,
            party_size,
            starts_at,
            ends_at,
            occupied_from,
            occupied_to,
            status,
            channel,
            customer_id,
            phone,
        )
        if row is not None:
            return _booking(row)
    raise LedgerError("no free booking code after several tries")


async def create_booking(
    conn: Conn,
    *,
    service_id: int,
    resource_id: int,
    starts_at: datetime,
    party_size: int,
    channel: Channel,
    now: datetime,
    customer_id: int | None = None,
    phone: str | None = None,
    status: BookingStatus = "confirmed",
    check_shift: bool = False,
) -> Booking:
    """Book from scratch: take the seats and write the booking, or raise `SlotFull`
    (`check_shift`: as in `create_hold`)."""
    slot = await _slot_context(
        conn, service_id, resource_id, starts_at, party_size, check_shift=check_shift
    )
    await take_capacity(
        conn,
        resource_id,
        slot.capacity,
        slot.occupied_from,
        slot.occupied_to,
        party_size,
        slot.reserve,
    )
    return await _insert_booking(
        conn,
        branch_id=slot.branch_id,
        service_id=service_id,
        resource_id=resource_id,
        hold_id=None,
        party_size=party_size,
        starts_at=slot.starts_at,
        ends_at=slot.ends_at,
        occupied_from=slot.occupied_from,
        occupied_to=slot.occupied_to,
        status=status,
        channel=channel,
        customer_id=customer_id,
        phone=phone,
    )


async def create_booking_from_hold(
    conn: Conn,
    hold_id: int,
    *,
    now: datetime,
    phone: str | None = None,
    customer_id: int | None = None,
    status: BookingStatus = "confirmed",
) -> Booking:
    """Turn a live hold into a booking: its seats pass to the booking, the ledger is untouched.

    The hold is claimed with a guarded UPDATE, so a hold becomes one booking at most,
    and a hold that expired (even if the sweep has not run yet) raises `HoldExpired`.
    """
    _require_transaction(conn)
    hold = await conn.fetchrow(
        """
        UPDATE holds SET released_at = $2, release_reason = 'converted'
        WHERE id = $1 AND released_at IS NULL AND expires_at > $2
        RETURNING *, lower(occupied) AS occupied_from, upper(occupied) AS occupied_to
        """,
        hold_id,
        now,
    )
    if hold is None:
        raise HoldExpired()
    return await _insert_booking(
        conn,
        branch_id=hold["branch_id"],
        service_id=hold["service_id"],
        resource_id=hold["resource_id"],
        hold_id=hold_id,
        party_size=hold["party_size"],
        starts_at=hold["starts_at"],
        ends_at=hold["ends_at"],
        occupied_from=hold["occupied_from"],
        occupied_to=hold["occupied_to"],
        status=status,
        channel=hold["channel"],
        customer_id=customer_id if customer_id is not None else hold["customer_id"],
        phone=phone,
    )


async def release_hold(conn: Conn, hold_id: int, now: datetime) -> bool:
    """Give a live hold's seats back at once (the customer let go); False if not live."""
    _require_transaction(conn)
    hold = await conn.fetchrow(
        """
        UPDATE holds SET released_at = $2, release_reason = 'released'
        WHERE id = $1 AND released_at IS NULL
        RETURNING resource_id, party_size, lower(occupied) AS f, upper(occupied) AS t
        """,
        hold_id,
        now,
    )
    if hold is None:
        return False
    await release_capacity(conn, hold["resource_id"], hold["f"], hold["t"], hold["party_size"])
    return True


async def expire_holds(conn: Conn, now: datetime, *, limit: int = 1000) -> int:
    """Release the seats of holds past their expiry; returns how many were released."""
    return len(await expire_due_holds(conn, now, limit=limit))


async def expire_due_holds(conn: Conn, now: datetime, *, limit: int = 1000) -> list[Record]:
    """Release the seats of holds past their expiry; returns the released holds
    (`id`, `branch_id`).

    Idempotent and safe to run concurrently: each due hold is claimed once
    (`FOR UPDATE SKIP LOCKED`, then `released_at` set), and the seats of all claimed
    holds are given back in one sorted, net change.
    """
    _require_transaction(conn)
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT id FROM holds
            WHERE released_at IS NULL AND expires_at <= $1
            ORDER BY id
            LIMIT $2
            FOR UPDATE SKIP LOCKED
        )
        UPDATE holds h SET released_at = $1, release_reason = 'expired'
        FROM due WHERE h.id = due.id
        RETURNING h.id, h.branch_id, h.resource_id, h.party_size,
                  lower(h.occupied) AS f, upper(h.occupied) AS t
        """,
        now,
        limit,
    )
    await _apply(
        conn, [Change(r["resource_id"], 0, r["f"], r["t"], -r["party_size"]) for r in rows]
    )
    return list(rows)


async def mark_no_shows(
    conn: Conn, started_before: datetime, now: datetime, *, limit: int = 1000
) -> list[Record]:
    """Mark active bookings that started before `started_before` and were never checked
    in as no-shows, giving their seats back; returns them (`id`, `branch_id`).

    Safe to run concurrently, like `expire_due_holds`."""
    _require_transaction(conn)
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT id FROM bookings
            WHERE status IN ('pending_payment', 'confirmed') AND checked_in_at IS NULL
              AND starts_at < $1
            ORDER BY starts_at, id
            LIMIT $3
            FOR UPDATE SKIP LOCKED
        )
        UPDATE bookings b SET status = 'no_show', no_show_at = $2, updated_at = now()
        FROM due WHERE b.id = due.id
        RETURNING b.id, b.branch_id, b.resource_id, b.party_size,
                  lower(b.occupied) AS f, upper(b.occupied) AS t
        """,
        started_before,
        now,
        limit,
    )
    await _apply(
        conn, [Change(r["resource_id"], 0, r["f"], r["t"], -r["party_size"]) for r in rows]
    )
    return list(rows)


async def cancel_booking(conn: Conn, booking_id: int, now: datetime) -> bool:
    """Cancel an active booking and free its seats at once; False if it was not active."""
    _require_transaction(conn)
    row = await conn.fetchrow(
        """
        UPDATE bookings SET status = 'cancelled', cancelled_at = $2, updated_at = now()
        WHERE id = $1 AND status IN ('pending_payment', 'confirmed')
        RETURNING resource_id, party_size, lower(occupied) AS f, upper(occupied) AS t
        """,
        booking_id,
        now,
    )
    if row is None:
        return False
    await release_capacity(conn, row["resource_id"], row["f"], row["t"], row["party_size"])
    return True


async def reschedule_booking(
    conn: Conn,
    booking_id: int,
    *,
    new_starts_at: datetime,
    now: datetime,
    new_resource_id: int | None = None,
    check_shift: bool = False,
) -> Booking:
    """Move an active booking in one step; on `SlotFull` the booking and ledger are unchanged
    (`check_shift`: as in `create_hold`).

    The new seats are taken and the old ones given back by one net change, so a move
    that overlaps the old span (10:00 -> 10:15) never competes with itself.
    """
    _require_transaction(conn)
    old = await conn.fetchrow(
        """
        SELECT service_id, resource_id, party_size, status,
               lower(occupied) AS f, upper(occupied) AS t
        FROM bookings WHERE id = $1 FOR UPDATE
        """,
        booking_id,
    )
    if old is None:
        raise NotFound()
    if old["status"] not in ACTIVE_STATUSES:
        raise BookingNotActive()
    resource_id = new_resource_id if new_resource_id is not None else old["resource_id"]
    slot = await _slot_context(
        conn,
        old["service_id"],
        resource_id,
        new_starts_at,
        old["party_size"],
        check_shift=check_shift,
    )
    await _apply(
        conn,
        [
            Change(
                resource_id, slot.capacity, slot.occupied_from, slot.occupied_to, old["party_size"]
            ),
            Change(old["resource_id"], 0, old["f"], old["t"], -old["party_size"]),
        ],
        slot.reserve,
    )
    row = await conn.fetchrow(
        """
        UPDATE bookings
        SET resource_id = $2, starts_at = $3, ends_at = $4, occupied = tstzrange($5, $6),
            updated_at = now()
        WHERE id = $1
        RETURNING *
        """,
        booking_id,
        resource_id,
        slot.starts_at,
        slot.ends_at,
        slot.occupied_from,
        slot.occupied_to,
    )
    assert row is not None
    return _booking(row)


# --- pruning the past ----------------------------------------------------------

# Units are kept this long after they end (for inspection), then purged.
PURGE_KEEP = timedelta(days=2)
PURGE_BATCH = 500  # unit rows per transaction
PURGE_MAX_BATCHES = 200  # per run; the next run goes on

MARK_PURGED = """
INSERT INTO capacity_ledger_purge (singleton, purged_before) VALUES (true, $1)
ON CONFLICT (singleton) DO UPDATE
SET purged_before = greatest(capacity_ledger_purge.purged_before, EXCLUDED.purged_before),
    updated_at = now()
"""

# Oldest first; rows another transaction holds (a release under way) are skipped,
# and so are units a live commitment still covers: it may yet give its seats back
# there (a no-show, a cancel), which needs the row. Counting bookings that are no
# longer live (completed) do not keep their units.
PURGE_BATCH_SQL = """
WITH doomed AS (
    SELECT u.resource_id, u.unit_start
    FROM resource_capacity_units u
    WHERE u.unit_start < $1
      AND NOT EXISTS (
          SELECT 1 FROM holds h
          WHERE h.resource_id = u.resource_id AND h.released_at IS NULL
            AND h.occupied && tstzrange(u.unit_start, u.unit_start + interval '5 minutes'))
      AND NOT EXISTS (
          SELECT 1 FROM bookings b
          WHERE b.resource_id = u.resource_id
            AND b.status IN ('pending_payment', 'confirmed')
            AND b.occupied && tstzrange(u.unit_start, u.unit_start + interval '5 minutes'))
    ORDER BY u.unit_start, u.resource_id
    LIMIT $2
    FOR UPDATE OF u SKIP LOCKED
)
DELETE FROM resource_capacity_units u
USING doomed d
WHERE u.resource_id = d.resource_id AND u.unit_start = d.unit_start
"""


async def purge_units(
    pool: Pool,
    now: datetime,
    *,
    keep: timedelta = PURGE_KEEP,
    batch: int = PURGE_BATCH,
    max_batches: int = PURGE_MAX_BATCHES,
) -> int:
    """Delete the unit rows that ended more than `keep` before `now`, `batch` rows per
    transaction; returns how many went.

    First the mark `capacity_ledger_purge.purged_before` moves forward (never back) and
    commits, so the invariant query stops looking for the units before it before any
    of them is gone. Safe to run twice or concurrently (rows are claimed with
    `SKIP LOCKED`; the mark only grows)."""
    if batch < 1 or max_batches < 1:
        raise ValueError("batch and max_batches must be positive")
    before = _current_unit(now - keep)
    await pool.execute(MARK_PURGED, before)

    async def one_batch(conn: Conn) -> int:
        await conn.execute(SET_LOCK_TIMEOUT)
        result: str = await conn.execute(PURGE_BATCH_SQL, before, batch)
        return int(result.split()[-1])

    total = 0
    for _ in range(max_batches):
        done = await in_transaction_with_retry(pool, one_batch)
        total += done
        if done < batch:
            break
    return total


# --- the invariant -------------------------------------------------------------

OVERBOOKED = """
WITH commitments AS (
    SELECT resource_id, occupied, party_size FROM holds WHERE released_at IS NULL
    UNION ALL
    SELECT resource_id, occupied, party_size FROM bookings
    WHERE status IN ('pending_payment', 'confirmed', 'completed')
), seats AS (
    SELECT c.resource_id, g.unit_start, sum(c.party_size)::integer AS seats
    FROM commitments c,
    LATERAL generate_series(
        date_bin('5 minutes', lower(c.occupied), timestamptz 'epoch'),
        date_bin('5 minutes', upper(c.occupied) - interval '1 microsecond', timestamptz 'epoch'),
        interval '5 minutes'
    ) AS g(unit_start)
    GROUP BY c.resource_id, g.unit_start
), pruned AS (
    SELECT coalesce(max(purged_before), '-infinity') AS before FROM capacity_ledger_purge
)
SELECT coalesce(s.resource_id, u.resource_id) AS resource_id,
       coalesce(s.unit_start, u.unit_start) AS unit_start,
       coalesce(s.seats, 0) AS seats, u.used, u.capacity,
       r.capacity AS resource_capacity
FROM seats s
FULL JOIN resource_capacity_units u
  ON u.resource_id = s.resource_id AND u.unit_start = s.unit_start
JOIN resources r ON r.id = coalesce(s.resource_id, u.resource_id)
CROSS JOIN pruned
WHERE (u.resource_id IS NOT NULL OR s.unit_start >= pruned.before)
  AND (coalesce(u.used, 0) <> coalesce(s.seats, 0)
       OR coalesce(s.seats, 0) > coalesce(u.capacity, 0)
       OR (coalesce(s.unit_start, u.unit_start) + interval '5 minutes'
               > coalesce($1::timestamptz, now())
           AND (u.capacity IS DISTINCT FROM r.capacity OR coalesce(s.seats, 0) > r.capacity)))
ORDER BY 1, 2
"""


async def overbooked(conn: Conn, now: datetime | None = None) -> list[Violation]:
    """Every (resource, unit) over capacity, or whose ledger `used` differs from the rows.

    Empty means: live holds plus counting bookings fit every resource, the ledger
    is exactly their sum, and every unit that has not ended by `now` (default: the
    database's clock) has the resource's real capacity and fits it. Units that ended
    keep the capacity they had. Units the purge removed (before
    `capacity_ledger_purge.purged_before`) are not looked for; the rows that remain
    there are checked like any other.
    """
    rows = await conn.fetch(OVERBOOKED, now)
    return [msgspec.convert(dict(r), Violation) for r in rows]
