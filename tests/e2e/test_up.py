"""`pagemesh up` as a user runs it: Redis + three service processes, prefixed logs, a working
API, a killed service restarted (and the restart logged), Ctrl-C stopping everything."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from pagemesh.redis_process import free_port
from tests.support.mesh import REPO_ROOT, wait_for


class Output:
    """Collects the process's stdout lines on a thread (so the pipe never fills up)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def has(self, text: str) -> bool:
        return any(text in line for line in self.lines)

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines[-n:])


def chat(port: int) -> str:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 12,
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return json.loads(resp.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        raise AssertionError(f"HTTP {exc.code}: {exc.read()!r}") from None


def test_pagemesh_up_serves_supervises_and_stops(tmp_path: Path, smollm2_path: Path) -> None:
    port, kv_port, ex_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-P", "-m", "pagemesh.cli", "up", "--model", str(smollm2_path)]
    argv += ["--model-name", "SmolLM2-135M-Instruct", "--device", "cpu", "--num-blocks", "256"]
    argv += ["--port", str(port)]
    argv += ["--kv-port", str(kv_port), "--executor-port", str(ex_port)]
    argv += ["--kv-metrics-port", "0", "--data-dir", str(tmp_path / "redis")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PAGEMESH_API_KEY", None)
    proc = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = Output(proc)
    try:
        try:
            wait_for(lambda: out.has("pagemesh is up"), 240, "pagemesh up", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{out.tail()}") from None
        for name in ("kvmanager |", "executor  |", "gateway   |", "up        |"):
            assert any(line.startswith(name) for line in out.lines), name
        try:
            assert "Paris" in chat(port)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{out.tail()}") from None

        # Each service is its own process; kill the executor as a crash would.
        services = {
            c.cmdline()[4]: c
            for c in psutil.Process(proc.pid).children()
            if c.cmdline()[1:4] == ["-P", "-m", "pagemesh.cli"]
        }
        assert set(services) == {"kvmanager", "executor", "gateway"}
        executor = services["executor"]
        executor.send_signal(signal.SIGKILL)
        try:
            wait_for(lambda: out.has("executor restarted (restart #1)"), 180, "the restart", 0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{out.tail()}") from None
        assert out.has("executor exited with code -9; restart #1")
        # The gateway reconnects its Serve stream on its own.
        wait_for(lambda: "Paris" in chat(port), 60, "the API after the restart", interval=0.5)

        pids = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=90) == 0, out.tail()
        time.sleep(0.5)
        assert not [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != "zombie"
        ]
        assert out.has("all stopped")
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
            proc.wait()
