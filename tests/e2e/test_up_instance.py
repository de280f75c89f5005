"""One `pagemesh up` per data directory and port set, with the real services (Redis, kvmanager,
an executor on SmolLM2, the gateway) on loopback: a second copy on the same ports refuses in one
line that names the first, starts nothing and leaves the first serving; the API key comes from a
file and never shows on a command line; `pagemesh kv stats` works without activating anything,
prints JSON numbers as numbers and ends cleanly on a closed pipe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import psutil

from pagemesh.redis_process import free_port
from tests.e2e.test_up import Output
from tests.support.mesh import REPO_ROOT, wait_for

KEY = "sk-test-from-a-file"
PAGEMESH = str(REPO_ROOT / "scripts" / "pagemesh")


def _chat(port: int, key: str | None) -> tuple[int, str]:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "temperature": 0,
        "max_tokens": 12,
    }
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers=headers,
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())["choices"][0]["message"]["content"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _up_argv(smollm2_path: Path, ports: dict[str, int], data_dir: Path, keys: Path) -> list[str]:
    argv = [sys.executable, "-P", "-m", "pagemesh.cli", "up", "--model", str(smollm2_path)]
    argv += ["--model-name", "SmolLM2-135M-Instruct", "--device", "cpu", "--num-blocks", "256"]
    argv += ["--port", str(ports["gateway"]), "--kv-port", str(ports["kv"])]
    argv += ["--executor-port", str(ports["executor"]), "--kv-metrics-port", str(ports["metrics"])]
    argv += ["--data-dir", str(data_dir), "--api-key-file", str(keys)]
    return argv


def test_one_instance_per_port_set(tmp_path: Path, smollm2_path: Path) -> None:
    ports = {name: free_port() for name in ("gateway", "kv", "executor", "metrics")}
    keys = tmp_path / "keys"
    keys.write_text(f"# the gateway's keys\n{KEY}\n")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PAGEMESH_API_KEY", None)
    env["PAGEMESH_CACHE_DIR"] = os.environ.get("PAGEMESH_CACHE_DIR") or str(
        Path.home() / ".cache" / "pagemesh"
    )
    argv = _up_argv(smollm2_path, ports, tmp_path / "redis", keys)
    first = subprocess.Popen(
        argv, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    out = Output(first)
    try:
        try:
            wait_for(lambda: out.has("pagemesh is up"), 240, "pagemesh up", interval=0.5)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\n{out.tail()}") from None
        status, text = _chat(ports["gateway"], KEY)
        assert (status, "Paris" in text) == (200, True), text
        assert _chat(ports["gateway"], None)[0] == 401
        # The key is read from the file: no process shows it in `ps`.
        procs = [first.pid, *(c.pid for c in psutil.Process(first.pid).children(recursive=True))]
        for pid in procs:
            assert KEY not in " ".join(psutil.Process(pid).cmdline())

        # A second copy, same ports and data directory: one line naming the first, nothing
        # started (no health borrowed from the first's services).
        second = subprocess.run(
            argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        lines = (second.stdout + second.stderr).strip().splitlines()
        assert second.returncode == 1, lines
        assert len(lines) == 1, lines
        assert "already running" in lines[0] and f"pid {first.pid}" in lines[0], lines
        # Another data directory, same ports: refused on the first port, naming the instance.
        other = _up_argv(smollm2_path, ports, tmp_path / "redis-2", keys)
        third = subprocess.run(
            other, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
        )
        lines = (third.stdout + third.stderr).strip().splitlines()
        assert third.returncode == 1, lines
        assert len(lines) == 1, lines
        assert f"port {ports['gateway']}" in lines[0] and f"pid {first.pid}" in lines[0], lines
        assert f"data dir {tmp_path / 'redis'}" in lines[0], lines  # the first, not itself
        assert "--port" in lines[0]

        # The first keeps serving, and its executor is still the only one at its kvmanager.
        status, text = _chat(ports["gateway"], KEY)
        assert (status, "Paris" in text) == (200, True), text
        assert not out.has("restart #"), out.tail()

        # The operator's command, without activating anything; JSON numbers are numbers.
        kv = f"127.0.0.1:{ports['kv']}"
        stats = subprocess.run(
            [PAGEMESH, "kv", "stats", "--json", "--address", kv],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert stats.returncode == 0, stats.stderr
        reply = json.loads(stats.stdout)
        assert [e["executor_id"] for e in reply["executors"]] == ["executor-0"]
        since_start = next(w for w in reply["windows"] if w["name"] == "since_start")["hits"]
        assert since_start["query_tokens"] > 0 and isinstance(since_start["query_tokens"], int)
        assert isinstance(reply["executors"][0]["pool"]["num_blocks"], int)
        # A closed pipe ends it cleanly, once or while watching.
        for extra in ("", " --watch 0.1"):
            piped = subprocess.run(
                [
                    "bash",
                    "-o",
                    "pipefail",
                    "-c",
                    f"{PAGEMESH} kv stats --json --address {kv}{extra} | head -c 10",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert piped.returncode == 0, piped.stderr
            assert len(piped.stdout) == 10 and piped.stdout.startswith("{")
            assert piped.stderr == "", piped.stderr

        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=90) == 0, out.tail()
    finally:
        if first.poll() is None:
            for child in psutil.Process(first.pid).children(recursive=True):
                child.kill()
            first.kill()
            first.wait()
