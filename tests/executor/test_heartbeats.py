"""A fleet member tells kvmanager its load: with every Step call, and, while idle (no Step call
goes out), in a load-only Step once per interval, so kvmanager keeps it live. Over the real
in-process allocator (kvmanager's core), no model."""

from __future__ import annotations

import asyncio

from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.scheduler import Scheduler
from pagemesh.services.kvmanager.local import LocalAllocator


class RecordingAllocator(LocalAllocator):
    def __init__(self) -> None:
        super().__init__("executor-7")
        self.steps: list[tuple[bool, object]] = []  # (carried any part, its load)

    async def step(
        self, commits, releases, extends, admits=None, admit_token_budget=0, *, load=None
    ):
        self.steps.append((bool(commits or releases or extends or admits), load))
        return await super().step(commits, releases, extends, admits, admit_token_budget, load=load)


async def test_an_idle_member_sends_load_only_steps_and_kvmanager_sees_them() -> None:
    config = EngineConfig(model="unused", device="cpu", served_model_name="smol",
                          advertise="127.0.0.1:1", num_blocks=64)  # fmt: skip
    allocator = RecordingAllocator()
    scheduler = Scheduler(config, allocator, 1024, {0})
    await scheduler.link.register(64, 16, "fp")
    ex = allocator.manager.executors["executor-7"]
    assert (ex.address, ex.model, ex.max_model_len) == ("127.0.0.1:1", "smol", 1024)

    task = asyncio.create_task(scheduler.link.heartbeats(interval=0.05))
    await asyncio.sleep(0.4)
    task.cancel()
    beats = [load for carried, load in allocator.steps if not carried]
    assert 4 <= len(beats) <= 9, len(beats)  # about one per interval, never a spin
    assert all(load is not None and (load.running, load.waiting) == (0, 0) for load in beats)
    assert ex.load.reports >= 4  # kvmanager took them as reports


async def test_no_heartbeat_while_calls_go_out() -> None:
    config = EngineConfig(model="unused", device="cpu", served_model_name="smol", num_blocks=64)
    allocator = RecordingAllocator()
    scheduler = Scheduler(config, allocator, 1024, {0})
    await scheduler.link.register(64, 16, "fp")
    task = asyncio.create_task(scheduler.link.heartbeats(interval=0.2))
    for _ in range(8):  # a busy executor: a Step call every 50 ms
        scheduler.link.defer([], ["nobody"])
        await scheduler.link.settle()
        await asyncio.sleep(0.05)
    task.cancel()
    assert allocator.steps and all(carried for carried, _ in allocator.steps)
    assert all(load is not None for _, load in allocator.steps)  # each carried the load
