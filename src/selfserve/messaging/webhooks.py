"""Twilio webhooks: inbound SMS and delivery callbacks, both signature-checked."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Controller, Request, Response, post
from litestar.connection import ASGIConnection
from litestar.params import URLEncodedBody
from litestar.utils.scope.state import ScopeState
from twilio.request_validator import RequestValidator

from selfserve.context import AppSettings, DbPool
from selfserve.errors import Forbidden
from selfserve.messaging.inbound import apply_status, handle_inbound
from selfserve.openapi_util import problems
from selfserve.settings import Settings

TWIML = "application/xml"


class InboundSmsForm(msgspec.Struct, rename="pascal"):
    """The fields of Twilio's inbound-message webhook this service reads."""

    message_sid: str
    from_: str = msgspec.field(name="From")
    to: str = ""
    body: str = ""


class StatusCallbackForm(msgspec.Struct, rename="pascal"):
    message_sid: str
    message_status: str
    error_code: str | None = None


class _Params(dict[str, list[str]]):
    """Form fields with repeats kept, in the shape RequestValidator reads."""

    def getall(self, name: str) -> list[str]:
        return self[name]


def _form(raw: bytes) -> _Params | None:
    """The url-encoded form, or None when it cannot be what Twilio signed (not UTF-8)."""
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, errors="strict")
    except (UnicodeDecodeError, ValueError):
        return None
    params = _Params()
    for key, value in pairs:
        params.setdefault(key, []).append(value)
    return params


async def verify_twilio_signature(request: Request[Any, Any, Any], settings: Settings) -> None:
    """Check X-Twilio-Signature against the public URL Twilio called (TLS proxies:
    the URL is built from SELFSERVE_PUBLIC_BASE_URL, never from the Host header).

    Nothing of the body is trusted before this passes: no signature is 403 without
    reading it, and a body that is not UTF-8 cannot carry a valid signature. The form
    checked here is the one the handler then receives."""
    signature = request.headers.get("x-twilio-signature")
    token = settings.twilio_auth_token
    if not signature or not token:
        raise Forbidden(code="invalid_signature")
    url = settings.public_base_url + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    params = _form(await request.body())
    if params is None or not RequestValidator(token).validate(url, params, signature):
        raise Forbidden(code="invalid_signature")
    ScopeState.from_scope(request.scope).form = {
        key: values[0] if len(values) == 1 else values for key, values in params.items()
    }


async def twilio_signed(connection: ASGIConnection[Any, Any, Any, Any], _: object) -> None:
    """Guard: runs before the form is parsed into the handler's `data`."""
    if not isinstance(connection, Request):  # the webhooks are HTTP routes only
        raise Forbidden(code="invalid_signature")
    await verify_twilio_signature(connection, connection.app.state.settings)


class TwilioWebhookController(Controller):
    path = "/v1/webhooks/twilio"
    tags = ["SMS (Twilio)"]
    guards = [twilio_signed]

    @post(
        "/sms",
        operation_id="twilioInboundSms",
        summary="Inbound SMS from Twilio (answers TwiML)",
        description="Signed with `X-Twilio-Signature` over SELFSERVE_PUBLIC_BASE_URL + path; "
        "a bad or missing signature is 403 `invalid_signature` before anything happens. "
        "Each MessageSid is applied once. Keywords: Y/C/确认, N/X/取消, 1-5, STATUS/查询, "
        "STOP/TD/退订, START, HELP; anything else is kept for staff.",
        status_code=200,
        media_type=TWIML,
        responses=problems(403, 413, 422),
    )
    async def inbound_sms(
        self,
        request: Request[Any, Any, Any],
        data: URLEncodedBody[InboundSmsForm],
        pool: DbPool,
        settings: AppSettings,
    ) -> Response[str]:
        reply = await handle_inbound(
            pool,
            message_sid=data.message_sid,
            phone=data.from_,
            to=data.to,
            body=data.body,
            settings=settings,
            redis=request.app.state.redis,
        )
        return Response(reply, media_type=TWIML)

    @post(
        "/status",
        operation_id="twilioStatusCallback",
        summary="Delivery status callback from Twilio",
        description="Signature-checked like inbound SMS; idempotent; a late callback never "
        "moves a message backwards (`delivered` stays `delivered`). Error 21610 opts the "
        "number out.",
        status_code=204,
        responses=problems(403, 413, 422),
    )
    async def status_callback(
        self,
        request: Request[Any, Any, Any],
        data: URLEncodedBody[StatusCallbackForm],
        pool: DbPool,
        settings: AppSettings,
    ) -> None:
        await apply_status(
            pool,
            message_sid=data.message_sid,
            twilio_status=data.message_status,
            error_code=data.error_code,
        )
