"""Domain errors and their RFC 9457 problem responses.

Services raise `DomainError` subclasses; one set of exception handlers turns
those, Litestar's own HTTP errors and validation failures into
`application/problem+json` with a stable machine `code`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from http import HTTPStatus
from typing import Any, ClassVar

import asyncpg
import msgspec
import structlog
from litestar import Request, Response
from litestar.exceptions import (
    HTTPException,
    NotAuthorizedException,
    NotFoundException,
    PermissionDeniedException,
    ValidationException,
)
from litestar.exceptions.http_exceptions import (
    MethodNotAllowedException,
    RequestEntityTooLarge,
)
from litestar.types import ExceptionHandlersMap

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://selfserve.dev/problems/"

log = structlog.get_logger("selfserve.errors")


class FieldError(msgspec.Struct, frozen=True):
    field: str
    message: str


class Problem(msgspec.Struct, omit_defaults=True):
    """RFC 9457 problem details with a stable machine-readable `code`."""

    type: str
    title: str
    status: int
    detail: str
    code: str
    instance: str | None = None
    request_id: str | None = None
    errors: list[FieldError] | None = None


# code -> (en, zh-CN) human text; `detail` follows Accept-Language.
MESSAGES: dict[str, tuple[str, str]] = {
    "validation_error": ("The request is not valid.", "请求内容无效。"),
    "malformed_body": ("The request body is not valid JSON.", "请求体不是有效的 JSON。"),
    "bad_request": ("The request could not be understood.", "无法理解该请求。"),
    "body_too_large": ("The request body is too large.", "请求体过大。"),
    "body_too_deep": (
        "The JSON body is nested too deeply (at most 32 levels).",
        "请求体 JSON 嵌套层级过深（最多 32 层）。",
    ),
    "not_found": ("The resource was not found.", "未找到该资源。"),
    "method_not_allowed": ("This method is not allowed here.", "不允许使用此方法。"),
    "unauthorized": ("Authentication is required.", "需要登录认证。"),
    "invalid_token": ("The access token is invalid or expired.", "访问令牌无效或已过期。"),
    "invalid_credentials": ("The credentials are not valid.", "凭据无效。"),
    "invalid_refresh_token": ("The refresh token is invalid.", "刷新令牌无效。"),
    "refresh_token_reused": (
        "This refresh token was already used; the session has been revoked.",
        "该刷新令牌已被使用，会话已被撤销。",
    ),
    "forbidden": ("You are not allowed to do this.", "您无权执行此操作。"),
    "branch_forbidden": (
        "You are not allowed to act on this branch.",
        "您无权操作该网点。",
    ),
    "conflict": ("The request conflicts with the current state.", "请求与当前状态冲突。"),
    "already_exists": ("A record with these values already exists.", "已存在相同的记录。"),
    "inactive_reference": (
        "The request refers to something that is deactivated.",
        "请求引用了已停用的对象。",
    ),
    "overlapping_shift": (
        "The shift overlaps another shift of the same resource.",
        "该班次与同一资源的其他班次重叠。",
    ),
    "service_unavailable": ("A dependency is unavailable.", "依赖服务暂不可用。"),
    "database_unavailable": (
        "The database cannot be reached right now; please try again shortly.",
        "暂时无法连接数据库，请稍后重试。",
    ),
    "internal_error": ("Something went wrong on our side.", "服务器内部错误。"),
    "invalid_code": ("The code is wrong or was already used.", "验证码错误或已使用。"),
    "code_expired": ("The code has expired; ask for a new one.", "验证码已过期，请重新获取。"),
    "code_locked": (
        "Too many wrong tries; ask for a new code.",
        "错误次数过多，请重新获取验证码。",
    ),
    "invalid_signature": ("The request signature is not valid.", "请求签名无效。"),
    "rate_limited": ("Too many requests; try again later.", "请求过于频繁，请稍后再试。"),
    "slot_full": (
        "This time is no longer available; please choose another.",
        "该时段已约满，请选择其他时间。",
    ),
    "hold_expired": (
        "The hold has expired or was already used; please choose a time again.",
        "预留已过期或已使用，请重新选择时间。",
    ),
    "slot_unavailable": (
        "This time is not offered for this service; choose a time from the availability list.",
        "该时间不可预约，请从可预约时段中选择。",
    ),
    "idempotency_key_reused": (
        "This Idempotency-Key was already used with a different request.",
        "该幂等键已用于另一个不同的请求。",
    ),
    "booking_not_active": (
        "The booking is no longer active.",
        "该预约已失效。",
    ),
    "booking_checked_in": (
        "This booking has checked in and is in the queue; to leave, cancel the ticket.",
        "该预约已签到并在排队中；如需离开，请取消排队号。",
    ),
    "idempotency_key_in_progress": (
        "A request with this Idempotency-Key is still being processed; retry shortly.",
        "使用该幂等键的请求仍在处理中，请稍后重试。",
    ),
    "staff_booking_required": (
        "After several missed appointments, please ask our staff to book for you.",
        "由于多次未按时赴约，请联系工作人员为您预约。",
    ),
    "already_waitlisted": (
        "You are already on the waitlist for this service on that day.",
        "您已在该日该服务的候补名单中。",
    ),
    "waitlist_entry_closed": (
        "This waitlist entry is no longer open.",
        "该候补登记已结束。",
    ),
    "queue_closed": (
        "This queue takes no more tickets today; please come back when the branch is open.",
        "该队列今日已停止取号，请在营业时间再来。",
    ),
    "ticket_not_active": ("The ticket is no longer in the queue.", "该号码已不在队列中。"),
    "ticket_state": (
        "The ticket is not in the state this action needs.",
        "该号码当前状态不允许此操作。",
    ),
    "recall_first": (
        "Recall the ticket before marking it a no-show.",
        "请先重新叫号，再标记为未到。",
    ),
    "already_checked_in": ("This booking has already checked in.", "该预约已签到。"),
    "payment_required": (
        "The deposit for this booking is not paid yet.",
        "该预约的定金尚未支付。",
    ),
    "check_in_too_early": (
        "It is too early to check in; see the window in this answer.",
        "签到时间未到，请查看可签到时段。",
    ),
    "check_in_too_late": (
        "The check-in window has passed; please ask our staff.",
        "已超过签到时段，请咨询工作人员。",
    ),
    "no_queue_for_service": (
        "No queue serves this booking's service here; please ask our staff.",
        "本网点没有办理该业务的队列，请咨询工作人员。",
    ),
    "counter_closed": ("The counter is closed; open it first.", "该窗口已关闭，请先开启。"),
    "counter_busy": (
        "The counter still has a called or served ticket.",
        "该窗口仍有已叫号或正在办理的号码。",
    ),
    "no_ticket_waiting": (
        "No ticket this counter can serve is waiting.",
        "当前没有该窗口可办理的等候号码。",
    ),
    "capacity_in_use": (
        "Bookings or holds already taken would no longer fit; move or cancel them first.",
        "已有的预约或保留名额将无法容纳，请先改期或取消它们。",
    ),
    "too_many_holds": (
        "You already hold as many times as allowed; book or let one go first.",
        "您的预留数量已达上限，请先完成预约或释放预留。",
    ),
    "too_many_bookings": (
        "You already have as many bookings for this service on that day as allowed.",
        "您在当天该服务的预约数量已达上限。",
    ),
    "too_many_tickets": (
        "You already have as many open tickets as allowed.",
        "您持有的排队号码数量已达上限。",
    ),
    "too_many_waitlist_entries": (
        "You are already on as many waitlists as allowed.",
        "您的候补登记数量已达上限。",
    ),
    "sms_limit_reached": (
        "Too many texts to this number or from this device; try later or leave out the phone.",
        "该号码或本设备的短信数量已达上限，请稍后再试或不填写手机号。",
    ),
    "login_throttled": (
        "Too many failed sign-ins; wait before trying again.",
        "登录失败次数过多，请稍后再试。",
    ),
}


def message(code: str, locale: str) -> str:
    en, zh = MESSAGES.get(code, MESSAGES["internal_error"])
    return zh if locale == "zh-CN" else en


def negotiate_locale(accept_language: str | None) -> str:
    """Pick `zh-CN` or `en` from an Accept-Language header (q-values honoured)."""
    if not accept_language:
        return "en"
    best, best_q = "en", -1.0
    for part in accept_language.split(","):
        pieces = part.strip().split(";")
        tag = pieces[0].strip().lower()
        q = 1.0
        for param in pieces[1:]:
            name, _, value = param.strip().partition("=")
            if name == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if tag.startswith("zh"):
            candidate = "zh-CN"
        elif tag.startswith("en") or tag == "*":
            candidate = "en"
        else:
            continue
        if q > best_q:
            best, best_q = candidate, q
    return best


class DomainError(Exception):
    """Base of every error a service raises on purpose."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: Sequence[FieldError] | None = None,
        headers: dict[str, str] | None = None,
        code: str | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(detail or self.code)
        self.detail = detail
        self.errors = list(errors) if errors else None
        self.headers = headers or {}
        self.code_override = code
        self.extra = extra or {}

    @property
    def problem_code(self) -> str:
        return self.code_override or self.code


