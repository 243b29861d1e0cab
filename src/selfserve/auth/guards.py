"""Guards: who may call a route. Roles from the token, scopes checked per branch."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg
import msgspec
from litestar.connection import ASGIConnection
from litestar.di import NamedDependency
from litestar.handlers.base import BaseRouteHandler

from selfserve.auth.tokens import Principal, TokenError, decode_access_token
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
    "device": "SELECT active, 'kiosk' AS role, ARRAY[branch_id] AS branch_ids "
    "FROM devices WHERE id = $1",
}


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
        principal = decode_access_token(settings, token.strip())
    except TokenError:
        raise Unauthorized(
            code="invalid_token",
            headers={"www-authenticate": 'Bearer error="invalid_token"'},
        ) from None
    sql = _CURRENT_SQL.get(principal.kind)
    if sql is not None:
        pool: asyncpg.Pool = connection.app.state.pool
        row = await pool.fetchrow(sql, principal.id)
        if row is None or not row["active"]:
            raise Unauthorized(
                code="invalid_token",
                headers={"www-authenticate": 'Bearer error="invalid_token"'},
            )
        role = row["role"]
        principal = msgspec.structs.replace(
            principal,
            role=role,
            branches=None if role == "admin" else tuple(row["branch_ids"]),
        )
    connection.scope.setdefault("state", {})["principal"] = principal
    return principal


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
    """A manager writes only inside their branches; the branch is named by the caller."""
    if principal.role == "admin":
        return
    if principal.role == "manager" and principal.in_scope(branch_id):
        return
    raise Forbidden(code="branch_forbidden")


def ensure_visible(principal: Principal, branch_id: int) -> None:
    """Something addressed by id outside the caller's branches is answered as missing."""
    if not principal.in_scope(branch_id):
        raise NotFound()


Caller = NamedDependency[Principal]
