"""A whole pagemesh on loopback for fault tests: Redis, kvmanager, an executor and a gateway, each
its own process (`python -m pagemesh.cli <service> ...`), on free ports.

The harness exists so that a test can do to one service what production does to it: SIGKILL it,
restart it on the same port, stop Redis under it, and then read kvmanager's own account of the
pool (`GetStats`) to check that nothing leaked. Each service's stdout/stderr goes to a log file
in the mesh's work directory; `tails()` gives the last lines of each, for failure messages.

Only loopback addresses are used. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagemesh.proto import executor_pb2, executor_pb2_grpc, kvmanager_pb2, kvmanager_pb2_grpc

from pagemesh.redis_process import RedisProcess, free_port

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class MeshError(RuntimeError):
    """A service did not start, did not become healthy, or died; the message holds log tails."""


class ServiceExited(MeshError):
    """The process is gone: waiting longer cannot help (wait_for does not retry it)."""


def wait_for(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll `predicate` until it returns something truthy; exceptions count as 'not yet'."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except ServiceExited:
            raise
        except Exception as exc:  # a service that is still starting raises; keep polling
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


def grpc_health_status(address: str, timeout: float = 1.0, service: str = "") -> str:
    """The gRPC health-checking protocol's status name (SERVING, NOT_SERVING, ...)."""
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def http_get(
    url: str, headers: dict[str, str] | None = None, timeout: float = 2.0
) -> tuple[int, bytes]:
    """A GET that returns (status, body) for every HTTP status, including 4xx/5xx."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


SERVICE_MODULES = {
    "kvmanager": "pagemesh.services.kvmanager.cli",
    "executor": "pagemesh.services.executor.cli",
    "gateway": "pagemesh.services.gateway.cli",
}
_LAUNCHER = (
    "import argparse, importlib, sys\n"
    "p = argparse.ArgumentParser(prog='pagemesh')\n"
    "sub = p.add_subparsers(dest='command', required=True)\n"
    "importlib.import_module(sys.argv[1]).add_commands(sub)\n"
    "a = p.parse_args(sys.argv[2:])\n"
    "sys.exit(int(a.func(a) or 0))\n"
)


@functools.cache
def _full_cli_works() -> bool:
    try:
        from pagemesh.cli import build_parser

        build_parser()
        return True
    except Exception:
        return False


@dataclass
class Service:
    """One service process: how to start it, where it logs, and how to tell it is healthy."""

    name: str
    argv: list[str]
    log_path: Path
    ready: Callable[[], bool]
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    starts: int = 0
    ready_times: list[float] = field(default_factory=list)  # seconds from spawn to healthy

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise MeshError(f"{self.name} is not running")
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def spawn(self) -> None:
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            # A new session: a SIGKILL of the service never reaches the test runner's group.
            self.proc = subprocess.Popen(
                self.argv,
                cwd=REPO_ROOT,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self, timeout: float) -> float:
        t0 = time.monotonic()

        def probe() -> bool:
            if not self.alive():
                code = self.proc.returncode if self.proc else None
                raise ServiceExited(f"{self.name} exited with {code} before it was healthy")
            return self.ready()

        try:
            wait_for(probe, timeout, f"{self.name} to become healthy", interval=0.2)
        except MeshError as exc:
            raise MeshError(f"{exc}\n{self.tail()}") from None
        except TimeoutError as exc:
            raise MeshError(f"{exc}\n{self.tail()}") from None
        took = time.monotonic() - t0
        self.ready_times.append(took)
        return took

    def kill(self) -> None:
        """SIGKILL: a crash, no cleanup of any kind in the service."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._note(f"killed (SIGKILL), exit {self.proc.returncode}")

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL when it does not exit in time."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._note(f"stopped, exit {self.proc.returncode}")

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = ["(no log)"]
        return f"----- {self.name} ({self.log_path}) -----\n" + "\n".join(text)

    def _note(self, message: str) -> None:
        with open(self.log_path, "ab") as log:
            log.write(f"===== {message}\n".encode())


