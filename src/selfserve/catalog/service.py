"""Catalogue use cases. Each write is one transaction; scope checked inside it."""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError, available_timezones

import asyncpg
import msgspec

from selfserve.auth.guards import ensure_can_write, ensure_visible
from selfserve.auth.passwords import hash_password, hash_password_async
from selfserve.auth.service import revoke_principal
from selfserve.auth.tokens import Principal, hash_secret
from selfserve.catalog import queries as q
from selfserve.catalog.models import (
    Branch,
    BranchCreate,
    BranchUpdate,
    Closure,
    Device,
    DeviceCreate,
    DeviceUpdate,
    DeviceWithSecret,
    ExceptionCreate,
    OpeningHours,
    Queue,
    QueueCreate,
    QueueUpdate,
    Resource,
    ResourceCreate,
    ResourceUpdate,
    Schedule,
    ScheduleCreate,
    ScheduleUpdate,
    Service,
    ServiceCreate,
    ServiceUpdate,
    ShiftCreate,
    StaffAccount,
    StaffCreate,
    StaffUpdate,
)
from selfserve.db import Conn, constraint_of, to_struct, transaction
from selfserve.errors import Conflict, FieldError, Forbidden, InvalidInput, NotFound
from selfserve.scheduling import ledger

Page = tuple[list[Any], str | None]


def _changes(update: msgspec.Struct) -> dict[str, Any]:
    return {
        f: getattr(update, f)
        for f in update.__struct_fields__
        if getattr(update, f) is not msgspec.UNSET
    }


def clock_to_minute(value: str) -> int:
    hours, minutes = value.split(":")
    return int(hours) * 60 + int(minutes)


def minute_to_clock(value: int) -> str:
    return f"{value // 60:02d}:{value % 60:02d}"


# --- branches ----------------------------------------------------------------

_VALID_ZONES: frozenset[str] | None = None
# IANA names: Area/Location components each starting with a capital letter (also UTC,
# Etc/GMT+5, US/Eastern). This leaves out what a system's zoneinfo folder holds beside
# them (`localtime`, `posixrules`, `posix/...`, `right/...`); `Factory` is tzdata's
# placeholder zone, not a place.
_IANA_NAME = re.compile(r"[A-Z][A-Za-z0-9_+-]*(/[A-Z][A-Za-z0-9_+-]*)*")
_NOT_PLACES = frozenset({"Factory"})


def validate_timezone(name: str, field: str = "timezone") -> None:
    global _VALID_ZONES
    if _VALID_ZONES is None:
        _VALID_ZONES = frozenset(
            zone
            for zone in available_timezones()
            if _IANA_NAME.fullmatch(zone) and zone not in _NOT_PLACES
        )
    hint = "an IANA time zone name such as Asia/Shanghai or Europe/London"
    if name not in _VALID_ZONES:
        raise InvalidInput.field(field, f"{name!r} is not {hint}")
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput.field(field, f"{name!r} is not {hint}") from None


def validate_hours(hours: Sequence[OpeningHours], closures: Sequence[Closure]) -> None:
    errors: list[FieldError] = []
    by_day: dict[int, list[tuple[int, int]]] = {}
    for i, h in enumerate(hours):
        opens, closes = clock_to_minute(h.opens), clock_to_minute(h.closes)
        if closes <= opens:
            errors.append(FieldError(f"opening_hours[{i}].closes", "must be after opens"))
            continue
        by_day.setdefault(h.weekday, []).append((opens, closes))
    for day, spans in by_day.items():
        spans.sort()
        for (_, end_a), (start_b, _) in itertools.pairwise(spans):
            if start_b < end_a:
                errors.append(FieldError("opening_hours", f"overlapping hours on weekday {day}"))
    seen: set[Any] = set()
    for i, c in enumerate(closures):
        if c.date in seen:
            errors.append(FieldError(f"closures[{i}].date", "closure date listed twice"))
        seen.add(c.date)
    if errors:
        raise InvalidInput(errors=errors)


def _branch(row: asyncpg.Record | None) -> Branch:
    return to_struct(row, Branch)


async def create_branch(pool: asyncpg.Pool, principal: Principal, data: BranchCreate) -> Branch:
    if principal.role != "admin":
        raise Forbidden()
    validate_timezone(data.timezone)
    validate_hours(data.opening_hours, data.closures)
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            q.INSERT_BRANCH,
            data.name,
            data.timezone,
            data.address,
            data.phone,
            msgspec.to_builtins(data.opening_hours),
            msgspec.to_builtins(sorted(data.closures, key=lambda c: c.date)),
            data.walk_in_reserve,
        )
    return _branch(row)


