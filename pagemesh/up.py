"""`pagemesh up`: the whole mesh on one machine, supervised.

Redis (a local redis-server unless --redis-url is given), then kvmanager, an executor and the
gateway, each its own process started as `pagemesh <service>`, each waited for (health) before
the next one starts. Their output is interleaved on our stdout with a prefix per service. A
service that dies is restarted with exponential backoff and the restart is logged; Ctrl-C (or
SIGTERM) stops them all, gateway first, so no client is left talking to a dead executor.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from pagemesh.children import set_pdeathsig
from pagemesh.env import add_option
from pagemesh.exits import EXIT_CONFIG, PREFIX
from pagemesh.instance import InstanceConflict, InstanceLock, acquire, check_ports
from pagemesh.line_prefixer import LinePrefixer

COLORS = {"redis": 31, "kvmanager": 36, "executor": 35, "gateway": 32, "up": 33}
# A service that stays up this long has its backoff reset: it was a crash, not a crash loop.
STABLE_SECONDS = 60.0
MAX_BACKOFF = 30.0
# Before a service was ever healthy, this many failures in a row mean a configuration error
# (bad model, port taken): give up instead of looping.
MAX_START_FAILURES = 3


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("up", help="run Redis, kvmanager, the executors and the gateway")
    add_option(p, "--model", "SmolLM2-135M-Instruct", "HF directory, hub id or .gguf file")
    add_option(p, "--model-name", "", "model id for clients (default: from the model)")
    add_option(p, "--device", "auto", "auto (CUDA if present), cpu or cuda[:N]")
    add_option(p, "--host", "127.0.0.1", "gateway bind address")
    add_option(p, "--port", 8000, "gateway HTTP port", int)
    add_option(p, "--kv-port", 50051, "kvmanager gRPC port (loopback)", int)
    add_option(p, "--kv-metrics-port", 9051, "kvmanager /metrics port (0: off)", int)
    add_option(p, "--executor-port", 50052, "first executor's gRPC port (loopback)", int)
    add_option(
        p,
        "--executors",
        0,
        "executors to run (0: one per visible GPU on CUDA, one on CPU); each its own process,"
        " port --executor-port + i",
        int,
    )
    add_option(p, "--gpus", "", "GPU indices for the executors, e.g. 0,1,2 (default: all)")
    add_option(p, "--redis-url", "", "use this Redis instead of starting a local one")
    add_option(p, "--redis-port", 0, "port of the local Redis (0: a free one)", int)
    add_option(
        p, "--data-dir", str(Path.home() / ".cache" / "pagemesh" / "redis"), "local Redis data"
    )
    add_option(p, "--num-blocks", 0, "KV pool blocks (0: automatic)", int)
    add_option(p, "--block-size", 16, "tokens per KV block", int)
    add_option(
        p,
        "--host-kv-gib",
        0.0,
        "host memory (GiB) per executor for the prefix cache's host tier (0: none)",
        float,
    )
    add_option(p, "--max-model-len", 0, "context length (0: the model's)", int)
    p.add_argument(
        "--api-key",
        default=None,
        help="require this API key (visible in `ps`: prefer env PAGEMESH_API_KEY or"
        " --api-key-file)",
    )
    add_option(p, "--api-key-file", "", "file of accepted API keys, one per line")
    add_option(p, "--start-timeout", 1800.0, "seconds to wait for a service's health", float)
    add_option(p, "--log-level", "info", "log level of the services")
    p.set_defaults(func=run)


class Console:
    """Prefixed, optionally coloured lines from every service on one stdout."""

    def __init__(self) -> None:
        self.color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")
        self.width = max(len(n) for n in COLORS)
        # Every service's output goes through one prefixer: a progress bar redrawn with \r by
        # one service never shares a line with another's output (line_prefixer.py).
        self.lines = LinePrefixer(sys.stdout.buffer, self.prefix, sys.stdout.isatty())

    def prefix(self, name: str) -> bytes:
        label = f"{name:<{self.width}} | "
        if self.color:
            label = f"\x1b[{COLORS.get(name, 37)}m{label}\x1b[0m"
        return label.encode()

    def write(self, name: str, data: bytes) -> None:
        self.lines.feed(name, data)

    def say(self, message: str) -> None:
        self.lines.feed("up", message.encode() + b"\n")


@dataclass
class Service:
    name: str
    argv: list[str]
    healthy: Callable[[], Awaitable[bool]]
    env: dict[str, str] = field(default_factory=dict)  # on top of ours
    proc: asyncio.subprocess.Process | None = None
    restarts: int = 0
    ever_healthy: bool = False
    started_at: float = 0.0
    pump: asyncio.Task[None] | None = field(default=None, repr=False)
    last_error: str = ""  # its last "error: ..." line (exits.py), repeated when it gives up


class Supervisor:
    def __init__(self, console: Console, start_timeout: float) -> None:
        self.console = console
        self.start_timeout = start_timeout
        self.services: list[Service] = []
        self.stopping = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []

    async def _spawn(self, svc: Service) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", **svc.env)
        svc.proc = await asyncio.create_subprocess_exec(
            *svc.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            # Own session: a terminal's Ctrl-C reaches only us, and we stop the services in
            # order (gateway first) instead of all at once.
            start_new_session=True,
            preexec_fn=set_pdeathsig,
        )
        svc.started_at = time.monotonic()
        svc.pump = asyncio.create_task(self._pump(svc, svc.proc))

    async def _pump(self, svc: Service, proc: asyncio.subprocess.Process) -> None:
        """Copies the service's output through the console's prefixer, and keeps its last
        error line (exits.py) to repeat if it cannot start."""
        assert proc.stdout is not None
        marker = PREFIX.encode()
        tail = b""
        while chunk := await proc.stdout.read(4096):
            self.console.write(svc.name, chunk)
            tail = (tail + chunk)[-8192:]
            at = tail.rfind(b"\n" + marker)
            if at >= 0 or tail.startswith(marker):
                line = tail[at + 1 if at >= 0 else 0 :].split(b"\n", 1)[0]
                svc.last_error = line.decode(errors="replace").strip()[len(PREFIX) :]
        self.console.lines.end(svc.name)

    async def start(self, svc: Service) -> None:
        """Spawns `svc` and waits for its health; retries a few times, then gives up. A
        permanent error (exit code EXIT_CONFIG: a missing model, a port in use) is not retried:
        its one line is the reason given."""
        self.services.append(svc)
        failures = 0
        while True:
            await self._spawn(svc)
            if await self._wait_healthy(svc):
                svc.ever_healthy = True
                self._watchers.append(asyncio.create_task(self._watch(svc)))
                return
            failures += 1
            await self._terminate(svc)
            if svc.proc is not None and svc.proc.returncode == EXIT_CONFIG:
                if svc.pump is not None:
                    with contextlib.suppress(Exception):
                        await svc.pump  # its last line read
                raise RuntimeError(f"{svc.name}: {svc.last_error or 'configuration error'}")
            if failures >= MAX_START_FAILURES or self.stopping.is_set():
                why = f": {svc.last_error}" if svc.last_error else " (its log above says why)"
                raise RuntimeError(f"{svc.name} did not become healthy ({failures} attempts){why}")
            self.console.say(f"{svc.name} failed to start; retrying ({failures})")
            await asyncio.sleep(min(2**failures, MAX_BACKOFF))

    async def _wait_healthy(self, svc: Service) -> bool:
        deadline = time.monotonic() + self.start_timeout
        assert svc.proc is not None
        while time.monotonic() < deadline and not self.stopping.is_set():
            if svc.proc.returncode is not None:
                self.console.say(f"{svc.name} exited with code {svc.proc.returncode}")
                return False
            with contextlib.suppress(Exception):
                # Healthy counts only while our own child runs: an answer on its port from
                # anything else (another instance) is not its health.
                if await svc.healthy() and svc.proc.returncode is None:
                    self.console.say(
                        f"{svc.name} healthy after {time.monotonic() - svc.started_at:.1f}s"
                    )
                    return True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(svc.proc.wait(), 0.5)
        return False

    async def _watch(self, svc: Service) -> None:
        """Restarts `svc` whenever it dies, with exponential backoff, until we stop."""
        backoff = 1.0
        while True:
            assert svc.proc is not None
            code = await svc.proc.wait()
            if svc.pump is not None:
                with contextlib.suppress(Exception):
                    await svc.pump
            if self.stopping.is_set():
                return
            if time.monotonic() - svc.started_at > STABLE_SECONDS:
                backoff = 1.0
            svc.restarts += 1
            self.console.say(
                f"{svc.name} exited with code {code}; restart #{svc.restarts} in {backoff:.0f}s"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            if self.stopping.is_set():
                return
            backoff = min(backoff * 2, MAX_BACKOFF)
            await self._spawn(svc)
            if await self._wait_healthy(svc):
                self.console.say(f"{svc.name} restarted (restart #{svc.restarts})")

    async def _terminate(self, svc: Service, timeout: float = 15.0) -> None:
        proc = svc.proc
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            self.console.say(f"{svc.name} did not stop in {timeout:.0f}s; killing it")
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if svc.pump is not None:
            with contextlib.suppress(Exception):
                await svc.pump

    async def stop_all(self) -> None:
        self.stopping.set()
        for task in self._watchers:
            task.cancel()
        for svc in reversed(self.services):
            if svc.proc is not None and svc.proc.returncode is None:
                self.console.say(f"stopping {svc.name}")
            await self._terminate(svc)


# -- health probes -----------------------------------------------------------------------------


def grpc_healthy(address: str) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
            return reply.status == health_pb2.HealthCheckResponse.SERVING

    return probe


def http_healthy(url: str) -> Callable[[], Awaitable[bool]]:
    def get() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    async def probe() -> bool:
        return await asyncio.to_thread(get)

    return probe


# -- the command -------------------------------------------------------------------------------


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-P", "-m", "pagemesh.cli", *args]


def _loopback(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host


async def _up(args: argparse.Namespace) -> int:
    from pagemesh.redis_process import RedisProcess

    console = Console()
    sup = Supervisor(console, args.start_timeout)
    loop = asyncio.get_running_loop()
    interrupted = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, interrupted.set)

    redis: RedisProcess | None = None
    redis_url = args.redis_url
    kv = f"127.0.0.1:{args.kv_port}"
    level = args.log_level
    lock: InstanceLock | None = None
    try:
        lock = await asyncio.to_thread(_preflight, args)
        if not redis_url:
            data = Path(args.data_dir).expanduser()
            redis = RedisProcess(
                port=args.redis_port, data_dir=data, log_path=data / "redis-server.log"
            )
            await asyncio.to_thread(redis.start)
            redis_url = redis.url
            console.say(f"redis-server on {redis_url} (data in {data}, log redis-server.log)")
        startup = asyncio.create_task(_start_services(sup, args, redis_url, kv, level, console))
        stop = asyncio.create_task(interrupted.wait())
        done, _ = await asyncio.wait([startup, stop], return_when=asyncio.FIRST_COMPLETED)
        if startup in done:
            startup.result()  # a service that never became healthy: RuntimeError
            await stop
        else:
            startup.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await startup
        console.say("stopping (Ctrl-C)")
        return 0
    except StartupRefused as exc:  # nothing was started: one line, nothing to stop
        console.say(f"error: {exc}")
        return 1
    except RuntimeError as exc:
        console.say(f"error: {exc}")
        return 1
    finally:
        if lock is not None:
            await sup.stop_all()
            if redis is not None:
                console.say("stopping redis")
                await asyncio.to_thread(redis.stop)
            console.say("all stopped")
            lock.release()
        console.lines.close()


class StartupRefused(RuntimeError):
    """A check before anything starts failed (instance.py, spec.py): the message is the line."""


def _preflight(args: argparse.Namespace) -> InstanceLock:
    """Everything that can refuse before a process starts: the model spec (a missing model or
    an unreachable hub is known in a second, not after three restarts), the data directory's
    lock, then every port this instance will give a service. Returns the lock, held until the
    end."""
    from pagemesh.services.executor.model.spec import ModelSpecError, check_model
    from pagemesh.services.gateway.cli import ApiKeyError, read_api_key_file

    try:
        check_model(args.model)
        if args.api_key_file:
            read_api_key_file(args.api_key_file)
    except (ModelSpecError, ApiKeyError) as exc:
        raise StartupRefused(str(exc)) from None
    data_dir = Path(args.data_dir).expanduser()
    url = f"http://{_loopback(args.host)}:{args.port}"
    ports = _ports(args)
    record = {
        "pid": os.getpid(),
        "url": url,
        "data_dir": str(data_dir),
        "ports": {name: port for name, _host, port, _option in ports if port},
    }
    try:
        lock = acquire(data_dir, record)
    except InstanceConflict as exc:
        raise StartupRefused(str(exc)) from None
    try:
        check_ports(ports)
    except InstanceConflict as exc:
        lock.release()
        raise StartupRefused(str(exc)) from None
    return lock


def _ports(args: argparse.Namespace) -> list[tuple[str, str, int, str]]:
    """(service, host, port, option) of every port this instance binds (0: none or a free one)."""
    ports = [("gateway", args.host, args.port, "--port")]
    ports.append(("kvmanager", "127.0.0.1", args.kv_port, "--kv-port"))
    ports.append(("kvmanager /metrics", "127.0.0.1", args.kv_metrics_port, "--kv-metrics-port"))
    for i in range(len(executor_gpus(args))):
        name = "executor" if i == 0 else f"executor-{i}"
        ports.append((name, "127.0.0.1", args.executor_port + i, "--executor-port"))
    if not args.redis_url:
        ports.append(("redis", "127.0.0.1", args.redis_port, "--redis-port"))
    return ports


async def _start_services(
    sup: Supervisor,
    args: argparse.Namespace,
    redis_url: str,
    kv: str,
    level: str,
    console: Console,
) -> None:
    # Internal services on loopback, whatever PAGEMESH_HOST says (it is the gateway's here).
    kv_argv = _cli("kvmanager", "--host", "127.0.0.1", "--port", str(args.kv_port))
    kv_argv += ["--redis-url", redis_url]
    kv_argv += ["--metrics-port", str(args.kv_metrics_port), "--log-level", level]
    await sup.start(Service("kvmanager", kv_argv, grpc_healthy(kv)))

    for i, gpu in enumerate(executor_gpus(args)):
        port = args.executor_port + i
        ex_argv = _cli("executor", "--model", args.model, "--host", "127.0.0.1")
        ex_argv += ["--port", str(port), "--executor-id", f"executor-{i}"]
        ex_argv += ["--kvmanager", kv, "--block-size", str(args.block_size)]
        ex_argv += ["--log-level", level]
        env = {}
        if gpu is None:
            ex_argv += ["--device", args.device]
        else:  # one GPU each: the process sees only its own
            ex_argv += ["--device", "cuda"]
            env["CUDA_VISIBLE_DEVICES"] = gpu
        if args.model_name:
            ex_argv += ["--served-model-name", args.model_name]
        if args.num_blocks:
            ex_argv += ["--num-blocks", str(args.num_blocks)]
        if args.max_model_len:
            ex_argv += ["--max-model-len", str(args.max_model_len)]
        if args.host_kv_gib:
            ex_argv += ["--host-kv-gib", str(args.host_kv_gib)]
        name = "executor" if i == 0 else f"executor-{i}"
        await sup.start(Service(name, ex_argv, grpc_healthy(f"127.0.0.1:{port}"), env))

    gw_argv = _cli("gateway", "--host", args.host, "--port", str(args.port))
    # No --executor: the gateway follows the fleet through kvmanager (and routes by it).
    gw_argv += ["--kvmanager", kv, "--log-level", level]
    gw_env = {}
    # The key goes in the gateway's environment, readable by its user only: on its command
    # line it would be visible to everyone in `ps`.
    if args.api_key:
        gw_env["PAGEMESH_API_KEY"] = args.api_key
    if args.api_key_file:
        gw_argv += ["--api-key-file", str(Path(args.api_key_file).expanduser().resolve())]
    url = f"http://{_loopback(args.host)}:{args.port}"
    await sup.start(Service("gateway", gw_argv, http_healthy(url + "/health"), gw_env))
    console.say(f"pagemesh is up: {url}/v1  (Ctrl-C stops everything)")
    console.say(f"hit rates: pagemesh kv stats --address {kv}   |   {url}/metrics")


def executor_gpus(args: argparse.Namespace) -> list[str | None]:
    """One entry per executor to start: the GPU it gets (a CUDA_VISIBLE_DEVICES value), or None
    on the CPU or where --device names the device itself."""
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()] if args.gpus else []
    if not gpus and args.device in ("auto", "cuda"):
        gpus = [str(i) for i in range(_visible_gpus())]
    count = args.executors or max(1, len(gpus))
    if not gpus:
        return [None] * count
    if count > len(gpus):
        raise RuntimeError(f"--executors {count} but only {len(gpus)} GPU(s): {','.join(gpus)}")
    return list(gpus[:count])


def _visible_gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def run(args: argparse.Namespace) -> int:
    return asyncio.run(_up(args))
