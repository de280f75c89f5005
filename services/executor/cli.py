"""`pagemesh executor`: loads a model, registers its KV pool with kvmanager (a new epoch) and
serves the Executor gRPC service."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import socket
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagemesh.env import add_option
from pagemesh.heap import freeze_startup_heap

if TYPE_CHECKING:  # (imported when run: loading torch is not for `--help`)
    from pagemesh.services.executor.engine import LLMEngine

DEFAULT_PORT = 50052
DEFAULT_KVMANAGER = "127.0.0.1:50051"

log = logging.getLogger("pagemesh.executor")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("executor", help="run the model engine (gRPC)")
    add_option(p, "--model", "SmolLM2-135M-Instruct", "HF directory, hub id or .gguf file")
    add_option(p, "--host", "127.0.0.1", "address to bind (internal service: loopback default)")
    add_option(p, "--port", DEFAULT_PORT, "gRPC port", int)
    add_option(p, "--kvmanager", DEFAULT_KVMANAGER, "kvmanager gRPC address")
    add_option(p, "--allocator", "grpc", "grpc (kvmanager) or local (in-process, for A/B)")
    add_option(
        p,
        "--executor-id",
        "",
        "name of this executor at kvmanager (default: its advertised host:port, unique in a fleet)",
    )
    add_option(
        p,
        "--advertise",
        "",
        "host:port gateways reach this executor on (default: --host:--port, the machine's"
        " hostname when --host is 0.0.0.0)",
    )
    add_option(
        p,
        "--served-model-name",
        "",
        "the model name clients send (default: from --model); kvmanager routes by it",
    )
    add_option(p, "--device", "auto", "auto (CUDA if present), cpu or cuda[:N]")
    add_option(p, "--dtype", "auto", "auto, float32, float16 or bfloat16")
    add_option(p, "--num-blocks", 0, "KV pool blocks (0: profiled on CUDA, default on CPU)", int)
    add_option(p, "--block-size", 16, "tokens per KV block", int)
    add_option(p, "--max-model-len", 0, "context length (0: the model's)", int)
    add_option(p, "--max-num-seqs", 256, "sequences running at once", int)
    add_option(p, "--max-num-batched-tokens", 8192, "tokens per step (prefill chunk budget)", int)
    add_option(p, "--max-beam-width", 8, "widest beam search a request may ask for", int)
    add_option(
        p,
        "--grammar-compile-timeout",
        10.0,
        "seconds a structured-output grammar may take to compile before its request is refused",
        float,
    )
    add_option(
        p,
        "--grammar-fill-threads",
        0,
        "threads filling a step's structured-output token masks (0: one)",
        int,
    )
    add_option(p, "--gpu-memory-utilization", 0.9, "fraction of GPU memory to use", float)
    add_option(
        p,
        "--host-kv-gib",
        0.0,
        "host memory (GiB, pinned on CUDA) for the prefix cache's host tier: evicted blocks"
        " spill there and come back on a hit (0: no tier)",
        float,
    )
    add_option(
        p, "--host-kv-blocks", 0, "the host tier's size in blocks instead of --host-kv-gib", int
    )
    add_option(
        p,
        "--host-kv-staging-mib",
        256,
        "CUDA: device memory (MiB) the host tier's copies are staged in, taken from the KV pool",
        int,
    )
    add_option(
        p, "--prefix-caching", True, "share cached prompt blocks (--no-prefix-caching: A/B)", bool
    )
    add_option(
        p,
        "--prefill-cuda-graphs",
        True,
        "replay CUDA graphs for prefill steps too (--no-prefill-cuda-graphs: A/B)",
        bool,
    )
    add_option(
        p,
        "--kvmanager-outage-timeout",
        30.0,
        "seconds kvmanager may be unreachable before requests fail (retryably); running"
        " sequences go on meanwhile",
        float,
    )
    add_option(
        p,
        "--scheduling",
        "auto",
        "auto (async on CUDA, sync elsewhere), async (launch step t before t-1 lands) or sync:"
        " the CPU can run the GPU's step order, and an A/B can price async at light load",
    )
    add_option(p, "--log-level", "info", "debug, info, warning or error")
    add_option(p, "--trace-steps", "", "append a JSON line per step and request event here")
    p.set_defaults(func=run)


def resolve_device(choice: str) -> str:
    if choice != "auto":
        return choice
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def served_name(spec: str) -> str:
    """The model id clients see: a hub id as is, a path's last component without `.gguf`."""
    path = Path(spec)
    if spec.startswith((".", "/", "~")) or path.suffix == ".gguf" or path.is_dir():
        return path.name.removesuffix(".gguf")
    return spec


def advertised_address(args: argparse.Namespace) -> str:
    """Where gateways reach this executor: --advertise, else the bind address (a wildcard bind
    is reached by the machine's name)."""
    if args.advertise:
        return str(args.advertise)
    host = args.host if args.host not in ("0.0.0.0", "::", "") else socket.gethostname()
    return f"{host}:{args.port}"


def executor_id(args: argparse.Namespace) -> str:
    """--executor-id, else the advertised address: two executors of one kvmanager never share
    an id by default (a restart at the same address keeps its id and gets a new epoch)."""
    return str(args.executor_id) or advertised_address(args)


