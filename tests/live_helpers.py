"""Clients for the live feed in tests: the board WebSocket (the `websockets` package)
and a ticket's Server-Sent Events (httpx streaming), each read with a deadline."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10.0  # seconds any one expected message may take


def board_url(base_url: str, branch_id: int, token: str | None = None) -> str:
    url = base_url.replace("http://", "ws://", 1) + f"/v1/branches/{branch_id}/live"
    return url + ("?" + urlencode({"access_token": token}) if token is not None else "")


def board(
    base_url: str, branch_id: int, token: str | None = None, headers: dict[str, str] | None = None
) -> connect:
    return connect(
        board_url(base_url, branch_id, token),
        additional_headers=headers,
        proxy=None,
        open_timeout=TIMEOUT,
    )


async def receive(ws: ClientConnection, timeout: float = TIMEOUT) -> dict[str, Any]:
    raw = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(raw, str), "the board feed sends text frames"
    message: dict[str, Any] = json.loads(raw)
    return message


async def receive_until(
    ws: ClientConnection, wanted: Callable[[dict[str, Any]], bool], timeout: float = TIMEOUT
) -> dict[str, Any]:
    """The first message `wanted` accepts, skipping others, within `timeout` overall."""

    async def scan() -> dict[str, Any]:
        while True:
            message = await receive(ws, timeout)
            if wanted(message):
                return message

    return await asyncio.wait_for(scan(), timeout)


async def close_code(
    base_url: str, branch_id: int, token: str | None = None, headers: dict[str, str] | None = None
) -> int:
    """The code the server closes a board connection with (it must send nothing)."""
    async with board(base_url, branch_id, token, headers) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert closed.value.rcvd is not None
    return closed.value.rcvd.code


class EventStream:
    """Server-Sent Events from an open streaming response: (event, JSON data) pairs;
    comments are kept in `comments`."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.comments: list[str] = []
        self._events = self._parse()

    async def _parse(self) -> AsyncIterator[tuple[str, Any]]:
        event, data = "message", []
        async for line in self.response.aiter_lines():
            if line == "":
                if data:
                    yield event, json.loads("\n".join(data))
                event, data = "message", []
            elif line.startswith(":"):
                self.comments.append(line[1:].strip())
            else:
                field, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if field == "event":
                    event = value
                elif field == "data":
                    data.append(value)

    async def next(self, timeout: float = TIMEOUT) -> tuple[str, Any]:
        return await asyncio.wait_for(anext(self._events), timeout)

    async def until(self, name: str, timeout: float = TIMEOUT) -> tuple[Any, list[tuple[str, Any]]]:
        """The data of the next `name` event, and the events skipped before it."""
        skipped: list[tuple[str, Any]] = []

        async def scan() -> Any:
            while True:
                event, data = await anext(self._events)
                if event == name:
                    return data
                skipped.append((event, data))

        return await asyncio.wait_for(scan(), timeout), skipped

    async def ended(self, timeout: float = TIMEOUT) -> list[tuple[str, Any]]:
        """Read to the end of the stream; the events that came before it."""

        async def drain() -> list[tuple[str, Any]]:
            return [item async for item in self._events]

        return await asyncio.wait_for(drain(), timeout)
