"""Catalogue HTTP: public reads and admin CRUD (create, list, get, patch, deactivate)."""

from __future__ import annotations

from typing import Annotated, Any

from litestar import Controller, Request, Router, get, patch, post
from litestar.params import JSONBody, PathParameter, QueryParameter

from selfserve.auth.guards import ADMIN_READERS, ADMIN_WRITERS, Caller, require
from selfserve.catalog import service as svc
from selfserve.catalog.models import (
    MAX_BIGINT,
    Branch,
    BranchCreate,
    BranchPage,
    BranchUpdate,
    Device,
    DeviceCreate,
    DevicePage,
    DeviceUpdate,
    DeviceWithSecret,
    Queue,
    QueueCreate,
    QueuePage,
    QueueUpdate,
    Resource,
    ResourceCreate,
    ResourcePage,
    ResourceUpdate,
    Schedule,
    ScheduleCreate,
    SchedulePage,
    ScheduleUpdate,
    Service,
    ServiceCreate,
    ServicePage,
    ServiceUpdate,
    StaffAccount,
    StaffCreate,
    StaffPage,
    StaffUpdate,
)
from selfserve.context import DbPool
from selfserve.openapi_util import problems
from selfserve.queueing.live import announce_rights_change

PathId = Annotated[int, PathParameter(le=MAX_BIGINT)]
Limit = Annotated[int, QueryParameter(ge=1, le=200, description="Page size (max 200)")]
Cursor = Annotated[str | None, QueryParameter(description="`next_cursor` of the previous page")]
BranchFilter = Annotated[
    int | None, QueryParameter(ge=1, le=MAX_BIGINT, description="Only this branch")
]
Inactive = Annotated[bool, QueryParameter(description="Include deactivated records")]

READ_ERRORS = problems(401, 403, 422)
ONE_ERRORS = problems(401, 403, 404)
CREATE_ERRORS = problems(400, 401, 403, 413, 422)
WRITE_ERRORS = problems(400, 401, 403, 404, 413, 422)
RESIZE_ERRORS = problems(400, 401, 403, 404, 409, 413, 422)
RETIRE_ERRORS = problems(401, 403, 404, 409)
SECURITY: list[dict[str, list[str]]] = [{"BearerToken": []}]


# --- public catalogue --------------------------------------------------------


class PublicCatalogueController(Controller):
    path = "/v1/branches"
    tags = ["Catalogue"]

    @get("/", operation_id="listBranches", summary="Active branches", responses=problems(422))
    async def list_branches(
        self, pool: DbPool, limit: Limit = 50, cursor: Cursor = None
    ) -> BranchPage:
        items, nxt = await svc.list_branches(
            pool, principal=None, public=True, limit=limit, cursor=cursor
        )
        return BranchPage(items=items, next_cursor=nxt)

    @get(
        "/{branch_id:int}", operation_id="getBranch", summary="One branch", responses=problems(404)
    )
    async def get_branch(self, pool: DbPool, branch_id: PathId) -> Branch:
        return await svc.get_branch(pool, branch_id, public=True)

    @get(
        "/{branch_id:int}/services",
        operation_id="listBranchServices",
        summary="Services offered at a branch",
        responses=problems(404, 422),
    )
    async def list_branch_services(
        self, pool: DbPool, branch_id: PathId, limit: Limit = 50, cursor: Cursor = None
    ) -> ServicePage:
        await svc.get_branch(pool, branch_id, public=True)
        items, nxt = await svc.list_services(
            pool,
            principal=None,
            branch_id=branch_id,
            limit=limit,
            cursor=cursor,
            only_active=True,
        )
        return ServicePage(items=items, next_cursor=nxt)


# --- admin -------------------------------------------------------------------


