"""Live events for boards and customers' phones.

Each change at a branch (a ticket issued, called, moved, finished, a counter opened)
publishes, after commit, a fresh `board` snapshot (`service.board_snapshot`) on the
channel `branch:<id>`, and a `ticket_called` event when a ticket is called or
recalled. Publishing goes through Litestar's channels plugin; with its Redis backend
an event published by one API process reaches the subscribers of every other.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import asyncpg
import msgspec
import structlog
from litestar import Litestar
from litestar.channels import ChannelsPlugin

from selfserve.queueing.models import TicketOut
from selfserve.queueing.service import board_snapshot
from selfserve.settings import Settings

log = structlog.get_logger("selfserve.live")


def branch_channel(branch_id: int) -> str:
    return f"branch:{branch_id}"


def _plugin(app: Litestar) -> ChannelsPlugin | None:
    try:
        return app.plugins.get(ChannelsPlugin)
    except KeyError:
        return None


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
    """Publish the branch's new board (and the call, if any). Never raises: the write
    is committed; a board that misses one event catches up with the next snapshot."""
    channels = _plugin(app)
    if channels is None:
        return
    try:
        events: list[dict[str, Any]] = []
        if called is not None:
            events.append(
                {
                    "type": "ticket_called",
                    "branch_id": branch_id,
                    "ticket_id": called.id,
                    "display_code": called.display_code,
                    "counter_id": called.counter_id,
                    "counter": counter_name,
                    "recalls": called.recalls,
                    "at": now.isoformat(),
                }
            )
        async with pool.acquire() as conn:
            events.append(await board_snapshot(conn, branch_id, now, settings))
        for event in events:
            channels.publish(msgspec.json.encode(event), channels=[branch_channel(branch_id)])
    except Exception:  # the write stands; log and go on
        log.exception("live_publish_failed", branch_id=branch_id)