async def get_branch(
    pool: asyncpg.Pool,
    branch_id: int,
    *,
    principal: Principal | None = None,
    public: bool = False,
) -> Branch:
    row = await pool.fetchrow(f"SELECT {q.BRANCH_COLUMNS} FROM branches WHERE id = $1", branch_id)
    if row is None or (public and not row["active"]):
        raise NotFound()
    if principal is not None:
        ensure_visible(principal, row["id"])
    return _branch(row)


async def list_branches(
    pool: asyncpg.Pool,
    *,
    principal: Principal | None,
    public: bool,
    limit: int,
    cursor: str | None,
    include_inactive: bool = False,
) -> Page:
    filters: list[str] = []
    params: list[Any] = []
    if public or not include_inactive:
        filters.append("active")
    if principal is not None and principal.branches is not None:
        params.append(list(principal.branches))
        filters.append(f"id = ANY(${len(params)}::bigint[])")
    return await q.page_of(
        pool,
        f"SELECT {q.BRANCH_COLUMNS} FROM branches",
        "id",
        filters,
        params,
        _branch,
        limit=limit,
        cursor=cursor,
    )


async def update_branch(
    pool: asyncpg.Pool, principal: Principal, branch_id: int, data: BranchUpdate
) -> Branch:
    changes = _changes(data)
    if "timezone" in changes:
        validate_timezone(changes["timezone"])
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"SELECT {q.BRANCH_COLUMNS} FROM branches WHERE id = $1 FOR UPDATE", branch_id
        )
        if row is None:
            raise NotFound()
        ensure_visible(principal, branch_id)
        ensure_can_write(principal, branch_id)
        current = _branch(row)
        hours = changes.get("opening_hours", current.opening_hours)
        closures = changes.get("closures", current.closures)
        validate_hours(hours, closures)
        for key in ("opening_hours", "closures"):
            if key in changes:
                value = changes[key]
                if key == "closures":
                    value = sorted(value, key=lambda c: c.date)
                changes[key] = msgspec.to_builtins(value)
        await q.update_columns(conn, "branches", branch_id, changes)
        row = await conn.fetchrow(
            f"SELECT {q.BRANCH_COLUMNS} FROM branches WHERE id = $1", branch_id
        )
    return _branch(row)


async def deactivate_branch(pool: asyncpg.Pool, principal: Principal, branch_id: int) -> Branch:
    if principal.role != "admin":
        raise Forbidden()
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"UPDATE branches SET active = false, updated_at = now() WHERE id = $1 "
            f"RETURNING {q.BRANCH_COLUMNS}",
            branch_id,
        )
        if row is None:
            raise NotFound()
    return _branch(row)


async def _branch_for_write(conn: Conn, principal: Principal, branch_id: int) -> None:
    """The named branch must exist, be active and lie inside the caller's scope (one
    outside it is answered as a missing one)."""
    active = await conn.fetchval("SELECT active FROM branches WHERE id = $1 FOR SHARE", branch_id)
    if active is None or not principal.in_scope(branch_id):
        raise InvalidInput.field("branch_id", "no such branch")
    ensure_can_write(principal, branch_id)  # in scope: only the role is left to check
    if not active:
        raise InvalidInput(
            errors=[FieldError("branch_id", "branch is deactivated")], code="inactive_reference"
        )


async def _lock_for_write(conn: Conn, principal: Principal, table: str, row_id: int) -> int:
    """Lock a branch-owned row for update; missing or out of scope looks the same (404),
    in scope but not writable is 403."""
    branch_id: int | None = await conn.fetchval(
        f"SELECT branch_id FROM {table} WHERE id = $1 FOR UPDATE", row_id
    )
    if branch_id is None:
        raise NotFound()
    ensure_visible(principal, branch_id)
    ensure_can_write(principal, branch_id)
    return branch_id


# --- services ----------------------------------------------------------------


def _validate_service(values: dict[str, Any]) -> None:
    errors = []
    if values["max_party"] < values["min_party"]:
        errors.append(FieldError("max_party", "must be at least min_party"))
    if values["deposit_minor"] > values["price_minor"]:
        errors.append(FieldError("deposit_minor", "must not exceed price_minor"))
    if errors:
        raise InvalidInput(errors=errors)


async def create_service(pool: asyncpg.Pool, principal: Principal, data: ServiceCreate) -> Service:
    values = msgspec.structs.asdict(data)
    _validate_service(values)
    async with transaction(pool) as conn:
        await _branch_for_write(conn, principal, data.branch_id)
        row = await conn.fetchrow(
            q.INSERT_SERVICE,
            data.branch_id,
            data.name,
            data.description,
            data.duration_min,
            data.buffer_before_min,
            data.buffer_after_min,
            data.price_minor,
            data.deposit_minor,
            data.currency,
            data.min_party,
            data.max_party,
            data.lead_time_min,
            data.horizon_days,
            data.cancellation_window_min,
            data.slot_interval_min,
        )
    return to_struct(row, Service)


