"""Live events for boards and customers' phones.

Each change at a branch (a ticket issued, called, moved, finished, a counter opened)
publishes, after commit, a fresh `board` snapshot (`service.board_snapshot`) on the
channel `branch:<id>`, and a `ticket_called` event when a ticket is called or
recalled. Publishing goes through Litestar's channels plugin; with its Redis backend
an event published by one API process reaches the subscribers of every other.

Readers: `WS /v1/branches/{id}/live` (`serve_board`: the board feed) and
`GET /v1/tickets/{id}/events` (`ticket_stream`: Server-Sent Events for one ticket).

Redis is a messenger here, never a store: if it is down, writes still commit (a
publish that fails is logged and dropped), readers keep their connection and the
listener reconnects and subscribes again; the next `board` snapshot catches up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager, suppress
from datetime import datetime
from functools import lru_cache
from typing import Any, Final

import anyio
import asyncpg
import msgspec
import structlog
from litestar import Litestar
from litestar.channels import ChannelsPlugin
from litestar.channels.backends.base import ChannelsBackend
from litestar.connection import ASGIConnection, WebSocket
from litestar.exceptions import WebSocketDisconnect
from litestar.handlers.base import BaseRouteHandler
from litestar.response import ServerSentEventMessage
from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from selfserve.auth.guards import Guard, authenticate, current_rights, token_expiry
from selfserve.auth.tokens import Principal
from selfserve.errors import Forbidden, Unauthorized
from selfserve.queueing import eta as eta_model
from selfserve.queueing import service as svc
from selfserve.queueing.models import TicketOut
from selfserve.queueing.service import board_snapshot
from selfserve.settings import Settings

log = structlog.get_logger("selfserve.live")

BOARD_ROLES: Final = ("kiosk", "display", "staff", "manager", "admin")
TICKET_WATCHERS: Final = ("kiosk", "staff", "manager", "admin")  # and the ticket's customer
FINAL_STATUSES: Final = frozenset({"done", "no_show", "cancelled"})
KEEPALIVE_S: Final = 15.0
"""An SSE comment this often keeps proxies from cutting an idle stream."""
SSE_RETRY_MS: Final = 3000
INBOX_SIZE: Final = 256
"""Events held for one slow reader; past it the oldest go (a newer board supersedes)."""
REDIS_RETRY_S: Final = 1.0
REDIS_RETRY_MAX_S: Final = 30.0

# WebSocket close codes of the board feed (4000-4999: application defined).
WS_UNAUTHORIZED: Final = 4401  # token missing, invalid, expired or revoked
WS_FORBIDDEN: Final = 4403  # a role that never reads boards, or rights lost while open
WS_NOT_FOUND: Final = 4404  # no such (active) branch, or one outside the caller's scope
WS_UNAVAILABLE: Final = 1011  # the live feed is not running in this process


def branch_channel(branch_id: int) -> str:
    return f"branch:{branch_id}"


RIGHTS_CHANNEL: Final = "rights"
"""Subjects (`device:5`, `staff:7`) whose rights were just taken away or changed."""


# --- the channels backend ------------------------------------------------------------


class RedisLiveBackend(ChannelsBackend):
    """Redis pub/sub for Litestar's channels plugin, namespaced and fault tolerant.

    Pub/sub channels are global to a Redis server (whatever the db index), so every
    channel is sent as `<prefix>:<channel>`; deployments and test runs sharing one
    server keep apart by prefix. The backend owns its own Redis client, created on
    startup and closed on shutdown (the plugin's lifespan).

    Unlike Litestar's `RedisChannelsPubSubBackend`, a Redis failure never escapes:
    `publish` logs and drops (the plugin's publishing task would otherwise die and
    its queue never drain), `subscribe` / `unsubscribe` only record what is wanted,
    and the listener reconnects and brings the subscriptions back in line."""

    def __init__(self, url: str, prefix: str) -> None:
        self._url = url
        self._prefix = prefix + ":"
        self._redis: Redis | None = None
        self._pubsub: PubSub | None = None
        self._wanted: set[str] = set()
        self._subscribed: set[str] = set()
        self._stale = True  # the pub/sub connection must be (re)built before use
        self._failures = 0  # in a row; for the reconnection backoff and quieter logs
        self._lock: asyncio.Lock | None = None
        self._wake: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self._redis is not None

    async def on_startup(self) -> None:
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._wanted = set()
        self._subscribed = set()
        self._stale = True
        self._failures = 0
        self._redis = Redis.from_url(
            self._url, socket_connect_timeout=5, socket_timeout=5, health_check_interval=30
        )

    async def on_shutdown(self) -> None:
        redis, pubsub = self._redis, self._pubsub
        self._redis = self._pubsub = None
        self._subscribed = set()
        if pubsub is not None:
            with suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
        if redis is not None:
            await redis.aclose()

    async def publish(self, data: bytes, channels: Iterable[str]) -> None:
        if self._redis is None:
            return
        try:
            for channel in set(channels):
                await self._redis.publish(self._prefix + channel, data)
        except (RedisError, OSError) as exc:
            log.warning("live_publish_failed", error=repr(exc))

    async def subscribe(self, channels: Iterable[str]) -> None:
        self._wanted.update(channels)
        await self._apply()

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        self._wanted.difference_update(channels)
        await self._apply()

    async def _apply(self, *, listener: bool = False) -> None:
        """Make Redis' subscriptions match `_wanted`; on failure mark the connection
        stale for the listener to rebuild. Never raises a Redis error. While Redis is
        known to be down only the listener retries (with backoff): a reader arriving
        then is not held up, and is subscribed with the others on reconnection."""
        if self._lock is None or self._redis is None:
            return
        if self._failures and not listener:
            if self._wake is not None:
                self._wake.set()
            return
        async with self._lock:
            try:
                if self._stale:
                    if not self._wanted:
                        return  # nothing to listen to: connect when something is
                    await self._renew()
                assert self._pubsub is not None
                while add := self._wanted - self._subscribed:
                    await self._pubsub.subscribe(*(self._prefix + c for c in add))
                    self._subscribed |= add
                while drop := self._subscribed - self._wanted:
                    await self._pubsub.unsubscribe(*(self._prefix + c for c in drop))
                    self._subscribed -= drop
                self._stale = False
                if self._failures:
                    log.info("live_resubscribed", after_failures=self._failures)
                    self._failures = 0
            except (RedisError, OSError) as exc:
                self._stale = True
                self._failures += 1
                if self._failures == 1:  # once per outage, not once per retry
                    log.warning("live_subscribe_failed", error=repr(exc))
            finally:
                if self._wake is not None:
                    self._wake.set()

    async def _renew(self) -> None:
        assert self._redis is not None
        old, self._pubsub = self._pubsub, self._redis.pubsub()
        self._subscribed = set()
        if old is not None:
            with suppress(Exception):
                await old.aclose()  # type: ignore[no-untyped-call]
        await self._pubsub.connect()  # type: ignore[no-untyped-call]

    async def stream_events(self) -> AsyncGenerator[tuple[str, bytes], None]:
        """Messages of the wanted channels, as `(channel, data)`, for ever."""
        while True:
            pubsub = self._pubsub
            if self._stale or pubsub is None or not self._subscribed:
                if self._stale and self._wanted and self._redis is not None:
                    # back off (1 s, 2 s, 4 s ... 30 s), then reconnect and resubscribe
                    exponent = min(max(self._failures - 1, 0), 5)
                    await asyncio.sleep(min(REDIS_RETRY_S * 2**exponent, REDIS_RETRY_MAX_S))
                    await self._apply(listener=True)
                    continue
                assert self._wake is not None
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as exc:  # a dropped connection, or one closed under us
                if pubsub is self._pubsub:
                    self._stale = True
                    log.warning("live_listen_failed", error=repr(exc))
                continue
            if message is None or message.get("type") != "message":
                continue
            name = message["channel"]
            name = name.decode() if isinstance(name, bytes) else str(name)
            if not name.startswith(self._prefix):
                continue
            channel = name[len(self._prefix) :]
            if channel in self._wanted:
                yield channel, message["data"]

    async def get_history(self, channel: str, limit: int | None = None) -> list[bytes]:
        """Pub/sub keeps no history; the first message of every reader is a snapshot."""
        return []


class BoardPublisher:
    """At most one board of a branch is being computed in a process at a time; the
    changes that commit meanwhile are folded into one more board right after it.

    A board is a whole snapshot of the branch (at 3,000 waiting tickets tens of ms
    of Python), and a busy branch changes many times a second; every change is
    still followed by a board computed after its commit, so the last board always
    shows the last state."""

    def __init__(self) -> None:
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._dirty: set[int] = set()

    def request(self, branch_id: int, publish: Callable[[], Awaitable[None]]) -> None:
        if branch_id in self._tasks:
            self._dirty.add(branch_id)
            return
        self._tasks[branch_id] = asyncio.create_task(self._run(branch_id, publish))

    async def _run(self, branch_id: int, publish: Callable[[], Awaitable[None]]) -> None:
        try:
            while True:
                self._dirty.discard(branch_id)
                await publish()
                if branch_id not in self._dirty:
                    return
        finally:
            del self._tasks[branch_id]

    async def drain(self) -> None:
        """Wait for the boards being computed (at shutdown, before Redis goes)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks.values()), return_exceptions=True)


