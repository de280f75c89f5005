"""`pagemesh executor --trace-steps FILE` (services/executor/trace.py): the real executor service
(SmolLM2 on CPU) behind the gateway's client over loopback gRPC writes a line per request arrival,
first and last output and one per step, with times that add up and the batch each step ran. Once
the last request has ended, kvmanager gets its release with no further request to carry it."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway.executor_client import RequestStream

from tests.executor.engine_support import assert_all_free_or_cached, make_engine
from tests.support.executor_service import executor_service


async def test_trace_has_every_request_and_step(smollm2_path: Path, tmp_path: Path) -> None:
    engine = await make_engine(smollm2_path)
    trace = tmp_path / "steps.jsonl"
    prompts = {"a": [1, 2, 3, 4, 5], "b": list(range(10, 60)), "c": [7] * 20}
    async with executor_service(engine, str(trace)) as client:
        streams = [
            client.submit(
                pb.GenerateRequest(
                    request_id=rid,
                    prompt_token_ids=ids,
                    params=pb.SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                )
            )
            for rid, ids in prompts.items()
        ]
        counts = await asyncio.wait_for(asyncio.gather(*(_count(s) for s in streams)), 120)
        assert counts == [6, 6, 6]
        # The last outputs went out before the releases; the loop sends them right after.
        ex = engine.allocator.manager.executors[engine.allocator.executor_id]
        for _ in range(300):
            if not ex.seqs and not engine.has_unfinished_requests():
                break
            await asyncio.sleep(0.1)
        assert not ex.seqs, f"never released: {list(ex.seqs)}"
        assert_all_free_or_cached(engine)
    lines = [json.loads(line) for line in trace.read_text().splitlines()]
    arrive = {e["rid"]: e["t"] for e in lines if e["ev"] == "arrive"}
    first = {e["rid"]: e["t"] for e in lines if e["ev"] == "first"}
    last = {e["rid"]: e["t"] for e in lines if e["ev"] == "last"}
    steps = [e for e in lines if e["ev"] == "step"]
    assert set(arrive) == set(first) == set(last) == set(prompts)
    assert all(last[r] > first[r] > arrive[r] for r in prompts)
    for s in steps:
        assert min(s["sched"], s["launch"], s["land"], s["kv_wait"]) >= 0
        assert s["kv_wait"] <= s["sched"]
        assert s["end"] >= s["t"] + s["sched"] + s["launch"] + s["land"] - 1e-6
        assert s["tokens"] >= s["seqs"] >= s["prefill_seqs"]
        if s["landed"]:  # its outputs landed within the step, before its line
            assert s["t"] <= s["landed"] <= s["end"]
    # Each request's last output came from a step that landed it (its line follows the event).
    for r in prompts:
        step = min((s for s in steps if s["end"] >= last[r]), key=lambda s: s["end"])
        assert 0 < step["landed"] <= last[r]
    # Every prompt token and every generated token but the last of each request ran in a step.
    assert sum(s["tokens"] for s in steps) == sum(len(p) + 5 for p in prompts.values())
    assert sum(s["admitted"] for s in steps) == len(prompts)
    assert any(s["prefill_seqs"] for s in steps)
    assert any(s["kv_wait"] > 0 for s in steps if s["admitted"])  # admission awaits kvmanager


async def _count(stream: RequestStream) -> int:
    n = 0
    async for outs in stream:
        n += sum(len(o.token_ids) for o in outs)
    return n
