"""Booking HTTP: availability (anyone), holds and bookings (customers and kiosks)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter

from selfserve.auth.guards import Caller, require
from selfserve.catalog.models import MAX_BIGINT
from selfserve.context import DbPool
from selfserve.openapi_util import problems
from selfserve.scheduling import service as svc
from selfserve.scheduling.models import (
    BookingCreate,
    BookingOut,
    BookingPage,
    HoldCreate,
    HoldOut,
    Reschedule,
    SlotPage,
)

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
        "same key, other body: 422 `idempotency_key_reused`",
    ),
]
SECURITY: list[dict[str, list[str]]] = [{"BearerToken": []}]
BOOKERS = ("customer", "kiosk")
CONFLICTS = (
    "`slot_full` (no seats left), `slot_unavailable` (not a slot of the service), "
    "`hold_expired`, `booking_not_active`"
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
        items = await svc.availability(
            pool,
            branch_id=branch_id,
            service_id=service_id,
            window_from=window_from,
            window_to=window_to,
            party_size=party_size,
            now=svc.utcnow(),
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
        summary="Hold a slot for a few minutes (customer or kiosk)",
        responses=problems(401, 403, 404, 409, 413, 422, s409=CONFLICTS),
    )
    async def create(
        self,
        pool: DbPool,
        principal: Caller,
        data: JSONBody[HoldCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[HoldOut]:
        out, replayed = await svc.create_hold(
            pool, principal, data, idempotency_key=idempotency_key, now=svc.utcnow()
        )
        return _created(out, replayed)


class BookingController(Controller):
    path = "/v1/bookings"
    tags = ["Booking"]
    security = SECURITY

    @post(
        "/",
        operation_id="createBooking",
        summary="Book a held slot or a slot directly (customer or kiosk)",
        responses=problems(401, 403, 404, 409, 413, 422, s409=CONFLICTS),
        guards=[require(*BOOKERS)],
    )
    async def create(
        self,
        pool: DbPool,
        redis: Redis,
        principal: Caller,
        data: JSONBody[BookingCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[BookingOut]:
        out, replayed = await svc.create_booking(
            pool, redis, principal, data, idempotency_key=idempotency_key, now=svc.utcnow()
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
        summary="Cancel a booking; frees its seats at once (customer)",
        responses=problems(401, 403, 404, 409, s409="`booking_not_active`"),
        guards=[require("customer")],
    )
    async def cancel(self, pool: DbPool, principal: Caller, booking_id: PathId) -> BookingOut:
        return await svc.cancel_booking(pool, principal, booking_id, now=svc.utcnow())

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
        principal: Caller,
        booking_id: PathId,
        data: JSONBody[Reschedule],
    ) -> BookingOut:
        return await svc.reschedule_booking(
            pool, redis, principal, booking_id, data.start, now=svc.utcnow()
        )


ROUTERS = [AvailabilityController, HoldController, BookingController]
