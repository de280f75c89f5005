"""The serving benchmark: the whole mesh driven through the streaming chat API like real clients.

    python benchmarks/serve_bench.py --url http://127.0.0.1:8000 --kvmanager 127.0.0.1:50051 \
        --workload shared_prefix --rate inf

Prints one JSON line per run: request throughput, output tokens/s, time to first token and time
per output token (p50/p90/p99), the prefix-cache hit rate measured by kvmanager against the
theoretical one for the workload, peak KV blocks in use, and KV memory utilization (tokens held
by live sequences over the slots of the blocks they hold, sampled while requests run).

Requests go out from `--client-procs` worker processes (benchmarks/load_client.py), each
conversation whole on one, with bodies serialized and connections opened before the clock
starts: one Python process would itself delay a burst's sends and the reading of its tokens.

`--start` launches the mesh itself (benchmarks/mesh_launcher.py) with `--model`, `--allocator`
and `--no-prefix-caching`, so an A/B pair runs in one invocation (`--compare allocator` or
`--compare prefix_caching`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
from pagemesh.services.gateway.chat import Tokenizer

from benchmarks import workloads
from benchmarks.load_client import (
    DEFAULT_CLIENT_PROCS,
    ClientPool,
    Exchange,
    arrival_offsets,
    client_session,
    first_turn_body,
    run_conversation,
)
from benchmarks.workloads import Conversation


def percentiles(values: list[float], ps: tuple[int, ...] = (50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in ps}
    ordered = sorted(values)
    out = {}
    for p in ps:
        k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
        out[f"p{p}"] = ordered[k]
    return out


class KVStatsPoller:
    """Samples kvmanager's GetStats (peak blocks in use) and the executor's GetInfo (tokens held
    by live sequences over the slots of the blocks they hold) while the run goes."""

    def __init__(self, address: str, executor_address: str | None, interval: float = 0.2) -> None:
        import grpc
        from pagemesh.proto import (
            executor_pb2,
            executor_pb2_grpc,
            kvmanager_pb2,
            kvmanager_pb2_grpc,
        )

        self._kv_pb2 = kvmanager_pb2
        self._ex_pb2 = executor_pb2
        self._channels = [grpc.aio.insecure_channel(address)]
        self._kv = kvmanager_pb2_grpc.KVManagerStub(self._channels[0])
        self._ex = None
        if executor_address:
            self._channels.append(grpc.aio.insecure_channel(executor_address))
            self._ex = executor_pb2_grpc.ExecutorStub(self._channels[1])
        # Each GetInfo walks every running sequence's table on the executor's event-loop thread
        # (~1 ms at 256 sequences): sampled too often, the measurement slows the run it measures.
        self.interval = interval
        self.peak_in_use = 0
        self.util_samples: list[float] = []
        self.sharing_samples: list[float] = []  # table blocks per distinct block
        self._task: asyncio.Task | None = None

    async def stats(self) -> Any:
        return await self._kv.GetStats(self._kv_pb2.GetStatsRequest(), timeout=5)

    async def _sample(self) -> None:
        s = await self.stats()
        for ex in s.executors:
            self.peak_in_use = max(self.peak_in_use, ex.pool.in_use)
        if self._ex is not None:
            info = await self._ex.GetInfo(self._ex_pb2.GetInfoRequest(), timeout=5)
            # Only samples with a full batch running: a lone tail request's last partial block
            # says little about how well a loaded server packs its memory.
            if info.kv_table_blocks and info.num_running >= 8:
                self.util_samples.append(
                    info.kv_tokens_held / (info.kv_table_blocks * info.block_size)
                )
                self.sharing_samples.append(info.kv_table_blocks / max(1, info.kv_blocks_held))

    async def _run(self) -> None:
        while True:
            # A sample lost to a timeout is no reason to stop the run.
            with contextlib.suppress(Exception):
                await self._sample()
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for ch in self._channels:
            await ch.close()


def hits_since_start(stats: Any) -> tuple[int, int]:
    for w in stats.windows:
        if w.name == "since_start":
            return w.hits.hit_tokens, w.hits.query_tokens
    return 0, 0


@dataclass(slots=True)
class ClientRun:
    """What the clients saw of one run."""

    exchanges: list[Exchange]  # every request, in arrival (send) order
    elapsed: float  # to the last response's end
    cpu_s: list[float]  # the parent's CPU seconds over the run, then each worker's
    requests_per_worker: list[int]


async def drive(
    url: str,
    model: str,
    convs: list[Conversation],
    rate: float,
    seed: int,
    warmup_first: bool,
    clients: ClientPool,
) -> ClientRun:
    """One run as the clients see it: the warm-up conversation (if any) from this process and
    alone, then the rest from the pool's workers, all timed from a common start."""
    warmup, rest = (convs[:1], convs[1:]) if warmup_first else ([], convs)
    # Before any clock starts: the workers serialize their bodies and open their connections.
    await clients.prepare(url, model, rest, arrival_offsets(len(rest), rate, seed))
    began = time.perf_counter()
    cpu_start = time.process_time()
    exchanges: list[Exchange] = []
    for conv in warmup:
        # The first request alone: its blocks are committed before the others arrive, which is
        # what the theoretical hit rate at block granularity assumes.
        async with client_session() as session:
            body = first_turn_body(model, conv)
            exchanges += await run_conversation(session, url, model, conv, body)
    start = clients.go()
    reports = await clients.reports()
    cpu_s = time.process_time() - cpu_start
    for report in reports:
        exchanges += report.exchanges
    exchanges.sort(key=lambda e: e.result.sent_at)
    return ClientRun(
        exchanges=exchanges,
        elapsed=max(r.end for r in reports) - (began if warmup else start),
        cpu_s=[cpu_s, *(r.cpu_s for r in reports)],
        requests_per_worker=[len(r.exchanges) for r in reports],
    )


