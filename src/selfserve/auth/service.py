"""Auth use cases: staff and device login, refresh rotation, family revocation."""

from __future__ import annotations

import hmac
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from selfserve.auth import throttle
from selfserve.auth.models import TokenPair
from selfserve.auth.passwords import hash_password_async, needs_rehash, verify_password_async
from selfserve.auth.tokens import (
    Principal,
    hash_secret,
    issue_access_token,
    new_refresh_token,
)
from selfserve.db import Conn
from selfserve.errors import Unauthorized
from selfserve.settings import Settings

STAFF_BY_EMAIL = """
SELECT s.id, s.password_hash, s.role, s.active,
       coalesce(array_agg(sb.branch_id ORDER BY sb.branch_id)
                FILTER (WHERE sb.branch_id IS NOT NULL), '{}') AS branch_ids
FROM staff s LEFT JOIN staff_branches sb ON sb.staff_id = s.id
WHERE lower(s.email) = lower($1)
GROUP BY s.id
"""

STAFF_BY_ID = """
SELECT s.id, s.role, s.active,
       coalesce(array_agg(sb.branch_id ORDER BY sb.branch_id)
                FILTER (WHERE sb.branch_id IS NOT NULL), '{}') AS branch_ids
FROM staff s LEFT JOIN staff_branches sb ON sb.staff_id = s.id
WHERE s.id = $1
GROUP BY s.id
"""

INSERT_REFRESH = """
INSERT INTO refresh_tokens
    (family_id, token_hash, principal_kind, principal_id, channel, expires_at)
VALUES ($1, $2, $3, $4, $5, $6)
"""

SPEND_REFRESH = """
UPDATE refresh_tokens SET used_at = now()
WHERE token_hash = $1 AND used_at IS NULL AND revoked_at IS NULL AND expires_at > now()
RETURNING family_id, principal_kind, principal_id, channel
"""

FIND_REFRESH = "SELECT family_id, used_at, revoked_at FROM refresh_tokens WHERE token_hash = $1"

REVOKE_FAMILY = """
UPDATE refresh_tokens SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL
"""

REVOKE_PRINCIPAL = """
UPDATE refresh_tokens SET revoked_at = now()
WHERE principal_kind = $1 AND principal_id = $2 AND revoked_at IS NULL
"""


def _principal_for_staff(row: asyncpg.Record) -> Principal:
    role = row["role"]
    return Principal(
        kind="staff",
        id=row["id"],
        role=role,
        channel="staff",
        branches=None if role == "admin" else tuple(row["branch_ids"]),
    )


async def issue_tokens(
    conn: Conn,
    settings: Settings,
    principal: Principal,
    family_id: uuid.UUID | None = None,
) -> TokenPair:
    token, token_hash = new_refresh_token()
    expires = datetime.now(UTC) + timedelta(seconds=settings.refresh_token_ttl_s)
    await conn.execute(
        INSERT_REFRESH,
        family_id or uuid.uuid4(),
        token_hash,
        principal.kind,
        principal.id,
        principal.channel,
        expires,
    )
    return TokenPair(
        access_token=issue_access_token(settings, principal),
        refresh_token=token,
        expires_in=settings.access_token_ttl_s,
        role=principal.role,
        channel=principal.channel,
        branch_ids=list(principal.branches) if principal.branches is not None else None,
    )


async def staff_login(
    pool: asyncpg.Pool,
    settings: Settings,
    email: str,
    password: str,
    *,
    redis: Any = None,
    client_address: str = "unknown",
) -> TokenPair:
    """Check the password off the event loop (no connection held meanwhile), under the
    login throttle (`throttle.py`) when Redis is given."""
    keys = throttle.keys(email, client_address)
    if redis is not None:
        await throttle.check(redis, keys, client_address)
    row = await pool.fetchrow(STAFF_BY_EMAIL, email)
    threads = settings.password_hash_threads
    ok = await verify_password_async(
        row["password_hash"] if row else None, password, threads=threads
    )
    if not row or not ok or not row["active"]:
        if redis is not None:
            await throttle.failed(redis, settings, keys)
        raise Unauthorized(code="invalid_credentials")
    rehashed = None
    if needs_rehash(row["password_hash"]):
        rehashed = await hash_password_async(password, threads=threads)
    async with pool.acquire() as conn, conn.transaction():
        if rehashed is not None:
            await conn.execute(
                "UPDATE staff SET password_hash = $2 WHERE id = $1", row["id"], rehashed
            )
        tokens = await issue_tokens(conn, settings, _principal_for_staff(row))
    if redis is not None:
        await throttle.succeeded(redis, keys, client_address)
    return tokens


async def device_login(
    pool: asyncpg.Pool, settings: Settings, device_id: int, secret: str
) -> TokenPair:
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT id, branch_id, kind, secret_hash, active FROM devices WHERE id = $1",
            device_id,
        )
        presented = hash_secret(secret)
        expected = bytes(row["secret_hash"]) if row else hash_secret("")
        if not row or not hmac.compare_digest(presented, expected) or not row["active"]:
            raise Unauthorized(code="invalid_credentials")
        await conn.execute("UPDATE devices SET last_seen_at = now() WHERE id = $1", device_id)
        principal = Principal(
            kind="device",
            id=row["id"],
            role=row["kind"],
            channel="kiosk",
            branches=(row["branch_id"],),
        )
        return await issue_tokens(conn, settings, principal)


async def _reload_principal(
    conn: Conn, kind: str, principal_id: int, channel: str
) -> Principal | None:
    """Rebuild the principal from current data, so role and scope changes apply."""
    if kind == "staff":
        row = await conn.fetchrow(STAFF_BY_ID, principal_id)
        return _principal_for_staff(row) if row and row["active"] else None
    if kind == "device":
        row = await conn.fetchrow(
            "SELECT branch_id, kind, active FROM devices WHERE id = $1", principal_id
        )
        if not row or not row["active"]:
            return None
        return Principal(
            kind="device",
            id=principal_id,
            role=row["kind"],
            channel="kiosk",
            branches=(row["branch_id"],),
        )
    if kind == "customer":
        return Principal(
            kind="customer",
            id=principal_id,
            role="customer",
            channel=channel,  # type: ignore[arg-type]
            branches=(),
        )
    return None


async def refresh(pool: asyncpg.Pool, settings: Settings, token: str) -> TokenPair:
    token_hash = hash_secret(token)
    async with pool.acquire() as conn:
        async with conn.transaction():
            spent = await conn.fetchrow(SPEND_REFRESH, token_hash)
            if spent is not None:
                principal = await _reload_principal(
                    conn, spent["principal_kind"], spent["principal_id"], spent["channel"]
                )
                if principal is None:
                    await conn.execute(REVOKE_FAMILY, spent["family_id"])
                else:
                    return await issue_tokens(conn, settings, principal, spent["family_id"])
        if spent is not None:
            raise Unauthorized(code="invalid_refresh_token")
        known = await conn.fetchrow(FIND_REFRESH, token_hash)
        if known is not None and known["used_at"] is not None:
            # A spent token presented again: someone holds a copy. End the whole family.
            await conn.execute(REVOKE_FAMILY, known["family_id"])
            raise Unauthorized(code="refresh_token_reused")
        raise Unauthorized(code="invalid_refresh_token")


async def revoke_principal(conn: Conn, kind: str, principal_id: int) -> None:
    await conn.execute(REVOKE_PRINCIPAL, kind, principal_id)
