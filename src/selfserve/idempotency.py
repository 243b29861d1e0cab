"""`Idempotency-Key` for creating POSTs: the same key and body replay the first
response; the same key with another body is a 422 `idempotency_key_reused`.

Keys are per caller (`Principal.subject`). Only successful responses are recorded,
in the same transaction as what the request created, so a replay finds exactly the
first response or nothing at all (a refused request changed nothing, and running it
again is safe). Records are purged after a day (`purge_idempotency_keys`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import msgspec

from selfserve.db import Conn
from selfserve.errors import FieldError, IdempotencyKeyReused

S = TypeVar("S", bound=msgspec.Struct)
X = TypeVar("X")

LOOKUP = """
SELECT request_hash, status_code, response FROM idempotency_keys
WHERE principal = $1 AND key = $2
"""

STORE = """
INSERT INTO idempotency_keys (principal, key, request_hash, status_code, response)
VALUES ($1, $2, $3, $4, $5)
ON CONFLICT (principal, key) DO NOTHING
RETURNING 1
"""


class _Replay(Exception):
    """Another request with the same key committed first: roll back, replay it."""


def request_hash(operation: str, data: msgspec.Struct) -> bytes:
    return hashlib.sha256(operation.encode() + b"\0" + msgspec.json.encode(data)).digest()


async def _stored(
    conn: Conn | asyncpg.Pool, subject: str, key: str, digest: bytes
) -> dict[str, Any] | None:
    row = await conn.fetchrow(LOOKUP, subject, key)
    if row is None:
        return None
    if bytes(row["request_hash"]) != digest:
        raise IdempotencyKeyReused(
            errors=[FieldError("Idempotency-Key", "already used with a different request")]
        )
    response: dict[str, Any] = row["response"]
    return response


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
    `on_replay` for a replay, replayed)."""
    digest = request_hash(operation, data)
    if key is not None:
        stored = await _stored(pool, subject, key, digest)
        if stored is not None:
            return msgspec.convert(stored, out_type), on_replay, True

    async def tx(conn: Conn) -> tuple[S, X]:
        out, extra = await work(conn)
        if key is not None:
            body = msgspec.to_builtins(out)
            if await conn.fetchval(STORE, subject, key, digest, 201, body) is None:
                raise _Replay()
        return out, extra

    try:
        out, extra = await run(tx)
    except _Replay:
        assert key is not None
        stored = await _stored(pool, subject, key, digest)
        assert stored is not None
        return msgspec.convert(stored, out_type), on_replay, True
    return out, extra, False
