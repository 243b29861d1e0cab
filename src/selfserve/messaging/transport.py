"""SMS transports: Twilio through the real `twilio` library (async client), or the
console when no Twilio credentials are configured (development).

A transport sends exactly one HTTP request per `send` and never retries on its own:
whether and when to try again is the send job's decision, made against the outbox
row. Errors come back as two kinds: `ProviderUnavailable` (try later: 429, 5xx,
network) and `ProviderRejected` (terminal: every other 4xx).
"""

from __future__ import annotations

import base64
import json
import logging
from contextvars import ContextVar
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Protocol

import aiohttp
import structlog
from twilio.base.exceptions import TwilioException
from twilio.http.async_http_client import AsyncTwilioHttpClient
from twilio.rest import Client

from selfserve.logs import mask_phone
from selfserve.messaging.models import SendReceipt, SmsRequest
from selfserve.settings import ConfigError, Settings

log = structlog.get_logger("selfserve.sms.transport")

STATUS_CALLBACK_PATH = "/v1/webhooks/twilio/status"
# One HTTP request to Twilio never takes longer than this. The send job's timeout
# (two requests at most: a lookup and a send) and the claim lease are larger.
HTTP_TIMEOUT_S = 20.0
# How many recent messages to one number a lookup reads (newest first).
LOOKUP_LIMIT = 50
# A Retry-After longer than this is treated as this (an hour of silence is plenty).
MAX_RETRY_AFTER_S = 3600.0


