"""Booking bodies and responses. Client bodies forbid unknown fields and carry no
server-owned fields (status, resource, channel, code)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from selfserve.catalog.models import MAX_BIGINT

Id = Annotated[int, Meta(ge=1, le=MAX_BIGINT)]
PartySize = Annotated[int, Meta(ge=1, le=1000)]
AwareDatetime = Annotated[datetime, Meta(tz=True, description="RFC 3339 with an offset")]
Phone = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=32,
        description="E.164 mobile number, e.g. +8613800138000 (China) or +447911123456 (UK)",
        examples=["+8613800138000", "+447911123456"],
    ),
]
BookingStatus = Literal["pending_payment", "confirmed", "cancelled", "no_show", "completed"]


class Input(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every client-sent body."""


class SlotOut(msgspec.Struct, kw_only=True):
    start: datetime
    end: datetime
    local_start: str
    """Branch wall time with its offset, e.g. 2030-03-04T10:00:00+08:00."""
    timezone: str
    remaining: int


class SlotPage(msgspec.Struct, kw_only=True):
    items: list[SlotOut]


class HoldCreate(Input, kw_only=True):
    branch_id: Id
    service_id: Id
    start: AwareDatetime
    party_size: PartySize = 1


class HoldOut(msgspec.Struct, kw_only=True):
    id: int
    branch_id: int
    service_id: int
    party_size: int
    start: datetime
    end: datetime
    local_start: str
    timezone: str
    expires_at: datetime


class BookingCreate(Input, kw_only=True):
    """Either `hold_id`, or `branch_id` + `service_id` + `start` (+ `party_size`).

    `phone` is for kiosks booking for a walk-in; a customer's phone is on file."""

    hold_id: Id | None = None
    branch_id: Id | None = None
    service_id: Id | None = None
    start: AwareDatetime | None = None
    party_size: PartySize | None = None
    phone: Phone | None = None


class Reschedule(Input, kw_only=True):
    start: AwareDatetime


class BookingOut(msgspec.Struct, kw_only=True):
    id: int
    code: str
    status: BookingStatus
    start: datetime
    end: datetime
    local_start: str
    timezone: str
    branch_id: int
    service_id: int
    party_size: int
    channel: str
    cancelled_at: datetime | None = None
    confirmed_by_sms_at: datetime | None = None
    late_cancellation: bool = False
    """True when cancelled inside the service's cancellation window (fee / no refund)."""


class BookingPage(msgspec.Struct, kw_only=True):
    items: list[BookingOut]
    next_cursor: str | None


WallClock = Annotated[
    str,
    Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", description="Branch wall time, HH:MM"),
]
WaitlistStatus = Literal[
    "waiting", "offered", "booked", "lapsed", "declined", "cancelled", "expired"
]


class WaitlistCreate(Input, kw_only=True):
    """Wait for a seat on `date` (branch calendar) starting between `earliest` and
    `latest` (branch wall times, inclusive)."""

    branch_id: Id
    service_id: Id
    date: date
    earliest: WallClock
    latest: WallClock
    party_size: PartySize = 1


class WaitlistOffer(msgspec.Struct, kw_only=True):
    """A seat held for the entry; book it with `POST /v1/bookings {hold_id}` (or reply
    Y to the SMS) before `expires_at`."""

    hold_id: int
    start: datetime
    end: datetime
    local_start: str
    expires_at: datetime


class WaitlistOut(msgspec.Struct, kw_only=True):
    id: int
    status: WaitlistStatus
    branch_id: int
    service_id: int
    date: date
    earliest: str
    latest: str
    party_size: int
    timezone: str
    channel: str
    offer: WaitlistOffer | None = None
    booking_id: int | None = None
    created_at: datetime


class WaitlistPage(msgspec.Struct, kw_only=True):
    items: list[WaitlistOut]
    next_cursor: str | None


# --- staff ------------------------------------------------------------------------

Reason = Annotated[
    str, Meta(min_length=1, max_length=500, description="Why staff made the change (kept)")
]


class StaffCancel(Input, kw_only=True):
    reason: Reason


class StaffReschedule(Input, kw_only=True):
    start: AwareDatetime
    reason: Reason


class BookingChangeOut(msgspec.Struct, kw_only=True):
    """A change staff made to the booking: who, when and why."""

    id: int
    action: Literal["cancel", "reschedule"]
    staff_id: int
    staff_name: str
    reason: str
    old_start: datetime
    new_start: datetime | None
    created_at: datetime


class AdminBookingOut(BookingOut, kw_only=True):
    """A booking as staff see it: with its resource and the phone it texts."""

    resource_id: int
    customer_id: int | None
    phone: str | None
    checked_in_at: datetime | None
    created_at: datetime


class AdminBookingDetail(AdminBookingOut, kw_only=True):
    changes: list[BookingChangeOut]
    """Changes staff made, oldest first."""


class AdminBookingPage(msgspec.Struct, kw_only=True):
    items: list[AdminBookingOut]
    next_cursor: str | None