class InvalidInput(DomainError):
    status = 422
    code = "validation_error"

    @classmethod
    def field(cls, field: str, msg: str) -> InvalidInput:
        return cls(errors=[FieldError(field=field, message=msg)])


class NotFound(DomainError):
    status = 404
    code = "not_found"


class Unauthorized(DomainError):
    status = 401
    code = "unauthorized"


class Forbidden(DomainError):
    status = 403
    code = "forbidden"


class Conflict(DomainError):
    status = 409
    code = "conflict"


class SlotFull(Conflict):
    """The resource has fewer free seats than asked for somewhere in the span."""

    code = "slot_full"


class HoldExpired(Conflict):
    code = "hold_expired"


class SlotUnavailable(Conflict):
    """The start is not a slot of the service (off the grid, closed, nobody on shift)."""

    code = "slot_unavailable"


class IdempotencyKeyReused(InvalidInput):
    code = "idempotency_key_reused"


class BookingNotActive(Conflict):
    code = "booking_not_active"


class BookingCheckedIn(Conflict):
    """The booking is checked in: it lives on as a queue ticket until that ends."""

    code = "booking_checked_in"


class IdempotencyKeyInProgress(Conflict):
    """Another request with the same key has not finished yet (try again shortly)."""

    code = "idempotency_key_in_progress"