async def run_workload(
    url: str,
    kv_address: str | None,
    model: str,
    name: str,
    convs: list[Conversation],
    rate: float,
    tokenizer: Tokenizer,
    block_size: int,
    seed: int = 0,
    warmup_first: bool = True,
    executor_address: str | None = None,
    clients: ClientPool | None = None,
    ttft_slo: float | None = None,
) -> dict[str, Any]:
    """One workload through the mesh, sent by `clients` (None: a pool of DEFAULT_CLIENT_PROCS
    started for this run alone); conversations arrive in a burst (rate inf) or as a Poisson
    process seeded by `seed`."""
    poller = KVStatsPoller(kv_address, executor_address) if kv_address else None
    before = hits_since_start(await poller.stats()) if poller else (0, 0)
    if poller:
        poller.start()
    with contextlib.ExitStack() as stack:
        if clients is None:
            clients = stack.enter_context(ClientPool(DEFAULT_CLIENT_PROCS))
        run = await drive(url, model, convs, rate, seed, warmup_first, clients)
    if poller:
        await asyncio.sleep(0.2)
        after = hits_since_start(await poller.stats())
        await poller.stop()
    results = [e.result for e in run.exchanges]
    ok = [r for r in results if r.ok]
    elapsed = run.elapsed
    tpot = [
        (r.token_times[-1] - r.token_times[0]) / (len(r.token_times) - 1)
        for r in ok
        if len(r.token_times) > 1
    ]
    out_tokens = sum(r.output_tokens for r in ok)
    # Encoded after the run, in arrival order: encoding a 1k-token chat takes milliseconds of a
    # client's event loop, which inside the run would delay other requests.
    prompts = [tokenizer.encode_chat(e.messages) for e in run.exchanges]
    theo_hits, theo_total = workloads.theoretical_hit_tokens(prompts, block_size)
    report: dict[str, Any] = {
        "workload": name,
        "rate": "inf" if rate == float("inf") else rate,
        "requests": len(results),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:3],
        "duration_s": round(elapsed, 3),
        "request_throughput": round(len(ok) / elapsed, 3),
        "output_tokens_per_s": round(out_tokens / elapsed, 1),
        "output_tokens": out_tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "cached_tokens_reported": sum(r.cached_tokens for r in ok),
        "ttft_s": {
            k: round(v, 4) for k, v in percentiles([r.ttft for r in ok], (10, 50, 90, 99)).items()
        },
        "tpot_s": {k: round(v, 5) for k, v in percentiles(tpot).items()},
        **(
            {"ttft_slo_s": ttft_slo, "within_ttft_slo": sum(r.ttft <= ttft_slo for r in ok)}
            if ttft_slo is not None
            else {}
        ),
        "theoretical_hit_rate": round(theo_hits / theo_total, 4) if theo_total else 0.0,
        # The clients' CPU over the run, the parent's and every worker's summed, and the busiest
        # one's: near 1.0 there means that process, not the server, set the pace.
        "client_cpu_fraction": round(sum(run.cpu_s) / elapsed, 3),
        "client_cpu_fraction_max": round(max(run.cpu_s) / elapsed, 3),
        # The parent's warm-up conversation is in none of these.
        "client_requests_per_proc": run.requests_per_worker,
    }
    if poller:
        hit_tokens = after[0] - before[0]
        query_tokens = after[1] - before[1]
        report["measured_hit_rate"] = round(hit_tokens / query_tokens, 4) if query_tokens else 0.0
        report["peak_blocks_in_use"] = poller.peak_in_use
        if poller.util_samples:
            report["kv_utilization_mean"] = round(
                sum(poller.util_samples) / len(poller.util_samples), 4
            )
            report["kv_utilization_min"] = round(min(poller.util_samples), 4)
            report["kv_sharing_factor_mean"] = round(
                sum(poller.sharing_samples) / len(poller.sharing_samples), 3
            )
    return report


