"""Booking HTTP: availability (anyone), holds and bookings (customers, kiosks and staff),
the waitlist (customers), and the bookings of a branch for its staff (day sheet, search,
cancel and reschedule with a reason)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter

from selfserve.auth.guards import ADMIN_READERS, Caller, require
from selfserve.catalog.models import MAX_BIGINT
from selfserve.context import AppSettings, DbPool
from selfserve.openapi_util import problems
from selfserve.phones import normalise_phone
from selfserve.scheduling import service as svc
from selfserve.scheduling import slots
from selfserve.scheduling import staff as staff_svc
from selfserve.scheduling.models import (
    AdminBookingDetail,
    AdminBookingPage,
    BookingCreate,
    BookingOut,
    BookingPage,
    BookingStatus,
    HoldCreate,
    HoldOut,
    Reschedule,
    SlotPage,
    StaffCancel,
    StaffReschedule,
    WaitlistCreate,
    WaitlistOut,
    WaitlistPage,
)
from selfserve.scheduling.policy import policy_of

Redis = NamedDependency[Any]
PathId = Annotated[int, PathParameter(le=MAX_BIGINT)]
QueryId = Annotated[int, QueryParameter(ge=1, le=MAX_BIGINT)]
Instant = Annotated[
    datetime, QueryParameter(description="RFC 3339 with an offset; without one: 422")
]
Limit = Annotated[int, QueryParameter(ge=1, le=200, description="Page size (max 200)")]
Cursor = Annotated[str | None, QueryParameter(description="`next_cursor` of the previous page")]
IdempotencyKey = Annotated[
    str | None,
    HeaderParameter(
        name="Idempotency-Key",
        min_length=1,
        max_length=200,
        required=False,
        description="Same key and body: the first response is replayed; "
        "same key, other body: 422 `idempotency_key_reused`; "
        "while the first request is still running: 409 `idempotency_key_in_progress` "
        "with `Retry-After`",
    ),
]
SECURITY: list[dict[str, list[str]]] = [{"BearerToken": []}]
BOOKERS = ("customer", "kiosk", "staff", "manager", "admin")
CONFLICTS = (
    "`slot_full` (no seats left), `slot_unavailable` (not a slot of the service), "
    "`hold_expired`, `booking_not_active`, `booking_checked_in` (cancel and reschedule), "
    "`idempotency_key_in_progress` (creating, with the same key as a request still running)"
)
NO_SHOWS = (
    "`staff_booking_required` (repeated no-shows: staff book for this customer), `forbidden` "
    "(a role that never books, e.g. a display device)"
)
TEXTS = (
    "`sms_limit_reached` (a phone typed by a kiosk or staff: too many texts to that number, "
    "from this device or today; nothing was written; wait `Retry-After` or send no `phone`)"
)
REPLAYED = "Idempotent-Replayed"


def _created(body: Any, replayed: bool) -> Response[Any]:
    return Response(content=body, status_code=201, headers={REPLAYED: "true"} if replayed else {})


class AvailabilityController(Controller):
    path = "/v1/availability"
    tags = ["Booking"]

    @get(
        "/",
        operation_id="getAvailability",
        summary="Bookable slots of a service in a range (at most 31 days)",
        responses=problems(404, 422),
    )
    async def availability(
        self,
        pool: DbPool,
        branch_id: QueryId,
        service_id: QueryId,
        window_from: Annotated[
            datetime, QueryParameter(name="from", description="RFC 3339 with an offset")
        ],
        window_to: Annotated[
            datetime, QueryParameter(name="to", description="RFC 3339 with an offset")
        ],
        party_size: Annotated[int, QueryParameter(ge=1, le=1000)] = 1,
    ) -> SlotPage:
        items = await slots.availability(
            pool,
            branch_id=branch_id,
            service_id=service_id,
            window_from=window_from,
            window_to=window_to,
            party_size=party_size,
            now=slots.utcnow(),
        )
        return SlotPage(items=items)


class HoldController(Controller):
    path = "/v1/holds"
    tags = ["Booking"]
    guards = [require(*BOOKERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createHold",
        summary="Hold a slot for a few minutes (customer, kiosk or staff)",
        responses=problems(
            401,
            403,
            404,
            409,
            413,
            422,
            s403=NO_SHOWS,
            s409=CONFLICTS + ", `too_many_holds` (a customer's live holds are at the limit)",
        ),
    )
    async def create(
        self,
        pool: DbPool,
        settings: AppSettings,
        principal: Caller,
        data: JSONBody[HoldCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[HoldOut]:
        out, replayed = await svc.create_hold(
            pool,
            principal,
            data,
            idempotency_key=idempotency_key,
            now=slots.utcnow(),
            policy=policy_of(settings),
        )
        return _created(out, replayed)


class BookingController(Controller):
    path = "/v1/bookings"
    tags = ["Booking"]
    security = SECURITY

    @post(
        "/",
        operation_id="createBooking",
        summary="Book a held slot or a slot directly (customer, kiosk or staff)",
        description="Kiosks and staff book for someone else and may send their `phone` "
        "(texted the confirmation and reminders). A customer with repeated no-shows gets "
        "403 `staff_booking_required`; staff can still book for them.",
        responses=problems(
            401,
            403,
            404,
            409,
            413,
            422,
            429,
            503,
            s403=NO_SHOWS,
            s409=CONFLICTS + ", `too_many_bookings` (the customer, or the walk-in phone, has "
            "as many upcoming bookings of this service at this branch that day as allowed)",
            s429=TEXTS,
        ),
        guards=[require(*BOOKERS)],
    )
    async def create(
        self,
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        data: JSONBody[BookingCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[BookingOut]:
        out, replayed = await svc.create_booking(
            pool,
            redis,
            principal,
            data,
            idempotency_key=idempotency_key,
            now=slots.utcnow(),
            policy=policy_of(settings),
        )
        return _created(out, replayed)

    @get(
        "/",
        operation_id="listBookings",
        summary="The caller's own bookings, newest first (customer)",
        responses=problems(401, 403, 422),
        guards=[require("customer")],
    )
    async def list(
        self, pool: DbPool, principal: Caller, limit: Limit = 50, cursor: Cursor = None
    ) -> BookingPage:
        items, nxt = await svc.list_bookings(pool, principal, limit=limit, cursor=cursor)
        return BookingPage(items=items, next_cursor=nxt)

    @get(
        "/{booking_id:int}",
        operation_id="getBooking",
        summary="One of the caller's bookings (customer)",
        responses=problems(401, 403, 404),
        guards=[require("customer")],
    )
    async def get(self, pool: DbPool, principal: Caller, booking_id: PathId) -> BookingOut:
        return await svc.get_booking(pool, principal, booking_id)

    @post(
        "/{booking_id:int}/cancel",
        operation_id="cancelBooking",
        status_code=200,
        summary="Cancel a booking; frees its seats at once and offers them to the waitlist "
        "(customer)",
        responses=problems(401, 403, 404, 409, s409="`booking_not_active`, `booking_checked_in`"),
        guards=[require("customer")],
    )
    async def cancel(
        self,
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        booking_id: PathId,
    ) -> BookingOut:
        return await svc.cancel_booking(
            pool,
            principal,
            booking_id,
            now=slots.utcnow(),
            redis=redis,
            policy=policy_of(settings),
        )

    @post(
        "/{booking_id:int}/reschedule",
        operation_id="rescheduleBooking",
        status_code=200,
        summary="Move a booking atomically; the old slot is kept on 409 (customer)",
        responses=problems(401, 403, 404, 409, 413, 422, s409=CONFLICTS),
        guards=[require("customer")],
    )
    async def reschedule(
        self,
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        booking_id: PathId,
        data: JSONBody[Reschedule],
    ) -> BookingOut:
        return await svc.reschedule_booking(
            pool,
            redis,
            principal,
            booking_id,
            data.start,
            now=slots.utcnow(),
            policy=policy_of(settings),
        )


class WaitlistController(Controller):
    path = "/v1/waitlist"
    tags = ["Booking"]
    security = SECURITY
    guards = [require("customer")]

    @post(
        "/",
        operation_id="joinWaitlist",
        summary="Wait for a seat on a day between two wall times (customer)",
        description="When seats free up (a cancel, a reschedule, an expired hold) the oldest "
        "matching entry gets a hold on the earliest fitting slot and an SMS offer; book it "
        "with `POST /v1/bookings {hold_id}` or reply Y before `offer.expires_at`, reply N to "
        "pass it on. A free seat already there is offered at once. One open entry per "
        "service and day: a second is 409 `already_waitlisted`.",
        responses=problems(
            401,
            403,
            404,
            409,
            413,
            422,
            s403=NO_SHOWS,
            s409="`already_waitlisted`, `idempotency_key_in_progress`, `too_many_waitlist_entries` (as many open entries "
            "as allowed)",
        ),
    )
    async def join(
        self,
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        data: JSONBody[WaitlistCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[WaitlistOut]:
        out, replayed = await svc.join_waitlist(
            pool,
            redis,
            principal,
            data,
            idempotency_key=idempotency_key,
            now=slots.utcnow(),
            policy=policy_of(settings),
        )
        return _created(out, replayed)

    @get(
        "/",
        operation_id="listWaitlist",
        summary="The caller's waitlist entries, newest first (customer)",
        responses=problems(401, 403, 422),
    )
    async def list(
        self, pool: DbPool, principal: Caller, limit: Limit = 50, cursor: Cursor = None
    ) -> WaitlistPage:
        items, nxt = await svc.list_waitlist(pool, principal, limit=limit, cursor=cursor)
        return WaitlistPage(items=items, next_cursor=nxt)

    @get(
        "/{entry_id:int}",
        operation_id="getWaitlistEntry",
        summary="One of the caller's waitlist entries, with its open offer (customer)",
        responses=problems(401, 403, 404),
    )
    async def get(self, pool: DbPool, principal: Caller, entry_id: PathId) -> WaitlistOut:
        return await svc.get_waitlist_entry(pool, principal, entry_id)

    @post(
        "/{entry_id:int}/cancel",
        operation_id="leaveWaitlist",
        status_code=200,
        summary="Leave the waitlist; a seat held for an open offer goes to the next entry "
        "(customer)",
        responses=problems(401, 403, 404, 409, s409="`waitlist_entry_closed`"),
    )
    async def cancel(
        self,
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        entry_id: PathId,
    ) -> WaitlistOut:
        return await svc.leave_waitlist(
            pool, redis, principal, entry_id, now=slots.utcnow(), policy=policy_of(settings)
        )


class AdminBookingController(Controller):
    path = "/v1/admin/bookings"
    tags = ["Admin: bookings"]
    guards = [require(*ADMIN_READERS)]
    security = SECURITY

    @get(
        "/",
        operation_id="adminListBookings",
        summary="The day sheet and booking search of the caller's branches (staff)",
        description="Bookings whose start lies in [`from`, `to`), matching every filter "
        "given, by start then id. Staff and managers see their branches' bookings, admins "
        "every branch's; a branch outside the caller's scope lists nothing.",
        responses=problems(401, 403, 422),
    )
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: Annotated[int | None, QueryParameter(ge=1, le=MAX_BIGINT)] = None,
        resource_id: Annotated[int | None, QueryParameter(ge=1, le=MAX_BIGINT)] = None,
        service_id: Annotated[int | None, QueryParameter(ge=1, le=MAX_BIGINT)] = None,
        window_from: Annotated[
            datetime | None,
            QueryParameter(name="from", description="Starts at or after, RFC 3339 with an offset"),
        ] = None,
        window_to: Annotated[
            datetime | None,
            QueryParameter(name="to", description="Starts before, RFC 3339 with an offset"),
        ] = None,
        status: Annotated[BookingStatus | None, QueryParameter()] = None,
        phone: Annotated[
            str | None, QueryParameter(max_length=32, description="E.164 phone")
        ] = None,
        code: Annotated[
            str | None, QueryParameter(max_length=16, description="Booking code")
        ] = None,
        limit: Limit = 50,
        cursor: Cursor = None,
    ) -> AdminBookingPage:
        items, nxt = await staff_svc.list_bookings(
            pool,
            principal,
            branch_id=branch_id,
            resource_id=resource_id,
            service_id=service_id,
            window_from=window_from,
            window_to=window_to,
            status=status,
            phone=normalise_phone(phone, mobile=False) if phone else None,
            code=code,
            limit=limit,
            cursor=cursor,
        )
        return AdminBookingPage(items=items, next_cursor=nxt)

    @get(
        "/{booking_id:int}",
        operation_id="adminGetBooking",
        summary="Any booking of the caller's branches, with the changes staff made (staff)",
        responses=problems(401, 403, 404),
    )
    async def get(self, pool: DbPool, principal: Caller, booking_id: PathId) -> AdminBookingDetail:
        return await staff_svc.get_booking(pool, principal, booking_id)

    @post(
        "/{booking_id:int}/cancel",
        operation_id="adminCancelBooking",
        status_code=200,
        summary="Cancel a booking for the branch, with a reason (staff)",
        description="Frees its seats at once and offers them to the waitlist, as the "
        "customer's cancel does, but without the late-cancellation policy. The change is "
        "recorded (who, when, why) and the booking's phone is texted.",
        responses=problems(
            401, 403, 404, 409, 413, 422, s409="`booking_not_active`, `booking_checked_in`"
        ),
    )
    async def cancel(
        self,
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        booking_id: PathId,
        data: JSONBody[StaffCancel],
    ) -> AdminBookingDetail:
        return await staff_svc.cancel_booking(
            pool,
            redis,
            principal,
            booking_id,
            data.reason,
            now=slots.utcnow(),
            policy=policy_of(settings),
        )

    @post(
        "/{booking_id:int}/reschedule",
        operation_id="adminRescheduleBooking",
        status_code=200,
        summary="Move a booking atomically for the branch, with a reason (staff)",
        description="The same rules as the customer's reschedule: the new start must be a "
        "slot of the service with room for the party, else 409 and the old slot is kept. "
        "The change is recorded (who, when, why) and the booking's phone is texted.",
        responses=problems(401, 403, 404, 409, 413, 422, s409=CONFLICTS),
    )
    async def reschedule(
        self,
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        booking_id: PathId,
        data: JSONBody[StaffReschedule],
    ) -> AdminBookingDetail:
        return await staff_svc.reschedule_booking(
            pool,
            redis,
            principal,
            booking_id,
            data.start,
            data.reason,
            now=slots.utcnow(),
            policy=policy_of(settings),
        )


ROUTERS = [
    AvailabilityController,
    HoldController,
    BookingController,
    WaitlistController,
    AdminBookingController,
]
