"""Guards: who may call a route. Roles from the token, scopes checked per branch."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import msgspec
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler

from selfserve.auth.tokens import Principal, TokenError, decode_access_token_expiry
from selfserve.errors import Forbidden, NotFound, Unauthorized
from selfserve.settings import Settings

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Coroutine[Any, Any, None]]

# Current rights of a token's subject: a token proves identity, but role, branch scope
# and revocation always come from the database, so changes apply on the next request.
_CURRENT_SQL = {
    "staff": """
        SELECT s.active, s.role,
               coalesce(array_agg(sb.branch_id ORDER BY sb.branch_id)
                        FILTER (WHERE sb.branch_id IS NOT NULL), '{}') AS branch_ids
        FROM staff s LEFT JOIN staff_branches sb ON sb.staff_id = s.id
        WHERE s.id = $1 GROUP BY s.id
    """,
    "device": "SELECT active, kind AS role, ARRAY[branch_id] AS branch_ids "
    "FROM devices WHERE id = $1",
}


async def current_rights(pool: asyncpg.Pool, principal: Principal) -> Principal | None:
    """The principal with its role and branches as they are now in the database; None
    when the staff account or device was deactivated (or deleted). Customers have no
    rights to lose: they come back as they are."""
    sql = _CURRENT_SQL.get(principal.kind)
    if sql is None:
        return principal
    row = await pool.fetchrow(sql, principal.id)
    if row is None or not row["active"]:
        return None
    role = row["role"]
    return msgspec.structs.replace(
        principal,
        role=role,
        branches=None if role == "admin" else tuple(row["branch_ids"]),
    )


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """Decode the bearer token once per request; revoked devices and staff stop at once."""
    cached = connection.scope.get("state", {}).get("principal")
    if isinstance(cached, Principal):
        return cached
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(headers={"www-authenticate": 'Bearer realm="selfserve"'})
    settings: Settings = connection.app.state.settings
    try:
        principal, expires_at = decode_access_token_expiry(settings, token.strip())
    except TokenError:
        raise Unauthorized(
            code="invalid_token",
            headers={"www-authenticate": 'Bearer error="invalid_token"'},
        ) from None
    current = await current_rights(connection.app.state.pool, principal)
    if current is None:
        raise Unauthorized(
            code="invalid_token",
            headers={"www-authenticate": 'Bearer error="invalid_token"'},
        )
    principal = current
    state = connection.scope.setdefault("state", {})
    state["principal"] = principal
    state["token_expires_at"] = expires_at
    return principal


def token_expiry(connection: ASGIConnection[Any, Any, Any, Any]) -> float | None:
    """When the access token `authenticate` accepted for this connection expires."""
    value = connection.scope.get("state", {}).get("token_expires_at")
    return value if isinstance(value, float) else None


def require(*roles: str) -> Guard:
    """A guard admitting only the given roles (any authenticated caller when empty)."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal = await authenticate(connection)
        if roles and principal.role not in roles:
            raise Forbidden()

    guard.__name__ = "require_" + ("_".join(roles) or "any")
    return guard


async def provide_principal(request: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    return await authenticate(request)


ADMIN_WRITERS = ("admin", "manager")
ADMIN_READERS = ("admin", "manager", "staff")


def ensure_can_write(principal: Principal, branch_id: int) -> None:
    """A manager writes only inside their branches. Outside the caller's scope is 404,
    as if the object did not exist; 403 only for a role that never writes."""
    if principal.role == "admin":
        return
    if not principal.in_scope(branch_id):
        raise NotFound()
    if principal.role != "manager":
        raise Forbidden()


def ensure_visible(principal: Principal, branch_id: int) -> None:
    """Something addressed by id outside the caller's branches is answered as missing."""
    if not principal.in_scope(branch_id):
        raise NotFound()


Caller = NamedDependency[Principal]