async def offline_engine_tok_s(
    model_dir: str,
    runs: list[list[tuple[list[int], int]]],
    device: str,
    max_num_batched_tokens: int | None = None,
) -> list[dict[str, Any]]:
    """The engine alone, in this process, on the prompts of each mixed repetition: the figures the
    mesh is held to, repetition by repetition. `runs` holds each repetition's (prompt ids,
    max_tokens) pairs; the first is also run once untimed, before any timed run."""
    from pagemesh.services.executor.config import EngineConfig
    from pagemesh.services.executor.engine import LLMEngine
    from pagemesh.services.executor.engine_api import SamplingParams
    from pagemesh.services.kvmanager.local import LocalAllocator

    budget = (
        {} if max_num_batched_tokens is None else {"max_num_batched_tokens": max_num_batched_tokens}
    )
    config = EngineConfig(model=model_dir, device=device, **budget)
    engine = LLMEngine(config, LocalAllocator())
    await engine.start()

    async def drain(reqs: list[tuple[list[int], int]], tag: str) -> tuple[int, float]:
        for i, (ids, mt) in enumerate(reqs):
            params = SamplingParams(temperature=0.0, max_tokens=mt, ignore_eos=True)
            # A salt per run: no run hits what the one before it cached.
            engine.add_request(f"{tag}-{i}", ids, params, cache_salt=tag)
        tokens = 0
        t0 = time.perf_counter()
        while engine.has_unfinished_requests():
            for out in await engine.step():
                tokens += len(out.token_ids)
        return tokens, time.perf_counter() - t0

    # One untimed run of a whole workload first: Triton compiles a kernel variant for each new
    # specialization it meets (seen mid-run after a short warm-up), which is not serving cost.
    await drain(runs[0], "warm")
    figures = []
    for rep, reqs in enumerate(runs):
        tokens, elapsed = await drain(reqs, f"run{rep}")
        figures.append(
            {
                "rep": rep,
                "output_tokens": tokens,
                "elapsed_s": round(elapsed, 3),
                "output_tokens_per_s": round(tokens / elapsed, 1),
                "max_num_batched_tokens": config.max_num_batched_tokens,
            }
        )
    return figures  # the engine and its pool go with this frame; run_suite frees the memory


