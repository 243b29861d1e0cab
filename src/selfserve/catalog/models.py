"""Catalogue bodies. Create/Update bodies forbid unknown fields and carry no
server-owned fields (id, active, timestamps)."""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

# Ids and money are PostgreSQL bigint: anything larger is bad input, never a 500.
MAX_BIGINT = 2**63 - 1

Name = Annotated[str, Meta(min_length=1, max_length=200)]
Text = Annotated[str, Meta(max_length=2000)]
Id = Annotated[int, Meta(ge=1, le=MAX_BIGINT)]
Weekday = Annotated[int, Meta(ge=1, le=7, description="ISO weekday: 1 = Monday … 7 = Sunday")]
ClockTime = Annotated[
    str,
    Meta(
        pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$|^24:00$",
        description="Branch-local wall time HH:MM (24:00 = end of day)",
        examples=["09:00"],
    ),
]
AwareDatetime = Annotated[datetime, Meta(tz=True, description="RFC 3339 with an offset")]
Minutes = Annotated[int, Meta(ge=0, le=100_000)]
Money = Annotated[
    int, Meta(ge=0, le=MAX_BIGINT, description="Integer minor units (e.g. fen, pence)")
]
Deposit = Annotated[
    int,
    Meta(
        ge=0,
        le=MAX_BIGINT,
        description="Integer minor units. Online payment is not part of this API yet: a "
        "booking of a service with a deposit is created as `pending_payment`.",
    ),
]
Currency = Annotated[str, Meta(pattern=r"^[A-Z]{3}$", description="ISO 4217 code")]
Timezone = Annotated[str, Meta(min_length=1, max_length=64, description="IANA time zone")]
Phone = Annotated[
    str,
    Meta(
        max_length=32,
        description="Branch phone in international format, e.g. +862150501234 or +442079460000",
    ),
]
Available = Annotated[
    bool,
    Meta(
        description="Dated exceptions: `false` (the default) takes the resource off duty "
        "in the span (leave, a closure), `true` puts it on duty there (extra hours). "
        "Weekly shifts are always `true`."
    ),
]
ResourceKind = Literal["counter", "staff", "room"]
DeviceKind = Literal["kiosk", "display"]
StaffRole = Literal["admin", "manager", "staff"]