async def get_service(
    pool: asyncpg.Pool, service_id: int, principal: Principal | None = None
) -> Service:
    row = await pool.fetchrow(f"SELECT {q.SERVICE_COLUMNS} FROM services WHERE id = $1", service_id)
    if row is None:
        raise NotFound()
    if principal is not None:
        ensure_visible(principal, row["branch_id"])
    return to_struct(row, Service)


def _scope_filters(
    principal: Principal | None, branch_id: int | None, column: str = "branch_id"
) -> tuple[list[str], list[Any]]:
    filters: list[str] = []
    params: list[Any] = []
    if branch_id is not None:
        params.append(branch_id)
        filters.append(f"{column} = ${len(params)}")
    if principal is not None and principal.branches is not None:
        params.append(list(principal.branches))
        filters.append(f"{column} = ANY(${len(params)}::bigint[])")
    return filters, params


async def list_services(
    pool: asyncpg.Pool,
    *,
    principal: Principal | None,
    branch_id: int | None,
    limit: int,
    cursor: str | None,
    only_active: bool,
) -> Page:
    filters, params = _scope_filters(principal, branch_id)
    if only_active:
        filters.append("active")
    return await q.page_of(
        pool,
        f"SELECT {q.SERVICE_COLUMNS} FROM services",
        "id",
        filters,
        params,
        lambda r: to_struct(r, Service),
        limit=limit,
        cursor=cursor,
    )


async def update_service(
    pool: asyncpg.Pool, principal: Principal, service_id: int, data: ServiceUpdate
) -> Service:
    changes = _changes(data)
    async with transaction(pool) as conn:
        row = await conn.fetchrow(
            f"SELECT {q.SERVICE_COLUMNS} FROM services WHERE id = $1 FOR UPDATE", service_id
        )
        if row is None:
            raise NotFound()
        ensure_visible(principal, row["branch_id"])
        ensure_can_write(principal, row["branch_id"])
        _validate_service({**dict(row), **changes})
        await q.update_columns(conn, "services", service_id, changes)
        row = await conn.fetchrow(
            f"SELECT {q.SERVICE_COLUMNS} FROM services WHERE id = $1", service_id
        )
    return to_struct(row, Service)


async def deactivate_service(pool: asyncpg.Pool, principal: Principal, service_id: int) -> Service:
    async with transaction(pool) as conn:
        await _lock_for_write(conn, principal, "services", service_id)
        row = await conn.fetchrow(
            f"UPDATE services SET active = false, updated_at = now() WHERE id = $1 "
            f"RETURNING {q.SERVICE_COLUMNS}",
            service_id,
        )
    return to_struct(row, Service)


# --- resources ---------------------------------------------------------------


async def _check_skills(
    conn: Conn, branch_id: int, skills: list[int], field: str = "skills"
) -> None:
    if not skills:
        return
    bad = await conn.fetchval(q.CHECK_SERVICES_IN_BRANCH, skills, branch_id)
    if bad:
        raise InvalidInput.field(field, f"not active services of this branch: {sorted(set(bad))}")


async def _load_resource(conn: Conn, resource_id: int) -> Resource | None:
    row = await conn.fetchrow(q.RESOURCE_SELECT + " WHERE r.id = $1", resource_id)
    return to_struct(row, Resource) if row else None


async def create_resource(
    pool: asyncpg.Pool, principal: Principal, data: ResourceCreate
) -> Resource:
    async with transaction(pool) as conn:
        await _branch_for_write(conn, principal, data.branch_id)
        await _check_skills(conn, data.branch_id, data.skills)
        rid = await conn.fetchval(
            q.INSERT_RESOURCE, data.branch_id, data.kind, data.name, data.capacity
        )
        await conn.execute(q.INSERT_SKILLS, rid, data.skills)
        resource = await _load_resource(conn, rid)
    assert resource is not None
    return resource


async def get_resource(pool: asyncpg.Pool, principal: Principal, resource_id: int) -> Resource:
    async with pool.acquire() as conn:
        resource = await _load_resource(conn, resource_id)
    if resource is None:
        raise NotFound()
    ensure_visible(principal, resource.branch_id)
    return resource


async def list_resources(
    pool: asyncpg.Pool,
    *,
    principal: Principal,
    branch_id: int | None,
    limit: int,
    cursor: str | None,
    include_inactive: bool,
) -> Page:
    filters, params = _scope_filters(principal, branch_id, "r.branch_id")
    if not include_inactive:
        filters.append("r.active")
    return await q.page_of(
        pool,
        q.RESOURCE_SELECT,
        "r.id",
        filters,
        params,
        lambda r: to_struct(r, Resource),
        limit=limit,
        cursor=cursor,
    )


