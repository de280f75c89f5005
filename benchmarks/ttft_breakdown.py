"""Where a request's time to first token goes at light load: the mesh of real processes (Redis,
kvmanager, executor, gateway), a shared-prefix workload at a low Poisson rate, and the three
clocks joined (client, gateway `--trace-requests`, executor `--trace-steps`; all perf_counter,
CLOCK_MONOTONIC, one clock on the host).

    python benchmarks/ttft_breakdown.py --model /tmp/rand1b --device cuda --rate 16    # GPU
    python benchmarks/ttft_breakdown.py --model <SmolLM2 dir> --device cpu --rate 2 \
        --num-requests 24 --system-tokens 256                                         # CPU

Prints one JSON line: the client's TTFT p50 (and p10/p90) and the p50 of each segment, in ms:

  http_in     client send -> the gateway's handler starts (aiohttp, HTTP parsing)
  parse       -> body read and validated
  tokenize    -> chat template applied and tokenized
  route       -> its executor chosen (the kvmanager Route call)
  submit      -> handed to the executor's Serve stream (request built)
  grpc_up     -> the executor's loop read it
  wait_step   -> the step that admits it begins (the step in progress ends first)
  admit       -> that step's schedule() done (admission, the kvmanager Allocate awaited)
  launch      -> that step's batch built and launched
  to_first    -> its first token out of a step (device time, landing; with async scheduling
                 also the next step's schedule and launch, which come before the landing)
  back        -> the gateway's request read its first step (executor routing, gRPC, fan-out)
  sse         -> first SSE bytes written (detokenize, format)
  http_out    -> the client read its first content delta

and, for the request's end (issue 24: what its last token waits for on the host):

  out_wait_first, out_wait_last   the step that made its first (last) output: from that
                 output's landing (postprocess done) to its hand-over to the gateway's stream
  last_gap       the client's gap between its last two content deltas (mid_gap: the gaps
                 before; last_gap - mid_gap is what the last token costs more than the others)
  e2e            client send -> its last content delta
With --max-tokens 1 the first token is the last: its TTFT carries whatever the end costs.

Only requests whose prompt hit the cache count in the cached figures (every request after the
first with prefix caching on). `--arms` runs several arms, each on a fresh mesh: `cached`,
`uncached` (the executor with --no-prefix-caching) and `sync` (cached, the executor with
--scheduling sync: what async scheduling costs or saves at light load).
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
from pagemesh.services.gateway.chat import Tokenizer

from benchmarks import workloads
from benchmarks.load_client import ClientPool, Exchange
from benchmarks.serve_bench import drive, percentiles
from benchmarks.workloads import Conversation, Turn

SEGMENTS = (
    "http_in",
    "parse",
    "tokenize",
    "route",
    "submit",
    "grpc_up",
    "wait_step",
    "admit",
    "launch",
    "to_first",
    "back",
    "sse",
    "http_out",
)


def shared_prefix(
    tokenizer: Any, count: int, args: argparse.Namespace, seed: int
) -> list[Conversation]:
    """workloads' shared_prefix (its defaults: a 1,024-token system prompt, user parts of
    64..256 tokens) with the lengths set by `args` (a CPU takes seconds for the defaults)."""
    rng = random.Random(seed)
    words = workloads.single_token_words(tokenizer)
    system = workloads.text_of(words, rng, args.system_tokens)
    lo, hi = args.user_tokens
    return [
        Conversation(
            [Turn(workloads.text_of(words, rng, rng.randint(lo, hi)), args.max_tokens)],
            system=system,
        )
        for _ in range(count)
    ]


def join(
    exchanges: list[Exchange], gateway_lines: list[str], executor_lines: list[str]
) -> list[dict[str, float]]:
    """Each answered request's segments (seconds), in send order. The client's record finds the
    gateway's line by the HTTP request id (X-Request-Id); the executor's events are under the
    gateway's request id."""
    gw = {r["http_id"]: r for r in map(json.loads, gateway_lines)}
    sent = sorted((e for e in exchanges if e.result.ok), key=lambda e: e.result.sent_at)
    missing = [e.result.request_id for e in sent if e.result.request_id not in gw]
    if missing:
        raise RuntimeError(f"{len(missing)} requests not in the gateway's trace: {missing[:3]}")
    events = [json.loads(line) for line in executor_lines]
    arrive = {e["rid"]: e["t"] for e in events if e["ev"] == "arrive"}
    first = {e["rid"]: e["t"] for e in events if e["ev"] == "first"}
    last = {e["rid"]: e["t"] for e in events if e["ev"] == "last"}
    admitted = {rid: e for e in events if e["ev"] == "step" for rid in e.get("admitted_rids", ())}
    steps = sorted((e for e in events if e["ev"] == "step"), key=lambda e: e["end"])
    ends = [e["end"] for e in steps]

    def step_of(t: float) -> dict[str, Any]:
        """The step whose trace line followed `t` (a first/last event, written just before)."""
        return steps[bisect.bisect_left(ends, t)]

    def out_wait(t: float) -> float:
        """From the landing of that step's outputs to `t` (their hand-over to the stream)."""
        landed = step_of(t).get("landed")
        return t - landed if landed else float("nan")

    rows = []
    for ex in sent:
        r = ex.result
        g = gw[r.request_id]
        rid = g["rid"]
        step = admitted[rid]
        scheduled = step["t"] + step["sched"]
        launched = scheduled + step["launch"]
        rows.append(
            {
                "cached": float(r.cached_tokens > 0),
                "ttft": r.ttft,
                "http_in": g["entry"] - r.sent_at,
                "parse": g["parsed"] - g["entry"],
                "tokenize": g["encoded"] - g["parsed"],
                "route": g["routed"] - g["encoded"],
                "submit": g["submitted"] - g["routed"],
                "grpc_up": arrive[rid] - g["submitted"],
                "wait_step": step["t"] - arrive[rid],
                "admit": step["sched"],
                "admit_kv_wait": step["kv_wait"],
                "launch": step["launch"],
                "to_first": first[rid] - launched,
                "back": g["first_step"] - first[rid],
                "sse": g["first_write"] - g["first_step"],
                "http_out": r.sent_at + r.ttft - g["first_write"],
                "out_wait_first": out_wait(first[rid]),
                "out_wait_last": out_wait(last[rid]) if rid in last else float("nan"),
                # Its last step left nothing running: the engine went idle with it.
                "ended_alone": float(rid in last and step_of(last[rid])["running"] == 0),
                **_client_gaps(r.token_times),
                # Running sequences besides the ones this step admitted: 0 is an idle engine.
                "others_running": float(step["running"] - step["admitted"]),
                "admitting_step": step["end"] - step["t"],
                "steps_to_first": float(
                    sum(1 for e in events if e["ev"] == "step" and step["t"] < e["t"] <= first[rid])
                    + 1
                ),
            }
        )
    return rows


