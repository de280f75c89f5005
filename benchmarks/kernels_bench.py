"""Paged-attention kernel benchmark: prints one JSON line of results (and a table on stderr).

Timing: each measured call is captured in a CUDA graph, once per rotation set (R sets of
inputs whose total size exceeds L2 several times over, so no call reads another's data out of
L2), and the graph is replayed; a figure is the median replay time divided by R.

Decode (bf16, page 16, head dim 128, 32 query / 8 KV heads, pages scattered over a pool larger
than needed): our Triton kernel; PyTorch SDPA on a contiguous padded cache [B, Hkv, L, D] with
the cuDNN and flash backends (what an unpaged server gets); gather-then-SDPA (copy the pages
into a contiguous cache, then SDPA); the ceilings: a device-to-device copy and a streaming-read
kernel. Achieved bandwidth counts the bytes of K and V over each sequence's real length, q and
out; its fraction is taken of the streaming-read ceiling.

Prefill: batch 8, 1024 cached + 1024 new tokens per sequence, ours over the paged cache against
SDPA's flash backend on the same work laid out contiguously (bottom-right causal).

Usage (GPU): python benchmarks/kernels_bench.py [--sweep] [--json-out PATH]
CPU smoke run of the code paths (interpreter, tiny shapes, no graphs, no baselines):
TRITON_INTERPRET=1 python benchmarks/kernels_bench.py --smoke
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from pagemesh.kernels import decode_attention, prefill_attention
from pagemesh.kernels._triton_utils import cdiv

HQ, HKV, D, PAGE = 32, 8, 128, 16
DTYPE = torch.bfloat16


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- timing


def time_calls(fns: list[Callable[[], Any]], reps: int, use_graph: bool) -> float:
    """Median seconds per call of fns (one call per rotation set)."""
    for fn in fns:  # warm-up: compilation, handles, allocator
        fn()
    if not use_graph:
        t0 = time.perf_counter()
        for fn in fns:
            fn()
        return (time.perf_counter() - t0) / len(fns)
    torch.cuda.synchronize()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    # Warm up for ~50 ms of replays: after the host-side setup the GPU has idled and its clocks
    # have dropped, which otherwise penalizes whichever variant is timed first.
    t_end = time.perf_counter() + 0.05
    for _ in range(1000):
        graph.replay()
        torch.cuda.synchronize()
        if time.perf_counter() > t_end:
            break
    times = []
    for _ in range(reps):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del graph
    return statistics.median(times) / len(fns)


def try_time(fns_factory: Callable[[], list[Callable[[], Any]]], reps: int, gpu: bool) -> Any:
    try:
        return time_calls(fns_factory(), reps, gpu)
    except Exception as e:  # a backend that does not apply: record why
        if gpu:
            torch.cuda.synchronize()
        return f"error: {type(e).__name__}: {str(e).splitlines()[0][:160]}"


# --------------------------------------------------------------------------- ceilings


@triton.jit
def _stream_read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr, ITERS: tl.constexpr):
    # Each program reads ITERS * BLOCK contiguous elements and writes one float: the
    # roofline of a kernel that only reads.
    pid = tl.program_id(0)
    base = pid.to(tl.int64) * BLOCK * ITERS
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(ITERS):
        offs = base + i * BLOCK + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + offs, mask=offs < n, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def ceilings(dev: torch.device, gpu: bool, nbytes: int) -> dict[str, Any]:
    n = nbytes // 2
    x = torch.randn(n, device=dev, dtype=DTYPE)
    y = torch.empty_like(x)
    t_copy = time_calls([lambda: y.copy_(x)], 20, gpu)
    res: dict[str, Any] = {"buffer_bytes": nbytes, "copy_tbs": 2 * nbytes / t_copy / 1e12}
    best = 0.0
    variants = {}
    for block, iters, warps in [(4096, 4, 8), (8192, 2, 8), (2048, 8, 4), (4096, 8, 8)]:
        grid = cdiv(n, block * iters)
        out = torch.empty(grid, device=dev, dtype=torch.float32)

        def run(block: int = block, iters: int = iters, warps: int = warps, out=out) -> None:
            _stream_read_kernel[(out.numel(),)](
                x, out, n, BLOCK=block, ITERS=iters, num_warps=warps
            )

        t = time_calls([run], 20, gpu)
        variants[f"b{block}_i{iters}_w{warps}"] = nbytes / t / 1e12
        best = max(best, nbytes / t / 1e12)
    res["read_tbs"] = best
    res["read_variants_tbs"] = variants
    return res


# --------------------------------------------------------------------------- decode


@dataclass
class DecodeSet:
    q: torch.Tensor  # [B, HQ, D]
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32
    out: torch.Tensor


def make_decode_sets(
    lens: list[int], rot: int, dev: torch.device, gen: torch.Generator, spread: float = 1.5
) -> tuple[torch.Tensor, torch.Tensor, list[DecodeSet]]:
    """One pool holds every rotation set's pages, shuffled over a pool `spread` times larger."""
    need = [cdiv(n, PAGE) for n in lens]
    per_set = sum(need)
    num_blocks = int(per_set * rot * spread) + 1
    shape = (num_blocks, PAGE, HKV, D)
    key_cache = torch.randn(shape, device=dev, dtype=DTYPE)
    value_cache = torch.randn(shape, device=dev, dtype=DTYPE)
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(need)
    sets = []
    used = 0
    for _ in range(rot):
        table = torch.zeros((len(lens), max_blocks), dtype=torch.int32)
        for b, nb in enumerate(need):
            table[b, :nb] = perm[used : used + nb].to(torch.int32)
            used += nb
        q = torch.randn((len(lens), HQ, D), generator=gen).to(DTYPE)
        sets.append(
            DecodeSet(
                q.to(dev),
                table.to(dev),
                torch.tensor(lens, dtype=torch.int32, device=dev),
                torch.empty((len(lens), HQ, D), device=dev, dtype=DTYPE),
            )
        )
    return key_cache, value_cache, sets