class CapacityInUse(Conflict):
    """A capacity change (a lower capacity, a deactivation, less time on shift) would
    leave some current or future unit with more seats used than exist."""

    code = "capacity_in_use"


class RateLimited(DomainError):
    status = 429
    code = "rate_limited"


class ServiceUnavailable(DomainError):
    status = 503
    code = "service_unavailable"


DATABASE_RETRY_AFTER_S = 2


class DatabaseUnavailable(ServiceUnavailable):
    """PostgreSQL cannot be reached (down, restarting, every connection busy too long)."""

    code = "database_unavailable"

    def __init__(self, detail: str | None = None) -> None:
        super().__init__(detail, headers={"retry-after": str(DATABASE_RETRY_AFTER_S)})


def _request_id(request: Request[Any, Any, Any]) -> str | None:
    rid = request.scope.get("state", {}).get("request_id")
    return rid if isinstance(rid, str) else None


def problem_response(
    request: Request[Any, Any, Any],
    *,
    status: int,
    code: str,
    detail: str | None = None,
    errors: Sequence[FieldError] | None = None,
    headers: dict[str, str] | None = None,
    extra: dict[str, Any] | None = None,
) -> Response[Any]:
    """A problem response; `extra` adds extension members (RFC 9457 section 3.2), e.g.
    the check-in window of a `check_in_too_early`, never overriding the standard ones."""
    locale = negotiate_locale(request.headers.get("accept-language"))
    body = Problem(
        type=TYPE_BASE + code,
        title=HTTPStatus(status).phrase,
        status=status,
        detail=detail or message(code, locale),
        code=code,
        instance=request.url.path,
        request_id=_request_id(request),
        errors=list(errors) if errors else None,
    )
    content: Any = body
    if extra:
        content = {**extra, **msgspec.structs.asdict(body)}
        content = {k: v for k, v in content.items() if v is not None}
    return Response(
        content=content,
        status_code=status,
        media_type=PROBLEM_MEDIA_TYPE,
        headers={"content-language": locale, **(headers or {})},
    )


def _domain_handler(request: Request[Any, Any, Any], exc: DomainError) -> Response[Any]:
    return problem_response(
        request,
        status=exc.status,
        code=exc.problem_code,
        detail=exc.detail,
        errors=exc.errors,
        headers=exc.headers,
        extra=exc.extra,
    )