async def update_resource(
    pool: asyncpg.Pool, principal: Principal, resource_id: int, data: ResourceUpdate
) -> Resource:
    changes = _changes(data)
    skills = changes.pop("skills", None)
    capacity = changes.pop("capacity", None)
    async with transaction(pool) as conn:
        branch_id = await _lock_for_write(conn, principal, "resources", resource_id)
        if capacity is not None:
            # Through the ledger, in this transaction: its future units get the new
            # capacity, or 409 `capacity_in_use` when taken seats would not fit.
            await ledger.resize_capacity(conn, resource_id, capacity, datetime.now(UTC))
        await q.update_columns(conn, "resources", resource_id, changes)
        if skills is not None:
            await _check_skills(conn, branch_id, skills)
            await conn.execute(
                "DELETE FROM resource_skills WHERE resource_id = $1 AND NOT service_id = ANY($2)",
                resource_id,
                skills,
            )
            await conn.execute(q.INSERT_SKILLS, resource_id, skills)
        resource = await _load_resource(conn, resource_id)
    assert resource is not None
    return resource


async def deactivate_resource(
    pool: asyncpg.Pool, principal: Principal, resource_id: int
) -> Resource:
    async with transaction(pool) as conn:
        await _lock_for_write(conn, principal, "resources", resource_id)
        # 409 `capacity_in_use` while bookings or holds still have seats on it.
        await ledger.retire_resource(conn, resource_id, datetime.now(UTC))
        await conn.execute(
            "UPDATE resources SET active = false, updated_at = now() WHERE id = $1", resource_id
        )
        resource = await _load_resource(conn, resource_id)
    assert resource is not None
    return resource


# --- queues ------------------------------------------------------------------

# The database's own rule; the body's pattern lets a trailing newline through
# (a Python `$` matches before one), PostgreSQL's `$` does not.
_PREFIX = re.compile(r"[A-Z]{1,2}")


def _check_prefix(prefix: str) -> None:
    if not _PREFIX.fullmatch(prefix):
        raise InvalidInput.field("prefix", "must be one or two capital letters A-Z")


def _prefix_taken() -> Conflict:
    return Conflict(
        code="already_exists",
        errors=[FieldError("prefix", "an active queue of this branch already uses it")],
    )


async def _load_queue(conn: Conn, queue_id: int) -> Queue | None:
    row = await conn.fetchrow(q.QUEUE_SELECT + " WHERE q.id = $1", queue_id)
    return to_struct(row, Queue) if row else None


async def create_queue(pool: asyncpg.Pool, principal: Principal, data: QueueCreate) -> Queue:
    _check_prefix(data.prefix)
    try:
        async with transaction(pool) as conn:
            await _branch_for_write(conn, principal, data.branch_id)
            await _check_skills(conn, data.branch_id, data.service_ids, "service_ids")
            qid = await conn.fetchval(q.INSERT_QUEUE, data.branch_id, data.name, data.prefix)
            await conn.execute(q.SET_QUEUE_SERVICES, qid, data.service_ids)
            queue = await _load_queue(conn, qid)
    except asyncpg.UniqueViolationError as exc:
        if constraint_of(exc) == "queues_branch_prefix_key":
            raise _prefix_taken() from None
        raise
    assert queue is not None
    return queue


async def get_queue(pool: asyncpg.Pool, principal: Principal, queue_id: int) -> Queue:
    async with pool.acquire() as conn:
        queue = await _load_queue(conn, queue_id)
    if queue is None:
        raise NotFound()
    ensure_visible(principal, queue.branch_id)
    return queue


async def list_queues(
    pool: asyncpg.Pool,
    *,
    principal: Principal,
    branch_id: int | None,
    limit: int,
    cursor: str | None,
    include_inactive: bool,
) -> Page:
    filters, params = _scope_filters(principal, branch_id, "q.branch_id")
    if not include_inactive:
        filters.append("q.active")
    return await q.page_of(
        pool,
        q.QUEUE_SELECT,
        "q.id",
        filters,
        params,
        lambda r: to_struct(r, Queue),
        limit=limit,
        cursor=cursor,
    )


