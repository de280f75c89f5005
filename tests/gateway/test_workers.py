"""The gateway's worker pool (workers.py) on plain processes: a dead worker is replaced while the
others keep running, a worker that cannot start stops the pool with its code, signals stop it.
(tests/e2e/test_gateway_workers.py does the same to real gateway workers.)"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
from pagemesh.services.gateway import workers
from pagemesh.services.gateway.workers import WorkerPool

from tests.support.mesh import wait_for

# A worker that serves until SIGTERM, then exits 0 as the gateway does; it says it is ready
# (its handler installed) with a file named by its pid in the directory argv[1], holding the rest
# of its arguments.
SERVE = (
    "import os, pathlib, signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "pathlib.Path(sys.argv[1], str(os.getpid())).write_text(' '.join(sys.argv[2:]))\n"
    "time.sleep(600)\n"
)


def _argv(code: str, *args: str) -> list[str]:
    return [sys.executable, "-c", code, *args]


@contextmanager
def running(pool: WorkerPool) -> Iterator[dict[str, int]]:
    """`pool.run()` in a thread; yields {"rc": ...} once it returned (after the block)."""
    out: dict[str, int] = {}
    thread = threading.Thread(target=lambda: out.setdefault("rc", pool.run()), daemon=True)
    thread.start()
    try:
        yield out
    finally:
        pool.stop()
        thread.join(60)
        assert not thread.is_alive(), "the pool did not stop"


def test_a_killed_worker_is_replaced_and_the_other_keeps_running(tmp_path: Path) -> None:
    def _two_workers_without(pool: WorkerPool, dead: int) -> list[int] | None:
        """The two workers' pids once both are ready, `dead` not among them."""
        pids = pool.pids()
        ready = all((tmp_path / str(pid)).exists() for pid in pids)
        return pids if len(pids) == 2 and dead not in pids and ready else None

    pool = WorkerPool(_argv(SERVE, str(tmp_path)), 2, replacement_args=["--late"])
    with running(pool) as result:
        first = wait_for(lambda: _two_workers_without(pool, -1), 30, "2 workers")
        os.kill(first[0], signal.SIGKILL)
        now = wait_for(lambda: _two_workers_without(pool, first[0]), 30, "a replacement")
        assert first[1] in now, "the surviving worker was restarted too"
        assert pool.slots[0].restarts == 1 and pool.slots[1].restarts == 0
        args = {pid: (tmp_path / str(pid)).read_text() for pid in [*first, *now]}
        assert args[first[0]] == args[first[1]] == "", "first starts get the plain argv"
        assert args[now[0]] == "--late", "a replacement gets replacement_args"
        # Killed again at once: still replaced (after a short backoff), not given up on.
        os.kill(now[0], signal.SIGKILL)
        wait_for(lambda: _two_workers_without(pool, now[0]), 30, "a second replacement")
        alive = pool.pids()
    assert result["rc"] == 0, "a SIGTERM stop is a clean exit"
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).is_running() for pid in alive)


def test_a_configuration_error_stops_the_pool_with_its_code() -> None:
    pool = WorkerPool(_argv("import sys; sys.exit(78)"), 2)
    with running(pool) as result:
        wait_for(lambda: "rc" in result, 30, "the pool to give up")
    assert result["rc"] == 78
    assert all(s.restarts == 0 for s in pool.slots)


def test_a_worker_that_cannot_start_is_not_restarted_forever(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(workers, "FIRST_BACKOFF_S", 0.05)
    pool = WorkerPool(_argv("import sys; sys.exit(3)"), 1)
    with running(pool) as result:
        wait_for(lambda: "rc" in result, 30, "the pool to give up")
    assert result["rc"] == 3
    assert pool.slots[0].restarts == workers.MAX_START_FAILURES - 1


def test_exit_codes_of_signals_follow_the_shell() -> None:
    assert workers.exit_code(-signal.SIGKILL) == 137
    assert workers.exit_code(0) == 0 and workers.exit_code(2) == 2
