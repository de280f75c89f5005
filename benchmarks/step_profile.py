"""Where a decode step's time goes: the engine's decode step under torch.profiler.

The step is the one `benchmarks/throughput.py` times (`decode_step_time`): a random-weight
~1B Llama (hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 8192, vocab 32000, bf16),
`--batches` sequences of `--prompt` random tokens prefilled, then decode steps as the engine
runs them (CUDA graphs, async scheduling). Per batch size: the median step time of 30
unprofiled steps, then `--steps` steps under the profiler (CPU + CUDA activities), split into
- device time per step by kind: GEMMs, attention, elementwise (norms, RoPE, activation, KV
  write, embedding, index ops), sampling (every kernel launched from inside the sampler),
  memcpy/memset;
- device busy time (the union of all device intervals) and the host gap: the step's wall time
  minus the device busy time (launches, scheduling, Python; under the profiler, which slows
  the host a little);
- the floor: (weight bytes + KV bytes read) / measured device copy bandwidth, as throughput.py.
Prints one JSON line; the top kernels of each batch size go to stderr.

    python benchmarks/step_profile.py [--batches 64,256] [--prompt 512] [--steps 20]
    PAGEMESH_FUSED_OPS=0 python benchmarks/step_profile.py   # the compiled, unfused ops
    python benchmarks/step_profile.py --tiny   # CPU: a tiny model, CPU activities only
                                               # (the leaf aten ops stand for kernels)
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
import transformers
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.kvmanager.local import LocalAllocator
from torch.profiler import ProfilerActivity, profile, record_function

from benchmarks.throughput import MODEL, start_decode, stop_decode, timed_steps

STEP = "pm::step"
SAMPLE = "pm::sample"
KINDS = ("gemm", "attention", "elementwise", "sampling", "memcpy")
_GEMM = re.compile(
    r"gemm|gemv|cutlass|xmma|nvjet|cublas|splitk|^sm\d\d_|^ampere_|aten::(mm|addmm|bmm)$", re.I
)
_ATTN = re.compile(r"attn|attention|_decode_kernel|_merge_kernel|_prefill_kernel|flash|sdpa", re.I)
_MEMCPY = re.compile(r"memcpy|memset", re.I)
_SAMPLE = re.compile(r"argmax|topk|sort|softmax|exponential|multinomial", re.I)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


@dataclass(slots=True)
class Span:
    name: str
    tid: Any
    start: float  # us
    end: float
    launch: tuple[Any, float]  # (thread, time) it was issued from: where its annotation is


def classify(span: Span, category: str, in_sampler: bool) -> str:
    if category in ("gpu_memcpy", "gpu_memset") or _MEMCPY.search(span.name):
        return "memcpy"
    if in_sampler:
        return "sampling"
    if _GEMM.search(span.name):
        return "gemm"
    if _ATTN.search(span.name):
        return "attention"
    if _SAMPLE.search(span.name):
        return "sampling"
    return "elementwise"


def _cpu_self_times(events: list[dict]) -> list[tuple[dict, float]]:
    """Each CPU op with its self time (its duration less its direct children's), per thread:
    on CPU an op's own work is its self time (addmm's matmul, not the resolve_conj inside)."""
    by_tid: dict[Any, list[dict]] = defaultdict(list)
    for e in events:
        by_tid[e["tid"]].append(e)
    out: list[tuple[dict, float]] = []
    for evs in by_tid.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list[Any]] = []  # [event, children's total duration]
        for e in evs:
            while stack and stack[-1][0]["ts"] + stack[-1][0]["dur"] <= e["ts"]:
                top, children = stack.pop()
                out.append((top, top["dur"] - children))
            if stack:
                stack[-1][1] += e["dur"]
            stack.append([e, 0.0])
        out += [(top, top["dur"] - children) for top, children in stack]
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None and cur_s is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None and cur_s is not None:
        total += cur_e - cur_s
    return total


def analyse(trace: dict, cuda: bool) -> tuple[dict, list[dict]]:
    """(per-step split, top kernels) from a Chrome trace of the profiled steps."""
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X"]
    steps = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == STEP]
    samples = [e for e in events if e.get("cat") == "user_annotation" and e["name"] == SAMPLE]
    assert steps, "no profiled steps in the trace"
    win_start = min(e["ts"] for e in steps)
    win_end = max(e["ts"] + e["dur"] for e in steps)
    spans: list[tuple[Span, str]] = []
    self_us: dict[int, float] = {}  # CPU: id(span) -> its self time
    if cuda:
        launches = {
            e["args"].get("correlation"): (e["tid"], e["ts"])
            for e in events
            if e.get("cat") in ("cuda_runtime", "cuda_driver")
        }
        for e in events:
            if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset"):
                launch = launches.get(e["args"].get("correlation"), (None, e["ts"]))
                span = Span(e["name"], e["tid"], e["ts"], e["ts"] + e["dur"], launch)
                spans.append((span, e["cat"]))
    else:
        ops = [e for e in events if e.get("cat") == "cpu_op"]
        for e, own in _cpu_self_times(ops):
            span = Span(e["name"], e["tid"], e["ts"], e["ts"] + e["dur"], (e["tid"], e["ts"]))
            self_us[id(span)] = own
            spans.append((span, "cpu_op"))
    sample_ranges: dict[Any, list[tuple[float, float]]] = defaultdict(list)
    for e in samples:
        sample_ranges[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))

    def in_sampler(launch: tuple[Any, float]) -> bool:
        tid, ts = launch
        return any(s <= ts <= t for s, t in sample_ranges.get(tid, ()))

    n = len(steps)
    by_kind = dict.fromkeys(KINDS, 0.0)
    per_name: dict[tuple[str, str], list[float]] = defaultdict(list)
    busy: list[tuple[float, float]] = []
    cpu_busy = 0.0
    for span, category in spans:
        start, end = max(span.start, win_start), min(span.end, win_end)
        if end <= start:
            continue
        # CUDA: the kernel's time in the window; CPU: the op's self time (ops nest on a thread)
        took = self_us.get(id(span), end - start) if not cuda else end - start
        kind = classify(span, category, in_sampler(span.launch))
        by_kind[kind] += took
        per_name[(span.name, kind)].append(took)
        busy.append((start, end))
        cpu_busy += took
    wall = (win_end - win_start) / n
    busy_us = (_union(busy) if cuda else cpu_busy) / n
    split = {
        "profiled_step_ms": round(wall / 1e3, 3),
        "device_busy_ms": round(busy_us / 1e3, 3),
        "host_gap_ms": round((wall - busy_us) / 1e3, 3),
        "device_ms": {k: round(v / n / 1e3, 3) for k, v in by_kind.items()},
        "kernels_per_step": round(sum(len(v) for v in per_name.values()) / n, 1),
    }
    top = sorted(per_name.items(), key=lambda kv: -sum(kv[1]))
    table = [
        {
            "name": name,
            "kind": kind,
            "calls_per_step": round(len(d) / n, 1),
            "us_per_step": round(sum(d) / n, 1),
        }
        for (name, kind), d in top
    ]
    return split, table


def copy_bandwidth(device: str) -> float:
    """Bytes read + written per second of a large copy on `device`."""
    numel = 2**28 if device == "cuda" else 2**24
    src = torch.randn(numel, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    return 2 * numel * 4 / seconds


def wrap_sampler(engine: LLMEngine) -> None:
    """Annotate the sampler's calls so that the kernels it launches count as sampling."""
    runner = engine.runner
    inner: Callable[..., Any] = runner.sampler

    class Annotated:
        def __getattr__(self, name: str) -> Any:
            return getattr(inner, name)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            with record_function(SAMPLE):
                return inner(*args, **kwargs)

    runner.sampler = Annotated()  # type: ignore[assignment]


