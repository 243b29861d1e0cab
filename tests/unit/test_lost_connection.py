"""Which database failures are "unavailable" (503) and which are bugs (500)."""

from __future__ import annotations

import asyncpg

from selfserve.errors import _lost_connection


def _raised_while_handling(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException:
            raise outer  # noqa: B904 (the implicit context is the point)
    except BaseException as exc:
        return exc


def test_a_closed_connection_reported_while_handling_a_lost_one_is_unavailable() -> None:
    exc = _raised_while_handling(
        asyncpg.InterfaceError(
            "cannot call Transaction.__aexit__(): the underlying connection is closed"
        ),
        asyncpg.exceptions.ConnectionDoesNotExistError(
            "connection was closed in the middle of operation"
        ),
    )
    assert _lost_connection(exc)


def test_a_protocol_still_consuming_the_servers_goodbye_is_unavailable() -> None:
    assert _lost_connection(
        asyncpg.InternalClientError(
            "cannot switch to state 12; another operation (2) is in progress"
        )
    )


def test_a_misused_connection_is_a_bug() -> None:
    assert not _lost_connection(
        asyncpg.InterfaceError("cannot perform operation: another operation is in progress")
    )
    assert not _lost_connection(asyncpg.InternalClientError("unexpected codec"))
