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
from typing import Any

import httpx2
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


class Stream:
    """One greedy chat stream read on a thread with httpx (to the end of its body)."""

    def __init__(self, port: int, question: str, max_tokens: int, salt: str = "") -> None:
        self.body: dict[str, Any] = {
            "model": "SmolLM2-135M-Instruct",
            "messages": [{"role": "user", "content": question}],
            "temperature": 0,
            "max_tokens": max_tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if salt:
            self.body["cache_salt"] = salt
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"
        self.text = ""
        self.chunks = 0
        self.usage: dict[str, Any] | None = None
        self.error: Any = None
        self.done = False
        self.failure = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> Stream:
        self._thread.start()
        return self

    def join(self, timeout: float) -> Stream:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "a stream hung"
        return self

    def _run(self) -> None:
        try:
            with (
                httpx2.Client(timeout=300) as http,
                http.stream("POST", self.url, json=self.body) as resp,
            ):
                for line in resp.iter_lines():
                    if line == "data: [DONE]":
                        self.done = True
                    elif line.startswith("data: "):
                        event = json.loads(line[6:])
                        self.error = event.get("error", self.error)
                        self.usage = event.get("usage") or self.usage
                        for choice in event.get("choices") or []:
                            self.text += (choice.get("delta") or {}).get("content") or ""
                            self.chunks += 1
        except Exception as exc:  # read by the test: a broken body is a failure
            self.failure = repr(exc)


QUESTIONS = [f"Tell me about the number {k} and what it is used for." for k in range(4)]
STREAM_TOKENS = 64


def test_pagemesh_up_serves_supervises_and_stops(tmp_path: Path, smollm2_path: Path) -> None:
    port, kv_port, ex_port = free_port(), free_port(), free_port()
    argv = [sys.executable, "-P", "-m", "pagemesh.cli", "up", "--model", str(smollm2_path)]
    argv += ["--model-name", "SmolLM2-135M-Instruct", "--device", "cpu", "--num-blocks", "256"]
    argv += ["--port", str(port)]
    argv += ["--kv-port", str(kv_port), "--executor-port", str(ex_port)]
    argv += ["--kv-metrics-port", "0", "--data-dir", str(tmp_path / "redis")]
    # A request waits for its executor's restart (the model reloaded on a busy CI core) this
    # long: the default (60 s) is sized for a machine of its own.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env["PAGEMESH_MIGRATION_WAIT"] = "240"
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
        # Streams under way when it dies go on once it is back (request migration): each ends
        # whole, with the text and usage of a cold run (its own cache salt shares nothing).
        cold = [Stream(port, q, STREAM_TOKENS, salt=f"cold-{k}") for k, q in enumerate(QUESTIONS)]
        for stream in cold:
            stream.start()
        for stream in cold:
            stream.join(240)
            assert stream.done and stream.text and not stream.failure, vars(stream)
        cut = [Stream(port, q, STREAM_TOKENS).start() for q in QUESTIONS]
        wait_for(lambda: all(s.chunks >= 3 for s in cut), 120, "the streams to be under way")
        executor.send_signal(signal.SIGKILL)
        try:
            wait_for(lambda: out.has("executor restarted (restart #1)"), 180, "the restart", 0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{out.tail()}") from None
        assert out.has("executor exited with code -9; restart #1")
        for stream, ref in zip(cut, cold, strict=True):
            stream.join(300)
            assert stream.done and not stream.error and not stream.failure, vars(stream)
            assert stream.text == ref.text, (stream.text, ref.text)
            assert stream.usage is not None and ref.usage is not None
            assert stream.usage["prompt_tokens"] == ref.usage["prompt_tokens"]
            assert stream.usage["completion_tokens"] == STREAM_TOKENS
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
