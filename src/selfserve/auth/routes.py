"""Auth endpoints: staff login, kiosk device login, refresh rotation."""

from __future__ import annotations

from typing import Any

from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody

from selfserve.auth import otp, service
from selfserve.auth.guards import Caller, require
from selfserve.auth.models import (
    CodeExchange,
    CodeRequest,
    CodeSent,
    DeviceLogin,
    Me,
    RefreshRequest,
    StaffLogin,
    TokenPair,
)
from selfserve.context import AppSettings, DbPool
from selfserve.db import to_struct
from selfserve.errors import NotFound, negotiate_locale
from selfserve.openapi_util import problems
from selfserve.phones import normalise_phone
from selfserve.ratelimit import client_address


class AuthController(Controller):
    path = "/v1/auth"
    tags = ["Identity"]

    @post(
        "/staff/login",
        operation_id="staffLogin",
        summary="Staff, manager or admin login",
        description="Email and password -> access token (role, branch scopes, channel `staff`) "
        "and a rotating refresh token.",
        status_code=200,
        responses=problems(
            400,
            401,
            422,
            429,
            503,
            s429="`login_throttled`: too many failures for this account or from this "
            "address; wait `Retry-After` seconds (delays double per failure, capped)",
        ),
    )
    async def staff_login(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[StaffLogin],
        pool: DbPool,
        redis: NamedDependency[Any],
        settings: AppSettings,
    ) -> TokenPair:
        address = client_address(
            request.client.host if request.client else None,
            request.headers.get("x-forwarded-for"),
            settings.trusted_proxies,
        )
        return await service.staff_login(
            pool, settings, data.email, data.password, redis=redis, client_address=address
        )

    @post(
        "/device",
        operation_id="deviceLogin",
        summary="Kiosk device login",
        description="`device_id` and the secret shown once at registration -> kiosk token "
        "scoped to the device's branch. A revoked device is refused.",
        status_code=200,
        responses=problems(400, 401, 422),
    )
    async def device_login(
        self, data: JSONBody[DeviceLogin], pool: DbPool, settings: AppSettings
    ) -> TokenPair:
        return await service.device_login(pool, settings, data.device_id, data.secret)

    @post(
        "/refresh",
        operation_id="refreshToken",
        summary="Rotate a refresh token",
        description="Spends the refresh token and returns a new pair. Presenting a spent "
        "token again revokes its whole family (`refresh_token_reused`).",
        status_code=200,
        responses=problems(400, 401, 422),
    )
    async def refresh(
        self, data: JSONBody[RefreshRequest], pool: DbPool, settings: AppSettings
    ) -> TokenPair:
        return await service.refresh(pool, settings, data.refresh_token)

    @post(
        "/otp",
        operation_id="requestSignInCode",
        summary="Text a one-time sign-in code to a phone",
        description="`phone` in international format. Rate-limited per phone, per client "
        "address and by a daily SMS budget (429 with `Retry-After`).",
        status_code=202,
        responses=problems(400, 422, 429, 503),
    )
    async def request_code(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CodeRequest],
        pool: DbPool,
        redis: NamedDependency[Any],
        settings: AppSettings,
    ) -> CodeSent:
        phone = normalise_phone(data.phone)
        address = client_address(
            request.client.host if request.client else None,
            request.headers.get("x-forwarded-for"),
            settings.trusted_proxies,
        )
        ttl = await otp.request_code(
            pool,
            redis,
            settings,
            phone=phone,
            client_address=address,
            accept_locale=negotiate_locale(request.headers.get("accept-language")),
        )
        return CodeSent(expires_in=ttl)

    @post(
        "/token",
        operation_id="exchangeSignInCode",
        summary="Exchange a texted code for customer tokens",
        description="Wrong, spent or expired codes are 401 (`invalid_code`, `code_expired`); "
        "after five wrong tries the code is locked (`code_locked`).",
        status_code=200,
        responses=problems(400, 401, 422),
    )
    async def exchange_code(
        self,
        request: Request[Any, Any, Any],
        data: JSONBody[CodeExchange],
        pool: DbPool,
        settings: AppSettings,
    ) -> TokenPair:
        return await otp.exchange_code(
            pool,
            settings,
            phone=normalise_phone(data.phone),
            code=data.code,
            channel=data.channel,
            locale=negotiate_locale(request.headers.get("accept-language")),
        )


class MeController(Controller):
    path = "/v1/me"
    tags = ["Identity"]
    security = [{"BearerToken": []}]

    @get(
        "/",
        operation_id="getMe",
        summary="The signed-in customer: profile, locale, SMS opt-out state",
        guards=[require("customer")],
        responses=problems(401, 403),
    )
    async def me(self, pool: DbPool, principal: Caller) -> Me:
        row = await pool.fetchrow(
            "SELECT c.id, c.phone, c.locale, "
            "EXISTS (SELECT 1 FROM sms_opt_outs o WHERE o.phone = c.phone) AS sms_opted_out "
            "FROM customers c WHERE c.id = $1",
            principal.id,
        )
        if row is None:
            raise NotFound()
        return to_struct(row, Me)