async def update_queue(
    pool: asyncpg.Pool, principal: Principal, queue_id: int, data: QueueUpdate
) -> Queue:
    changes = _changes(data)
    service_ids = changes.pop("service_ids", None)
    if "prefix" in changes:
        _check_prefix(changes["prefix"])
    try:
        async with transaction(pool) as conn:
            branch_id = await _lock_for_write(conn, principal, "queues", queue_id)
            if service_ids is not None:
                await _check_skills(conn, branch_id, service_ids, "service_ids")
            await q.update_columns(conn, "queues", queue_id, changes)
            if service_ids is not None:
                await conn.execute(q.SET_QUEUE_SERVICES, queue_id, service_ids)
            queue = await _load_queue(conn, queue_id)
    except asyncpg.UniqueViolationError as exc:
        if constraint_of(exc) == "queues_branch_prefix_key":
            raise _prefix_taken() from None
        raise
    assert queue is not None
    return queue


async def deactivate_queue(pool: asyncpg.Pool, principal: Principal, queue_id: int) -> Queue:
    """Soft: the queue stops taking tickets and its prefix is free for another queue."""
    async with transaction(pool) as conn:
        await _lock_for_write(conn, principal, "queues", queue_id)
        await conn.execute(
            "UPDATE queues SET active = false, updated_at = now() WHERE id = $1", queue_id
        )
        queue = await _load_queue(conn, queue_id)
    assert queue is not None
    return queue


# --- schedules ---------------------------------------------------------------


def _schedule(row: asyncpg.Record | None) -> Schedule:
    if row is None:
        raise LookupError("expected a schedule row")
    d = dict(row)
    start, end = d.pop("start_minute"), d.pop("end_minute")
    d["start"] = minute_to_clock(start) if start is not None else None
    d["end"] = minute_to_clock(end) if end is not None else None
    return msgspec.convert(d, Schedule)


def _check_shift(start: int, end: int) -> None:
    if end <= start:
        raise InvalidInput.field("end", "must be after start")


def _check_exception(starts_at: datetime, ends_at: datetime) -> None:
    if ends_at <= starts_at:
        raise InvalidInput.field("ends_at", "must be after starts_at")


def _overlap(exc: asyncpg.ExclusionViolationError) -> InvalidInput:
    if constraint_of(exc) == "schedules_no_overlapping_shifts":
        return InvalidInput(
            errors=[FieldError("start", "overlaps another shift of this resource on that day")],
            code="overlapping_shift",
        )
    return InvalidInput(
        errors=[FieldError("starts_at", "overlaps another exception of this resource")],
        code="overlapping_shift",
    )


async def _resource_for_write(conn: Conn, principal: Principal, resource_id: int) -> int:
    # FOR UPDATE: a schedule change waits for the takes under way on the resource (they
    # read the row FOR SHARE) and is checked against them (`_shift_check`).
    row = await conn.fetchrow(
        "SELECT branch_id, active FROM resources WHERE id = $1 FOR UPDATE", resource_id
    )
    if row is None or not principal.in_scope(row["branch_id"]):
        raise InvalidInput.field("resource_id", "no such resource")
    ensure_can_write(principal, row["branch_id"])
    if not row["active"]:
        raise InvalidInput(
            errors=[FieldError("resource_id", "resource is deactivated")],
            code="inactive_reference",
        )
    branch_id: int = row["branch_id"]
    return branch_id


async def _on_shift_before(conn: Conn, resource_id: int) -> tuple[datetime, set[tuple[str, int]]]:
    """The live commitments of the resource on shift before a schedule change; the
    caller holds the resource row FOR UPDATE, so no take is under way on it."""
    now = datetime.now(UTC)
    return now, await ledger.commitments_on_shift(conn, resource_id, now)


async def _shift_check(
    conn: Conn, resource_id: int, before: tuple[datetime, set[tuple[str, int]]]
) -> None:
    """409 `capacity_in_use` when the change took a booking or hold off shift."""
    now, on_shift = before
    after = await ledger.commitments_on_shift(conn, resource_id, now)
    problem = ledger.shift_conflicts(resource_id, on_shift, after)
    if problem is not None:
        raise problem


async def _lock_schedule(conn: Conn, schedule_id: int) -> asyncpg.Record:
    """The schedule row FOR UPDATE, its resource row locked FOR UPDATE first (the order
    `create_schedule` takes them in)."""
    resource_id = await conn.fetchval(
        "SELECT resource_id FROM schedules WHERE id = $1", schedule_id
    )
    if resource_id is None:
        raise NotFound()
    await conn.execute("SELECT 1 FROM resources WHERE id = $1 FOR UPDATE", resource_id)
    row = await conn.fetchrow(q.SCHEDULE_SELECT + " WHERE s.id = $1 FOR UPDATE OF s", schedule_id)
    if row is None:
        raise NotFound()
    return row


