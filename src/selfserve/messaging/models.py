"""Messaging values: a claimed outbox row and what a transport takes and gives back."""

from __future__ import annotations

from datetime import datetime

import msgspec

ENCODINGS: frozenset[str] = frozenset({"GSM-7", "UCS-2"})
LOCALES: frozenset[str] = frozenset({"zh-CN", "en"})


class ClaimedMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A row the send job holds: `attempts` is this claim's fencing token."""

    id: int
    phone: str
    body: str
    branch_id: int | None
    branch_timezone: str | None
    time_critical: bool
    attempts: int
    maybe_sent: bool
    created_at: datetime
    expires_at: datetime | None = None
    past_deadline: bool = False
    template: str = ""


class SmsRequest(msgspec.Struct, frozen=True, kw_only=True):
    """What a transport needs to send one message."""

    message_id: int
    phone: str
    body: str


class SendReceipt(msgspec.Struct, frozen=True, kw_only=True):
    """The provider accepted the message under this id."""

    provider_sid: str
    status: str = "queued"
    created_at: datetime | None = None
