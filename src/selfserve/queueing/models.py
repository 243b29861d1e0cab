"""Walk-in queue bodies and responses."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from selfserve.catalog.models import MAX_BIGINT
from selfserve.scheduling.models import Input

Id = Annotated[int, Meta(ge=1, le=MAX_BIGINT)]
Priority = Annotated[
    int,
    Meta(
        ge=0,
        le=9,
        description="Priority class rank: 0 normal; higher is served earlier "
        "(e.g. 1 pregnancy, 2 elderly, 3 disability; the branch decides)",
    ),
]
Phone = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=32,
        description="E.164 mobile number, e.g. +8613800138000 (China) or +447911123456 (UK)",
        examples=["+8613800138000", "+447911123456"],
    ),
]
TicketStatus = Literal["waiting", "called", "serving", "done", "no_show", "cancelled"]


class Eta(msgspec.Struct, kw_only=True):
    """An estimated wait, shown as a band (never as false precision)."""

    low_min: int
    high_min: int
    text: str
    """e.g. "10–15 min" / "10–15 分钟" (by Accept-Language)."""


class QueueStatus(msgspec.Struct, kw_only=True):
    id: int
    name: str
    prefix: str
    service_ids: list[int]
    waiting: int
    open_counters: int
    """Open counters able to serve at least one of the queue's services."""
    estimated_wait: Eta | None
    """For a ticket taken now; null when no open counter serves the queue."""


class QueueStatusPage(msgspec.Struct, kw_only=True):
    items: list[QueueStatus]


class TicketCreate(Input, kw_only=True):
    """Kiosks may send the walk-in's `phone` (texts when the turn nears and when
    called); a customer joining remotely has theirs on file."""

    queue_id: Id
    service_id: Id | None = None
    """One of the queue's services; default: the queue's first."""
    phone: Phone | None = None
    priority: Priority = 0


class CheckIn(Input, kw_only=True):
    """`code` (the booking's 6 letters, at a kiosk) or `booking_id` (from the app)."""

    code: Annotated[str, Meta(min_length=1, max_length=16)] | None = None
    booking_id: Id | None = None


class Transfer(Input, kw_only=True):
    queue_id: Id
    service_id: Id | None = None


class TicketOut(msgspec.Struct, kw_only=True):
    id: int
    display_code: str
    status: TicketStatus
    kind: Literal["walk_in", "appointment"]
    branch_id: int
    queue_id: int
    service_id: int
    priority: int
    channel: str
    issued_at: datetime
    position: int | None
    """1 = next in its queue; null once called."""
    eta: Eta | None
    booking_id: int | None = None
    counter_id: int | None = None
    called_at: datetime | None = None
    recalls: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None


class CounterOut(msgspec.Struct, kw_only=True):
    id: int
    branch_id: int
    name: str
    open: bool
    service_ids: list[int]