def contiguous_cache(cache: torch.Tensor, table: torch.Tensor, max_len: int) -> torch.Tensor:
    """[B, HKV, max_len, D] gathered from the pages (padding rows come from block 0)."""
    nb = cdiv(max_len, PAGE)
    g = cache[table[:, :nb].long()]  # [B, nb, PAGE, HKV, D]
    return g.flatten(1, 2)[:, :max_len].transpose(1, 2).contiguous()


def sdpa_decode(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: Any, scale: float
) -> torch.Tensor:
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([backend]):
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a64, b64 = a.double(), b.double()
    if not torch.isfinite(a64).all():
        return float("inf")
    return float((a64 - b64).norm() / b64.norm())


def bench_decode_config(
    name: str,
    lens: list[int],
    dev: torch.device,
    gpu: bool,
    read_tbs: float,
    l2_bytes: int,
    sweep: bool,
    reps: int,
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    batch = len(lens)
    max_len = max(lens)
    kv_bytes = sum(lens) * HKV * D * 2 * 2
    qo_bytes = 2 * batch * HQ * D * 2
    set_bytes = kv_bytes + qo_bytes
    rot = max(1, min(16, cdiv(4 * l2_bytes, set_bytes)))
    key_cache, value_cache, sets = make_decode_sets(lens, rot, dev, gen)
    scale = D**-0.5
    res: dict[str, Any] = {
        "batch": batch,
        "max_context": max_len,
        "mean_context": sum(lens) / batch,
        "rotation_sets": rot,
        "bytes_per_call": set_bytes,
    }

    def ours(**kw: Any) -> list[Callable[[], Any]]:
        return [
            lambda s=s: decode_attention.paged_decode_attention(
                s.q, key_cache, value_cache, s.block_tables, s.seq_lens, scale, s.out, **kw
            )
            for s in sets
        ]

    def figures(t: Any) -> dict[str, Any]:
        if isinstance(t, str):
            return {"error": t}
        tbs = set_bytes / t / 1e12
        return {"us": t * 1e6, "tbs": tbs, "frac_read": tbs / read_tbs}

    auto_splits = decode_attention.choose_num_splits(batch, HKV, max_len, dev)
    res["auto_splits"] = auto_splits
    t_ours = try_time(lambda: ours(max_seq_len=max_len), reps, gpu)
    res["ours"] = figures(t_ours)
    other = not decode_attention.FUSED_MERGE_DEFAULT
    t = try_time(lambda: ours(max_seq_len=max_len, fused_merge=other), reps, gpu)
    res["ours_fused_merge" if other else "ours_two_kernel_merge"] = figures(t)

    if sweep:
        sw: dict[str, Any] = {}

        def point(label: str, **kw: Any) -> None:
            t = try_time(lambda: ours(max_seq_len=max_len, **kw), reps, gpu)
            sw[label] = figures(t).get("frac_read", figures(t).get("error"))

        for splits in [1, 2, 4, 8, 16, 32, 64]:
            if splits == 1 or max_len // splits >= 64:
                point(f"splits{splits}", num_splits=splits)
        for bn, warps, stages in [(32, 4, 3), (32, 4, 5), (64, 4, 4), (128, 4, 2), (128, 4, 3)]:
            point(f"bn{bn}_w{warps}_s{stages}", block_n=bn, num_warps=warps, num_stages=stages)
        if batch <= 8:  # latency-bound: try deeper pipelines with more slices
            for splits in [16, 32, 64]:
                for bn, warps, stages in [(32, 4, 5), (128, 4, 2), (32, 4, 3)]:
                    point(
                        f"splits{splits}_bn{bn}_w{warps}_s{stages}",
                        num_splits=splits,
                        block_n=bn,
                        num_warps=warps,
                        num_stages=stages,
                    )
        res["sweep_frac_read"] = sw

    # Check: our output against cuDNN's on the same data laid out contiguously (uniform lengths
    # only; a padded cache without a mask attends to padding).
    conts = [
        (
            contiguous_cache(key_cache, s.block_tables, max_len),
            contiguous_cache(value_cache, s.block_tables, max_len),
        )
        for s in sets
    ]
    from torch.nn.attention import SDPBackend

    backends = [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]
    if not gpu:  # smoke run: the math backend exercises the comparison code on CPU
        backends.append(("math", SDPBackend.MATH))
    for label, backend in backends:
        outs: list[torch.Tensor] = []

        def sdpa_fns(
            backend: Any = backend, outs: list[torch.Tensor] = outs
        ) -> list[Callable[[], Any]]:
            def make(s: DecodeSet, k: torch.Tensor, v: torch.Tensor) -> Callable[[], Any]:
                q4 = s.q.unsqueeze(2)

                def fn() -> None:
                    outs.append(sdpa_decode(q4, k, v, backend, scale))

                return fn

            return [make(s, k, v) for s, (k, v) in zip(sets, conts, strict=True)]

        t = try_time(sdpa_fns, reps, gpu)
        res[f"sdpa_{label}"] = figures(t)
        if not isinstance(t, str):
            res[f"sdpa_{label}"]["speed_ours_over"] = (
                (t / t_ours) if not isinstance(t_ours, str) else None
            )
            if len(set(lens)) == 1 and outs:
                ref = outs[0].squeeze(2)
                res[f"sdpa_{label}"]["rel_err_ours_vs"] = rel_err(sets[0].out.float(), ref.float())
    conts.clear()  # free the contiguous copies before the gather baseline allocates its own

    def gather_fns() -> list[Callable[[], Any]]:
        def make(s: DecodeSet) -> Callable[[], Any]:
            q4 = s.q.unsqueeze(2)
            nb = cdiv(max_len, PAGE)

            def fn() -> None:
                idx = s.block_tables[:, :nb].long()
                k = key_cache[idx].flatten(1, 2).transpose(1, 2)
                v = value_cache[idx].flatten(1, 2).transpose(1, 2)
                F.scaled_dot_product_attention(q4, k, v, scale=scale, enable_gqa=True)

            return fn

        return [make(s) for s in sets]

    res["gather_then_sdpa"] = figures(try_time(gather_fns, reps, gpu))
    return res


# --------------------------------------------------------------------------- prefill


def bench_prefill(
    dev: torch.device, gpu: bool, batch: int, cached: int, new: int, sweep: bool, reps: int
) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(7)
    total = cached + new
    lens = [total] * batch
    rot = 2 if gpu else 1
    key_cache, value_cache, sets = make_decode_sets(lens, rot, dev, gen)
    scale = D**-0.5
    qsl = torch.arange(0, batch * new + 1, new, dtype=torch.int32, device=dev)
    qs = [torch.randn((batch * new, HQ, D), generator=gen).to(DTYPE).to(dev) for _ in range(rot)]
    outs = [torch.empty_like(q) for q in qs]
    # Causal FLOPs: new token i sees cached + i + 1 keys; 2 matmuls of 2*D flops per pair.
    pairs = batch * HQ * (new * cached + new * (new + 1) // 2)
    flops = 4 * D * pairs
    res: dict[str, Any] = {"batch": batch, "cached": cached, "new": new, "gflop": flops / 1e9}

    def ours(**kw: Any) -> list[Callable[[], Any]]:
        return [
            lambda i=i: prefill_attention.paged_prefill_attention(
                qs[i], key_cache, value_cache, sets[i].block_tables, sets[i].seq_lens, qsl,
                scale, outs[i], **kw,
            )
            for i in range(rot)
        ]  # fmt: skip

    def figures(t: Any) -> dict[str, Any]:
        if isinstance(t, str):
            return {"error": t}
        return {"us": t * 1e6, "tflops": flops / t / 1e12}

    t_ours = try_time(ours, reps, gpu)
    res["ours"] = figures(t_ours)
    if sweep:
        sw = {}
        for bm, bn, w, st in [
            (128, 64, 8, 3),
            (64, 64, 4, 3),
            (128, 128, 8, 2),
            (128, 128, 4, 3),
            (64, 128, 4, 3),
            (128, 32, 4, 4),
        ]:
            t = try_time(
                lambda bm=bm, bn=bn, w=w, st=st: ours(
                    block_m=bm, block_n=bn, num_warps=w, num_stages=st
                ),
                reps,
                gpu,
            )
            sw[f"bm{bm}_bn{bn}_w{w}_s{st}"] = figures(t).get("tflops", figures(t).get("error"))
        res["sweep_tflops"] = sw
    # Flash on the contiguous layout: q [B, HQ, new, D], k/v [B, HKV, total, D], bottom-right
    # causal (flash's own is_causal aligns the diagonal to the bottom right when q is shorter).
    q4 = [q.view(batch, new, HQ, D).transpose(1, 2).contiguous() for q in qs]
    kv4 = [
        (
            contiguous_cache(key_cache, s.block_tables, total),
            contiguous_cache(value_cache, s.block_tables, total),
        )
        for s in sets
    ]
    flash_outs: list[torch.Tensor] = []

    def flash_fns(expand: bool) -> list[Callable[[], Any]]:
        def make(i: int) -> Callable[[], Any]:
            k, v = kv4[i]
            if expand:
                k = k.repeat_interleave(HQ // HKV, dim=1)
                v = v.repeat_interleave(HQ // HKV, dim=1)

            def fn() -> None:
                flash_outs.append(
                    torch.ops.aten._scaled_dot_product_flash_attention(
                        q4[i], k, v, 0.0, True, False, scale=scale
                    )[0]
                )

            return fn

        return [make(i) for i in range(rot)]

    t = try_time(lambda: flash_fns(False), reps, gpu)
    res["flash_gqa_heads"] = "native"
    if isinstance(t, str):
        res["flash_native_gqa_error"] = t
        res["flash_gqa_heads"] = "expanded"
        t = try_time(lambda: flash_fns(True), reps, gpu)
    res["sdpa_flash"] = figures(t)
    if not isinstance(t, str) and not isinstance(t_ours, str):
        res["ours_over_flash_throughput"] = t / t_ours
        ref = flash_outs[0].transpose(1, 2).reshape(batch * new, HQ, D)
        res["rel_err_ours_vs_flash"] = rel_err(outs[0].float(), ref.float())
    return res


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="CPU interpreter run, tiny shapes")
    ap.add_argument("--sweep", action="store_true", help="also sweep splits and tile configs")
    ap.add_argument(
        "--sweep-max-batch", type=int, default=None, help="sweep only decode batches up to this"
    )
    ap.add_argument("--json-out", default=None)
    ap.add_argument("--only", default=None, help="comma-separated config names")
    args = ap.parse_args()

    gpu = torch.cuda.is_available() and not args.smoke
    dev = torch.device("cuda" if gpu else "cpu")
    reps = 30 if gpu else 1
    info: dict[str, Any] = {
        "bench": "kernels",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join(sys.argv),
    }
    if gpu:
        props = torch.cuda.get_device_properties(dev)
        info.update(
            device=props.name,
            sms=props.multi_processor_count,
            l2_bytes=getattr(props, "L2_cache_size", 50 * 2**20),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
    l2 = info.get("l2_bytes", 1 << 16)
    torch.manual_seed(0)

    t0 = time.time()
    info["ceilings"] = ceilings(dev, gpu, (2 << 30) if gpu else (1 << 16))
    read_tbs = info["ceilings"]["read_tbs"]
    log(f"ceilings: {info['ceilings']} ({time.time() - t0:.0f}s)")

    gen = torch.Generator().manual_seed(1234)
    if gpu:
        configs: dict[str, list[int]] = {
            "b1_ctx8192": [8192],
            "b8_ctx2048": [2048] * 8,
            "b8_ctx8192": [8192] * 8,
            "b64_ctx2048": [2048] * 64,
            "b64_ctx8192": [8192] * 64,
            "b256_ctx2048": [2048] * 256,
            "b256_ctx8192": [8192] * 256,
            "b64_mixed128to8192": torch.randint(128, 8193, (64,), generator=gen).tolist(),
        }
    else:
        configs = {"b2_ctx40": [40, 40], "b3_mixed": [1, 17, 33]}
    if args.only:
        keep = set(args.only.split(","))
        configs = {k: v for k, v in configs.items() if k in keep}
    decode = {}
    for name, lens in configs.items():
        t1 = time.time()
        sweep = args.sweep and (args.sweep_max_batch is None or len(lens) <= args.sweep_max_batch)
        decode[name] = bench_decode_config(name, lens, dev, gpu, read_tbs, l2, sweep, reps)
        log(f"decode {name}: {json.dumps(decode[name])} ({time.time() - t1:.0f}s)")
        if gpu:
            torch.cuda.empty_cache()
    info["decode"] = decode

    t1 = time.time()
    if gpu:
        sweep = args.sweep and args.sweep_max_batch is None
        info["prefill"] = bench_prefill(dev, gpu, 8, 1024, 1024, sweep, reps)
    else:
        info["prefill"] = bench_prefill(dev, gpu, 2, 20, 12, args.sweep, reps)
    log(f"prefill: {json.dumps(info['prefill'])} ({time.time() - t1:.0f}s)")
    info["wall_s"] = time.time() - t0

    # Table, then the JSON line last.
    log(
        f"\n{'config':22s} {'ours us':>9s} {'%read':>6s} {'cudnn us':>9s} {'x cudnn':>7s} {'flash us':>9s} {'gather us':>9s}"
    )
    for name, r in decode.items():
        o = r.get("ours", {})
        c = r.get("sdpa_cudnn", {})
        f = r.get("sdpa_flash", {})
        g = r.get("gather_then_sdpa", {})
        log(
            f"{name:22s} {o.get('us', math.nan):9.1f} {100 * o.get('frac_read', math.nan):6.1f} "
            f"{c.get('us', math.nan):9.1f} {c.get('speed_ours_over', math.nan) or math.nan:7.2f} "
            f"{f.get('us', math.nan):9.1f} {g.get('us', math.nan):9.1f}"
        )
    p = info["prefill"]
    log(
        f"prefill ours {p['ours']} flash {p.get('sdpa_flash')} ratio {p.get('ours_over_flash_throughput')}"
    )
    line = json.dumps(info)
    print(line, flush=True)
    if args.json_out:
        with open(args.json_out, "w") as fh:
            fh.write(line + "\n")


if __name__ == "__main__":
    main()