def _client_gaps(times: list[float]) -> dict[str, float]:
    """The client's end of the request: its last inter-delta gap, the median of the ones before
    and its last delta's time after the send (nan where there are too few deltas)."""
    nan = float("nan")
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {
        "last_gap": gaps[-1] if gaps else nan,
        "mid_gap": statistics.median(gaps[:-1]) if len(gaps) > 1 else nan,
        "e2e": times[-1] if times else nan,
    }


def decode_step_times(executor_lines: list[str], since: float) -> list[float]:
    """Each decode-only step's time, from its start to its trace line (seconds)."""
    steps = (json.loads(line) for line in executor_lines)
    return [
        e["end"] - e["t"]
        for e in steps
        if e["ev"] == "step" and e["t"] >= since and e["tokens"] == e["seqs"] > 0
    ]


def summarize(rows: list[dict[str, float]], decode_steps: list[float]) -> dict[str, Any]:
    def ms(v: float) -> float:
        return round(v * 1000, 3)

    out: dict[str, Any] = {"requests": len(rows)}
    if not rows:
        return out
    ttft = percentiles([r["ttft"] for r in rows], (10, 50, 90))
    out["ttft_ms"] = {k: ms(v) for k, v in ttft.items()}
    out["p50_ms"] = {
        k: ms(statistics.median(r[k] for r in rows)) for k in (*SEGMENTS, "admit_kv_wait")
    }
    out["sum_of_p50_ms"] = round(sum(out["p50_ms"][k] for k in SEGMENTS), 3)
    # The request's end: known values only (nan: too few deltas, no trace line).
    for k in ("out_wait_first", "out_wait_last", "last_gap", "mid_gap", "e2e"):
        known = [r[k] for r in rows if r[k] == r[k]]
        if known:
            out["p50_ms"][k] = ms(statistics.median(known))
    # out_wait_last split by how the request ended: alone (the engine idle after its last step)
    # or beside others still running.
    for name, alone in (("out_wait_last_alone", 1.0), ("out_wait_last_beside", 0.0)):
        known = [r["out_wait_last"] for r in rows if r["ended_alone"] == alone]
        known = [v for v in known if v == v]
        if known:
            out["p50_ms"][name] = ms(statistics.median(known))
    out["ended_alone_fraction"] = round(sum(r["ended_alone"] for r in rows) / len(rows), 3)
    out["steps_to_first_p50"] = statistics.median(r["steps_to_first"] for r in rows)
    # How the engine stood when each request came: alone (an idle engine) or beside decodes,
    # and what one step takes (the admitting one; the decode-only ones of the run).
    out["admitted_beside_others_fraction"] = round(
        sum(r["others_running"] > 0 for r in rows) / len(rows), 3
    )
    out["admitting_step_ms_p50"] = ms(statistics.median(r["admitting_step"] for r in rows))
    if decode_steps:
        out["decode_step_ms_p50"] = ms(statistics.median(decode_steps))
    return out