class AdminBranchController(Controller):
    path = "/v1/admin/branches"
    tags = ["Admin: branches"]
    guards = [require(*ADMIN_READERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createBranch",
        summary="Create a branch (admin)",
        responses=CREATE_ERRORS,
        guards=[require("admin")],
    )
    async def create(self, pool: DbPool, principal: Caller, data: JSONBody[BranchCreate]) -> Branch:
        return await svc.create_branch(pool, principal, data)

    @get("/", operation_id="adminListBranches", summary="Branches in scope", responses=READ_ERRORS)
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        limit: Limit = 50,
        cursor: Cursor = None,
        include_inactive: Inactive = False,
    ) -> BranchPage:
        items, nxt = await svc.list_branches(
            pool,
            principal=principal,
            public=False,
            limit=limit,
            cursor=cursor,
            include_inactive=include_inactive,
        )
        return BranchPage(items=items, next_cursor=nxt)

    @get(
        "/{branch_id:int}",
        operation_id="adminGetBranch",
        summary="One branch",
        responses=ONE_ERRORS,
    )
    async def get(self, pool: DbPool, principal: Caller, branch_id: PathId) -> Branch:
        return await svc.get_branch(pool, branch_id, principal=principal)

    @patch(
        "/{branch_id:int}",
        operation_id="updateBranch",
        summary="Update a branch",
        responses=WRITE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def update(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: PathId,
        data: JSONBody[BranchUpdate],
    ) -> Branch:
        return await svc.update_branch(pool, principal, branch_id, data)

    @post(
        "/{branch_id:int}/deactivate",
        operation_id="deactivateBranch",
        status_code=200,
        summary="Deactivate a branch (admin)",
        responses=ONE_ERRORS,
        guards=[require("admin")],
    )
    async def deactivate(self, pool: DbPool, principal: Caller, branch_id: PathId) -> Branch:
        return await svc.deactivate_branch(pool, principal, branch_id)


class AdminServiceController(Controller):
    path = "/v1/admin/services"
    tags = ["Admin: services"]
    guards = [require(*ADMIN_READERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createService",
        summary="Create a service",
        responses=CREATE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def create(
        self, pool: DbPool, principal: Caller, data: JSONBody[ServiceCreate]
    ) -> Service:
        return await svc.create_service(pool, principal, data)

    @get("/", operation_id="adminListServices", summary="Services in scope", responses=READ_ERRORS)
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: BranchFilter = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        include_inactive: Inactive = False,
    ) -> ServicePage:
        items, nxt = await svc.list_services(
            pool,
            principal=principal,
            branch_id=branch_id,
            limit=limit,
            cursor=cursor,
            only_active=not include_inactive,
        )
        return ServicePage(items=items, next_cursor=nxt)

    @get(
        "/{service_id:int}",
        operation_id="adminGetService",
        summary="One service",
        responses=ONE_ERRORS,
    )
    async def get(self, pool: DbPool, principal: Caller, service_id: PathId) -> Service:
        return await svc.get_service(pool, service_id, principal)

    @patch(
        "/{service_id:int}",
        operation_id="updateService",
        summary="Update a service",
        responses=WRITE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def update(
        self,
        pool: DbPool,
        principal: Caller,
        service_id: PathId,
        data: JSONBody[ServiceUpdate],
    ) -> Service:
        return await svc.update_service(pool, principal, service_id, data)

    @post(
        "/{service_id:int}/deactivate",
        operation_id="deactivateService",
        status_code=200,
        summary="Deactivate a service",
        responses=ONE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def deactivate(self, pool: DbPool, principal: Caller, service_id: PathId) -> Service:
        return await svc.deactivate_service(pool, principal, service_id)


class AdminResourceController(Controller):
    path = "/v1/admin/resources"
    tags = ["Admin: resources"]
    guards = [require(*ADMIN_READERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createResource",
        summary="Create a counter, staff member or room",
        responses=CREATE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def create(
        self, pool: DbPool, principal: Caller, data: JSONBody[ResourceCreate]
    ) -> Resource:
        return await svc.create_resource(pool, principal, data)

    @get(
        "/", operation_id="adminListResources", summary="Resources in scope", responses=READ_ERRORS
    )
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: BranchFilter = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        include_inactive: Inactive = False,
    ) -> ResourcePage:
        items, nxt = await svc.list_resources(
            pool,
            principal=principal,
            branch_id=branch_id,
            limit=limit,
            cursor=cursor,
            include_inactive=include_inactive,
        )
        return ResourcePage(items=items, next_cursor=nxt)

    @get(
        "/{resource_id:int}",
        operation_id="adminGetResource",
        summary="One resource",
        responses=ONE_ERRORS,
    )
    async def get(self, pool: DbPool, principal: Caller, resource_id: PathId) -> Resource:
        return await svc.get_resource(pool, principal, resource_id)

    @patch(
        "/{resource_id:int}",
        operation_id="updateResource",
        summary="Update a resource",
        description=(
            "A new `capacity` applies through the capacity ledger from the current "
            "5-minute unit on; 409 `capacity_in_use` (naming the bookings) when seats "
            "already taken would not fit."
        ),
        responses=RESIZE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def update(
        self,
        pool: DbPool,
        principal: Caller,
        resource_id: PathId,
        data: JSONBody[ResourceUpdate],
    ) -> Resource:
        return await svc.update_resource(pool, principal, resource_id, data)

    @post(
        "/{resource_id:int}/deactivate",
        operation_id="deactivateResource",
        status_code=200,
        summary="Deactivate a resource",
        description=(
            "409 `capacity_in_use` (naming the bookings) while bookings or holds still "
            "have seats on it from now on."
        ),
        responses=RETIRE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def deactivate(self, pool: DbPool, principal: Caller, resource_id: PathId) -> Resource:
        return await svc.deactivate_resource(pool, principal, resource_id)


class AdminScheduleController(Controller):
    path = "/v1/admin/schedules"
    tags = ["Admin: schedules"]
    guards = [require(*ADMIN_READERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createSchedule",
        summary="Add a weekly shift or a dated exception to a resource",
        description="`kind: shift` takes weekday + start/end in branch wall time; "
        "`kind: exception` takes an instant range (`available: false` = off). "
        "Overlapping shifts of one resource are refused with 422 `overlapping_shift`; "
        "time off that would leave a booking or hold off shift with 409 `capacity_in_use` "
        "(also when updating or deactivating an entry).",
        responses={**CREATE_ERRORS, **problems(409)},
        guards=[require(*ADMIN_WRITERS)],
    )
    async def create(
        self, pool: DbPool, principal: Caller, data: JSONBody[ScheduleCreate]
    ) -> Schedule:
        return await svc.create_schedule(pool, principal, data)

    @get(
        "/",
        operation_id="adminListSchedules",
        summary="Schedule entries in scope",
        responses=READ_ERRORS,
    )
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: BranchFilter = None,
        resource_id: Annotated[int | None, QueryParameter(ge=1, le=MAX_BIGINT)] = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        include_inactive: Inactive = False,
    ) -> SchedulePage:
        items, nxt = await svc.list_schedules(
            pool,
            principal=principal,
            branch_id=branch_id,
            resource_id=resource_id,
            limit=limit,
            cursor=cursor,
            include_inactive=include_inactive,
        )
        return SchedulePage(items=items, next_cursor=nxt)

    @get(
        "/{schedule_id:int}",
        operation_id="adminGetSchedule",
        summary="One schedule entry",
        responses=ONE_ERRORS,
    )
    async def get(self, pool: DbPool, principal: Caller, schedule_id: PathId) -> Schedule:
        return await svc.get_schedule(pool, principal, schedule_id)

    @patch(
        "/{schedule_id:int}",
        operation_id="updateSchedule",
        summary="Update a schedule entry",
        responses=RESIZE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def update(
        self,
        pool: DbPool,
        principal: Caller,
        schedule_id: PathId,
        data: JSONBody[ScheduleUpdate],
    ) -> Schedule:
        return await svc.update_schedule(pool, principal, schedule_id, data)

    @post(
        "/{schedule_id:int}/deactivate",
        operation_id="deactivateSchedule",
        status_code=200,
        summary="Deactivate a schedule entry",
        responses=RETIRE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def deactivate(self, pool: DbPool, principal: Caller, schedule_id: PathId) -> Schedule:
        return await svc.deactivate_schedule(pool, principal, schedule_id)


class AdminQueueController(Controller):
    path = "/v1/admin/queues"
    tags = ["Admin: queues"]
    guards = [require(*ADMIN_READERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createQueue",
        summary="Create a walk-in queue",
        description="Its `service_ids` must be active services of the same branch. "
        "Two active queues of a branch never share a `prefix` (409 `already_exists`).",
        responses={**CREATE_ERRORS, **problems(409)},
        guards=[require(*ADMIN_WRITERS)],
    )
    async def create(self, pool: DbPool, principal: Caller, data: JSONBody[QueueCreate]) -> Queue:
        return await svc.create_queue(pool, principal, data)

    @get("/", operation_id="adminListQueues", summary="Queues in scope", responses=READ_ERRORS)
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: BranchFilter = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        include_inactive: Inactive = False,
    ) -> QueuePage:
        items, nxt = await svc.list_queues(
            pool,
            principal=principal,
            branch_id=branch_id,
            limit=limit,
            cursor=cursor,
            include_inactive=include_inactive,
        )
        return QueuePage(items=items, next_cursor=nxt)

    @get(
        "/{queue_id:int}",
        operation_id="adminGetQueue",
        summary="One queue",
        responses=ONE_ERRORS,
    )
    async def get(self, pool: DbPool, principal: Caller, queue_id: PathId) -> Queue:
        return await svc.get_queue(pool, principal, queue_id)

    @patch(
        "/{queue_id:int}",
        operation_id="updateQueue",
        summary="Update a queue",
        description="`service_ids` replaces the whole set.",
        responses={**WRITE_ERRORS, **problems(409)},
        guards=[require(*ADMIN_WRITERS)],
    )
    async def update(
        self,
        pool: DbPool,
        principal: Caller,
        queue_id: PathId,
        data: JSONBody[QueueUpdate],
    ) -> Queue:
        return await svc.update_queue(pool, principal, queue_id, data)

    @post(
        "/{queue_id:int}/deactivate",
        operation_id="deactivateQueue",
        status_code=200,
        summary="Deactivate a queue",
        description="It takes no new tickets, and its prefix is free for another queue.",
        responses=ONE_ERRORS,
        guards=[require(*ADMIN_WRITERS)],
    )
    async def deactivate(self, pool: DbPool, principal: Caller, queue_id: PathId) -> Queue:
        return await svc.deactivate_queue(pool, principal, queue_id)


class AdminDeviceController(Controller):
    path = "/v1/admin/devices"
    tags = ["Admin: devices"]
    guards = [require(*ADMIN_WRITERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createDevice",
        summary="Register a kiosk or display device",
        description="The response carries `secret` once; only its hash is stored.",
        responses=CREATE_ERRORS,
    )
    async def create(
        self, pool: DbPool, principal: Caller, data: JSONBody[DeviceCreate]
    ) -> DeviceWithSecret:
        return await svc.create_device(pool, principal, data)

    @get("/", operation_id="adminListDevices", summary="Devices in scope", responses=READ_ERRORS)
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: BranchFilter = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        include_inactive: Inactive = False,
    ) -> DevicePage:
        items, nxt = await svc.list_devices(
            pool,
            principal=principal,
            branch_id=branch_id,
            limit=limit,
            cursor=cursor,
            include_inactive=include_inactive,
        )
        return DevicePage(items=items, next_cursor=nxt)

    @get(
        "/{device_id:int}",
        operation_id="adminGetDevice",
        summary="One device",
        responses=ONE_ERRORS,
    )
    async def get(self, pool: DbPool, principal: Caller, device_id: PathId) -> Device:
        return await svc.get_device(pool, principal, device_id)

    @patch(
        "/{device_id:int}",
        operation_id="updateDevice",
        summary="Rename a device",
        responses=WRITE_ERRORS,
    )
    async def update(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        principal: Caller,
        device_id: PathId,
        data: JSONBody[DeviceUpdate],
    ) -> Device:
        device = await svc.update_device(pool, principal, device_id, data)
        announce_rights_change(request.app, f"device:{device_id}")  # its kind may have changed
        return device

    @post(
        "/{device_id:int}/deactivate",
        operation_id="deactivateDevice",
        status_code=200,
        summary="Revoke a device",
        description="Its tokens stop working at once.",
        responses=ONE_ERRORS,
    )
    async def deactivate(
        self, request: Request[Any, Any, Any], pool: DbPool, principal: Caller, device_id: PathId
    ) -> Device:
        device = await svc.deactivate_device(pool, principal, device_id)
        announce_rights_change(request.app, f"device:{device_id}")  # open boards end at once
        return device


class AdminStaffController(Controller):
    path = "/v1/admin/staff"
    tags = ["Admin: staff"]
    guards = [require(*ADMIN_WRITERS)]
    security = SECURITY

    @post(
        "/",
        operation_id="createStaff",
        summary="Create a staff, manager or admin account",
        description="Admins create any role; a manager creates `staff` in own branches.",
        responses={**CREATE_ERRORS, **problems(409)},
    )
    async def create(
        self, pool: DbPool, principal: Caller, data: JSONBody[StaffCreate]
    ) -> StaffAccount:
        return await svc.create_staff(pool, principal, data)

    @get("/", operation_id="adminListStaff", summary="Accounts in scope", responses=READ_ERRORS)
    async def list(
        self,
        pool: DbPool,
        principal: Caller,
        branch_id: BranchFilter = None,
        limit: Limit = 50,
        cursor: Cursor = None,
        include_inactive: Inactive = False,
    ) -> StaffPage:
        items, nxt = await svc.list_staff(
            pool,
            principal=principal,
            branch_id=branch_id,
            limit=limit,
            cursor=cursor,
            include_inactive=include_inactive,
        )
        return StaffPage(items=items, next_cursor=nxt)

    @get(
        "/{staff_id:int}", operation_id="adminGetStaff", summary="One account", responses=ONE_ERRORS
    )
    async def get(self, pool: DbPool, principal: Caller, staff_id: PathId) -> StaffAccount:
        return await svc.get_staff(pool, principal, staff_id)

    @patch(
        "/{staff_id:int}",
        operation_id="updateStaff",
        summary="Update an account",
        description="Changing password, role or branches revokes its refresh tokens.",
        responses=WRITE_ERRORS,
    )
    async def update(
        self,
        request: Request[Any, Any, Any],
        pool: DbPool,
        principal: Caller,
        staff_id: PathId,
        data: JSONBody[StaffUpdate],
    ) -> StaffAccount:
        account = await svc.update_staff(pool, principal, staff_id, data)
        announce_rights_change(request.app, f"staff:{staff_id}")  # role or branches may change
        return account

    @post(
        "/{staff_id:int}/deactivate",
        operation_id="deactivateStaff",
        status_code=200,
        summary="Deactivate an account",
        description="Its tokens stop working at once.",
        responses={**ONE_ERRORS, **problems(409)},
    )
    async def deactivate(
        self, request: Request[Any, Any, Any], pool: DbPool, principal: Caller, staff_id: PathId
    ) -> StaffAccount:
        account = await svc.deactivate_staff(pool, principal, staff_id)
        announce_rights_change(request.app, f"staff:{staff_id}")  # open boards end at once
        return account


ROUTERS: list[type[Controller] | Router] = [
    PublicCatalogueController,
    Router(
        path="/",
        route_handlers=[
            AdminBranchController,
            AdminServiceController,
            AdminResourceController,
            AdminScheduleController,
            AdminQueueController,
            AdminDeviceController,
            AdminStaffController,
        ],
    ),
]
