"""Boards of a branch are computed one at a time, and changes that commit meanwhile
fold into one more board after it: never a change without a later board."""

from __future__ import annotations

import asyncio

from selfserve.queueing.live import BoardPublisher


async def test_changes_during_a_board_fold_into_one_more_board() -> None:
    boards = BoardPublisher()
    started: list[int] = []
    gate = asyncio.Event()
    version = 0  # the branch's state, bumped by each change

    async def publish() -> None:
        started.append(version)
        await gate.wait()

    version = 1
    boards.request(7, publish)
    await asyncio.sleep(0)  # the first board starts on state 1 and waits
    assert started == [1]
    for v in (2, 3, 4):  # three changes while it is being computed
        version = v
        boards.request(7, publish)
    gate.set()
    await boards.drain()
    # one more board, computed after the last change: it shows state 4
    assert started == [1, 4]


async def test_branches_do_not_wait_for_each_other_and_failures_do_not_stick() -> None:
    boards = BoardPublisher()
    seen: list[int] = []
    gate = asyncio.Event()

    async def slow() -> None:
        await gate.wait()
        seen.append(1)

    async def fast() -> None:
        seen.append(2)

    async def broken() -> None:
        raise RuntimeError("redis went away")

    boards.request(1, slow)
    boards.request(2, fast)
    await asyncio.sleep(0)
    assert seen == [2]
    gate.set()
    boards.request(3, broken)
    await boards.drain()
    assert seen == [2, 1]
    boards.request(3, fast)  # a failed board leaves the branch free for the next one
    await boards.drain()
    assert seen == [2, 1, 2]
