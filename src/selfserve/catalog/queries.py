"""Catalogue SQL: `$n` constants and small helpers taking a connection."""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import asyncpg

from selfserve.catalog.models import MAX_BIGINT
from selfserve.db import Conn
from selfserve.errors import InvalidInput

T = TypeVar("T")

BRANCH_COLUMNS = (
    "id, name, timezone, address, phone, opening_hours, closures, "
    "walk_in_reserve::float8 AS walk_in_reserve, active, created_at, updated_at"
)
SERVICE_COLUMNS = (
    "id, branch_id, name, description, duration_min, buffer_before_min, buffer_after_min, "
    "price_minor, deposit_minor, currency, min_party, max_party, lead_time_min, horizon_days, "
    "cancellation_window_min, slot_interval_min, active, created_at, updated_at"
)
RESOURCE_SELECT = """
SELECT r.id, r.branch_id, r.kind, r.name, r.capacity, r.active, r.created_at, r.updated_at,
       coalesce((SELECT array_agg(rs.service_id ORDER BY rs.service_id)
                 FROM resource_skills rs WHERE rs.resource_id = r.id), '{}') AS skills
FROM resources r
"""
SCHEDULE_SELECT = """
SELECT s.id, s.resource_id, r.branch_id, s.kind, s.weekday, s.start_minute, s.end_minute,
       s.starts_at, s.ends_at, s.available, s.note, s.active, s.created_at, s.updated_at
FROM schedules s JOIN resources r ON r.id = s.resource_id
"""
QUEUE_SELECT = """
SELECT q.id, q.branch_id, q.name, q.prefix, q.active, q.created_at, q.updated_at,
       coalesce((SELECT array_agg(qs.service_id ORDER BY qs.service_id)
                 FROM queue_services qs WHERE qs.queue_id = q.id), '{}') AS service_ids
FROM queues q
"""
DEVICE_COLUMNS = (
    "id, branch_id, name, kind, active, revoked_at, last_seen_at, created_at, updated_at"
)
STAFF_SELECT = """
SELECT s.id, s.email, s.name, s.role, s.active, s.created_at, s.updated_at,
       coalesce((SELECT array_agg(sb.branch_id ORDER BY sb.branch_id)
                 FROM staff_branches sb WHERE sb.staff_id = s.id), '{}') AS branch_ids
FROM staff s
"""

INSERT_BRANCH = f"""
INSERT INTO branches (name, timezone, address, phone, opening_hours, closures, walk_in_reserve)
VALUES ($1, $2, $3, $4, $5, $6, $7)
RETURNING {BRANCH_COLUMNS}
"""
INSERT_SERVICE = f"""
INSERT INTO services (branch_id, name, description, duration_min, buffer_before_min,
    buffer_after_min, price_minor, deposit_minor, currency, min_party, max_party, lead_time_min,
    horizon_days, cancellation_window_min, slot_interval_min)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15)
RETURNING {SERVICE_COLUMNS}
"""
INSERT_RESOURCE = """
INSERT INTO resources (branch_id, kind, name, capacity) VALUES ($1, $2, $3, $4) RETURNING id
"""
INSERT_SKILLS = """
INSERT INTO resource_skills (resource_id, service_id)
SELECT $1, unnest($2::bigint[]) ON CONFLICT DO NOTHING
"""
INSERT_QUEUE = "INSERT INTO queues (branch_id, name, prefix) VALUES ($1, $2, $3) RETURNING id"
# Both parts see the same snapshot, so services that stay are kept, not deleted and re-inserted.
SET_QUEUE_SERVICES = """
WITH gone AS (
    DELETE FROM queue_services WHERE queue_id = $1 AND NOT service_id = ANY($2::bigint[])
)
INSERT INTO queue_services (queue_id, service_id) SELECT $1, unnest($2::bigint[])
ON CONFLICT DO NOTHING
"""
INSERT_SCHEDULE = """
INSERT INTO schedules (resource_id, kind, weekday, start_minute, end_minute, starts_at, ends_at,
    available, note)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
RETURNING id
"""
INSERT_DEVICE = f"""
INSERT INTO devices (branch_id, name, kind, secret_hash) VALUES ($1, $2, $3, $4)
RETURNING {DEVICE_COLUMNS}
"""
INSERT_STAFF = (
    "INSERT INTO staff (email, name, password_hash, role) VALUES ($1, $2, $3, $4) RETURNING id"
)
# Both parts see the same snapshot, so rows that stay are kept, not deleted and re-inserted.
SET_STAFF_BRANCHES = """
WITH gone AS (
    DELETE FROM staff_branches WHERE staff_id = $1 AND NOT branch_id = ANY($2::bigint[])
)
INSERT INTO staff_branches (staff_id, branch_id) SELECT $1, unnest($2::bigint[])
ON CONFLICT DO NOTHING
"""