ARMS = {"cached": [], "uncached": ["--no-prefix-caching"], "sync": ["--scheduling", "sync"]}


def run(args: argparse.Namespace, arm: str) -> dict[str, Any]:
    from tests.support.mesh import Mesh, MeshConfig

    model_dir = str(Path(args.model).resolve())
    tok = Tokenizer.load(args.tokenizer or model_dir)
    uncached = arm == "uncached"
    # A folder per arm: its own Redis data and traces.
    work = Path(args.workdir or tempfile.mkdtemp(prefix="pm-ttft-")) / arm
    gw_trace, ex_trace = work / "gateway.jsonl", work / "executor.jsonl"
    for f in (gw_trace, ex_trace):
        f.unlink(missing_ok=True)
    executor_args = ["--device", args.device, "--trace-steps", str(ex_trace)]
    if args.device.startswith("cuda"):
        executor_args += ["--num-blocks", "0", "--gpu-memory-utilization", "0.85"]
    executor_args += args.executor_arg + ARMS[arm]  # the arm's flags last: they win
    config = MeshConfig(
        model=model_dir,
        model_name="bench",
        num_blocks=args.num_blocks,
        executor_args=executor_args,
        gateway_args=[
            "--workers",
            str(args.gateway_workers),
            "--trace-requests",
            str(gw_trace),
        ],
        start_timeout=600.0,
    )
    convs = shared_prefix(tok.hf, args.num_requests, args, args.seed)
    # Warm-up (untimed): other prompts, a burst then a few alone, so that the measured run meets
    # no first-time compile of a shape.
    warm = shared_prefix(tok.hf, args.warmup, args, args.seed + 500)
    with Mesh(work, config) as mesh, ClientPool(1) as clients:
        asyncio.run(drive(mesh.url, "bench", warm, float("inf"), 0, True, clients))
        asyncio.run(drive(mesh.url, "bench", warm[:4], args.rate, 1, False, clients))
        since = time.perf_counter()
        client_run = asyncio.run(
            drive(mesh.url, "bench", convs, args.rate, args.seed, True, clients)
        )
    # Read after the mesh stopped: the executor flushes its trace at a clean exit.
    executor_lines = ex_trace.read_text().splitlines()
    rows = join(client_run.exchanges, gw_trace.read_text().splitlines(), executor_lines)
    failed = sum(not e.result.ok for e in client_run.exchanges)
    # With caching on, the first request (sent alone) fills the cache: the rest hit.
    measured = rows if uncached else [r for r in rows if r["cached"]]
    return {
        "bench": "ttft_breakdown",
        "arm": arm,
        "device": args.device,
        "rate": args.rate,
        "system_tokens": args.system_tokens,
        "user_tokens": list(args.user_tokens),
        "max_tokens": args.max_tokens,
        "gateway_workers": args.gateway_workers,
        "executor_args": args.executor_arg + ARMS[arm],
        "failed": failed,
        **summarize(measured, decode_step_times(executor_lines, since)),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model dir (SmolLM2's, or make_random_model's)")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cuda")
    p.add_argument("--rate", type=float, default=16.0, help="requests/s (Poisson)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--system-tokens", type=int, default=1024)
    p.add_argument(
        "--user-tokens",
        type=lambda v: tuple(int(x) for x in v.split(",")),
        default=(64, 256),
        help="LO,HI: each user part's length, uniform",
    )
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-blocks", type=int, default=2048, help="KV blocks (CPU; CUDA profiles)")
    p.add_argument("--gateway-workers", type=int, default=1)
    p.add_argument(
        "--arms",
        default="cached",
        help=f"comma-separated, in order, each on a fresh mesh: {', '.join(ARMS)}",
    )
    p.add_argument("--executor-arg", action="append", default=[], help="one more executor argument")
    p.add_argument("--workdir", default="")
    args = p.parse_args()
    arms = [a for a in args.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or not arms:
        p.error(f"--arms: choose from {', '.join(ARMS)} (got {args.arms!r})")
    for arm in arms:
        print(json.dumps(run(args, arm)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