class Input(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every client-sent body."""


# --- branches ----------------------------------------------------------------


class OpeningHours(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    weekday: Weekday
    opens: ClockTime
    closes: ClockTime


class Closure(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    date: date
    reason: Annotated[str, Meta(max_length=200)] = ""


class BranchCreate(Input, kw_only=True):
    name: Name
    timezone: Timezone
    address: Text = ""
    phone: Phone | None = None
    opening_hours: list[OpeningHours] = []
    closures: list[Closure] = []
    walk_in_reserve: Annotated[float, Meta(ge=0, le=1)] = 0.0


class BranchUpdate(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    timezone: Timezone | UnsetType = UNSET
    address: Text | UnsetType = UNSET
    phone: Phone | UnsetType | None = UNSET
    opening_hours: list[OpeningHours] | UnsetType = UNSET
    closures: list[Closure] | UnsetType = UNSET
    walk_in_reserve: Annotated[float, Meta(ge=0, le=1)] | UnsetType = UNSET


class Branch(msgspec.Struct, kw_only=True):
    id: int
    name: str
    timezone: str
    address: str
    phone: str | None
    opening_hours: list[OpeningHours]
    closures: list[Closure]
    walk_in_reserve: float
    active: bool
    created_at: datetime
    updated_at: datetime


# --- services ----------------------------------------------------------------


class ServiceCreate(Input, kw_only=True):
    branch_id: Id
    name: Name
    description: Text = ""
    duration_min: Annotated[int, Meta(ge=1, le=1440)]
    buffer_before_min: Annotated[int, Meta(ge=0, le=1440)] = 0
    buffer_after_min: Annotated[int, Meta(ge=0, le=1440)] = 0
    price_minor: Money = 0
    deposit_minor: Deposit = 0
    currency: Currency = "CNY"
    min_party: Annotated[int, Meta(ge=1, le=1000)] = 1
    max_party: Annotated[int, Meta(ge=1, le=1000)] = 1
    lead_time_min: Minutes = 0
    horizon_days: Annotated[int, Meta(ge=1, le=730)] = 30
    cancellation_window_min: Minutes = 0
    slot_interval_min: Annotated[int, Meta(ge=1, le=1440)] = 15


class ServiceUpdate(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    description: Text | UnsetType = UNSET
    duration_min: Annotated[int, Meta(ge=1, le=1440)] | UnsetType = UNSET
    buffer_before_min: Annotated[int, Meta(ge=0, le=1440)] | UnsetType = UNSET
    buffer_after_min: Annotated[int, Meta(ge=0, le=1440)] | UnsetType = UNSET
    price_minor: Money | UnsetType = UNSET
    deposit_minor: Deposit | UnsetType = UNSET
    currency: Currency | UnsetType = UNSET
    min_party: Annotated[int, Meta(ge=1, le=1000)] | UnsetType = UNSET
    max_party: Annotated[int, Meta(ge=1, le=1000)] | UnsetType = UNSET
    lead_time_min: Minutes | UnsetType = UNSET
    horizon_days: Annotated[int, Meta(ge=1, le=730)] | UnsetType = UNSET
    cancellation_window_min: Minutes | UnsetType = UNSET
    slot_interval_min: Annotated[int, Meta(ge=1, le=1440)] | UnsetType = UNSET


class Service(msgspec.Struct, kw_only=True):
    id: int
    branch_id: int
    name: str
    description: str
    duration_min: int
    buffer_before_min: int
    buffer_after_min: int
    price_minor: int
    deposit_minor: int
    currency: str
    min_party: int
    max_party: int
    lead_time_min: int
    horizon_days: int
    cancellation_window_min: int
    slot_interval_min: int
    active: bool
    created_at: datetime
    updated_at: datetime


# --- resources ---------------------------------------------------------------


class ResourceCreate(Input, kw_only=True):
    branch_id: Id
    kind: ResourceKind
    name: Name
    capacity: Annotated[int, Meta(ge=1, le=10_000)] = 1
    skills: list[Id] = msgspec.field(default_factory=list)


class ResourceUpdate(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    capacity: Annotated[int, Meta(ge=1, le=10_000)] | UnsetType = UNSET
    skills: list[Id] | UnsetType = UNSET


class Resource(msgspec.Struct, kw_only=True):
    id: int
    branch_id: int
    kind: str
    name: str
    capacity: int
    skills: list[int]
    active: bool
    created_at: datetime
    updated_at: datetime


# --- schedules ---------------------------------------------------------------


class ShiftCreate(Input, kw_only=True, tag="shift", tag_field="kind"):
    """A weekly shift in branch-local wall time."""

    resource_id: Id
    weekday: Weekday
    start: ClockTime
    end: ClockTime
    note: Annotated[str, Meta(max_length=200)] = ""


class ExceptionCreate(Input, kw_only=True, tag="exception", tag_field="kind"):
    """A dated exception: the resource is off (`available: false`) or on extra."""

    resource_id: Id
    starts_at: AwareDatetime
    ends_at: AwareDatetime
    available: Available = False
    note: Annotated[str, Meta(max_length=200)] = ""


ScheduleCreate = ShiftCreate | ExceptionCreate


class ScheduleUpdate(Input, kw_only=True):
    weekday: Weekday | UnsetType = UNSET
    start: ClockTime | UnsetType = UNSET
    end: ClockTime | UnsetType = UNSET
    starts_at: AwareDatetime | UnsetType = UNSET
    ends_at: AwareDatetime | UnsetType = UNSET
    available: Available | UnsetType = UNSET
    note: Annotated[str, Meta(max_length=200)] | UnsetType = UNSET


class Schedule(msgspec.Struct, kw_only=True):
    id: int
    resource_id: int
    branch_id: int
    kind: Literal["shift", "exception"]
    weekday: int | None
    start: str | None
    end: str | None
    starts_at: datetime | None
    ends_at: datetime | None
    available: Available
    note: str
    active: bool
    created_at: datetime
    updated_at: datetime


# --- queues ------------------------------------------------------------------

QueuePrefix = Annotated[
    str,
    Meta(
        pattern=r"^[A-Z]{1,2}$",
        description="One or two capital letters A–Z that start the queue's ticket codes",
        examples=["A"],
    ),
]
QueueServices = Annotated[list[Id], Meta(min_length=1)]


class QueueCreate(Input, kw_only=True):
    branch_id: Id
    name: Name
    prefix: QueuePrefix
    service_ids: QueueServices


class QueueUpdate(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    prefix: QueuePrefix | UnsetType = UNSET
    service_ids: QueueServices | UnsetType = UNSET


class Queue(msgspec.Struct, kw_only=True):
    id: int
    branch_id: int
    name: str
    prefix: str
    service_ids: list[int]
    active: bool
    created_at: datetime
    updated_at: datetime


# --- devices -----------------------------------------------------------------


class DeviceCreate(Input, kw_only=True):
    branch_id: Id
    name: Name
    kind: DeviceKind = "kiosk"


class DeviceUpdate(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    kind: DeviceKind | UnsetType = UNSET  # its rights change at the device's next request


class Device(msgspec.Struct, kw_only=True):
    id: int
    branch_id: int
    name: str
    kind: str
    active: bool
    revoked_at: datetime | None
    last_seen_at: datetime | None
    created_at: datetime
    updated_at: datetime


class DeviceWithSecret(Device, kw_only=True):
    secret: str


# --- staff accounts ----------------------------------------------------------

StaffEmail = Annotated[
    str, Meta(min_length=3, max_length=320, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
]
NewPassword = Annotated[str, Meta(min_length=10, max_length=1024)]


class StaffCreate(Input, kw_only=True):
    email: StaffEmail
    name: Name
    password: NewPassword
    role: StaffRole
    branch_ids: list[Id] = msgspec.field(default_factory=list)


class StaffUpdate(Input, kw_only=True):
    name: Name | UnsetType = UNSET
    password: NewPassword | UnsetType = UNSET
    role: StaffRole | UnsetType = UNSET
    branch_ids: list[Id] | UnsetType = UNSET


class StaffAccount(msgspec.Struct, kw_only=True):
    id: int
    email: str
    name: str
    role: str
    branch_ids: list[int]
    active: bool
    created_at: datetime
    updated_at: datetime


# --- pages -------------------------------------------------------------------


class BranchPage(msgspec.Struct):
    items: list[Branch]
    next_cursor: str | None


class ServicePage(msgspec.Struct):
    items: list[Service]
    next_cursor: str | None


class ResourcePage(msgspec.Struct):
    items: list[Resource]
    next_cursor: str | None


class SchedulePage(msgspec.Struct):
    items: list[Schedule]
    next_cursor: str | None


class QueuePage(msgspec.Struct):
    items: list[Queue]
    next_cursor: str | None


class DevicePage(msgspec.Struct):
    items: list[Device]
    next_cursor: str | None


class StaffPage(msgspec.Struct):
    items: list[StaffAccount]
    next_cursor: str | None