async def create_schedule(
    pool: asyncpg.Pool, principal: Principal, data: ScheduleCreate
) -> Schedule:
    if isinstance(data, ShiftCreate):
        start, end = clock_to_minute(data.start), clock_to_minute(data.end)
        _check_shift(start, end)
        args: tuple[Any, ...] = (
            data.resource_id,
            "shift",
            data.weekday,
            start,
            end,
            None,
            None,
            True,
            data.note,
        )
    else:
        assert isinstance(data, ExceptionCreate)
        _check_exception(data.starts_at, data.ends_at)
        args = (
            data.resource_id,
            "exception",
            None,
            None,
            None,
            data.starts_at,
            data.ends_at,
            data.available,
            data.note,
        )
    try:
        async with transaction(pool) as conn:
            await _resource_for_write(conn, principal, data.resource_id)
            before = await _on_shift_before(conn, data.resource_id)
            sid = await conn.fetchval(q.INSERT_SCHEDULE, *args)
            await _shift_check(conn, data.resource_id, before)
            row = await conn.fetchrow(q.SCHEDULE_SELECT + " WHERE s.id = $1", sid)
    except asyncpg.ExclusionViolationError as exc:
        raise _overlap(exc) from None
    return _schedule(row)


async def get_schedule(pool: asyncpg.Pool, principal: Principal, schedule_id: int) -> Schedule:
    row = await pool.fetchrow(q.SCHEDULE_SELECT + " WHERE s.id = $1", schedule_id)
    if row is None:
        raise NotFound()
    ensure_visible(principal, row["branch_id"])
    return _schedule(row)


async def list_schedules(
    pool: asyncpg.Pool,
    *,
    principal: Principal,
    branch_id: int | None,
    resource_id: int | None,
    limit: int,
    cursor: str | None,
    include_inactive: bool,
) -> Page:
    filters, params = _scope_filters(principal, branch_id, "r.branch_id")
    if resource_id is not None:
        params.append(resource_id)
        filters.append(f"s.resource_id = ${len(params)}")
    if not include_inactive:
        filters.append("s.active")
    return await q.page_of(
        pool,
        q.SCHEDULE_SELECT,
        "s.id",
        filters,
        params,
        _schedule,
        limit=limit,
        cursor=cursor,
    )


_SHIFT_FIELDS = {"weekday", "start", "end"}
_EXCEPTION_FIELDS = {"starts_at", "ends_at", "available"}


async def update_schedule(
    pool: asyncpg.Pool, principal: Principal, schedule_id: int, data: ScheduleUpdate
) -> Schedule:
    changes = _changes(data)
    try:
        async with transaction(pool) as conn:
            row = await _lock_schedule(conn, schedule_id)
            ensure_visible(principal, row["branch_id"])
            ensure_can_write(principal, row["branch_id"])
            before = await _on_shift_before(conn, row["resource_id"])
            wrong = (_EXCEPTION_FIELDS if row["kind"] == "shift" else _SHIFT_FIELDS) & set(changes)
            if wrong:
                raise InvalidInput(
                    errors=[
                        FieldError(f, f"does not apply to a {row['kind']}") for f in sorted(wrong)
                    ]
                )
            columns: dict[str, Any] = {}
            if row["kind"] == "shift":
                start = (
                    clock_to_minute(changes["start"]) if "start" in changes else row["start_minute"]
                )
                end = clock_to_minute(changes["end"]) if "end" in changes else row["end_minute"]
                _check_shift(start, end)
                columns = {
                    "weekday": changes.get("weekday", row["weekday"]),
                    "start_minute": start,
                    "end_minute": end,
                }
            else:
                starts_at = changes.get("starts_at", row["starts_at"])
                ends_at = changes.get("ends_at", row["ends_at"])
                _check_exception(starts_at, ends_at)
                columns = {
                    "starts_at": starts_at,
                    "ends_at": ends_at,
                    "available": changes.get("available", row["available"]),
                }
            if "note" in changes:
                columns["note"] = changes["note"]
            await q.update_columns(conn, "schedules", schedule_id, columns)
            await _shift_check(conn, row["resource_id"], before)
            updated = await conn.fetchrow(q.SCHEDULE_SELECT + " WHERE s.id = $1", schedule_id)
    except asyncpg.ExclusionViolationError as exc:
        raise _overlap(exc) from None
    return _schedule(updated)


async def deactivate_schedule(
    pool: asyncpg.Pool, principal: Principal, schedule_id: int
) -> Schedule:
    async with transaction(pool) as conn:
        row = await _lock_schedule(conn, schedule_id)
        ensure_visible(principal, row["branch_id"])
        ensure_can_write(principal, row["branch_id"])
        before = await _on_shift_before(conn, row["resource_id"])
        await conn.execute(
            "UPDATE schedules SET active = false, updated_at = now() WHERE id = $1", schedule_id
        )
        await _shift_check(conn, row["resource_id"], before)
        updated = await conn.fetchrow(q.SCHEDULE_SELECT + " WHERE s.id = $1", schedule_id)
    return _schedule(updated)


