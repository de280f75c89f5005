"""The fleet as kvmanager sees it: which registered executors are live, and who is told when that
changes (the Fleet service's WatchFleet watchers, fleet_service.py).

An executor is live while its last call is at most `timeout` seconds old. Every call naming it
and its current epoch counts (Manager.executor counts them in `calls`: a Step, a Session
message, an idle executor's heartbeat; its registration, and a restore from Redis, set
`last_seen`, so restored executors get one timeout to show up). Match and GetStats, which anyone
may send about an executor, are no sign of its life. A down executor is routed around and is
live again with its next call.

The hot path only counts; the check that runs every `interval` seconds (`run`) turns a changed
count into `last_seen` (the check's time, at most `interval` after the call), so an executor
goes down between `timeout` and `timeout + interval` after its last call. Liveness is decided
whenever it is asked (the router, stats): an executor that called since the last check is live
at once. The same check finds what changed since watchers were last told (a registration, a new
epoch, an executor going down or coming back) and wakes them, each then sending one fresh
snapshot however many changes came meanwhile. Load moves are not changes: whoever routes asks
kvmanager, which has the current load.
"""

from __future__ import annotations

import asyncio
import logging
import time

from pagemesh.services.kvmanager.manager import ExecutorState, Manager

log = logging.getLogger("pagemesh.kvmanager.fleet")

# An idle executor sends a heartbeat about every second: ten missed in a row is not a slow
# step or a GC pause but a process that is gone or cut off.
DEFAULT_TIMEOUT = 10.0


class Fleet:
    def __init__(self, manager: Manager, timeout: float = DEFAULT_TIMEOUT) -> None:
        if timeout <= 0:
            raise ValueError("the executor timeout must be positive")
        self.m = manager
        self.timeout = timeout
        # Often enough that a change reaches watchers well within the timeout's own slack.
        self.interval = min(1.0, timeout / 4)
        # What watchers were last told: executor id -> (epoch, live).
        self._told: dict[str, tuple[int, bool]] = {}
        self._watchers: set[asyncio.Event] = set()
        self.changes = 0  # changes told so far

    def is_live(self, ex: ExecutorState, now: float | None = None) -> bool:
        if ex.calls != ex.seen_calls:  # it called since the last check
            return True
        return (time.monotonic() if now is None else now) - ex.last_seen <= self.timeout

    def idle_for(self, ex: ExecutorState, now: float | None = None) -> float:
        """Seconds since its last call, as far as the checks tell (0: since the last one)."""
        if ex.calls != ex.seen_calls:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - ex.last_seen)

    def members(self) -> list[tuple[ExecutorState, bool]]:
        """Every registered executor (by id) and whether it is live."""
        now = time.monotonic()
        return [(ex, self.is_live(ex, now)) for _, ex in sorted(self.m.executors.items())]

    # -- watchers -------------------------------------------------------------------------------
    def watch(self) -> asyncio.Event:
        """An event set at every change from now on (the watcher clears it and sends a
        snapshot); `unwatch` it when done."""
        e = asyncio.Event()
        self._watchers.add(e)
        return e

    def unwatch(self, e: asyncio.Event) -> None:
        self._watchers.discard(e)

    def check(self) -> bool:
        """Notes the executors that called since the last check, then wakes the watchers if the
        membership changed since they were last told; True if it did. Cheap (a few operations
        per executor): called every `interval`, at every registration and watch."""
        now = time.monotonic()
        for ex in self.m.executors.values():
            if ex.calls != ex.seen_calls:
                ex.seen_calls = ex.calls
                ex.last_seen = now
        state = {eid: (ex.epoch, self.is_live(ex, now)) for eid, ex in self.m.executors.items()}
        if state == self._told:
            return False
        for eid, (epoch, live) in state.items():
            was = self._told.get(eid)
            if was is not None and was[0] == epoch and was[1] != live:
                ex = self.m.executors[eid]
                if live:
                    log.info("executor %s (epoch %d) is live again", eid, epoch)
                else:
                    log.warning(
                        "executor %s (epoch %d) is down: no call for %.1fs (bound %.1fs);"
                        " routed around until it calls again",
                        eid,
                        epoch,
                        self.idle_for(ex, now),
                        self.timeout,
                    )
        self._told = state
        self.changes += 1
        for e in self._watchers:
            e.set()
        return True

    async def run(self) -> None:
        """The liveness check, until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            self.check()
