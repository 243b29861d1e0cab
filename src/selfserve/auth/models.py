"""Request and response bodies of the auth endpoints."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# No NUL: PostgreSQL text cannot hold it, so it must be refused as input, not fail in SQL.
Email = Annotated[
    str, msgspec.Meta(min_length=3, max_length=320, pattern=r"^[^@\s\x00]+@[^@\s\x00]+$")
]
Password = Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


class StaffLogin(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    email: Email
    password: Password


class DeviceLogin(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    device_id: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]  # a PostgreSQL bigint
    secret: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class RefreshRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    refresh_token: Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class TokenPair(msgspec.Struct, kw_only=True):
    access_token: str
    refresh_token: str
    expires_in: int
    token_type: Literal["bearer"] = "bearer"  # noqa: S105
    role: str
    channel: str
    branch_ids: list[int] | None


MobilePhone = Annotated[
    str,
    msgspec.Meta(
        min_length=3,
        max_length=32,
        description="Mobile number in international format, e.g. +8613800138000 (China) "
        "or +447911123456 (UK)",
        examples=["+8613800138000", "+447911123456"],
    ),
]


class CodeRequest(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    phone: MobilePhone


class CodeSent(msgspec.Struct, kw_only=True):
    expires_in: int


class CodeExchange(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    phone: MobilePhone
    code: Annotated[str, msgspec.Meta(pattern=r"^[0-9]{6}$")]
    channel: Literal["app", "mini_program", "web"]


class Me(msgspec.Struct, kw_only=True):
    id: int
    phone: str
    locale: str
    sms_opted_out: bool