# --- devices -----------------------------------------------------------------


async def create_device(
    pool: asyncpg.Pool, principal: Principal, data: DeviceCreate
) -> DeviceWithSecret:
    secret = secrets.token_urlsafe(32)
    async with transaction(pool) as conn:
        await _branch_for_write(conn, principal, data.branch_id)
        row = await conn.fetchrow(
            q.INSERT_DEVICE, data.branch_id, data.name, data.kind, hash_secret(secret)
        )
    device = to_struct(row, Device)
    return DeviceWithSecret(**msgspec.structs.asdict(device), secret=secret)


async def get_device(pool: asyncpg.Pool, principal: Principal, device_id: int) -> Device:
    row = await pool.fetchrow(f"SELECT {q.DEVICE_COLUMNS} FROM devices WHERE id = $1", device_id)
    if row is None:
        raise NotFound()
    ensure_visible(principal, row["branch_id"])
    return to_struct(row, Device)


async def list_devices(
    pool: asyncpg.Pool,
    *,
    principal: Principal,
    branch_id: int | None,
    limit: int,
    cursor: str | None,
    include_inactive: bool,
) -> Page:
    filters, params = _scope_filters(principal, branch_id)
    if not include_inactive:
        filters.append("active")
    return await q.page_of(
        pool,
        f"SELECT {q.DEVICE_COLUMNS} FROM devices",
        "id",
        filters,
        params,
        lambda r: to_struct(r, Device),
        limit=limit,
        cursor=cursor,
    )


async def update_device(
    pool: asyncpg.Pool, principal: Principal, device_id: int, data: DeviceUpdate
) -> Device:
    async with transaction(pool) as conn:
        await _lock_for_write(conn, principal, "devices", device_id)
        await q.update_columns(conn, "devices", device_id, _changes(data))
        row = await conn.fetchrow(
            f"SELECT {q.DEVICE_COLUMNS} FROM devices WHERE id = $1", device_id
        )
    return to_struct(row, Device)


async def deactivate_device(pool: asyncpg.Pool, principal: Principal, device_id: int) -> Device:
    """Revoke a device: its access tokens stop at once, its refresh tokens are revoked."""
    async with transaction(pool) as conn:
        await _lock_for_write(conn, principal, "devices", device_id)
        row = await conn.fetchrow(
            "UPDATE devices SET active = false, revoked_at = coalesce(revoked_at, now()), "
            f"updated_at = now() WHERE id = $1 RETURNING {q.DEVICE_COLUMNS}",
            device_id,
        )
        await revoke_principal(conn, "device", device_id)
    return to_struct(row, Device)


# --- staff accounts ----------------------------------------------------------


def _check_staff_grant(principal: Principal, role: str, branch_ids: list[int]) -> None:
    """Admins grant anything; a manager only manages staff inside their own branches
    (an account visible to them that reaches beyond is theirs to read, not to change).
    Branches asked for outside the manager's scope are refused by `_check_branches`."""
    if principal.role == "admin":
        return
    if principal.role != "manager" or role != "staff":
        raise Forbidden()
    if not branch_ids:
        raise InvalidInput.field("branch_ids", "a staff account needs at least one branch")


def _check_current_grant(principal: Principal, account: StaffAccount) -> None:
    _check_staff_grant(principal, account.role, account.branch_ids)
    if any(not principal.in_scope(b) for b in account.branch_ids):
        raise Forbidden(code="branch_forbidden")


async def _check_branches(
    conn: Conn, principal: Principal, role: str, branch_ids: list[int]
) -> None:
    """Every branch exists, is active and is in the caller's scope; one outside it
    is refused exactly as a missing one."""
    if role != "admin" and not branch_ids:
        raise InvalidInput.field("branch_ids", f"a {role} account needs at least one branch")
    bad = list(await conn.fetchval(q.CHECK_BRANCHES_ACTIVE, branch_ids) or []) if branch_ids else []
    bad += [b for b in branch_ids if not principal.in_scope(b)]
    if bad:
        raise InvalidInput.field("branch_ids", f"no such active branch: {sorted(set(bad))}")


async def _load_staff(conn: Conn, staff_id: int) -> StaffAccount | None:
    row = await conn.fetchrow(q.STAFF_SELECT + " WHERE s.id = $1", staff_id)
    return to_struct(row, StaffAccount) if row else None


def _staff_visible(principal: Principal, account: StaffAccount) -> bool:
    if principal.branches is None:
        return True
    return any(principal.in_scope(b) for b in account.branch_ids)