class LiveChannels(ChannelsPlugin):
    """The channels plugin on `RedisLiveBackend`, knowing whether it runs (it does
    not when the app is driven without its lifespan, e.g. by some test clients)."""

    def __init__(self, backend: RedisLiveBackend) -> None:
        super().__init__(
            backend,
            arbitrary_channels_allowed=True,
            subscriber_max_backlog=INBOX_SIZE,
            subscriber_backlog_strategy="dropleft",
        )
        self.live_backend = backend
        self.boards = BoardPublisher()

    @property
    def running(self) -> bool:
        return self.live_backend.running

    async def _on_shutdown(self) -> None:
        await self.boards.drain()
        await super()._on_shutdown()


def channels_plugin(settings: Settings) -> LiveChannels | None:
    """The plugin for `create_app`; None (no live feed) without a Redis URL."""
    if not settings.redis_url:
        return None
    return LiveChannels(RedisLiveBackend(settings.redis_url, settings.live_channel_prefix))


def _plugin(app: Litestar) -> LiveChannels | None:
    try:
        plugin = app.plugins.get(LiveChannels)
    except KeyError:
        return None
    return plugin if plugin.running else None


# --- publishing ----------------------------------------------------------------------


async def publish_branch(
    app: Litestar,
    pool: asyncpg.Pool,
    settings: Settings,
    branch_id: int,
    *,
    now: datetime,
    called: TicketOut | None = None,
    counter_name: str | None = None,
) -> None:
    """Publish the call, if any, at once, and have the branch's new board computed
    (`BoardPublisher`: in the background, folded with other changes of the moment).
    Never raises: the write is committed; a board that misses one event catches up
    with the next snapshot."""
    channels = _plugin(app)
    if channels is None:
        return
    channel = branch_channel(branch_id)
    if called is not None:
        event = {
            "type": "ticket_called",
            "branch_id": branch_id,
            "ticket_id": called.id,
            "display_code": called.display_code,
            "counter_id": called.counter_id,
            "counter": counter_name,
            "recalls": called.recalls,
            "at": now.isoformat(),
        }
        channels.publish(msgspec.json.encode(event), channels=[channel])

    async def board() -> None:
        try:
            async with pool.acquire() as conn:
                snapshot = await board_snapshot(conn, branch_id, svc.utcnow(), settings)
            channels.publish(msgspec.json.encode(snapshot), channels=[channel])
        except Exception:  # the write stands; log and go on
            log.exception("live_publish_failed", branch_id=branch_id)

    channels.boards.request(branch_id, board)


