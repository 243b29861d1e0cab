"""`Idempotency-Key` for creating POSTs: the same key and body replay the first
response; the same key with another body is a 422 `idempotency_key_reused`.

Keys are per caller (`Principal.subject`). A request first reserves its key (a row
with no response, committed at once, owned by a random token until
`reserved_until`); a duplicate arriving while it runs gets 409
`idempotency_key_in_progress` with `Retry-After`, never a second run (which would
answer e.g. `slot_full` for the seat the first one took). A successful request
completes the row with its response in the same transaction as what it created, and
only while it still owns the reservation, so a replay finds exactly the first
response. A refused request deletes its reservation (it changed nothing, and running
it again is safe). A reservation whose request died (process killed) expires after
`RESERVATION_S` and is taken over; the late request, if it was only slow, then fails
to complete the row and rolls back. Records are purged after a day
(`purge_idempotency_keys`).
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec
import structlog

from selfserve.db import Conn
from selfserve.errors import FieldError, IdempotencyKeyInProgress, IdempotencyKeyReused

S = TypeVar("S", bound=msgspec.Struct)
X = TypeVar("X")

log = structlog.get_logger("selfserve.idempotency")

# How long a reservation keeps duplicates out; longer than any request takes.
RESERVATION_S = 30.0
# What an "in progress" answer tells the client to wait before asking again.
RETRY_AFTER_S = 1

LOOKUP = """
SELECT request_hash, status_code, response FROM idempotency_keys
WHERE principal = $1 AND key = $2
"""

# A new key, or one whose reservation expired without a response: ours now.
RESERVE = """
INSERT INTO idempotency_keys (principal, key, request_hash, reserved_until, owner)
VALUES ($1, $2, $3, now() + make_interval(secs => $4), $5)
ON CONFLICT (principal, key) DO UPDATE
SET request_hash = excluded.request_hash, reserved_until = excluded.reserved_until,
    owner = excluded.owner, created_at = now()
WHERE idempotency_keys.response IS NULL AND idempotency_keys.reserved_until < now()
RETURNING 1
"""

# In the request's own transaction: only the owner of the reservation completes it.
COMPLETE = """
UPDATE idempotency_keys
SET status_code = $4, response = $5, reserved_until = NULL, owner = NULL
WHERE principal = $1 AND key = $2 AND owner = $3 AND response IS NULL
RETURNING 1
"""

RELEASE = """
DELETE FROM idempotency_keys
WHERE principal = $1 AND key = $2 AND owner = $3 AND response IS NULL
"""

# Reserving again after the key was released between our attempt and our look.
RESERVE_ATTEMPTS = 3


class _Replay(Exception):
    """Our reservation was taken over: roll back, answer with what the key holds now."""


def request_hash(operation: str, data: msgspec.Struct) -> bytes:
    return hashlib.sha256(operation.encode() + b"\0" + msgspec.json.encode(data)).digest()


def _in_progress() -> IdempotencyKeyInProgress:
    return IdempotencyKeyInProgress(headers={"Retry-After": str(RETRY_AFTER_S)})


async def _stored(
    conn: Conn | asyncpg.Pool, subject: str, key: str, digest: bytes
) -> tuple[bool, dict[str, Any] | None]:
    """(whether the key exists, its response if complete); 422 for another body."""
    row = await conn.fetchrow(LOOKUP, subject, key)
    if row is None:
        return False, None
    if bytes(row["request_hash"]) != digest:
        raise IdempotencyKeyReused(
            errors=[FieldError("Idempotency-Key", "already used with a different request")]
        )
    response: dict[str, Any] | None = row["response"]
    return True, response


async def _reserve(
    pool: asyncpg.Pool, subject: str, key: str, digest: bytes, owner: uuid.UUID
) -> dict[str, Any] | None:
    """Reserve the key for this request (None) or return the first response; 409 while
    another request holds it."""
    for _ in range(RESERVE_ATTEMPTS):
        if await pool.fetchval(RESERVE, subject, key, digest, RESERVATION_S, owner):
            return None
        exists, response = await _stored(pool, subject, key, digest)
        if response is not None:
            return response
        if exists:
            raise _in_progress()
    raise _in_progress()


async def _release(pool: asyncpg.Pool, subject: str, key: str, owner: uuid.UUID) -> None:
    try:
        await asyncio.shield(pool.execute(RELEASE, subject, key, owner))
    except (Exception, asyncio.CancelledError) as exc:  # it expires by itself
        log.warning("idempotency_release_failed", error=type(exc).__name__)


async def once(
    pool: asyncpg.Pool,
    *,
    subject: str,
    key: str | None,
    operation: str,
    data: msgspec.Struct,
    out_type: type[S],
    work: Callable[[Conn], Awaitable[tuple[S, X]]],
    run: Callable[[Callable[[Conn], Awaitable[tuple[S, X]]]], Awaitable[tuple[S, X]]],
    on_replay: X,
) -> tuple[S, X, bool]:
    """Run `work` in a transaction (`run` opens it: plain, with retries, ...) unless
    `key` was used already. Returns (response, what `work` returned beside it, or
    `on_replay` for a replay, replayed). 409 `idempotency_key_in_progress` while
    another request with the key runs."""
    if key is None:
        out, extra = await run(work)
        return out, extra, False
    digest = request_hash(operation, data)
    owner = uuid.uuid4()
    first = await _reserve(pool, subject, key, digest, owner)
    if first is not None:
        return msgspec.convert(first, out_type), on_replay, True

    async def tx(conn: Conn) -> tuple[S, X]:
        out, extra = await work(conn)
        body = msgspec.to_builtins(out)
        if await conn.fetchval(COMPLETE, subject, key, owner, 201, body) is None:
            raise _Replay()
        return out, extra

    try:
        out, extra = await run(tx)
    except _Replay:
        _, stored = await _stored(pool, subject, key, digest)
        if stored is None:
            raise _in_progress() from None
        return msgspec.convert(stored, out_type), on_replay, True
    except BaseException:
        await _release(pool, subject, key, owner)
        raise
    return out, extra, False
