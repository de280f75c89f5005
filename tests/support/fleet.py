"""A fleet on loopback: Redis, kvmanager, several executors (real processes, SmolLM2 on the CPU,
small pools) and a gateway that follows the fleet through kvmanager (no --executor: it learns
the executors from kvmanager's WatchFleet and routes each request with Fleet.Route).

Executors can be added and stopped while it runs (`add_executor`, `stop_executor`). Where each
request went is read from kvmanager's own account (GetStats: per executor, route decisions by
policy and reason) and from the gateway's /metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from pagemesh.proto import executor_pb2, executor_pb2_grpc, kvmanager_pb2, kvmanager_pb2_grpc

from pagemesh.redis_process import RedisProcess, free_port
from tests.support.mesh import LOOPBACK, Service, grpc_health_status, http_get, wait_for


@dataclass
class FleetConfig:
    model: str  # the model directory every executor loads
    executors: int = 3
    model_names: list[str] = field(default_factory=list)  # per executor; default "smol"
    num_blocks: int = 64
    block_size: int = 16
    max_num_seqs: int = 16
    routing_policy: str = "kv"
    executor_timeout: float = 3.0  # kvmanager marks a silent executor down after this
    start_timeout: float = 240.0
    device: str = "cpu"  # "cuda": every executor on the one visible GPU (route_bench)
    executor_args: list[str] = field(default_factory=list)


class Fleet:
    def __init__(self, workdir: Path, config: FleetConfig) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.redis = RedisProcess(
            data_dir=self.workdir / "redis", log_path=self.workdir / "redis.log"
        )
        self.kv_port = free_port()
        self.gateway_port = free_port()
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
        if config.device == "cpu":
            self.env["CUDA_VISIBLE_DEVICES"] = ""
        self.kvmanager: Service | None = None
        self.gateway: Service | None = None
        self.executors: dict[str, Service] = {}  # executor id -> its process
        self.ports: dict[str, int] = {}
        self._channel: grpc.Channel | None = None

    @staticmethod
    def _cli(*args: str) -> list[str]:
        return [sys.executable, "-P", "-m", "pagemesh.cli", *args]

    @property
    def kv_address(self) -> str:
        return f"{LOOPBACK}:{self.kv_port}"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    # ----- lifecycle -----

    def start(self) -> Fleet:
        try:
            self.redis.start()
            self.kvmanager = Service(
                "kvmanager",
                self._cli(
                    "kvmanager", "--port", str(self.kv_port), "--redis-url", self.redis.url,
                    "--metrics-port", "0", "--executor-timeout", str(self.config.executor_timeout),
                ),
                self.workdir / "kvmanager.log",
                lambda: grpc_health_status(self.kv_address) == "SERVING",
                self.env,
            )  # fmt: skip
            self.kvmanager.spawn()
            self.kvmanager.wait_ready(self.config.start_timeout)
            names = self.config.model_names or ["smol"] * self.config.executors
            for i in range(self.config.executors):
                self.add_executor(names[i % len(names)], wait=False)
            for svc in self.executors.values():
                svc.wait_ready(self.config.start_timeout)
            self.gateway = Service(
                "gateway",
                self._cli(
                    "gateway", "--host", LOOPBACK, "--port", str(self.gateway_port),
                    "--kvmanager", self.kv_address,
                    "--routing-policy", self.config.routing_policy,
                ),
                self.workdir / "gateway.log",
                lambda: http_get(self.url + "/health", {}, timeout=1.0)[0] == 200,
                self.env,
            )  # fmt: skip
            self.gateway.spawn()
            self.gateway.wait_ready(self.config.start_timeout)
            self.wait_for_models(self.config.start_timeout)
        except BaseException:
            print(self.tails(), file=sys.stderr)
            self.close()
            raise
        return self

    def add_executor(
        self, model_name: str = "smol", wait: bool = True, extra_args: tuple[str, ...] = ()
    ) -> str:
        """Starts one more executor serving `model_name` (`extra_args` for it alone, e.g. a
        shorter --max-model-len); returns its id."""
        executor_id = f"executor-{len(self.executors)}"
        port = free_port()
        address = f"{LOOPBACK}:{port}"
        svc = Service(
            executor_id,
            self._cli(
                "executor", "--model", self.config.model, "--port", str(port),
                "--kvmanager", self.kv_address, "--device", self.config.device,
                "--executor-id", executor_id, "--served-model-name", model_name,
                "--num-blocks", str(self.config.num_blocks),
                "--block-size", str(self.config.block_size),
                "--max-num-seqs", str(self.config.max_num_seqs),
                *self.config.executor_args, *extra_args,
            ),
            self.workdir / f"{executor_id}.log",
            lambda: grpc_health_status(address) == "SERVING",
            self.env,
        )  # fmt: skip
        self.executors[executor_id] = svc
        self.ports[executor_id] = port
        svc.spawn()
        if wait:
            svc.wait_ready(self.config.start_timeout)
        return executor_id

    def stop_executor(self, executor_id: str) -> None:
        self.executors[executor_id].stop(timeout=20)

    def kill_executor(self, executor_id: str) -> None:
        """SIGKILL: a crash, nothing cleaned up in the executor."""
        self.executors[executor_id].kill()

    def executor_info(self, executor_id: str) -> executor_pb2.ExecutorInfo:
        address = f"{LOOPBACK}:{self.ports[executor_id]}"
        with grpc.insecure_channel(address) as channel:
            stub = executor_pb2_grpc.ExecutorStub(channel)
            return stub.GetInfo(executor_pb2.GetInfoRequest(), timeout=5.0)

    def close(self) -> None:
        services = [self.gateway, *self.executors.values(), self.kvmanager]
        for svc in services:
            if svc is not None:
                with contextlib.suppress(Exception):
                    svc.stop(timeout=10)
        if self._channel is not None:
            self._channel.close()
        with contextlib.suppress(Exception):
            self.redis.stop()

    def __enter__(self) -> Fleet:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            print(self.tails(), file=sys.stderr)
        self.close()

    def tails(self, lines: int = 30) -> str:
        services = [self.kvmanager, *self.executors.values(), self.gateway]
        return "\n".join(s.tail(lines) for s in services if s is not None)

    # ----- what the fleet says -----

    def stats(self) -> kvmanager_pb2.GetStatsResponse:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.kv_address)
        stub = kvmanager_pb2_grpc.KVManagerStub(self._channel)
        return stub.GetStats(kvmanager_pb2.GetStatsRequest(), timeout=5.0)

    def routed(self) -> dict[str, dict[str, int]]:
        """executor id -> reason -> route decisions that chose it (kvmanager's count)."""
        out: dict[str, dict[str, int]] = {}
        for ex in self.stats().executors:
            counts = out.setdefault(ex.executor_id, {})
            for r in ex.routed:
                counts[r.reason] = counts.get(r.reason, 0) + r.count
        return out

    def routed_total(self) -> dict[str, int]:
        return {ex: sum(c.values()) for ex, c in self.routed().items()}

    def live(self) -> dict[str, bool]:
        return {ex.executor_id: ex.live for ex in self.stats().executors}

    def models(self) -> list[str]:
        status, body = http_get(self.url + "/v1/models", {}, timeout=5.0)
        if status != 200:
            return []
        return sorted(m["id"] for m in json.loads(body)["data"])

    def wait_for_models(self, timeout: float) -> None:
        want = sorted(set(self.config.model_names or ["smol"]))
        wait_for(lambda: self.models() == want, timeout, f"the gateway to serve {want}")

    def metrics(self) -> str:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5.0) as resp:
            return resp.read().decode()

    def chat(
        self, model: str, messages: list[dict[str, str]], max_tokens: int = 2, **extra: Any
    ) -> tuple[int, dict[str, Any]]:
        body = {"model": model, "messages": messages, "max_tokens": max_tokens, **extra}
        req = urllib.request.Request(
            self.url + "/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