class InlineExecutor(concurrent.futures.Executor):
    """Runs what is submitted at once, in the caller's thread. --tiny: the CPU engine runs its
    forward in a worker thread, and torch.profiler only records the thread it was started in."""

    def submit(
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


def sync(device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


async def profile_batch(
    engine: LLMEngine, batch: int, prompt_len: int, steps: int, device: str, tag: str
) -> tuple[dict, list[dict]]:
    await start_decode(engine, batch, prompt_len, tag)
    times = await timed_steps(engine, 30, lambda: sync(device))
    activities = [ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(ProfilerActivity.CUDA)
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            with record_function(STEP):
                await engine.step()
        sync(device)
    ctx = await stop_decode(engine, batch, tag)
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    prof.export_chrome_trace(path)
    trace = json.loads(Path(path).read_text())
    os.unlink(path)
    split, table = analyse(trace, device == "cuda")
    result = {
        "batch": batch,
        "context_tokens_total": ctx,
        "step_ms": round(statistics.median(times) * 1e3, 3),
        **split,
    }
    return result, table


def print_table(batch: int, table: list[dict], limit: int) -> None:
    print(f"\n-- batch {batch}: top kernels (device time per step) --", file=sys.stderr)
    print(f"{'us/step':>9} {'calls':>6}  {'kind':<11} name", file=sys.stderr)
    for row in table[:limit]:
        name = row["name"] if len(row["name"]) <= 100 else row["name"][:97] + "..."
        print(
            f"{row['us_per_step']:>9.1f} {row['calls_per_step']:>6} {row['kind']:<11} {name}",
            file=sys.stderr,
        )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="64,256")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20, help="profiled decode steps per batch")
    ap.add_argument("--top", type=int, default=25, help="rows of the kernel table")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="CPU, a tiny model, CPU activities")
    args = ap.parse_args()
    device = "cpu" if args.tiny else "cuda"
    model_args = dict(MODEL)
    batches = [int(b) for b in args.batches.split(",")]
    if args.tiny:
        model_args.update(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            vocab_size=512,
        )
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        **model_args, eos_token_id=None, bos_token_id=None, pad_token_id=0
    )
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        hf = transformers.LlamaForCausalLM(cfg).to(dtype).eval()
    tmp = Path(tempfile.mkdtemp(prefix="pm-step-"))
    hf.save_pretrained(tmp)
    del hf
    model, mconf = load_model(tmp, device, dtype)
    config = EngineConfig(
        model=str(tmp),
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        num_blocks=4096 if device == "cpu" else None,
        max_num_seqs=max(256, *batches),
        max_num_batched_tokens=8192,
        use_cuda_graphs=not args.no_cuda_graphs,
        gpu_memory_utilization=0.6,
    )
    engine = LLMEngine(config, LocalAllocator(), model=model, model_config=mconf)
    await engine.start()
    wrap_sampler(engine)
    if device == "cpu":
        engine.runner._worker = InlineExecutor()
    bw = copy_bandwidth(device)
    weight_bytes = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n
    )
    kv_per_token = 2 * mconf.num_layers * mconf.num_kv_heads * mconf.head_dim * dtype.itemsize
    result: dict[str, Any] = {
        "bench": "step_profile",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__,
        "fused_ops": os.environ.get("PAGEMESH_FUSED_OPS", "1"),
        "cuda_graphs": config.use_cuda_graphs and device == "cuda",
        "async_scheduling": config.async_scheduling,
        "prompt_tokens": args.prompt,
        "profiled_steps": args.steps,
        "params_b": round(sum(p.numel() for p in model.parameters()) / 1e9, 3),
        "copy_bandwidth_GBps": round(bw / 1e9, 1),
        "decode": [],
    }
    for batch in batches:
        log(f"batch {batch}: prefill, 30 timed steps, {args.steps} profiled")
        row, table = await profile_batch(
            engine, batch, args.prompt, args.steps, device, f"p{batch}_"
        )
        floor = (weight_bytes + row["context_tokens_total"] * kv_per_token) / bw
        row["floor_ms"] = round(floor * 1e3, 3)
        row["step_over_floor"] = round(row["step_ms"] / (floor * 1e3), 2)
        result["decode"].append(row)
        print_table(batch, table, args.top)
        log(f"batch {batch}: {json.dumps(row)}")
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
