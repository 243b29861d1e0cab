"""Auth endpoints: staff login, kiosk device login, refresh rotation."""

from __future__ import annotations

from litestar import Controller, post
from litestar.params import JSONBody

from selfserve.auth import service
from selfserve.auth.models import DeviceLogin, RefreshRequest, StaffLogin, TokenPair
from selfserve.context import AppSettings, DbPool
from selfserve.openapi_util import problems


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
        responses=problems(400, 401, 422),
    )
    async def staff_login(
        self, data: JSONBody[StaffLogin], pool: DbPool, settings: AppSettings
    ) -> TokenPair:
        return await service.staff_login(pool, settings, data.email, data.password)

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