def make_allocator(args: argparse.Namespace) -> Any:
    if args.allocator == "local":
        from pagemesh.services.kvmanager.local import LocalAllocator

        return LocalAllocator(executor_id=executor_id(args))
    if args.allocator != "grpc":
        raise SystemExit(f"--allocator must be grpc or local, not {args.allocator!r}")
    from pagemesh.services.kvmanager.client import KVManagerClient

    return KVManagerClient(args.kvmanager, executor_id=executor_id(args))


def executor_info(engine: LLMEngine, device: str) -> Any:
    from pagemesh.proto import executor_pb2 as pb

    cfg = engine.config
    eos = sorted(engine.eos_token_ids)
    return pb.ExecutorInfo(
        executor_id=cfg.executor_id,
        model=engine.config.served_model_name,  # set in _main: --served-model-name or --model's
        model_path=engine.model_path,
        model_fingerprint=engine.model_fingerprint,
        block_size=cfg.block_size,
        num_blocks=engine.pool.num_blocks,
        max_model_len=engine.max_model_len,
        device=device,
        eos_token_id=eos[0] if eos else 0,
        vocab_size=engine.vocab_size,
        epoch=engine.epoch,
        max_num_seqs=cfg.max_num_seqs,
        max_beam_width=cfg.max_beam_width,
    )


async def _start_engine(engine: LLMEngine, attempts: int = 30) -> None:
    """engine.start(), retried while kvmanager is unreachable (it may start after us under
    compose or a supervisor); the model is loaded once, only registration is retried."""
    from pagemesh.services.kvmanager.api import AllocatorUnavailable

    delay = 0.5
    for attempt in range(1, attempts + 1):
        try:
            await engine.start()
            return
        except AllocatorUnavailable as exc:
            if attempt == attempts:
                raise
            log.warning("kvmanager unreachable (%s); retrying in %.1fs", exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


def scheduling_mode(value: str) -> bool | None:
    """--scheduling as EngineConfig.async_scheduling (None: the device decides)."""
    modes = {"auto": None, "async": True, "sync": False}
    if value not in modes:
        raise SystemExit(f"--scheduling must be auto, async or sync, not {value!r}")
    return modes[value]


async def _main(args: argparse.Namespace) -> None:
    from pagemesh.services.executor.config import EngineConfig
    from pagemesh.services.executor.engine import LLMEngine
    from pagemesh.services.executor.server import serve

    device = resolve_device(args.device)
    config = EngineConfig(
        model=args.model,
        device=device,
        dtype=args.dtype,
        block_size=args.block_size,
        num_blocks=args.num_blocks or None,
        max_model_len=args.max_model_len or None,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_beam_width=args.max_beam_width,
        grammar_compile_timeout_s=args.grammar_compile_timeout,
        grammar_fill_threads=args.grammar_fill_threads,
        gpu_memory_utilization=args.gpu_memory_utilization,
        host_kv_blocks=args.host_kv_blocks,
        host_kv_gib=args.host_kv_gib,
        host_kv_staging_mib=args.host_kv_staging_mib,
        executor_id=executor_id(args),
        advertise=advertised_address(args),
        served_model_name=args.served_model_name or served_name(args.model),
        enable_prefix_caching=args.prefix_caching,
        use_prefill_cuda_graphs=args.prefill_cuda_graphs,
        kvmanager_outage_timeout=args.kvmanager_outage_timeout,
        async_scheduling=scheduling_mode(args.scheduling),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    allocator = make_allocator(args)
    try:
        engine = LLMEngine(config, allocator)
        log.info("loading %s on %s (allocator %s)", args.model, device, args.allocator)
        start = asyncio.create_task(_start_engine(engine))
        waiter = asyncio.create_task(stop.wait())
        await asyncio.wait([start, waiter], return_when=asyncio.FIRST_COMPLETED)
        if not start.done():  # stopped while loading
            start.cancel()
            return
        waiter.cancel()
        start.result()
        freeze_startup_heap()
        info = executor_info(engine, device)
        log.info(
            "epoch %d: %d blocks x %d tokens, max_model_len %d",
            info.epoch,
            info.num_blocks,
            info.block_size,
            info.max_model_len,
        )
        try:
            await serve(engine, info, args.host, args.port, stop, args.trace_steps)
        finally:
            await engine.close()
    finally:
        with contextlib.suppress(Exception):
            await allocator.close()


def run(args: argparse.Namespace) -> int:
    from pagemesh.services.executor.model.spec import ModelSpecError, check_model

    from pagemesh.exits import config_error, port_taken_message, quiet_interpreter_exit
    from pagemesh.instance import port_in_use

    quiet_interpreter_exit()
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # The permanent errors first, in a second and before torch loads (exits.py): a supervisor
    # does not retry them.
    try:
        check_model(args.model)
    except ModelSpecError as exc:
        return config_error(exc)
    if port_in_use(args.host, args.port):
        return config_error(port_taken_message("executor", args.host, args.port, "--port"))
    try:
        asyncio.run(_main(args))
    except ModelSpecError as exc:  # found while loading (a converted GGUF's architecture)
        return config_error(exc)
    return 0