@dataclass
class MeshConfig:
    model: str
    num_blocks: int = 512
    block_size: int = 16
    api_key: str | None = None
    model_name: str = "smollm2"
    # None leaves the internal services on their default bind address (what the security test
    # checks: loopback unless told otherwise).
    internal_host: str | None = None
    kvmanager_args: Sequence[str] = ()
    executor_args: Sequence[str] = ()
    gateway_args: Sequence[str] = ()
    start_timeout: float = 240.0
    env: dict[str, str] = field(default_factory=dict)


class Mesh:
    """Redis + kvmanager + executor + gateway, started in dependency order and health-checked.

    Use as a context manager; on an exception inside the block the log tails are printed.
    """

    SERVICES = ("kvmanager", "executor", "gateway")

    def __init__(
        self, workdir: Path, config: MeshConfig, redis: RedisProcess | None = None
    ) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self._own_redis = redis is None
        self.redis = redis or RedisProcess(
            data_dir=self.workdir / "redis", log_path=self.workdir / "redis.log"
        )
        self.kv_port = free_port()
        self.executor_port = free_port()
        self.gateway_port = free_port()
        self.kv_metrics_port = free_port()  # its default (9051) would collide between meshes
        self.executor_id = ""  # known once the executor answers GetInfo
        self._channels: dict[str, grpc.Channel] = {}
        env = dict(os.environ)
        env.update(
            {
                "PYTHONUNBUFFERED": "1",
                "CUDA_VISIBLE_DEVICES": "",
                "TQDM_DISABLE": "1",  # progress bars would fill the logs
            }
        )
        env.update(config.env)
        self.env = env
        self.services: dict[str, Service] = {
            "kvmanager": Service(
                "kvmanager",
                self._kvmanager_argv(),
                self.workdir / "kvmanager.log",
                self._kvmanager_ready,
                env,
            ),
            "executor": Service(
                "executor",
                self._executor_argv(),
                self.workdir / "executor.log",
                self._executor_ready,
                env,
            ),
            "gateway": Service(
                "gateway",
                self._gateway_argv(),
                self.workdir / "gateway.log",
                self._gateway_ready,
                env,
            ),
        }

    # ----- command lines (the flags each service's CLI documents) -----

    @staticmethod
    def _cli(*args: str) -> list[str]:
        if _full_cli_works():
            return [sys.executable, "-P", "-m", "pagemesh.cli", *args]
        # The same subcommand through its own module only, while another module of the CLI
        # (e.g. `pagemesh up`) is missing or broken in this tree.
        return [sys.executable, "-P", "-c", _LAUNCHER, SERVICE_MODULES[args[0]], *args]

    def _host_args(self) -> list[str]:
        host = self.config.internal_host
        return ["--host", host] if host else []

    def _kvmanager_argv(self) -> list[str]:
        return self._cli(
            "kvmanager",
            "--port", str(self.kv_port),
            "--redis-url", self.redis.url,
            "--metrics-port", str(self.kv_metrics_port),
            "--log-level", "info",
            *self._host_args(),
            *self.config.kvmanager_args,
        )  # fmt: skip

    def _executor_argv(self) -> list[str]:
        return self._cli(
            "executor",
            "--model", self.config.model,
            "--port", str(self.executor_port),
            "--kvmanager", self.kv_address,
            "--device", "cpu",
            "--num-blocks", str(self.config.num_blocks),
            "--block-size", str(self.config.block_size),
            *self._host_args(),
            *self.config.executor_args,
        )  # fmt: skip

    def _gateway_argv(self) -> list[str]:
        argv = self._cli(
            "gateway",
            "--host", LOOPBACK,
            "--port", str(self.gateway_port),
            "--executor", self.executor_address,
            "--kvmanager", self.kv_address,
            "--model-name", self.config.model_name,
            *self.config.gateway_args,
        )  # fmt: skip
        if self.config.api_key:
            argv += ["--api-key", self.config.api_key]
        return argv

    # ----- addresses -----

    @property
    def kv_address(self) -> str:
        return f"{LOOPBACK}:{self.kv_port}"

    @property
    def executor_address(self) -> str:
        return f"{LOOPBACK}:{self.executor_port}"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.gateway_port}"

    @property
    def headers(self) -> dict[str, str]:
        if self.config.api_key:
            return {"Authorization": f"Bearer {self.config.api_key}"}
        return {}

    # ----- health probes -----

    def _kvmanager_ready(self) -> bool:
        try:
            return grpc_health_status(self.kv_address) == "SERVING"
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
        self.stats(timeout=1.0)  # no health service: an answer to GetStats is enough
        return True

    def _executor_ready(self) -> bool:
        try:
            serving = grpc_health_status(self.executor_address) == "SERVING"
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            serving = True
        if serving:
            info = self.executor_info(timeout=1.0)
            self.executor_id = info.executor_id
        return serving

    def _gateway_ready(self) -> bool:
        status, _ = http_get(self.url + "/health", self.headers, timeout=1.0)
        return status == 200

    # ----- lifecycle -----

    def start(self) -> Mesh:
        try:
            if self.redis.proc is None:
                self.redis.start()
            for name in self.SERVICES:
                self.services[name].spawn()
                self.services[name].wait_ready(self.config.start_timeout)
            self.wait_for_serve_streams(self.config.start_timeout)
        except BaseException:
            print(self.tails(), file=sys.stderr)
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in reversed(self.SERVICES):
            with contextlib.suppress(Exception):
                self.services[name].stop(timeout=10)
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        if self._own_redis:
            self.redis.cleanup()

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            print(self.tails(), file=sys.stderr)
        self.close()

    def kill(self, name: str) -> None:
        self.services[name].kill()

    def start_service(self, name: str, timeout: float | None = None) -> float:
        """Start a stopped/killed service again on the same port; returns seconds to healthy."""
        service = self.services[name]
        service.spawn()
        took = service.wait_ready(timeout or self.config.start_timeout)
        self._drop_channel(name)
        return took

    def restart(self, name: str, *, kill: bool = True, timeout: float | None = None) -> float:
        if kill:
            self.services[name].kill()
        else:
            self.services[name].stop()
        return self.start_service(name, timeout)

    def ensure_healthy(self) -> None:
        """Bring back any service a previous test left dead (a shared mesh must not cascade)."""
        if self.redis.proc is None or self.redis.proc.poll() is not None:
            self.redis.stop()
            self.redis.start()
        for name in self.SERVICES:
            service = self.services[name]
            if not service.alive():
                self.start_service(name)
            else:
                service.wait_ready(60)

    def pids(self) -> dict[str, int]:
        return {name: s.pid for name, s in self.services.items() if s.alive()}

    def reconfigure_gateway(self, gateway_args: Sequence[str]) -> None:
        """The gateway stopped and started again with other arguments (`--workers 2`), on the
        same port, its Serve streams open."""
        service = self.services["gateway"]
        service.stop()
        self.config = dataclasses.replace(self.config, gateway_args=tuple(gateway_args))
        service.argv = self._gateway_argv()
        self.start_service("gateway")
        self.wait_for_serve_streams()

    def gateway_worker_pids(self) -> list[int]:
        """The live gateway workers (`--workers N`: the gateway's children; else the gateway)."""
        import psutil

        parent = psutil.Process(self.services["gateway"].pid)
        if self.gateway_workers == 1:
            return [parent.pid]
        children = []
        for child in parent.children():
            with contextlib.suppress(psutil.NoSuchProcess):
                if child.status() != psutil.STATUS_ZOMBIE:
                    children.append(child.pid)
        return children

    def tails(self, lines: int = 40) -> str:
        return "\n".join(s.tail(lines) for s in self.services.values())

    # ----- Redis -----

    def stop_redis(self, kill: bool = False) -> None:
        self.redis.stop(kill=kill)

    def start_redis(self, empty: bool = False) -> None:
        """Start Redis again; `empty` wipes its data directory first (a replacement server)."""
        if empty:
            assert self.redis.data_dir is not None
            for child in self.redis.data_dir.iterdir():
                if child.is_dir():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        self.redis.start()

    def redis_client(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis.url, socket_timeout=5)

    # ----- gRPC -----

    def _channel(self, name: str) -> grpc.Channel:
        if name not in self._channels:
            address = self.kv_address if name == "kvmanager" else self.executor_address
            self._channels[name] = grpc.insecure_channel(address)
        return self._channels[name]

    def _drop_channel(self, name: str) -> None:
        # A fresh channel after a restart: no waiting out the old one's reconnect backoff.
        channel = self._channels.pop(name, None)
        if channel is not None:
            channel.close()

    def kv_stub(self) -> kvmanager_pb2_grpc.KVManagerStub:
        return kvmanager_pb2_grpc.KVManagerStub(self._channel("kvmanager"))

    def executor_stub(self) -> executor_pb2_grpc.ExecutorStub:
        return executor_pb2_grpc.ExecutorStub(self._channel("executor"))

    def stats(self, executor_id: str = "", timeout: float = 5.0) -> kvmanager_pb2.GetStatsResponse:
        return self.kv_stub().GetStats(
            kvmanager_pb2.GetStatsRequest(executor_id=executor_id), timeout=timeout
        )

    @property
    def gateway_workers(self) -> int:
        args = list(self.config.gateway_args)
        return int(args[args.index("--workers") + 1]) if "--workers" in args else 1

    def wait_for_serve_streams(self, timeout: float = 60.0) -> None:
        """Until every gateway worker has its Serve stream to the executor open (after a start
        or an executor restart): /health answers from whichever worker takes the connection,
        and a worker still without its stream answers 503."""
        n = self.gateway_workers
        wait_for(
            lambda: self.executor_info(timeout=1.0).num_serve_streams >= n,
            timeout,
            f"{n} gateway Serve streams",
        )

    def executor_info(self, timeout: float = 5.0) -> executor_pb2.ExecutorInfo:
        return self.executor_stub().GetInfo(executor_pb2.GetInfoRequest(), timeout=timeout)

    def executor_stats(self, timeout: float = 5.0) -> kvmanager_pb2.ExecutorStats:
        """This mesh's executor as kvmanager sees it."""
        reply = self.stats(timeout=timeout)
        for ex in reply.executors:
            if ex.executor_id == self.executor_id:
                return ex
        raise MeshError(f"kvmanager has no executor {self.executor_id!r}: {reply}")

    def pool(self, timeout: float = 5.0) -> kvmanager_pb2.PoolStats:
        return self.executor_stats(timeout).pool

    def wait_idle(self, timeout: float = 60.0, baseline_in_use: int = 0) -> kvmanager_pb2.PoolStats:
        """Wait until no sequence is live and blocks in use are back to `baseline_in_use`."""

        def idle() -> kvmanager_pb2.PoolStats | None:
            pool = self.pool(timeout=2.0)
            if pool.live_sequences == 0 and pool.in_use <= baseline_in_use:
                return pool
            return None

        try:
            return wait_for(idle, timeout, "the pool to drain", interval=0.2)
        except TimeoutError as exc:
            try:
                last = str(self.pool(timeout=2.0)).replace("\n", " ")
            except Exception as inner:
                last = repr(inner)
            raise TimeoutError(f"{exc}; last pool: {last}") from None

    def gateway_health(self, timeout: float = 2.0) -> tuple[int, dict[str, Any]]:
        status, body = http_get(self.url + "/health", self.headers, timeout=timeout)
        try:
            parsed = json.loads(body or b"{}")
        except ValueError:
            parsed = {"raw": body.decode(errors="replace")}
        return status, parsed if isinstance(parsed, dict) else {"value": parsed}


def assert_pool_consistent(pool: kvmanager_pb2.PoolStats) -> None:
    """Every block is in exactly one state: free + in use + cached = total."""
    total = pool.free + pool.in_use + pool.cached
    assert total == pool.num_blocks, (
        f"block accounting broken: free {pool.free} + in_use {pool.in_use} + cached "
        f"{pool.cached} = {total} != num_blocks {pool.num_blocks}"
    )


@contextlib.contextmanager
def running_mesh(workdir: Path, config: MeshConfig) -> Iterator[Mesh]:
    with Mesh(workdir, config) as mesh:
        yield mesh
