"""`pagemesh gateway --workers N`: N gateway processes on one port (SO_REUSEPORT), kept at N.

A worker that dies (a crash, the OOM killer, a SIGKILL) takes its own connections with it: its
clients' streams are cut, and the executor aborts their requests once that worker's Serve stream
breaks. The other workers serve on (the kernel sends new connections only to live listeners),
and this parent starts a new worker in the dead one's place, as `pagemesh up` and compose restart
a service: at once the first time, then with exponential backoff while it keeps dying, the
backoff reset once a worker has lived STABLE_S. Stopping the whole gateway for one dead worker
would cut every other worker's streams too. A replacement opens the port only once it can serve
(`replacement_args`: the gateway's --listen-when-ready): the kernel spreads new connections over
every listener, and one still loading would answer its share with 503s.

Not restarted: a worker that exits with EX_CONFIG (a permanent start-up error, exits.py), or
that dies MAX_START_FAILURES times in a row within START_S of being started (it cannot start:
restarting it forever would hide that). Then the other workers are stopped and the parent exits
with the worker's code, for its supervisor to report. SIGTERM and SIGINT are passed on to every
worker; the parent exits once they all have.
"""

from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from pagemesh.exits import EXIT_CONFIG

log = logging.getLogger("pagemesh.gateway.workers")

STABLE_S = 60.0  # a worker that lived this long died of a crash, not a crash loop: no backoff
START_S = 10.0  # a death this soon after a start counts as a failure to start
MAX_START_FAILURES = 3
FIRST_BACKOFF_S = 0.5  # the second restart in a row waits this long, doubling from there
MAX_BACKOFF_S = 30.0
POLL_S = 0.2


@dataclass(slots=True)
class _Slot:
    """One worker place: the process in it now and how its recent deaths went."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # when a dead worker's replacement is due
    backoff_s: float = 0.0
    quick_deaths: int = 0  # consecutive deaths within START_S of their start
    restarts: int = 0


def exit_code(returncode: int) -> int:
    """A child's return code as a process exit code: killed by signal N is 128 + N (the
    shell's convention; Popen reports it as -N)."""
    return 128 - returncode if returncode < 0 else returncode


class WorkerPool:
    """Runs `count` copies of `argv` and keeps them running; `run` returns the exit code."""

    def __init__(
        self,
        argv: list[str],
        count: int,
        preexec_fn: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        replacement_args: list[str] | None = None,
    ) -> None:
        self.argv = argv
        # Appended to a replacement's argv: the gateway's --listen-when-ready, so that it takes
        # no connection before it can serve while the others do.
        self.replacement_args = replacement_args or []
        self.slots = [_Slot(i) for i in range(count)]
        self._preexec_fn = preexec_fn
        self._clock = clock
        self._stopping = False
        self._rc = 0

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.slots if s.proc is not None and s.proc.poll() is None]

    def stop(self, signum: int = signal.SIGTERM) -> None:
        """Passes `signum` on to every live worker; none is restarted from now on."""
        self._stopping = True
        for slot in self.slots:
            slot.restart_at = None
            if slot.proc is not None and slot.proc.poll() is None:
                slot.proc.send_signal(signum)

    def run(self) -> int:
        """Starts the workers, then watches them until they have all stopped."""
        for slot in self.slots:
            self._spawn(slot)
        while True:
            for slot in self.slots:
                self._check(slot)
            if self._stopping and all(s.proc is None for s in self.slots):
                return self._rc
            time.sleep(POLL_S)

    def _spawn(self, slot: _Slot) -> None:
        argv = [*self.argv, *self.replacement_args] if slot.restarts else self.argv
        slot.proc = subprocess.Popen(argv, preexec_fn=self._preexec_fn)
        slot.started_at = self._clock()
        slot.restart_at = None

    def _check(self, slot: _Slot) -> None:
        now = self._clock()
        if slot.proc is None:
            if slot.restart_at is not None and now >= slot.restart_at:
                slot.restarts += 1
                self._spawn(slot)
                assert slot.proc is not None
                log.info(
                    "gateway worker %d restarted (pid %d, restart #%d)",
                    slot.index,
                    slot.proc.pid,
                    slot.restarts,
                )
            return
        code = slot.proc.poll()
        if code is None:
            return
        pid, slot.proc = slot.proc.pid, None
        if self._stopping:
            self._rc = self._rc or exit_code(code)
            return
        lived = now - slot.started_at
        slot.quick_deaths = slot.quick_deaths + 1 if lived < START_S else 0
        if code == EXIT_CONFIG or slot.quick_deaths >= MAX_START_FAILURES:
            why = (
                "a configuration error"
                if code == EXIT_CONFIG
                else f"{slot.quick_deaths} failed starts in a row"
            )
            log.error(
                "gateway worker %d (pid %d) exited with code %d: %s, not restarted; stopping the"
                " gateway",
                slot.index,
                pid,
                code,
                why,
            )
            self._rc = exit_code(code) or 1
            self.stop()
            return
        if lived >= STABLE_S:
            slot.backoff_s = 0.0
        slot.restart_at = now + slot.backoff_s
        log.warning(
            "gateway worker %d (pid %d) exited with code %d after %.0fs; its connections are"
            " lost, the other workers serve on; restarting it in %.1fs",
            slot.index,
            pid,
            code,
            lived,
            slot.backoff_s,
        )
        slot.backoff_s = min(max(slot.backoff_s * 2, FIRST_BACKOFF_S), MAX_BACKOFF_S)
