"""Twilio webhooks: inbound SMS and delivery callbacks, both signature-checked."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl

import msgspec
from litestar import Controller, Request, Response, post
from litestar.params import URLEncodedBody
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


async def verify_twilio_signature(request: Request[Any, Any, Any], settings: Settings) -> None:
    """Check X-Twilio-Signature against the public URL Twilio called (TLS proxies:
    the URL is built from SELFSERVE_PUBLIC_BASE_URL, never from the Host header)."""
    signature = request.headers.get("x-twilio-signature")
    token = settings.twilio_auth_token
    if not signature or not token:
        raise Forbidden(code="invalid_signature")
    url = settings.public_base_url + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    params = _Params()
    for key, value in parse_qsl((await request.body()).decode(), keep_blank_values=True):
        params.setdefault(key, []).append(value)
    if not RequestValidator(token).validate(url, params, signature):
        raise Forbidden(code="invalid_signature")


class TwilioWebhookController(Controller):
    path = "/v1/webhooks/twilio"
    tags = ["SMS (Twilio)"]

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
        await verify_twilio_signature(request, settings)
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
        await verify_twilio_signature(request, settings)
        await apply_status(
            pool,
            message_sid=data.message_sid,
            twilio_status=data.message_status,
            error_code=data.error_code,
        )
