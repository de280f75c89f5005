"""The host's share of a decode step, on the CPU: what the engine does per step besides the
model's forward (on the GPU the forward is one CUDA-graph replay; everything else is host time
that the device waits for when it is longer than the device's work).

The engine runs as benchmarks/throughput.py's decode measurement runs it (`start_decode`,
`timed_steps`: `--batch` greedy requests of `--prompt` random tokens, all decoding, in-process
LocalAllocator, async scheduling as on CUDA) with a minimal model (1 layer, hidden 64, vocab
512) whose forward runs inline in the step's thread and is timed apart. Each step's host time is
its wall time less its forward; it is split by component, each timed exclusively (a
component's time excludes the components it calls):
  schedule     Scheduler.schedule (the running queue, look-ahead results landed)
  allocator    the LocalAllocator's calls (kvmanager's core, in process)
  prepare      ModelRunner._prepare: the batch's index arrays, uploads, device gathers,
               sampling tensors
  sample       ModelRunner._sample: the sampler's ops, the tokens written to token_buf and
               queued for the host
  collect      ModelRunner._collect: the tokens to Python lists
  launched     Scheduler.launched: the sequences advance, the look-ahead decision
  postprocess  Scheduler.postprocess: tokens into the sequences, outputs, finishes
  commit       Scheduler.commit_entries: the blocks this step filled
  other        the rest of LLMEngine.step (engine bookkeeping, the event loop's hops)
`host_us` is the median step (the common pure decode step: no block boundary, no Extend);
`host_us_mean` counts the steps that cross a block boundary or send a look-ahead Extend too;
`components_us` are per-component medians, `components_us_mean` means; `gc_us_mean` the
collector's time (inside the components; the heap is frozen after start-up, as the executor's
service does). Then 20 more steps count the torch ops dispatched outside the forward
(`torch_ops_per_step`; `compute_ops_per_step`: those that are not a view, i.e. a kernel or a
copy on CUDA): device-independent, and on the GPU each costs host time.
Prints one JSON line; `--profile [tottime|cumulative]` adds cProfile's top functions to stderr.

    python benchmarks/host_step.py [--batches 64,256] [--prompt 512] [--steps 150] [--profile]

On a shared machine run it a few times, interleaved with the tree it is compared against (an
older tree: its package laid out as installed, first on PYTHONPATH; benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import json
import pstats
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
import transformers
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.kvmanager.local import LocalAllocator
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.step_profile import InlineExecutor
from benchmarks.throughput import MODEL, start_decode, stop_decode
from pagemesh.heap import freeze_startup_heap

# The forward costs little at these sizes and is timed apart anyway.
HOST_MODEL = dict(
    MODEL,
    hidden_size=64,
    num_hidden_layers=1,
    num_attention_heads=4,
    num_key_value_heads=2,
    intermediate_size=128,
    vocab_size=512,
)
COMPONENTS = (
    "schedule",
    "allocator",
    "prepare",
    "sample",
    "collect",
    "launched",
    "postprocess",
    "commit",
)
FORWARD = "forward"
# Ops that make a view or a tensor over existing memory (no device work).
METADATA_OPS = {
    "aten.view",
    "aten.slice",
    "aten.select",
    "aten.split",
    "aten.split_with_sizes",
    "aten.alias",
    "aten.as_strided",
    "aten.detach",
    "aten.lift_fresh",
    "aten.resolve_conj",
    "aten.resolve_neg",
    "aten.unsqueeze",
    "aten.squeeze",
}
OP_COUNT_STEPS = 20  # decode steps whose torch ops are counted (after the timed ones)
GC = "gc"  # reported apart: it runs inside the components


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class ExclusiveTimer:
    """Seconds per component, each exclusive of the timed components it calls (a stack of the
    components running now: a nested one's time is taken off its caller's)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list[Any]] = []  # [name, start, time of nested components]
        self._gc_start = 0.0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if asyncio.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def timed_async(*args: Any, **kwargs: Any) -> Any:
                # Awaited work (other tasks run meanwhile) would be counted twice: an async
                # component is timed up to its first suspension only when nothing else runs,
                # which holds here (one thread, the allocator in process).
                self._enter(name)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    self._exit()

            return timed_async

        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            self._enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self._exit()

        return timed

    def _enter(self, name: str) -> None:
        self._stack.append([name, time.perf_counter(), 0.0])

    def _exit(self) -> None:
        name, start, nested = self._stack.pop()
        took = time.perf_counter() - start
        self.totals[name] += took - nested
        if self._stack:
            self._stack[-1][2] += took

    def gc_callback(self, phase: str, info: dict[str, int]) -> None:
        """gc.callbacks: the collector's time (inside whichever component allocated)."""
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.totals[GC] += time.perf_counter() - self._gc_start

    def take(self) -> dict[str, float]:
        out, self.totals = dict(self.totals), defaultdict(float)
        return out


