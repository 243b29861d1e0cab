"""Access tokens (PyJWT, algorithm pinned) and opaque refresh tokens."""

from __future__ import annotations

import hashlib
import secrets
import time
import uuid
from typing import Any, Literal

import jwt
import msgspec

from selfserve.settings import Settings

Role = Literal["admin", "manager", "staff", "kiosk", "display", "customer"]
Channel = Literal["app", "mini_program", "kiosk", "sms", "web", "staff"]
ROLES: tuple[str, ...] = ("admin", "manager", "staff", "kiosk", "display", "customer")
# The roles each kind of subject can hold: a token whose claims disagree with its
# subject is refused however it is signed (a customer never carries staff rights).
ROLES_OF: dict[str, frozenset[str]] = {
    "customer": frozenset({"customer"}),
    "device": frozenset({"kiosk", "display"}),
    "staff": frozenset({"admin", "manager", "staff"}),
}
CHANNELS_OF: dict[str, frozenset[str]] = {
    "customer": frozenset({"app", "mini_program", "web"}),
    "device": frozenset({"kiosk"}),
    "staff": frozenset({"staff"}),
}
CHANNELS: tuple[str, ...] = ("app", "mini_program", "kiosk", "sms", "web", "staff")
REQUIRED_CLAIMS = ["exp", "iat", "iss", "aud", "sub", "role", "channel"]


class Principal(msgspec.Struct, frozen=True, kw_only=True):
    """Who is calling: decoded from a verified access token."""

    kind: Literal["staff", "device", "customer"]
    id: int
    role: Role
    channel: Channel
    branches: tuple[int, ...] | None  # None: every branch (admin)

    @property
    def subject(self) -> str:
        return f"{self.kind}:{self.id}"

    def in_scope(self, branch_id: int) -> bool:
        return self.branches is None or branch_id in self.branches


class TokenError(Exception):
    pass


def _signing_key(settings: Settings) -> str:
    if settings.jwt_algorithm == "ES256":
        assert settings.jwt_private_key is not None
        return settings.jwt_private_key
    return settings.jwt_secret


def _verifying_key(settings: Settings) -> str:
    if settings.jwt_algorithm == "ES256":
        assert settings.jwt_public_key is not None
        return settings.jwt_public_key
    return settings.jwt_secret


def issue_access_token(
    settings: Settings, principal: Principal, *, now: float | None = None
) -> str:
    issued = int(now if now is not None else time.time())
    claims: dict[str, Any] = {
        "iss": settings.jwt_issuer,
        "aud": settings.jwt_audience,
        "sub": principal.subject,
        "iat": issued,
        "nbf": issued,
        "exp": issued + settings.access_token_ttl_s,
        "jti": uuid.uuid4().hex,
        "role": principal.role,
        "channel": principal.channel,
        "branches": list(principal.branches) if principal.branches is not None else "*",
    }
    return jwt.encode(claims, _signing_key(settings), algorithm=settings.jwt_algorithm)


def decode_access_token(settings: Settings, token: str) -> Principal:
    """Verify signature, algorithm, expiry, issuer and audience; raise TokenError."""
    return decode_access_token_expiry(settings, token)[0]


def decode_access_token_expiry(settings: Settings, token: str) -> tuple[Principal, float]:
    """`decode_access_token`, also giving the token's expiry (Unix time)."""
    try:
        claims = jwt.decode(
            token,
            _verifying_key(settings),
            algorithms=[settings.jwt_algorithm],
            audience=settings.jwt_audience,
            issuer=settings.jwt_issuer,
            options={"require": REQUIRED_CLAIMS, "verify_signature": True},
            leeway=5,
        )
    except jwt.PyJWTError as exc:
        raise TokenError(type(exc).__name__) from None
    try:
        kind, _, raw_id = str(claims["sub"]).partition(":")
        role = claims["role"]
        channel = claims["channel"]
        if kind not in ROLES_OF or role not in ROLES_OF[kind]:
            raise TokenError("role does not agree with the subject")
        if channel not in CHANNELS or channel not in CHANNELS_OF[kind]:
            raise TokenError("channel does not agree with the subject")
        raw_branches = claims.get("branches")
        branches: tuple[int, ...] | None
        if raw_branches == "*":
            if role != "admin":
                raise TokenError("only admins span every branch")
            branches = None
        elif isinstance(raw_branches, list):
            branches = tuple(int(b) for b in raw_branches)
        elif raw_branches is None:
            branches = ()
        else:
            raise TokenError("malformed branches")
        if kind == "customer" and branches:
            raise TokenError("a customer has no branch scope")
        if kind == "device" and (branches is None or len(branches) != 1):
            raise TokenError("a device belongs to exactly one branch")
        principal = Principal(
            kind=kind,  # type: ignore[arg-type]  # checked against the literal above
            id=int(raw_id),
            role=role,
            channel=channel,
            branches=branches,
        )
        return principal, float(claims["exp"])
    except (KeyError, ValueError, TypeError):
        raise TokenError("malformed claims") from None


def new_refresh_token() -> tuple[str, bytes]:
    """An opaque, high-entropy refresh token and the hash we store."""
    token = secrets.token_urlsafe(32)
    return token, hash_secret(token)


def hash_secret(secret: str) -> bytes:
    # Secrets here are random with 256 bits of entropy; a fast hash is sufficient.
    return hashlib.sha256(secret.encode()).digest()