# Services named as skills or by a queue must exist, be active and belong to its branch.
CHECK_SERVICES_IN_BRANCH = """
SELECT array_agg(x) FROM unnest($1::bigint[]) AS x
WHERE NOT EXISTS (SELECT 1 FROM services s WHERE s.id = x AND s.branch_id = $2 AND s.active)
"""
CHECK_BRANCHES_ACTIVE = """
SELECT array_agg(x) FROM unnest($1::bigint[]) AS x
WHERE NOT EXISTS (SELECT 1 FROM branches b WHERE b.id = x AND b.active)
"""


# A cursor is opaque to clients: base64url (no padding) of the last id in ASCII digits.
# Decoding accepts exactly what encoding produces, so no input reaches int() unchecked.
_CURSOR = re.compile(r"[A-Za-z0-9_-]{1,28}")
_CURSOR_ID = re.compile(rb"[0-9]{1,19}")


def encode_cursor(last_id: int) -> str:
    return base64.urlsafe_b64encode(str(last_id).encode()).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> int:
    """The id a cursor carries; 0 for no cursor; 422 for anything this API did not issue."""
    if not cursor:
        return 0
    raw = b""
    if _CURSOR.fullmatch(cursor):
        try:
            raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        except ValueError:
            raw = b""
    if not _CURSOR_ID.fullmatch(raw) or encode_cursor(int(raw)) != cursor:
        raise InvalidInput.field("cursor", "not a cursor this API issued")
    value = int(raw)
    if value > MAX_BIGINT:
        raise InvalidInput.field("cursor", "not a cursor this API issued")
    return value


async def page(
    conn: Conn,
    select: str,
    id_column: str,
    filters: Sequence[str],
    params: Sequence[Any],
    *,
    limit: int,
    cursor: str | None,
) -> tuple[list[asyncpg.Record], str | None]:
    """Keyset pagination on the id column; fetch one extra row to know if more exist."""
    after = decode_cursor(cursor)
    args = [*params, after, limit + 1]
    where = [*filters, f"{id_column} > ${len(args) - 1}"]
    sql = f"{select} WHERE {' AND '.join(where)} ORDER BY {id_column} LIMIT ${len(args)}"
    records = await conn.fetch(sql, *args)
    more = len(records) > limit
    records = records[:limit]
    next_cursor = encode_cursor(records[-1]["id"]) if more and records else None
    return records, next_cursor


async def page_of(
    pool: asyncpg.Pool,
    select: str,
    id_column: str,
    filters: Sequence[str],
    params: Sequence[Any],
    convert: Callable[[asyncpg.Record], T],
    *,
    limit: int,
    cursor: str | None,
) -> tuple[list[T], str | None]:
    """`page` on a pooled connection, rows converted; no filters means every row."""
    async with pool.acquire() as conn:
        rows, nxt = await page(
            conn, select, id_column, filters or ["true"], params, limit=limit, cursor=cursor
        )
    return [convert(r) for r in rows], nxt


async def update_columns(conn: Conn, table: str, row_id: int, changes: Mapping[str, Any]) -> None:
    """UPDATE only the given whitelisted columns, bumping updated_at."""
    if not changes:
        await conn.execute(f"UPDATE {table} SET updated_at = now() WHERE id = $1", row_id)
        return
    sets = ", ".join(f"{column} = ${i}" for i, column in enumerate(changes, start=2))
    await conn.execute(
        f"UPDATE {table} SET {sets}, updated_at = now() WHERE id = $1", row_id, *changes.values()
    )