def instrument(engine: LLMEngine, timer: ExclusiveTimer) -> None:
    """Wraps each component's entry point on its instance (the classes stay untouched)."""
    runner, sc = engine.runner, engine.scheduler
    targets: list[tuple[Any, str, str]] = [
        (sc, "schedule", "schedule"),
        (runner, "_prepare", "prepare"),
        (runner, "_forward", FORWARD),
        (runner, "_sample", "sample"),
        (runner, "_collect", "collect"),
        (sc, "launched", "launched"),
        (sc, "postprocess", "postprocess"),
        (sc, "commit_entries", "commit"),
    ]
    allocator = sc.link.allocator
    for method in ("step", "extend", "commit", "release", "allocate", "fork"):
        if hasattr(allocator, method):
            targets.append((allocator, method, "allocator"))
    for obj, attr, name in targets:
        setattr(obj, attr, timer.wrap(name, getattr(obj, attr)))


class OpCounter(TorchDispatchMode):
    """Counts the torch ops a step dispatches outside the forward (views and in-place ops
    included). Device-independent: on CUDA each is a launch or at least a dispatch (~5-20 us
    of host time each), so this is the figure the GPU's host path follows."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.compute = 0  # of which ops that are no view or alias: a kernel each on CUDA
        self.by_op: dict[str, int] = defaultdict(int)
        self.paused = False

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.paused:
            name = str(func.overloadpacket)
            self.count += 1
            self.compute += name not in METADATA_OPS
            self.by_op[name] += 1
        return func(*args, **(kwargs or {}))


def uncounted_forward(engine: LLMEngine, counter: OpCounter) -> None:
    """The forward's ops are not counted (on the GPU it is one graph replay)."""
    runner = engine.runner
    forward = runner._forward

    def paused(*args: Any, **kwargs: Any) -> Any:
        counter.paused = True
        try:
            return forward(*args, **kwargs)
        finally:
            counter.paused = False

    runner._forward = paused  # type: ignore[method-assign]


async def count_ops(engine: LLMEngine, counter: OpCounter, steps: int) -> list[tuple[int, int]]:
    """(torch ops, of which compute ops) of each of `steps` decode steps (after the timed
    ones: the counting mode slows every op)."""
    counts = []
    for _ in range(steps):
        counter.count = counter.compute = 0
        with counter:
            await engine.step()
        counts.append((counter.count, counter.compute))
    return counts


def pause_during_forward(engine: LLMEngine, profiler: cProfile.Profile) -> None:
    """cProfile sees the host's work only: it is off during the forward."""
    runner = engine.runner
    forward = runner._forward

    def unprofiled(*args: Any, **kwargs: Any) -> Any:
        profiler.disable()
        try:
            return forward(*args, **kwargs)
        finally:
            profiler.enable()

    runner._forward = unprofiled  # type: ignore[method-assign]


