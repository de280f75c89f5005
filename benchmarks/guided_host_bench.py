"""Structured output's host time per step (issue 23): what a step with constrained rows adds on
the host, where the engine is host-bound (a batch-64 decode step of the 1B model is ~1.5 ms on
an H100). Prints one JSON line.

`--batch` matchers of the structured bench's JSON schema (SmolLM2's tokenizer, 49,152 tokens)
walk the grammar on random allowed tokens (EOS left out: the schema is open-ended), all of them
constrained, then a mixed batch (`--mixed` of them constrained). Per step, medians in us:
- accept: the landed tokens advance the matchers;
- fill: the step's masks;
- apply: the masks onto the logits [batch, V] (on CUDA the host's share: upload + launch;
  `apply_device_us`: the device's, CUDA events);
each for the engine's code (grammar.GrammarBatch) and for the previous, per-row one
(`before`: a Python call per row to accept and fill, a fresh bitmask per step, the rows spread
on the device before xgrammar's kernel). `fill_threads`: the batched fill at 1, 2, 4, ...
threads. `accept_api`: a call per row against xgrammar's batch_accept_token. `gil`: the batched fill run in a worker thread while the main thread runs Python:
the main thread's progress against running alone (1.0: the fill holds no GIL). `overlap`:
the fill then some pure-Python work inline, against the fill in a worker thread meanwhile.
`h2d_probe` (CUDA): apply's pieces alone (the mask's upload three ways, the kernel's launch, a
torch op's launch), host us, device idle and busy.

    python benchmarks/guided_host_bench.py --tokenizer .tok      # GPU host (the lead)
    python benchmarks/guided_host_bench.py --steps 20            # CPU
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
import numpy as np
import torch
import transformers
import xgrammar as xgr
from pagemesh.services.executor.grammar import GrammarBatch, GrammarCompiler

from benchmarks.structured_bench import GUIDE


@dataclass
class _Request:
    beam: Any = None


@dataclass
class _Seq:
    """What GrammarBatch reads of a Sequence."""

    matcher: Any
    is_finished: bool = False
    request: _Request = field(default_factory=_Request)


def _before_accept(seqs: list[_Seq], tokens: list[int]) -> None:
    # The per-row path this replaces (scheduler.postprocess, one call per row).
    for seq, token in zip(seqs, tokens, strict=True):
        m = seq.matcher
        if m is not None and not m.is_terminated():
            m.accept_token(token)


def _before_fill(seqs: list[_Seq], rows: list[int], words: int) -> torch.Tensor:
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        seq = seqs[r]
        m = seq.matcher
        if seq.is_finished or m is None or m.is_terminated():
            continue
        m.fill_next_token_bitmask(bitmask, i)
    return bitmask


def _before_apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], v: int) -> None:
    c, s = len(rows), logits.shape[0]
    if logits.is_cuda:
        compact = bitmask.pin_memory().to(logits.device, non_blocking=True)
        if c == s:
            xgr.apply_token_bitmask_inplace(logits, compact, vocab_size=v, backend="triton")
            return
        full = torch.empty((s, compact.shape[1]), dtype=torch.int32, device=logits.device)
        idx = torch.from_numpy(np.asarray(rows, np.int64)).pin_memory()
        idx = idx.to(logits.device, non_blocking=True)
        full.index_copy_(0, idx, compact)
        xgr.apply_token_bitmask_inplace(logits, full, vocab_size=v, indices=idx, backend="triton")
        return
    if c != s:
        full = torch.full((s, bitmask.shape[1]), -1, dtype=torch.int32)
        full[rows] = bitmask
        bitmask = full
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=v, indices=rows, backend="cpu")


def _upload(device: torch.device) -> Any:
    def up(a: np.ndarray) -> torch.Tensor:
        t = torch.from_numpy(a)
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

    return up


def _allowed(bitmask: torch.Tensor, i: int, v: int) -> np.ndarray:
    bits = np.unpackbits(bitmask[i].numpy().view(np.uint8), bitorder="little")[:v]
    return np.flatnonzero(bits)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def _us(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e6, 1)


def run(
    compiled: Any,
    n: int,
    constrained: int,
    steps: int,
    v: int,
    eos: int,
    device: torch.device,
    threads: int,
    rng: random.Random,
) -> tuple[dict, list[Any]]:
    rows = list(range(constrained))
    new = [_Seq(xgr.GrammarMatcher(compiled)) for _ in range(n)]
    old = [_Seq(xgr.GrammarMatcher(compiled)) for _ in range(n)]
    for s in (*new[constrained:], *old[constrained:]):
        s.matcher = None
    batch = GrammarBatch(v, {eos}, pin=device.type == "cuda", threads=threads)
    logits = torch.randn(
        n, v, device=device, dtype=torch.bfloat16 if device.type == "cuda" else torch.float32
    )
    up = _upload(device)
    t: dict[str, list[float]] = {k: [] for k in ("accept", "fill", "apply")}
    b: dict[str, list[float]] = {k: [] for k in ("accept", "fill", "apply")}
    dev_new: list[float] = []
    dev_old: list[float] = []
    words = -(-v // 32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for step in range(steps + 3):  # the first 3 warm up (kernel compiles, buffers)
        # The two paths take turns going first (the first after the token draw finds colder
        # caches).
        first_new = step % 2 == 0
        if not first_new:
            old_mask, old_fill_s = _timed(_before_fill, old, rows, words)
        masks, fill_s = _timed(batch.fill, new, rows)
        if first_new:
            old_mask, old_fill_s = _timed(_before_fill, old, rows, words)
        assert torch.equal(masks.bitmask, old_mask), "the two paths' masks differ"
        sync()
        ev = (
            [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            if device.type == "cuda"
            else []
        )
        if ev:
            ev[0].record()
        start = time.perf_counter()
        masks.apply(logits, v, up)
        apply_s = time.perf_counter() - start
        if ev:
            ev[1].record()
            ev[2].record()
        start = time.perf_counter()
        _before_apply(logits, old_mask, rows, v)
        old_apply_s = time.perf_counter() - start
        if ev:
            ev[3].record()
        sync()
        # The landed tokens: random allowed ones (EOS left out: ignore_eos); a matcher with
        # nothing else left starts over (outside the timings).
        tokens = []
        for i in range(n):
            if i >= constrained:
                tokens.append(rng.randrange(v))
                continue
            allowed = _allowed(masks.bitmask, i, v)
            allowed = allowed[allowed != eos]
            if not len(allowed):
                for s in (new[i], old[i]):
                    s.matcher.reset()
                tokens.append(-1)
                continue
            tokens.append(int(allowed[rng.randrange(len(allowed))]))
        live = [i for i in range(n) if tokens[i] >= 0]
        lnew = [new[i] for i in live]
        lold = [old[i] for i in live]
        ltok = [tokens[i] for i in live]
        lrows = [j for j, i in enumerate(live) if i < constrained]
        if not first_new:
            _, old_accept_s = _timed(_before_accept, lold, ltok)
        refused, accept_s = _timed(batch.accept, lnew, ltok, lrows)
        if first_new:
            _, old_accept_s = _timed(_before_accept, lold, ltok)
        assert not refused
        if step >= 3:
            t["fill"].append(fill_s)
            t["apply"].append(apply_s)
            t["accept"].append(accept_s)
            b["fill"].append(old_fill_s)
            b["apply"].append(old_apply_s)
            b["accept"].append(old_accept_s)
            if ev:
                dev_new.append(ev[0].elapsed_time(ev[1]) * 1e-3)
                dev_old.append(ev[2].elapsed_time(ev[3]) * 1e-3)
    out = {k: _us(x) for k, x in t.items()}
    out["total"] = round(sum(out.values()), 1)
    before = {k: _us(x) for k, x in b.items()}
    before["total"] = round(sum(before.values()), 1)
    result = {
        "batch": n,
        "constrained": constrained,
        "threads": threads,
        "us": out,
        "before_us": before,
    }
    if dev_new:
        result["apply_device_us"] = {"now": _us(dev_new), "before": _us(dev_old)}
    return result, [s.matcher for s in new[:constrained]]


def fill_threads(matchers: list[Any], v: int, counts: list[int], steps: int) -> dict:
    """The batched fill alone at several thread counts, on matchers part-way into the grammar
    (where `run` left them)."""
    n = len(matchers)
    buf = torch.empty((n, -(-v // 32)), dtype=torch.int32)
    out = {}
    for k in counts:
        bm = xgr.BatchGrammarMatcher(k)
        times = []
        for _ in range(steps + 3):
            start = time.perf_counter()
            bm.batch_fill_next_token_bitmask(matchers, buf)
            times.append(time.perf_counter() - start)
        out[str(k)] = _us(times[3:])
    return out


def accept_api(matchers: list[Any], v: int, eos: int, steps: int, rng: random.Random) -> dict:
    """Accepting a step's tokens: a call per row against xgrammar's batch_accept_token, on
    forks of the same matchers (the grammar.GrammarBatch.accept choice)."""
    n = len(matchers)
    buf = torch.empty((n, -(-v // 32)), dtype=torch.int32)
    bm = xgr.BatchGrammarMatcher(1)
    per_row, batched = [], []
    for _ in range(steps):
        bm.batch_fill_next_token_bitmask(matchers, buf)
        tokens = []
        for i in range(n):
            allowed = _allowed(buf, i, v)
            allowed = allowed[allowed != eos]
            if not len(allowed):
                matchers[i].reset()
                matchers[i].fill_next_token_bitmask(buf, i)
                allowed = _allowed(buf, i, v)
            tokens.append(int(allowed[rng.randrange(len(allowed))]))
        a = [m.fork() for m in matchers]
        b = [m.fork() for m in matchers]
        start = time.perf_counter()
        ok_a = [m.accept_token(t) for m, t in zip(a, tokens, strict=True)]
        per_row.append(time.perf_counter() - start)
        start = time.perf_counter()
        ok_b = xgr.BatchGrammarMatcher.batch_accept_token(b, tokens)
        batched.append(time.perf_counter() - start)
        assert all(ok_a) and all(ok_b)
        for m, t in zip(matchers, tokens, strict=True):
            m.accept_token(t)
    return {"per_row_us": _us(per_row), "batch_accept_token_us": _us(batched)}


def gil(matchers: list[Any], v: int, threads: int) -> dict:
    """Does the batched fill leave the GIL to the main thread? The main thread counts while a
    worker fills (repeatedly); its rate over its rate alone."""
    n = len(matchers)
    buf = torch.empty((n, -(-v // 32)), dtype=torch.int32)
    bm = xgr.BatchGrammarMatcher(threads)
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            bm.batch_fill_next_token_bitmask(matchers, buf)

    def count(seconds: float) -> float:
        c, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            c += 1
        return c / seconds

    alone = count(0.3)
    th = threading.Thread(target=worker)
    th.start()
    shared = count(0.3)
    stop.set()
    th.join()
    return {"main_thread_rate_with_fill_over_alone": round(shared / alone, 3)}


def overlap(matchers: list[Any], v: int, steps: int) -> dict:
    """Would a worker thread hide the fill behind the loop's Python work? Per step: the fill
    then ~`work` of pure Python (inline, as the engine does), against the fill submitted to a
    worker thread, the same Python work, then waiting for the fill."""
    n = len(matchers)
    buf = torch.empty((n, -(-v // 32)), dtype=torch.int32)
    bm = xgr.BatchGrammarMatcher(1)
    pool = concurrent.futures.ThreadPoolExecutor(1)

    def python_work() -> int:  # ~ a postprocess of a batch: attribute reads, small objects
        acc = 0
        for i in range(3000):
            acc += len(str(i))
        return acc

    work, inline, threaded = [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        python_work()
        work.append(time.perf_counter() - start)
        start = time.perf_counter()
        bm.batch_fill_next_token_bitmask(matchers, buf)
        python_work()
        inline.append(time.perf_counter() - start)
        start = time.perf_counter()
        future = pool.submit(bm.batch_fill_next_token_bitmask, matchers, buf)
        python_work()
        future.result()
        threaded.append(time.perf_counter() - start)
    pool.shutdown()
    return {"python_work_us": _us(work), "inline_us": _us(inline), "worker_us": _us(threaded)}


def h2d_probe(v: int, device: torch.device, steps: int) -> dict:
    """CUDA: the host's time for each piece of StepMasks.apply alone, medians in us over
    `steps` calls, with the device idle and with it busy (a queued matmul of ~ms that the
    calls queue behind, as in a step): the mask's upload as the engine makes it (a view of a
    pinned buffer, `.to(non_blocking=True)`), the same into a preallocated device buffer
    (`copy_`), the same from pageable memory, the mask kernel's launch, and a one-op torch
    launch for scale."""
    if device.type != "cuda":
        return {}
    words = -(-v // 32)
    pinned = torch.full((256, words), -1, dtype=torch.int32).pin_memory()
    pageable = torch.full((256, words), -1, dtype=torch.int32)
    dst = torch.empty((256, words), dtype=torch.int32, device=device)
    logits = torch.zeros(64, v, dtype=torch.float32, device=device)
    big = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mask64 = dst[:64]
    from pagemesh import kernels

    probes = {
        "pinned_view_to": lambda: pinned[:64].to(device, non_blocking=True),
        "pinned_copy_into": lambda: mask64.copy_(pinned[:64], non_blocking=True),
        "pageable_to": lambda: pageable[:64].to(device, non_blocking=True),
        "mask_kernel_launch": lambda: kernels.apply_token_bitmask(logits, mask64, None, v),
        "torch_op_launch": lambda: logits.add_(0.0),
    }
    out: dict[str, Any] = {"pinned_view_is_pinned": bool(pinned[:64].is_pinned())}
    for busy in (False, True):
        for name, fn in probes.items():
            fn()
            times = []
            for _ in range(steps):
                torch.cuda.synchronize()
                if busy:
                    big @ big  # ~1-2 ms of device work queued ahead
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            out[f"{name}{'_busy' if busy else ''}_us"] = _us(times)
    torch.cuda.synchronize()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", type=Path, default=None, help="SmolLM2's tokenizer files")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--mixed", type=int, default=16, help="constrained rows of the mixed batch")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument(
        "--threads", type=int, default=0, help="the engine's fill threads (0: its default)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    tok_dir = args.tokenizer
    if tok_dir is None:
        from pagemesh.services.executor.model.loader import DEFAULT_MODEL, resolve_model

        tok_dir = resolve_model(DEFAULT_MODEL)
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    v = len(tok)
    eos = int(tok.eos_token_id)
    compiler = GrammarCompiler(str(tok_dir), v, [eos])
    compiled = compiler.compile_now(GUIDE)
    compiler.close()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from pagemesh.services.executor.grammar import default_fill_threads

    threads = args.threads or default_fill_threads()
    rng = random.Random(args.seed)
    counts = sorted({1, 2, 4, 8, 16, threads} & set(range(1, (os.cpu_count() or 1) + 1)))
    every, matchers = run(
        compiled, args.batch, args.batch, args.steps, v, eos, device, threads, rng
    )
    mixed, _ = run(compiled, args.batch, args.mixed, args.steps, v, eos, device, threads, rng)
    result = {
        "bench": "guided_host",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "cpu_count": os.cpu_count(),
        "vocab": v,
        "all_constrained": every,
        "mixed": mixed,
        "fill_threads_us": fill_threads(matchers, v, counts, args.steps),
        "accept_api": accept_api(matchers, v, eos, args.steps, rng),
        "gil": gil(matchers, v, threads),
        "overlap": overlap(matchers, v, args.steps),
        "h2d_probe": h2d_probe(v, device, args.steps),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    sys.exit(main())
