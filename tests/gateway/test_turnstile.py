"""The gateway's turnstile: handlers that arrive together pass one per event-loop iteration, in
order, so a task woken by one handler (the Serve stream's writer) runs before the next passes."""

from __future__ import annotations

import asyncio

from pagemesh.services.gateway.turnstile import Turnstile


async def test_one_per_iteration_in_order_with_others_in_between() -> None:
    gate = Turnstile()
    log: list[str] = []
    writer_woken = asyncio.Event()

    async def writer() -> None:
        while True:
            await writer_woken.wait()
            writer_woken.clear()
            log.append("write")

    async def handler(i: int) -> None:
        await gate.turn()
        log.append(f"h{i}")
        writer_woken.set()  # as a submit wakes the stream's writer

    w = asyncio.create_task(writer())
    await asyncio.sleep(0)
    await asyncio.gather(*(handler(i) for i in range(5)))
    await asyncio.sleep(0)
    w.cancel()
    # Without the turnstile: h0 h1 h2 h3 h4 write (the writer after every handler).
    assert log == ["h0", "write", "h1", "write", "h2", "write", "h3", "write", "h4", "write"]


async def test_a_cancelled_waiter_gives_its_turn_away() -> None:
    gate = Turnstile()
    passed: list[int] = []

    async def handler(i: int) -> None:
        await gate.turn()
        passed.append(i)

    tasks = [asyncio.create_task(handler(i)) for i in range(4)]
    await asyncio.sleep(0)  # h0 passed; h1..h3 wait
    tasks[1].cancel()
    await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
    assert passed == [0, 2, 3]
    await asyncio.wait_for(gate.turn(), 5)  # the line is empty: the next one passes


async def test_alone_passes_at_once() -> None:
    gate = Turnstile()
    for _ in range(3):
        await asyncio.wait_for(gate.turn(), 1)
        await asyncio.sleep(0)  # the scheduled release runs; no one waits