# --- reading -------------------------------------------------------------------------


def available(app: Litestar) -> bool:
    return _plugin(app) is not None


def announce_rights_change(app: Litestar, subject: str) -> None:
    """After a commit that may take rights away (a device or staff account
    deactivated, a device's kind or an account's role or branches changed): the open
    boards and ticket streams of `subject` (`device:5`, `staff:7`), in every API
    process, re-check at once instead of at their next periodic check. Best effort:
    a message Redis loses is made up for by the periodic check."""
    channels = _plugin(app)
    if channels is not None:
        channels.publish(subject.encode(), channels=[RIGHTS_CHANNEL])


@asynccontextmanager
async def subscription(app: Litestar, branch_id: int) -> AsyncIterator[asyncio.Queue[bytes]]:
    """The events of a branch from now on, in a bounded inbox; the subscription ends
    with the block however it is left (disconnect, cancellation, error)."""
    async with _subscribed(app, branch_channel(branch_id)) as inbox:
        yield inbox


@asynccontextmanager
async def _subscribed(app: Litestar, channel: str) -> AsyncIterator[asyncio.Queue[bytes]]:
    plugin = _plugin(app)
    if plugin is None:
        raise RuntimeError("the live feed is not running")
    inbox: asyncio.Queue[bytes] = asyncio.Queue(maxsize=INBOX_SIZE)

    async def deliver(data: bytes) -> None:
        if inbox.full():
            inbox.get_nowait()  # drop the oldest: a newer board supersedes it
        inbox.put_nowait(data)

    subscriber = await plugin.subscribe(channel)
    try:
        async with subscriber.run_in_background(deliver, join=False):
            yield inbox
    finally:
        with anyio.CancelScope(shield=True):  # also when the reader was cancelled
            await plugin.unsubscribe(subscriber, channel)