class ProviderError(Exception):
    def __init__(self, message: str, *, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.code = code


class ProviderUnavailable(ProviderError):
    """Try again later. `maybe_sent`: the request may have been accepted anyway."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        retry_after: float | None = None,
        maybe_sent: bool,
    ):
        super().__init__(message, status=status, code=code)
        self.retry_after = retry_after
        self.maybe_sent = maybe_sent


class ProviderRejected(ProviderError):
    """The provider refused this message; sending it again would be refused again."""


class SmsTransport(Protocol):
    name: str

    async def send(self, request: SmsRequest) -> SendReceipt:
        """Hand one message to the provider: one request, no retries."""
        ...

    async def find_sent(self, request: SmsRequest, *, since: datetime) -> list[SendReceipt]:
        """Messages the provider already holds for this recipient with this exact body,
        created at or after `since`, newest first."""
        ...

    async def close(self) -> None: ...


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), capped; None if absent."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    seconds = (when - (now or datetime.now(UTC))).total_seconds()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


# --- Twilio -----------------------------------------------------------------


class _ResponseSlot:
    __slots__ = ("response",)

    def __init__(self) -> None:
        self.response: Any = None


# The HTTP response behind the Twilio call running in this task. TwilioRestException
# carries the status and error code but not the headers, and a 429's Retry-After is
# in the headers. A context variable keeps concurrent jobs on one client apart.
_last_response: ContextVar[_ResponseSlot | None] = ContextVar(
    "selfserve_twilio_response", default=None
)

# twilio logs every request's URL and query (phone numbers) at INFO: keep it quieter.
_http_log = logging.getLogger("selfserve.sms.twilio_http")
_http_log.setLevel(logging.WARNING)


class OneShotTwilioHttpClient(AsyncTwilioHttpClient):  # type: ignore[misc]
    """twilio's aiohttp client with four changes:

    - no retries: `max_retries` stays None, so no aiohttp_retry `RetryClient` wraps
      the session and a create is sent exactly once per call;
    - the client's timeout applies to every request (the stock client hands the
      per-request timeout, None, to aiohttp, which then waits forever);
    - the response (headers included) is kept for the calling task;
    - the Basic credentials go in the Authorization header directly.
    """

    def __init__(self, timeout_s: float = HTTP_TIMEOUT_S) -> None:
        super().__init__(pool_connections=True, timeout=timeout_s, logger=_http_log)
        # A plain aiohttp session, not aiohttp_retry's RetryClient around one.
        assert isinstance(self.session, aiohttp.ClientSession), "the Twilio client must not retry"

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 (twilio's signature)
        allow_redirects: bool = False,
    ) -> Any:
        if auth is not None:
            # Basic auth written here: aiohttp deprecates its BasicAuth helper, which
            # the stock client would build from `auth`.
            credentials = base64.b64encode(f"{auth[0]}:{auth[1]}".encode("latin-1")).decode()
            headers = {**(headers or {}), "Authorization": f"Basic {credentials}"}
        response = await super().request(
            method,
            url,
            params=params,
            data=data,
            headers=headers,
            auth=None,
            timeout=timeout if timeout is not None else self.timeout,
            allow_redirects=allow_redirects,
        )
        slot = _last_response.get()
        if slot is not None:
            slot.response = response
        return response


def _error_code(response: Any) -> Any:
    try:
        payload = json.loads(response.text)
    except (AttributeError, TypeError, ValueError):
        return None
    return payload.get("code") if isinstance(payload, dict) else None


def _classify(exc: TwilioException, response: Any) -> ProviderError:
    status = getattr(exc, "status", None)
    raw_code = getattr(exc, "code", None)
    if not isinstance(status, int) and response is not None:
        # A failed list comes back as a bare TwilioException: read the answer itself.
        status = getattr(response, "status_code", None)
        raw_code = _error_code(response)
    code = str(raw_code) if raw_code is not None else None
    text = getattr(exc, "msg", None) or getattr(exc, "detail", None)
    if not text:
        text = exc.args[0] if exc.args else type(exc).__name__
    message = str(text)
    if not isinstance(status, int):
        # Not an HTTP error answer (e.g. a body twilio could not parse): unknown outcome.
        return ProviderUnavailable(message, code=code, maybe_sent=True)
    if status == 429 or status >= 500:
        headers = getattr(response, "headers", None) or {}
        return ProviderUnavailable(
            message,
            status=status,
            code=code,
            retry_after=parse_retry_after(headers.get("Retry-After")),
            # A 429 is refused before anything is created; a 5xx may hide a success.
            maybe_sent=status >= 500,
        )
    return ProviderRejected(message, status=status, code=code)


class TwilioTransport:
    name = "twilio"

    def __init__(
        self,
        *,
        account_sid: str,
        auth_token: str,
        from_number: str,
        api_base_url: str,
        status_callback: str,
        timeout_s: float = HTTP_TIMEOUT_S,
    ) -> None:
        self.from_number = from_number
        self.status_callback = status_callback
        self._http = OneShotTwilioHttpClient(timeout_s)
        self._client = Client(
            username=account_sid,
            password=auth_token,
            account_sid=account_sid,
            http_client=self._http,
            # Only what is passed here: no TWILIO_EDGE / TWILIO_REGION from the process
            # environment rewriting the host of a configured base URL.
            environment={"TWILIO_ACCOUNT_SID": account_sid},
        )
        # The Api domain (api.twilio.com) builds every Messages URL from this base, so
        # Twilio-compatible gateways and local test servers work unchanged.
        self._client.api.base_url = api_base_url.rstrip("/")

    async def _call(self, operation: str, **kwargs: Any) -> Any:
        slot = _ResponseSlot()
        token = _last_response.set(slot)
        messages = self._client.messages
        try:
            if operation == "create":
                return await messages.create_async(**kwargs)
            return await messages.list_async(**kwargs)
        except TwilioException as exc:
            raise _classify(exc, slot.response) from exc
        except aiohttp.ClientConnectorError as exc:
            # The connection was never made, so the request never left.
            raise ProviderUnavailable(f"cannot connect: {exc}", maybe_sent=False) from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            # The request may have arrived and been acted on; its answer was lost.
            raise ProviderUnavailable(
                f"{type(exc).__name__}: {exc}", maybe_sent=operation == "create"
            ) from exc
        finally:
            _last_response.reset(token)

    async def send(self, request: SmsRequest) -> SendReceipt:
        created = await self._call(
            "create",
            to=request.phone,
            from_=self.from_number,
            body=request.body,
            status_callback=self.status_callback,
        )
        return SendReceipt(
            provider_sid=str(created.sid),
            status=str(created.status or "queued"),
            created_at=created.date_created,
        )

    async def find_sent(self, request: SmsRequest, *, since: datetime) -> list[SendReceipt]:
        found = await self._call(
            "list",
            to=request.phone,
            from_=self.from_number,
            limit=LOOKUP_LIMIT,
            page_size=LOOKUP_LIMIT,
        )
        return [
            SendReceipt(
                provider_sid=str(m.sid), status=str(m.status or ""), created_at=m.date_created
            )
            for m in found
            if m.sid
            and m.body == request.body
            and m.date_created is not None
            and m.date_created >= since
        ]

    async def close(self) -> None:
        await self._http.close()


# --- console (development) ----------------------------------------------------


class ConsoleTransport:
    """No provider: the message is logged (phone masked) and recorded as sent under
    a `console-<id>` sid, so it shows in the message log like any other."""

    name = "console"

    def __init__(self, *, show_body: bool = True) -> None:
        self.show_body = show_body

    async def send(self, request: SmsRequest) -> SendReceipt:
        log.info(
            "sms_console",
            message_id=request.message_id,
            phone=mask_phone(request.phone),
            body=request.body if self.show_body else f"<{len(request.body)} characters>",
        )
        return SendReceipt(provider_sid=f"console-{request.message_id}", status="sent")

    async def find_sent(self, request: SmsRequest, *, since: datetime) -> list[SendReceipt]:
        return []  # nothing ever left this process: sending again is safe

    async def close(self) -> None:
        return None


def build_transport(settings: Settings) -> SmsTransport:
    """Twilio when credentials are set, else the console."""
    if settings.twilio_account_sid and settings.twilio_auth_token:
        if not settings.twilio_from:
            raise ConfigError("SELFSERVE_TWILIO_FROM is required with Twilio credentials")
        return TwilioTransport(
            account_sid=settings.twilio_account_sid,
            auth_token=settings.twilio_auth_token,
            from_number=settings.twilio_from,
            api_base_url=settings.twilio_api_base_url,
            status_callback=settings.public_base_url + STATUS_CALLBACK_PATH,
        )
    if settings.twilio_account_sid or settings.twilio_auth_token:
        raise ConfigError("set both TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN, or neither")
    if settings.is_production:
        log.warning("sms_console_transport", detail="no Twilio credentials: SMS are not sent")
    # In production the body may hold a sign-in code: keep it out of the logs.
    return ConsoleTransport(show_body=not settings.is_production)