def wait_until_serving(url: str, model: str, timeout: float = 300.0) -> None:
    """Until a one-token chat succeeds: after an executor restart the gateway needs a moment to
    reconnect its Serve stream, and answers 503 meanwhile."""
    import urllib.error
    import urllib.request

    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    ).encode()
    deadline = time.monotonic() + timeout
    while True:
        req = urllib.request.Request(
            f"{url}/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=60) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            if time.monotonic() > deadline:
                raise
        time.sleep(0.5)


def run_suite(args: argparse.Namespace, tokenizer: Tokenizer, clients: ClientPool) -> None:
    """Issue 7's figures in one invocation: the offline engine, then one mesh whose executor is
    restarted for each A/B arm (prefix caching off, in-process allocator)."""
    from tests.support.mesh import Mesh, MeshConfig

    model_dir = str(Path(args.model).resolve())
    served = args.served_model_name or "bench"
    inf = float("inf")
    # (arm, workload, rate): bursts measure throughput and queueing; the Poisson runs measure
    # what one request sees on a loaded but not saturated server.
    rates = [float(r) for r in args.poisson_rates.split(",") if r]

    def workload_of(name: str, rate: float, rep: int) -> list[Conversation]:
        """Repetition `rep` of a workload: prompts of its own per repetition (a rerun would hit
        what the run before it cached) and per Poisson rate (a later rate re-sending an earlier
        one's prompts would find them cached); the same prompts in every arm."""
        seed = args.seed + 10 * rep + (0 if rate == inf else 1 + rates.index(rate))
        workload, _, count = name.partition("@")
        if count:  # a burst size of its own, and prompts of its own
            seed += 1000 + int(count)
        return workloads.build(
            workload, tokenizer.hf, int(count) if count else args.num_requests, seed
        )

    # Mixed repetition k runs the same prompts through the offline engine and through the mesh
    # (both arms): workloads differ by several percent in the throughput they allow (the
    # repetitions of seed 0 carry 70.5k-75.3k output tokens under one ~512-token makespan), so
    # mesh and engine are compared on the same repetition, never one's mean on the other's first.
    mixed_reps = [workload_of("mixed", inf, rep) for rep in range(args.mixed_reps)]
    offline = asyncio.run(
        offline_engine_tok_s(
            model_dir,
            [
                [
                    (tokenizer.encode_chat(workloads.messages_for(c, 0, [])), c.turns[0].max_tokens)
                    for c in convs
                ]
                for convs in mixed_reps
            ],
            args.device,
            args.max_num_batched_tokens,
        )
    )
    for figure in offline:
        print(json.dumps({"run": "offline_engine", "workload": "mixed", **figure}), flush=True)
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the mesh's executor sizes its pool from what is free

    base_exec = [
        "--device",
        args.device,
        "--num-blocks",
        "0",
        "--max-num-seqs",
        "256",
        "--gpu-memory-utilization",
        str(args.gpu_memory_utilization),
    ]
    if args.max_num_batched_tokens is not None:
        base_exec += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    arms = {
        "grpc": [],
        "no_prefix_caching": ["--no-prefix-caching"],
        "local_allocator": ["--allocator", "local"],
    }
    # Larger shared-prefix bursts run as workloads of their own ("shared_prefix@256"): how the
    # cache's effect on TTFT grows as prefill work, rather than fixed costs, sets the wait.
    sizes = [int(n) for n in args.prefix_burst_sizes.split(",") if n]
    big_bursts = [] if args.smoke else [f"shared_prefix@{n}" for n in sizes]
    # The allocator A/B (the mixed runs of the grpc and local_allocator arms) runs first in
    # each arm, right after its warm-up, back to back: the same position in each arm's life.
    plan = [
        *[("grpc", "mixed", inf)] * args.mixed_reps,
        *[("grpc", "shared_prefix", inf)] * args.prefix_reps,
        *[("grpc", b, inf) for b in big_bursts],
        *[("grpc", "shared_prefix", r) for r in rates],
        ("grpc", "multi_turn", inf),
        ("grpc", "parallel", inf),
        *[("no_prefix_caching", "shared_prefix", inf)] * args.prefix_reps,
        *[("no_prefix_caching", b, inf) for b in big_bursts],
        *[("no_prefix_caching", "shared_prefix", r) for r in rates],
        ("no_prefix_caching", "multi_turn", inf),
        *[("local_allocator", "mixed", inf)] * args.mixed_reps,
    ]
    env = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")}
    workdir = Path(args.workdir)
    reports: dict[tuple[str, str, float], list[dict[str, Any]]] = {}
    config = MeshConfig(
        model=model_dir,
        model_name=served,
        executor_args=base_exec,
        gateway_args=["--workers", str(args.gateway_workers)],
        env=env,
        start_timeout=600.0,
    )
    # A whole mixed run, untimed, like the offline figure's: a fresh executor compiles kernels
    # and ops for shapes as it first meets them (its first timed run was up to 30% slower).
    # Warm-up seeds apart from every timed run's (seed + 10 * rep + rate index, + 1000 + size
    # for the larger bursts): the shared warm-up once had the 64/s run's seed, and its 32
    # prompts, cached, lifted that run's hit rate above the theoretical one (0.89 vs 0.85).
    warmup = workloads.build("mixed", tokenizer.hf, args.num_requests, args.seed + 500)
    # Prefills over a long cached prefix in a burst: shapes the mixed warm-up may not reach.
    warmup_shared = workloads.build("shared_prefix", tokenizer.hf, 32, args.seed + 501)

    def warm(mesh: Mesh) -> None:
        # A fresh executor compiles and captures on its first shapes: keep that out of the
        # figures of whichever arm runs first.
        for convs, first in ((warmup, False), (warmup_shared, True)):
            asyncio.run(
                run_workload(
                    mesh.url,
                    None,
                    served,
                    "warmup",
                    convs,
                    float("inf"),
                    tokenizer,
                    args.block_size,
                    warmup_first=first,
                    clients=clients,
                )
            )

    with Mesh(workdir, config) as mesh:
        current = "grpc"
        warm(mesh)
        for arm, name, rate in plan:
            if arm != current:
                mesh.services["executor"].argv = mesh._executor_argv() + arms[arm]
                mesh.restart("executor", kill=False, timeout=600.0)
                mesh.wait_for_serve_streams(120.0)  # every gateway worker, not just one
                wait_until_serving(mesh.url, served)
                warm(mesh)
                current = arm
            rep = len(reports.get((arm, name, rate), []))
            convs = mixed_reps[rep] if name == "mixed" else workload_of(name, rate, rep)
            report = asyncio.run(
                run_workload(
                    mesh.url,
                    mesh.kv_address,
                    served,
                    name,
                    convs,
                    rate,
                    tokenizer,
                    args.block_size,
                    args.seed,
                    warmup_first=name != "mixed",
                    executor_address=mesh.executor_address,
                    clients=clients,
                )
            )
            report["arm"] = arm
            reports.setdefault((arm, name, rate), []).append(report)
            print(json.dumps(report), flush=True)

    def ratio(a: float, b: float) -> float:
        return round(a / b, 3) if b else float("nan")

    def mean(arm: str, name: str, rate: float, *path: str) -> float:
        values = []
        for r in reports[arm, name, rate]:
            v: Any = r
            for key in path:
                v = v.get(key, float("nan")) if isinstance(v, dict) else float("nan")
            values.append(float(v))
        return sum(values) / len(values)

    def ttft_ratio(name: str, rate: float) -> float:
        return ratio(
            mean("no_prefix_caching", name, rate, "ttft_s", "p50"),
            mean("grpc", name, rate, "ttft_s", "p50"),
        )

    summary = {
        "run": "summary",
        "shared_prefix_ttft_p50_off_over_on_burst": ttft_ratio("shared_prefix", inf),
        **{
            f"shared_prefix_ttft_p50_off_over_on_rate{r:g}": ttft_ratio("shared_prefix", r)
            for r in rates
        },
        **{f"{b}_ttft_p50_off_over_on": ttft_ratio(b, inf) for b in big_bursts},
        "multi_turn_ttft_p50_off_over_on": ttft_ratio("multi_turn", inf),
        "grpc_over_local_output_tok_s": ratio(
            mean("grpc", "mixed", inf, "output_tokens_per_s"),
            mean("local_allocator", "mixed", inf, "output_tokens_per_s"),
        ),
        # Repetition k of either arm runs the same prompts: the pairwise ratios.
        "grpc_over_local_per_rep": [
            ratio(g["output_tokens_per_s"], loc["output_tokens_per_s"])
            for g, loc in zip(
                reports["grpc", "mixed", inf], reports["local_allocator", "mixed", inf], strict=True
            )
        ],
        "mixed_output_tok_s_runs": {
            arm: [r["output_tokens_per_s"] for r in reports[arm, "mixed", inf]]
            for arm in ("grpc", "local_allocator")
        },
        # Repetition k of the mesh against the offline engine on the same prompts, and on the
        # means of the same repetitions.
        "mesh_over_offline_per_rep": [
            ratio(g["output_tokens_per_s"], o["output_tokens_per_s"])
            for g, o in zip(reports["grpc", "mixed", inf], offline, strict=True)
        ],
        "offline_output_tok_s_runs": [o["output_tokens_per_s"] for o in offline],
        "mesh_over_offline_output_tok_s": ratio(
            mean("grpc", "mixed", inf, "output_tokens_per_s"),
            sum(o["output_tokens_per_s"] for o in offline) / len(offline),
        ),
        "shared_prefix_hit_rate_measured_theoretical": [
            mean("grpc", "shared_prefix", inf, "measured_hit_rate"),
            mean("grpc", "shared_prefix", inf, "theoretical_hit_rate"),
        ],
        "mixed_kv_utilization": mean("grpc", "mixed", inf, "kv_utilization_mean"),
    }
    print(json.dumps(summary), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--kvmanager", default=None, help="HOST:PORT for GetStats")
    parser.add_argument("--executor", default=None, help="HOST:PORT for GetInfo (KV utilization)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="model (dir) of the mesh")
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--tokenizer", default=None, help="tokenizer dir (default: --model)")
    parser.add_argument("--workload", choices=workloads.WORKLOADS, action="append")
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--rate", type=float, default=float("inf"), help="requests/s (Poisson)")
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--client-procs",
        type=int,
        default=DEFAULT_CLIENT_PROCS,
        help="client processes sending the requests (a conversation stays on one)",
    )
    parser.add_argument(
        "--suite",
        action="store_true",
        help="start the mesh and run every figure of issue 7 (A/B arms included)",
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.85)
    parser.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=None,
        help="suite: tokens per step of the mesh's executor and the offline engine alike"
        " (default: the executor's)",
    )
    parser.add_argument("--workdir", default="/tmp/pagemesh-serve-bench")
    parser.add_argument("--gateway-workers", type=int, default=4)
    parser.add_argument(
        "--poisson-rates",
        default="16,64",
        help="suite: Poisson rates (requests/s), comma-separated",
    )
    parser.add_argument("--mixed-reps", type=int, default=5, help="suite: mixed runs per arm")
    parser.add_argument(
        "--prefix-reps", type=int, default=2, help="suite: shared-prefix bursts per arm"
    )
    parser.add_argument(
        "--prefix-burst-sizes",
        default="256",
        help="suite: shared-prefix bursts of these sizes too, once per arm (comma-separated)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="4 requests a workload, 8 tokens each (CPU check)"
    )
    args = parser.parse_args()

    tok_path = args.tokenizer or args.model
    if not Path(tok_path).exists():
        from pagemesh.services.executor.model.loader import resolve_model

        tok_path = str(resolve_model(tok_path))
    # The gateway's own tokenizer wrapper: prompts are encoded exactly as the gateway encodes
    # them, so the theoretical hit rate is computed on the very token ids kvmanager sees.
    tokenizer = Tokenizer.load(tok_path)
    if args.smoke:
        args.num_requests = args.num_requests or 4
        workloads.MAX_TOKENS_CAP = 8
    with ClientPool(args.client_procs) as clients:
        if args.suite:
            run_suite(args, tokenizer, clients)
            return 0
        served = args.served_model_name or Path(args.model).name
        for name in args.workload or ["shared_prefix"]:
            convs = workloads.build(name, tokenizer.hf, args.num_requests, args.seed)
            report = asyncio.run(
                run_workload(
                    args.url,
                    args.kvmanager,
                    served,
                    name,
                    convs,
                    args.rate,
                    tokenizer,
                    args.block_size,
                    args.seed,
                    warmup_first=name != "mixed",
                    executor_address=args.executor,
                    clients=clients,
                )
            )
            print(json.dumps(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