async def authenticate_live(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal:
    """`authenticate`, also taking the token from `?access_token=`: browsers cannot
    set headers on a WebSocket or an EventSource. A header wins over the query."""
    if "authorization" in connection.headers:
        return await authenticate(connection)
    token = connection.query_params.get("access_token")
    if not isinstance(token, str) or not token.strip():
        return await authenticate(connection)  # answers 401
    try:
        header = ("Bearer " + token.strip()).encode("ascii")
    except UnicodeEncodeError:
        raise Unauthorized(code="invalid_token") from None
    scope: Any = {
        **connection.scope,
        "headers": [*connection.scope["headers"], (b"authorization", header)],
        "state": {},  # parsed headers are cached in the state: start afresh
    }
    checked: ASGIConnection[Any, Any, Any, Any] = ASGIConnection(scope)
    principal = await authenticate(checked)
    state = connection.scope.setdefault("state", {})
    state["principal"] = principal  # for `principal`
    state["token_expires_at"] = token_expiry(checked)
    return principal


def require_live(*roles: str) -> Guard:
    """`require`, with the token from the header or `?access_token=`."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal = await authenticate_live(connection)
        if roles and principal.role not in roles:
            raise Forbidden()

    guard.__name__ = "require_live_" + ("_".join(roles) or "any")
    return guard


async def rights_lost(
    pool: asyncpg.Pool,
    settings: Settings,
    principal: Principal,
    expires_at: float | None,
    allowed: Callable[[Principal], bool],
    announced: asyncio.Queue[bytes] | None = None,
) -> tuple[int, str]:
    """Wait until an open stream's caller may no longer read it: the token expires
    (4401), the device or staff account is deactivated (4401), or its role or branches
    change so that `allowed` refuses it (4403). Rights are read again from the database
    every `SELFSERVE_LIVE_RECHECK` seconds, and at once when the caller's subject is
    `announced` (`announce_rights_change`, read from the `RIGHTS_CHANNEL` inbox); the
    expiry is waited for exactly. Returns the close code and reason. While the
    database is unreachable the stream goes on and the next check decides."""
    subject = principal.subject.encode()
    next_check = time.monotonic() + settings.live_recheck_s
    while True:
        wait = next_check - time.monotonic()
        if expires_at is not None:
            left = expires_at - time.time()
            if left <= 0:
                return WS_UNAUTHORIZED, "token expired"
            wait = min(wait, left)
        if wait > 0 and not await _announced(announced, subject, wait):
            continue  # time for the periodic check, or the expiry: the loop decides
        next_check = time.monotonic() + settings.live_recheck_s
        try:
            current = await current_rights(pool, principal)
        except Exception as exc:  # the database away, the pool closing: check again later
            log.warning("live_rights_check_failed", error=type(exc).__name__)
            continue
        if current is None:
            return WS_UNAUTHORIZED, "revoked"
        if not allowed(current):
            return WS_FORBIDDEN, "forbidden"


async def _announced(inbox: asyncio.Queue[bytes] | None, subject: bytes, within_s: float) -> bool:
    """Whether `subject` is announced within `within_s` seconds (others are skipped)."""
    if inbox is None:
        await asyncio.sleep(within_s)
        return False
    try:
        async with asyncio.timeout(within_s):
            while await inbox.get() != subject:
                pass
    except TimeoutError:
        return False
    return True


@asynccontextmanager
async def rights_announcements(app: Litestar) -> AsyncIterator[asyncio.Queue[bytes]]:
    """Subjects announced by `announce_rights_change` from now on (open it before the
    stream's first message, so no announcement after that is missed)."""
    async with _subscribed(app, RIGHTS_CHANNEL) as inbox:
        yield inbox


@lru_cache(maxsize=16)
def _decoded(raw: bytes) -> Any:
    """One decode per message per process, however many streams read it (a board with
    a thousand waiting tickets is ~65 KB of JSON; the streams only read the result)."""
    return msgspec.json.decode(raw)


def _text(document: Any) -> str:
    return msgspec.json.encode(document).decode()


async def serve_board(socket: WebSocket[Any, Any, Any], branch_id: int) -> None:
    """The board feed: the current snapshot at once, then every event of the branch
    as a text JSON message, until the client goes."""
    await socket.accept()
    try:
        principal = await authenticate_live(socket)
    except Unauthorized:
        await socket.close(code=WS_UNAUTHORIZED, reason="unauthorized")
        return
    if principal.role not in BOARD_ROLES:
        await socket.close(code=WS_FORBIDDEN, reason="forbidden")
        return
    if not principal.in_scope(branch_id):  # answered as a missing branch
        await socket.close(code=WS_NOT_FOUND, reason="not found")
        return
    app = socket.app
    if not available(app):
        await socket.close(code=WS_UNAVAILABLE, reason="live feed unavailable")
        return
    pool: asyncpg.Pool = app.state.pool
    settings: Settings = app.state.settings
    # Subscribe first, then read: nothing committed after the snapshot is missed.
    async with subscription(app, branch_id) as inbox, rights_announcements(app) as announced:
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT active FROM branches WHERE id = $1", branch_id):
                await socket.close(code=WS_NOT_FOUND, reason="not found")
                return
            snapshot = await board_snapshot(conn, branch_id, svc.utcnow(), settings)
        await socket.send_text(_text(snapshot))

        def allowed(current: Principal) -> bool:
            return current.role in BOARD_ROLES and current.in_scope(branch_id)

        await _forward_until_disconnect(
            socket,
            inbox,
            lambda: rights_lost(
                pool, settings, principal, token_expiry(socket), allowed, announced
            ),
        )


async def _forward_until_disconnect(
    socket: WebSocket[Any, Any, Any],
    inbox: asyncio.Queue[bytes],
    lost: Callable[[], Awaitable[tuple[int, str]]],
) -> None:
    """Forward the inbox to the board until it goes, or until `lost` answers a close
    code (the caller's rights went): then close with it."""
    async with anyio.create_task_group() as tasks:

        async def watch() -> None:
            code, reason = await lost()
            with suppress(WebSocketDisconnect, OSError, RuntimeError):
                await socket.close(code=code, reason=reason)
            tasks.cancel_scope.cancel()

        tasks.start_soon(watch)

        async def forward() -> None:
            try:
                while True:
                    data = await inbox.get()
                    await socket.send_text(data.decode())
            except (WebSocketDisconnect, OSError, RuntimeError):
                pass  # the client went while we were sending
            tasks.cancel_scope.cancel()

        tasks.start_soon(forward)
        try:
            # A board only listens; anything it sends is ignored.
            while (await socket.receive())["type"] != "websocket.disconnect":
                pass
        except WebSocketDisconnect:
            pass
        tasks.cancel_scope.cancel()


def _place(position: int | None, low: int | None, high: int | None, locale: str) -> dict[str, Any]:
    eta = None
    if low is not None and high is not None:
        eta = {"low_min": low, "high_min": high, "text": eta_model.format_band(low, high, locale)}
    return {"position": position, "eta": eta}


async def ticket_stream(
    app: Litestar,
    pool: asyncpg.Pool,
    settings: Settings,
    principal: Principal,
    ticket_id: int,
    branch_id: int,
    locale: str,
    expires_at: float | None = None,
) -> AsyncGenerator[ServerSentEventMessage, None]:
    """Server-Sent Events for one ticket: `ticket` (TicketOut) first; `position`
    (`{position, eta}`) when its place or wait changes while waiting; `called` when
    it is called or recalled; `ticket` again once it reaches a final state, and the
    stream ends. A comment every KEEPALIVE_S while nothing happens. When the caller's
    token expires or their rights go (`rights_lost`), a last `closed` event
    (`{code, reason}`: 4401 or 4403, as the board's close codes) and the stream ends."""

    def allowed(now: Principal) -> bool:
        if now.kind == "customer":
            return True  # their own ticket (checked when the stream opened)
        return now.role in TICKET_WATCHERS and now.in_scope(branch_id)

    async def current() -> TicketOut:
        return await svc.get_ticket(
            pool, principal, ticket_id, now=svc.utcnow(), settings=settings, locale=locale
        )

    async with subscription(app, branch_id) as inbox, rights_announcements(app) as announced:
        ticket = await current()  # read after subscribing: no change falls in between
        yield ServerSentEventMessage(event="ticket", data=_text(ticket), retry=SSE_RETRY_MS)
        if ticket.status in FINAL_STATUSES:
            return
        eta = ticket.eta
        last = _place(
            ticket.position,
            eta.low_min if eta else None,
            eta.high_min if eta else None,
            locale,
        )
        watcher = asyncio.create_task(
            rights_lost(pool, settings, principal, expires_at, allowed, announced)
        )
        try:
            while True:
                getter = asyncio.ensure_future(inbox.get())
                done, _ = await asyncio.wait(
                    {getter, watcher}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                )
                if watcher in done:
                    getter.cancel()
                    code, reason = watcher.result()
                    yield ServerSentEventMessage(
                        event="closed", data=_text({"code": code, "reason": reason})
                    )
                    return
                if getter not in done:
                    getter.cancel()
                    yield ServerSentEventMessage(data=None, comment="keep-alive")
                    continue
                raw = getter.result()
                try:
                    event = _decoded(raw)
                except msgspec.DecodeError:
                    continue
                if not isinstance(event, dict):
                    continue
                kind = event.get("type")
                if kind == "ticket_called" and event.get("ticket_id") == ticket_id:
                    called = {
                        k: event.get(k)
                        for k in (
                            "ticket_id",
                            "display_code",
                            "counter_id",
                            "counter",
                            "recalls",
                            "at",
                        )
                    }
                    yield ServerSentEventMessage(event="called", data=_text(called))
                elif kind == "board":
                    place = (event.get("tickets") or {}).get(str(ticket_id))
                    if place is not None:  # still waiting
                        band = place.get("eta") or {}
                        now_place = _place(
                            place.get("position"),
                            band.get("low_min"),
                            band.get("high_min"),
                            locale,
                        )
                        if now_place != last:
                            last = now_place
                            yield ServerSentEventMessage(event="position", data=_text(now_place))
                        continue
                    calls = event.get("calls") or []
                    if any(c.get("ticket_id") == ticket_id for c in calls):
                        continue  # called or serving: the board says so, nothing to send
                    ticket = await current()  # gone from the board: finished, or moved on
                    if ticket.status in FINAL_STATUSES:
                        yield ServerSentEventMessage(event="ticket", data=_text(ticket))
                        return
        finally:
            watcher.cancel()