_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]+)`")
_EXAMPLE_INSTANT = "2030-03-04T10:00:00+08:00"
_HUMANE: tuple[tuple[str, str], ...] = (
    (
        "Invalid RFC3339 encoded datetime",
        "expected an RFC 3339 date-time with a UTC offset (Z or ±HH:MM), "
        f"e.g. {_EXAMPLE_INSTANT} or 2030-03-04T02:00:00Z",
    ),
    (
        "Expected `datetime` with a timezone component",
        "the date-time needs a UTC offset (Z or ±HH:MM), e.g. " + _EXAMPLE_INSTANT,
    ),
    ("Invalid RFC3339 encoded date", "expected a date YYYY-MM-DD, e.g. 2030-03-04"),
    ("Invalid RFC3339 encoded time", "expected a time HH:MM:SS, e.g. 10:00:00"),
)


def humane(msg: str) -> str:
    """msgspec's terse messages, said with what is expected and an example."""
    for terse, better in _HUMANE:
        if msg.startswith(terse):
            return better
    if msg.startswith("Expected `datetime`, got"):
        return f"expected an RFC 3339 date-time with a UTC offset, e.g. {_EXAMPLE_INSTANT}"
    if msg.startswith("Expected `date`, got"):
        return "expected a date YYYY-MM-DD, e.g. 2030-03-04"
    return msg


def _public_names(request: Request[Any, Any, Any]) -> dict[str, str]:
    """Handler parameter name -> the name the client uses (a query alias like `from`)."""
    try:
        parameters = request.route_handler.parsed_fn_signature.parameters
    except Exception:  # no handler resolved (routing errors): nothing to rename
        return {}
    out: dict[str, str] = {}
    for name, field in parameters.items():
        alias = getattr(field.kwarg_definition, "name", None)
        if isinstance(alias, str) and alias and alias != name:
            out[name] = alias
    return out


_AT_PATH = re.compile(r" - at `\$\.?([^`]*)`$")


def _validation_errors(extra: Any, names: dict[str, str] | None = None) -> list[FieldError]:
    """Litestar/msgspec validation details -> [{field, message}] naming the real field
    (as the client spells it: query aliases, not handler parameter names)."""
    names = names or {}
    out: list[FieldError] = []
    if isinstance(extra, list):
        for item in extra:
            if isinstance(item, dict):
                key = str(item.get("key") or item.get("source") or "body")
                msg = str(item.get("message", "invalid value"))
                unknown = _UNKNOWN_FIELD.search(msg)
                at = _AT_PATH.search(msg)
                if unknown:
                    # Litestar puts a nested object's path in `key` and drops the " - at".
                    nested = "" if key in ("data", "body") else key
                    prefix = at.group(1) if at and at.group(1) else nested
                    key = f"{prefix}.{unknown.group(1)}" if prefix else unknown.group(1)
                elif key == "data":
                    key = at.group(1) if at and at.group(1) else "body"
                    if msg == "'data'":  # the body was empty
                        msg = "a JSON body is required"
                head, dot, rest = key.partition(".")
                key = names.get(head, head) + dot + rest
                out.append(FieldError(field=key, message=humane(msg)))
    return out


def _http_handler(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    status = exc.status_code
    headers = dict(exc.headers or {})
    if isinstance(exc, ValidationException):
        detail = str(exc.detail or "")
        errors = _validation_errors(exc.extra, _public_names(request))
        if "malformed" in detail.lower() or "json is malformed" in detail.lower():
            return problem_response(request, status=400, code="malformed_body", errors=errors)
        if not errors:
            errors = [FieldError(field="body", message=detail or "invalid value")]
        return problem_response(request, status=422, code="validation_error", errors=errors)
    if status == 400:
        text = str(exc.detail or "")
        looks_like_body = any(
            w in text.lower() for w in ("json", "truncated", "malformed", "decode")
        )
        if looks_like_body or request.method in ("POST", "PUT", "PATCH"):
            return problem_response(request, status=400, code="malformed_body")
        return problem_response(request, status=400, code="bad_request", detail=text or None)
    if isinstance(exc, RequestEntityTooLarge):
        code = "body_too_large"
    elif isinstance(exc, NotFoundException):
        code = "not_found"
    elif isinstance(exc, NotAuthorizedException):
        code = "unauthorized"
    elif isinstance(exc, PermissionDeniedException):
        code = "forbidden"
    elif isinstance(exc, MethodNotAllowedException):
        code = "method_not_allowed"
    elif status == 413:
        code = "body_too_large"
    elif status >= 500:
        code = "internal_error"
    else:
        code = HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    return problem_response(request, status=status, code=code, headers=headers)


def _internal_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled_error", path=request.url.path, error=type(exc).__name__)
    return problem_response(request, status=500, code="internal_error")


_UNSTORABLE = (
    asyncpg.exceptions.CharacterNotInRepertoireError,  # NUL in text
    asyncpg.exceptions.UntranslatableCharacterError,  # \u0000 in jsonb
)


def _data_handler(request: Request[Any, Any, Any], exc: asyncpg.DataError) -> Response[Any]:
    """A client value PostgreSQL cannot hold is bad input (422), not a server fault."""
    text = str(exc)
    encoding = text.startswith("invalid input for query argument") and (
        "out of" in text or "surrogates not allowed" in text
    )
    if isinstance(exc, _UNSTORABLE) or encoding:
        # asyncpg could not encode an argument: a number or date out of range, a bad character
        return problem_response(
            request,
            status=422,
            code="validation_error",
            errors=[FieldError("body", "contains a value that cannot be stored")],
        )
    return _internal_handler(request, exc)


def _unavailable_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """PostgreSQL went away under a request (restart, failover, lost connection) or a
    statement ran past its timeout: 503 with Retry-After, never a 500. What the request
    wrote is rolled back unless its commit was under way: a client that must know
    retries with the same Idempotency-Key."""
    log.warning(
        "dependency_unavailable", path=request.url.path, error=type(exc).__name__, detail=str(exc)
    )
    code = "service_unavailable" if isinstance(exc, TimeoutError) else "database_unavailable"
    return problem_response(
        request,
        status=503,
        code=code,
        headers={"retry-after": str(DATABASE_RETRY_AFTER_S)},
    )


_CONNECTION_LOST = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
)


def _lost_connection(exc: BaseException) -> bool:
    """Whether a connection failure is behind `exc`: asyncpg reports a connection that
    died inside `async with conn.transaction()` as an InterfaceError ("the underlying
    connection is closed") raised while handling the real failure."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, _CONNECTION_LOST):
            return True
        if isinstance(cause, asyncpg.InternalClientError) and "cannot switch to state" in str(
            cause
        ):
            # The server's goodbye (e.g. 57P01) arrived on an idle pooled connection
            # just before the request used it: the protocol is still consuming it.
            return True
        cause = cause.__cause__ or cause.__context__
    return "connection is closed" in str(exc)


def _interface_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    if _lost_connection(exc):
        return _unavailable_handler(request, exc)
    return _internal_handler(request, exc)


EXCEPTION_HANDLERS: ExceptionHandlersMap = {
    DomainError: _domain_handler,
    HTTPException: _http_handler,
    asyncpg.DataError: _data_handler,
    # SQLSTATE classes 08 (connection) and 57 (server shutting down, starting up).
    asyncpg.PostgresConnectionError: _unavailable_handler,
    asyncpg.exceptions.OperatorInterventionError: _unavailable_handler,
    TimeoutError: _unavailable_handler,
    asyncpg.InterfaceError: _interface_handler,
    asyncpg.InternalClientError: _interface_handler,
    Exception: _internal_handler,
}

__all__ = [
    "EXCEPTION_HANDLERS",
    "MESSAGES",
    "PROBLEM_MEDIA_TYPE",
    "BookingCheckedIn",
    "BookingNotActive",
    "CapacityInUse",
    "Conflict",
    "DatabaseUnavailable",
    "DomainError",
    "FieldError",
    "Forbidden",
    "HoldExpired",
    "IdempotencyKeyInProgress",
    "IdempotencyKeyReused",
    "InvalidInput",
    "NotFound",
    "Problem",
    "RateLimited",
    "ServiceUnavailable",
    "SlotFull",
    "SlotUnavailable",
    "Unauthorized",
    "negotiate_locale",
    "problem_response",
]