async def create_staff(pool: asyncpg.Pool, principal: Principal, data: StaffCreate) -> StaffAccount:
    branch_ids = sorted(set(data.branch_ids))
    _check_staff_grant(principal, data.role, branch_ids)
    password_hash = await hash_password_async(data.password)
    try:
        async with transaction(pool) as conn:
            await _check_branches(conn, principal, data.role, branch_ids)
            sid = await conn.fetchval(
                q.INSERT_STAFF, data.email.strip(), data.name, password_hash, data.role
            )
            await conn.execute(q.SET_STAFF_BRANCHES, sid, branch_ids)
            account = await _load_staff(conn, sid)
    except asyncpg.UniqueViolationError:
        raise Conflict(
            code="already_exists", errors=[FieldError("email", "already registered")]
        ) from None
    assert account is not None
    return account


async def create_first_admin(pool: asyncpg.Pool, email: str, password: str, name: str) -> int:
    """Bootstrap (CLI): create an admin; an existing account with that email is an error."""
    try:
        async with transaction(pool) as conn:
            sid: int = await conn.fetchval(
                q.INSERT_STAFF, email.strip(), name, hash_password(password), "admin"
            )
    except asyncpg.UniqueViolationError:
        raise Conflict(code="already_exists", detail=f"{email} is already registered") from None
    return sid


async def get_staff(pool: asyncpg.Pool, principal: Principal, staff_id: int) -> StaffAccount:
    async with pool.acquire() as conn:
        account = await _load_staff(conn, staff_id)
    if account is None or not _staff_visible(principal, account):
        raise NotFound()
    return account


async def list_staff(
    pool: asyncpg.Pool,
    *,
    principal: Principal,
    branch_id: int | None,
    limit: int,
    cursor: str | None,
    include_inactive: bool,
) -> Page:
    filters: list[str] = []
    params: list[Any] = []
    if branch_id is not None:
        params.append(branch_id)
        filters.append(
            f"EXISTS (SELECT 1 FROM staff_branches x WHERE x.staff_id = s.id "
            f"AND x.branch_id = ${len(params)})"
        )
    if principal.branches is not None:
        params.append(list(principal.branches))
        filters.append(
            f"EXISTS (SELECT 1 FROM staff_branches x WHERE x.staff_id = s.id "
            f"AND x.branch_id = ANY(${len(params)}::bigint[]))"
        )
    if not include_inactive:
        filters.append("s.active")
    return await q.page_of(
        pool,
        q.STAFF_SELECT,
        "s.id",
        filters,
        params,
        lambda r: to_struct(r, StaffAccount),
        limit=limit,
        cursor=cursor,
    )


async def update_staff(
    pool: asyncpg.Pool, principal: Principal, staff_id: int, data: StaffUpdate
) -> StaffAccount:
    changes = _changes(data)
    new_hash = await hash_password_async(changes["password"]) if "password" in changes else None
    async with transaction(pool) as conn:
        current = await _load_staff(conn, staff_id)
        if current is None or not _staff_visible(principal, current):
            raise NotFound()
        await conn.execute("SELECT 1 FROM staff WHERE id = $1 FOR UPDATE", staff_id)
        role = changes.get("role", current.role)
        branch_ids = sorted(set(changes.get("branch_ids", current.branch_ids)))
        _check_current_grant(principal, current)
        _check_staff_grant(principal, role, branch_ids)
        await _check_branches(conn, principal, role, branch_ids)
        columns: dict[str, Any] = {}
        if "name" in changes:
            columns["name"] = changes["name"]
        if "role" in changes:
            columns["role"] = role
        if "password" in changes:
            columns["password_hash"] = new_hash
        await q.update_columns(conn, "staff", staff_id, columns)
        if "branch_ids" in changes:
            await conn.execute(q.SET_STAFF_BRANCHES, staff_id, branch_ids)
        if "password" in changes or "role" in changes or "branch_ids" in changes:
            await revoke_principal(conn, "staff", staff_id)
        account = await _load_staff(conn, staff_id)
    assert account is not None
    return account


async def deactivate_staff(pool: asyncpg.Pool, principal: Principal, staff_id: int) -> StaffAccount:
    async with transaction(pool) as conn:
        current = await _load_staff(conn, staff_id)
        if current is None or not _staff_visible(principal, current):
            raise NotFound()
        _check_current_grant(principal, current)
        if current.id == principal.id and principal.kind == "staff":
            raise Conflict(detail="you cannot deactivate your own account")
        await conn.execute(
            "UPDATE staff SET active = false, updated_at = now() WHERE id = $1", staff_id
        )
        await revoke_principal(conn, "staff", staff_id)
        account = await _load_staff(conn, staff_id)
    assert account is not None
    return account
