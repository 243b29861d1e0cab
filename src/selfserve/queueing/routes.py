"""Walk-in queue HTTP: queue status, tickets, check-in, counters and the ticket's life.

Live events are published after each committed change (`live.py`) and read by the
board feed (`WS /v1/branches/{id}/live`) and a ticket's event stream (SSE)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Response, WebSocket, get, post, websocket
from litestar.di import NamedDependency
from litestar.handlers import HTTPRouteHandler
from litestar.params import HeaderParameter, JSONBody, PathParameter, QueryParameter
from litestar.response import ServerSentEvent

from selfserve.auth.guards import Caller, require, token_expiry
from selfserve.catalog.models import MAX_BIGINT
from selfserve.context import AppSettings, DbPool
from selfserve.errors import ServiceUnavailable, negotiate_locale
from selfserve.openapi_util import problems
from selfserve.queueing import live
from selfserve.queueing import service as svc
from selfserve.queueing.models import (
    CheckIn,
    CounterOut,
    QueueStatusPage,
    TicketCreate,
    TicketOut,
    Transfer,
)

Redis = NamedDependency[Any]
PathId = Annotated[int, PathParameter(le=MAX_BIGINT)]
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
AccessToken = Annotated[
    str | None,
    QueryParameter(
        name="access_token",
        required=False,
        max_length=4096,
        description="The access token, for clients that cannot send an Authorization "
        "header (a browser's EventSource or WebSocket); the header wins when both are sent",
    ),
]
SECURITY: list[dict[str, list[str]]] = [{"BearerToken": []}]
STAFF = ("staff", "manager", "admin")
ISSUERS = ("customer", "kiosk", *STAFF)
STATE_CONFLICTS = "`ticket_state` (with `status` and `expected`), `recall_first`"


def _locale(request: Request[Any, Any, Any]) -> str:
    return negotiate_locale(request.headers.get("accept-language"))


async def _published(
    request: Request[Any, Any, Any],
    pool: Any,
    settings: Any,
    redis: Any,
    changed: svc.Changed,
) -> TicketOut:
    await svc.enqueue(redis, changed.outbox)
    await svc.text_turn_near(pool, redis, changed.branch_id, now=svc.utcnow(), settings=settings)
    counter = None
    if changed.called and changed.ticket.counter_id is not None:
        counter = await pool.fetchval(
            "SELECT name FROM resources WHERE id = $1", changed.ticket.counter_id
        )
    await live.publish_branch(
        request.app,
        pool,
        settings,
        changed.branch_id,
        now=svc.utcnow(),
        called=changed.ticket if changed.called else None,
        counter_name=counter,
    )
    return changed.ticket


class BranchQueuesController(Controller):
    path = "/v1/branches"
    tags = ["Walk-in queue"]

    @get(
        "/{branch_id:int}/queues",
        operation_id="listBranchQueues",
        summary="Queues of a branch with waiting count, open counters and estimated wait",
        responses=problems(404),
    )
    async def queues(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        settings: AppSettings,
        branch_id: PathId,
    ) -> QueueStatusPage:
        items = await svc.list_queue_statuses(
            pool, branch_id, now=svc.utcnow(), settings=settings, locale=_locale(request)
        )
        return QueueStatusPage(items=items)

    @websocket("/{branch_id:int}/live", name="branch-live")
    async def board_feed(self, socket: WebSocket[Any, Any, Any], branch_id: PathId) -> None:
        """The board feed (not in the OpenAPI document: see `ticketEvents` and README)."""
        await live.serve_board(socket, branch_id)


class TicketController(Controller):
    path = "/v1/tickets"
    tags = ["Walk-in queue"]
    security = SECURITY

    @post(
        "/",
        operation_id="createTicket",
        summary="Take a ticket (kiosk, staff) or join remotely (customer)",
        description="Answers the daily display code (e.g. A023, numbered per queue in "
        "branch time), the place in the queue and the expected wait as a band. 409 "
        "`queue_closed` when the branch is closed or the wait would run past closing.",
        responses=problems(
            401,
            403,
            404,
            409,
            413,
            422,
            429,
            503,
            s409="`queue_closed`, `idempotency_key_in_progress`, `too_many_tickets` (the customer, or the walk-in phone, "
            "has as many open tickets as allowed)",
            s429="`sms_limit_reached` (a phone typed by a kiosk or staff: too many texts to "
            "that number, from this device or today; nothing was written; wait `Retry-After` "
            "or send no `phone`)",
        ),
        guards=[require(*ISSUERS)],
    )
    async def create(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        data: JSONBody[TicketCreate],
        idempotency_key: IdempotencyKey = None,
    ) -> Response[TicketOut]:
        out, branch_id, replayed = await svc.issue_ticket(
            pool,
            principal,
            data,
            idempotency_key=idempotency_key,
            now=svc.utcnow(),
            settings=settings,
            locale=_locale(request),
            redis=redis,
        )
        if not replayed:
            await live.publish_branch(request.app, pool, settings, branch_id, now=svc.utcnow())
        return Response(
            out, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else {}
        )

    @get(
        "/{ticket_id:int}/events",
        operation_id="ticketEvents",
        summary="Live events of one ticket (Server-Sent Events)",
        description="For the ticket's customer, or kiosks and staff of its branch "
        "(others as for `getTicket`). The token comes in the Authorization header or, "
        "for a browser's EventSource, as `?access_token=`. Events, each `data` one JSON "
        "document: `ticket` (the ticket, as `getTicket` answers) first; `position` "
        "(`{position, eta}`) whenever its place or expected wait changes while it "
        "waits; `called` (`{ticket_id, display_code, counter_id, counter, recalls, at}`) "
        "when it is called or recalled; once it is `done`, `no_show` or `cancelled`, "
        "a last `ticket` and the stream ends (close the EventSource then, or it "
        "reconnects). A `: keep-alive` comment every 15 s while nothing happens. "
        "503 `service_unavailable` when this process has no live feed.\n\n"
        "The display boards' feed is a WebSocket, `WS /v1/branches/{branch_id}/live` "
        "(WebSockets are outside OpenAPI): for a kiosk of that branch, or staff, "
        "managers and admins with it in scope; the token as `?access_token=` (browsers) "
        "or an Authorization header. It sends the board at once (`type: board`: recent "
        "calls with their counters, each queue's waiting count, open counters and "
        "expected wait, and `tickets` `{id: {position, eta}}`), then every event of the "
        "branch as a text JSON message: a new `board` after each change and "
        "`ticket_called` (`{ticket_id, display_code, counter_id, counter, recalls, at}`) "
        "on each call, whichever API process made the change. It closes with 4401 (no "
        "valid token; on an open feed: the token expired or the device or account was "
        "deactivated), 4403 (a role that never reads boards, or rights on the branch "
        "lost while open), 4404 (no such branch, or one outside the caller's scope) or "
        "1011 (no live feed in this process). Display devices read boards only.\n\n"
        "Both feeds re-check the caller every `SELFSERVE_LIVE_RECHECK` seconds and at "
        "the token's expiry; a ticket stream whose caller lost the right to read it "
        "sends a last `closed` event (`{code, reason}`, codes as the board's) and ends.",
        responses=problems(
            401, 403, 404, 503, s503="The live feed is not running (`service_unavailable`)."
        ),
        guards=[live.require_live(*ISSUERS)],
        media_type="text/event-stream",
        response_description="A stream of Server-Sent Events: `ticket`, `position`, `called`",
    )
    async def events(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        settings: AppSettings,
        principal: Caller,
        ticket_id: PathId,
        access_token: AccessToken = None,  # read by the guard; declared for the schema
    ) -> ServerSentEvent:
        locale = _locale(request)
        ticket = await svc.get_ticket(  # first: missing and out of scope answer 404
            pool, principal, ticket_id, now=svc.utcnow(), settings=settings, locale=locale
        )
        if not live.available(request.app):
            raise ServiceUnavailable()
        return ServerSentEvent(
            live.ticket_stream(
                request.app,
                pool,
                settings,
                principal,
                ticket_id,
                ticket.branch_id,
                locale,
                token_expiry(request),
            )
        )

    @get(
        "/{ticket_id:int}",
        operation_id="getTicket",
        summary="A ticket: status, place and expected wait",
        description="Customers see their own tickets (others answer 404); kiosks and "
        "staff those of their branches.",
        responses=problems(401, 403, 404),
        guards=[require(*ISSUERS)],
    )
    async def get(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        settings: AppSettings,
        principal: Caller,
        ticket_id: PathId,
    ) -> TicketOut:
        return await svc.get_ticket(
            pool,
            principal,
            ticket_id,
            now=svc.utcnow(),
            settings=settings,
            locale=_locale(request),
        )

    @post(
        "/{ticket_id:int}/cancel",
        operation_id="cancelTicket",
        status_code=200,
        summary="Leave the queue",
        responses=problems(401, 403, 404, 409, s409="`ticket_not_active`"),
        guards=[require(*ISSUERS)],
    )
    async def cancel(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        ticket_id: PathId,
    ) -> TicketOut:
        changed = await svc.cancel_ticket(
            pool,
            principal,
            ticket_id,
            now=svc.utcnow(),
            settings=settings,
            locale=_locale(request),
        )
        return await _published(request, pool, settings, redis, changed)

    @post(
        "/{ticket_id:int}/transfer",
        operation_id="transferTicket",
        status_code=200,
        summary="Move a ticket to another queue, keeping its place by issue time (staff)",
        responses=problems(401, 403, 404, 409, 413, 422, s409="`ticket_not_active`"),
        guards=[require(*STAFF)],
    )
    async def transfer(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        ticket_id: PathId,
        data: JSONBody[Transfer],
    ) -> TicketOut:
        changed = await svc.transfer(
            pool,
            principal,
            ticket_id,
            data,
            now=svc.utcnow(),
            settings=settings,
            locale=_locale(request),
        )
        return await _published(request, pool, settings, redis, changed)


# recall, start, finish and no-show differ only in the action and its documentation.
ACTIONS: tuple[tuple[svc.Action, str, str, str], ...] = (
    ("recall", "recall", "recallTicket", "Announce a called ticket again (staff)"),
    ("start", "start", "startTicket", "The called customer arrived: service starts (staff)"),
    ("finish", "finish", "finishTicket", "Service done; schedules the feedback survey (staff)"),
    (
        "no_show",
        "no-show",
        "noShowTicket",
        "A called customer did not come, after the recalls the branch requires (staff)",
    ),
)


def _action_route(
    action: svc.Action, segment: str, operation_id: str, summary: str
) -> HTTPRouteHandler:
    async def handler(
        request: Request[Any, Any, Any],
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        ticket_id: PathId,
    ) -> TicketOut:
        changed = await svc.act(
            pool,
            principal,
            ticket_id,
            action,
            now=svc.utcnow(),
            settings=settings,
            locale=_locale(request),
        )
        return await _published(request, pool, settings, redis, changed)

    handler.__name__ = handler.__qualname__ = f"{action}_ticket"
    return post(
        f"/v1/tickets/{{ticket_id:int}}/{segment}",
        operation_id=operation_id,
        status_code=200,
        summary=summary,
        responses=problems(401, 403, 404, 409, s409=STATE_CONFLICTS),
        guards=[require(*STAFF)],
        tags=["Walk-in queue"],
        security=SECURITY,
    )(handler)


ACTION_ROUTES = [_action_route(*a) for a in ACTIONS]


class CheckInController(Controller):
    path = "/v1/check-ins"
    tags = ["Walk-in queue"]
    security = SECURITY

    @post(
        "/",
        operation_id="checkIn",
        summary="A booking joins the branch queue with appointment priority (kiosk, app)",
        description="By `code` at a kiosk of the branch or `booking_id` from the customer's "
        "app. Outside the window (`SELFSERVE_CHECK_IN_EARLY` before to "
        "`SELFSERVE_CHECK_IN_LATE` after the start) a 409 `check_in_too_early` / "
        "`check_in_too_late` carries `window_opens_at` and `window_closes_at`.",
        responses=problems(
            401,
            403,
            404,
            409,
            413,
            422,
            s409="`check_in_too_early`, `check_in_too_late`, `already_checked_in`, "
            "`payment_required`, `booking_not_active`, `no_queue_for_service`",
        ),
        guards=[require("customer", "kiosk", *STAFF)],
    )
    async def check_in(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        data: JSONBody[CheckIn],
    ) -> Response[TicketOut]:
        changed = await svc.check_in(
            pool, principal, data, now=svc.utcnow(), settings=settings, locale=_locale(request)
        )
        return Response(await _published(request, pool, settings, redis, changed), status_code=201)


async def _set_open(
    request: Request[Any, Any, Any],
    pool: Any,
    settings: Any,
    principal: Any,
    counter_id: int,
    is_open: bool,
) -> CounterOut:
    out, branch_id = await svc.set_counter_open(
        pool, principal, counter_id, is_open, now=svc.utcnow()
    )
    await live.publish_branch(request.app, pool, settings, branch_id, now=svc.utcnow())
    return out


class CounterController(Controller):
    path = "/v1/counters"
    tags = ["Walk-in queue"]
    security = SECURITY
    guards = [require(*STAFF)]

    @post(
        "/{counter_id:int}/open",
        operation_id="openCounter",
        status_code=200,
        summary="Open a counter: it starts taking tickets (staff)",
        responses=problems(401, 403, 404),
    )
    async def open(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        settings: AppSettings,
        principal: Caller,
        counter_id: PathId,
    ) -> CounterOut:
        return await _set_open(request, pool, settings, principal, counter_id, True)

    @post(
        "/{counter_id:int}/close",
        operation_id="closeCounter",
        status_code=200,
        summary="Close a counter: it takes no more tickets (staff)",
        responses=problems(401, 403, 404),
    )
    async def close(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        settings: AppSettings,
        principal: Caller,
        counter_id: PathId,
    ) -> CounterOut:
        return await _set_open(request, pool, settings, principal, counter_id, False)

    @post(
        "/{counter_id:int}/call-next",
        operation_id="callNext",
        status_code=200,
        summary="Call the next ticket this counter can serve (staff)",
        description="Skills, checked-in appointments due now, priority classes, FIFO, "
        "with aging so nobody waits past the bound behind later arrivals. Two counters "
        "calling at once never get the same ticket.",
        responses=problems(
            401,
            403,
            404,
            409,
            s409="`counter_closed`, `counter_busy`, `no_ticket_waiting`",
        ),
    )
    async def call_next(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        redis: Redis,
        settings: AppSettings,
        principal: Caller,
        counter_id: PathId,
    ) -> TicketOut:
        changed = await svc.call_next(
            pool,
            principal,
            counter_id,
            now=svc.utcnow(),
            settings=settings,
            locale=_locale(request),
        )
        return await _published(request, pool, settings, redis, changed)


ROUTERS: list[type[Controller] | HTTPRouteHandler] = [
    BranchQueuesController,
    TicketController,
    *ACTION_ROUTES,
    CheckInController,
    CounterController,
]