async def measure(
    engine: LLMEngine,
    timer: ExclusiveTimer,
    counter: OpCounter,
    batch: int,
    prompt: int,
    steps: int,
    profile: str,
) -> dict[str, Any]:
    await start_decode(engine, batch, prompt, f"h{batch}_")
    timer.take()
    host: list[float] = []
    parts: dict[str, list[float]] = defaultdict(list)
    profiler = cProfile.Profile() if profile else None
    sort = profile
    if profiler is not None:
        pause_during_forward(engine, profiler)
    for _ in range(steps):
        if profiler is not None:
            profiler.enable()
        start = time.perf_counter()
        await engine.step()
        wall = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        took = timer.take()
        forward = took.pop(FORWARD, 0.0)
        parts[GC].append(took.pop(GC, 0.0))
        host.append(wall - forward)
        for name in COMPONENTS:
            parts[name].append(took.get(name, 0.0))
        parts["other"].append(wall - forward - sum(took.values()))
    counter.by_op.clear()
    ops = await count_ops(engine, counter, OP_COUNT_STEPS)
    top = sorted(counter.by_op.items(), key=lambda kv: -kv[1])[:12]
    log(f"batch {batch}: torch ops per step: {[(k, v / OP_COUNT_STEPS) for k, v in top]}")
    ctx = await stop_decode(engine, batch, f"h{batch}_")
    if profiler is not None:
        print(f"\n-- batch {batch}: cProfile, {steps} steps, by own time --", file=sys.stderr)
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats(sort).print_stats(35)
    us = 1e6
    return {
        "batch": batch,
        "context_tokens_total": ctx,
        "steps": steps,
        "host_us": round(statistics.median(host) * us, 1),
        "host_us_mean": round(statistics.fmean(host) * us, 1),
        "host_us_p90": round(statistics.quantiles(host, n=10)[-1] * us, 1),
        "torch_ops_per_step": statistics.median(n for n, _ in ops),
        "compute_ops_per_step": statistics.median(c for _, c in ops),
        # Medians (the machine is shared: a mean takes every other job's interruptions) and
        # means (the periodic work: block boundaries, look-ahead Extends, commits).
        "components_us": {
            name: round(statistics.median(parts[name]) * us, 1) for name in (*COMPONENTS, "other")
        },
        "components_us_mean": {
            name: round(statistics.fmean(parts[name]) * us, 1) for name in (*COMPONENTS, "other")
        },
        "gc_us_mean": round(statistics.fmean(parts[GC]) * us, 1),
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=150, help="timed decode steps per batch")
    ap.add_argument(
        "--profile",
        nargs="?",
        const="tottime",
        default="",
        help="cProfile's top functions to stderr, sorted by tottime (or cumulative)",
    )
    args = ap.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    # start_decode's requests make 256 tokens; 3 warm-up steps and the timed ones must fit.
    assert args.steps <= 220, "--steps: at most 220 (start_decode's requests stop at 256)"
    torch.manual_seed(0)
    torch.set_num_threads(1)  # host work is one thread's; the tiny forward needs no more
    cfg = transformers.LlamaConfig(
        **HOST_MODEL, eos_token_id=None, bos_token_id=None, pad_token_id=0
    )
    hf = transformers.LlamaForCausalLM(cfg).eval()
    tmp = Path(tempfile.mkdtemp(prefix="pm-host-"))
    hf.save_pretrained(tmp)
    del hf
    model, mconf = load_model(tmp, "cpu", torch.float32)
    blocks = max(batches) * -(-(args.prompt + 256 + 16) // 16) + 64
    config = EngineConfig(
        model=str(tmp),
        device="cpu",
        dtype="float32",
        num_blocks=blocks,
        max_num_seqs=max(256, *batches),
        max_num_batched_tokens=8192,
        async_scheduling=True,  # as on CUDA
    )
    engine = LLMEngine(config, LocalAllocator(), model=model, model_config=mconf)
    await engine.start()
    engine.runner._worker = InlineExecutor()  # the forward inline: one thread, timed apart
    timer = ExclusiveTimer()
    instrument(engine, timer)
    counter = OpCounter()
    uncounted_forward(engine, counter)
    freeze_startup_heap()  # as the executor's service does once it has started (cli.py)
    gc.callbacks.append(timer.gc_callback)
    result: dict[str, Any] = {
        "bench": "host_step",
        "device": "cpu",
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "prompt_tokens": args.prompt,
        "decode": [],
    }
    for batch in batches:
        log(f"batch {batch}: prefill, then {args.steps} timed decode steps")
        row = await measure(engine, timer, counter, batch, args.prompt, args.steps, args.profile)
        result["decode"].append(row)
        log(f"batch {batch}: {json.dumps(row)}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
