"""benchmarks/host_step.py's accounting: a component's time excludes the timed components it
calls (a fake clock), and the op counter tells views from ops that do work."""

from __future__ import annotations

import asyncio
import itertools

import pytest
import torch

from benchmarks import host_step
from benchmarks.host_step import ExclusiveTimer, OpCounter


def test_nested_components_are_taken_off_their_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([0.0, 1.0, 3.0, 4.0, 4.5, 10.0])  # outer in, inner in/out, async in/out, out
    monkeypatch.setattr(host_step.time, "perf_counter", lambda: next(clock))
    timer = ExclusiveTimer()

    async def waits() -> None:
        await asyncio.sleep(0)

    inner = timer.wrap("inner", lambda: None)
    awaited = timer.wrap("awaited", waits)

    def outer() -> None:
        inner()
        asyncio.run(awaited())

    timer.wrap("outer", outer)()
    assert timer.take() == {"inner": 2.0, "awaited": 0.5, "outer": 10.0 - 2.0 - 0.5}
    assert timer.take() == {}


def test_op_counter_separates_views_from_work() -> None:
    counter = OpCounter()
    x = torch.arange(8)
    with counter:
        y = x.view(2, 4)[1]  # two views
        z = y + 1  # one op
        counter.paused = True
        z * 2  # not counted
        counter.paused = False
    assert (counter.count, counter.compute) == (3, 1)
    assert counter.by_op["aten.add"] == 1
    assert list(itertools.islice(counter.by_op, 3)) == ["aten.view", "aten.select", "aten.add"]
