"""What the gateway's host pays per step message to fan a step out to its requests: the
ExecutorClient's `_dispatch` of a step of 256 requests with one column token each (the common
decode step, proto/executor.proto StepOutput), alone and followed by each request's
Generation._apply of what it got (a stand-in detokenizer, so tokenizer time stays out). No
network, no event loop: the message is parsed from its wire bytes once, as grpc.aio hands it over.

    python benchmarks/dispatch_bench.py [--requests 256] [--rounds 15] [--compare REV]

`--compare REV` also loads executor_client.py and generation.py as they were at git revision REV
and runs the two alternately (REV, this tree, REV, ...), so both see the same host load. One JSON
line per implementation: the median over rounds of microseconds per step message, and per token.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import _repo  # noqa: F401  (first: the checkout's benchmarks/ and tests/ by name)
from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway import executor_client, generation

ROOT = Path(__file__).resolve().parent.parent


def load_at(rev: str, path: str, name: str, into: Path) -> ModuleType:
    """The module at `path` as it was at git revision `rev`, imported under `name`."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{rev}:{path}"], check=True, capture_output=True
    ).stdout
    file = into / f"{name}.py"
    file.write_bytes(source)
    spec = importlib.util.spec_from_file_location(name, file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class StubDetokenizer:
    """Text for every token, never a stop: the consumer's own work without the tokenizer's."""

    stopped = False

    def push(self, token_ids: list[int]) -> str:
        return "x"


def make_steps(requests: int) -> tuple[list[str], pb.StepOutput, pb.StepOutput]:
    rids = [f"chat-1f2e3-a1b2c3d4-{k}" for k in range(requests)]
    # Each request's first output is full: it brings the usage counts the columns stand for.
    first = pb.StepOutput(
        outputs=[
            pb.SequenceOutput(
                request_id=rid, token_ids=[100 + k], num_prompt_tokens=200 + k, num_cached_tokens=64
            )
            for k, rid in enumerate(rids)
        ]
    )
    column = pb.StepOutput(
        token_request_ids=rids, token_indices=[0] * requests, token_ids=range(1000, 1000 + requests)
    )
    # As grpc.aio hands a message over: parsed from its bytes.
    return rids, *(pb.StepOutput.FromString(m.SerializeToString()) for m in (first, column))


class Setup:
    """One implementation's client, its requests' streams and their consumers."""

    def __init__(self, ec: Any, gen: Any, rids: list[str], first: pb.StepOutput) -> None:
        self.client = ec.ExecutorClient("127.0.0.1:1")  # never connects
        self.consumers = []
        for rid in rids:
            stream = ec.RequestStream(rid, 1)
            self.client._streams[rid] = stream
            consumer = gen.Generation.__new__(gen.Generation)  # no executor: only _apply runs
            consumer.__dict__.update(
                request_id=rid, n=1, _want_logprobs=False, _detok=[StubDetokenizer()],
                finish_reasons=[None], prompt_tokens=0, cached_tokens=0, completion_tokens=0,
                _executor_done=False, _cut_alone=False, _cut=[],
            )  # fmt: skip
            self.consumers.append((stream._queue, consumer))
        self.client._dispatch(first)
        self.drain(apply=True)

    def drain(self, apply: bool) -> None:
        for queue, consumer in self.consumers:
            while not queue.empty():
                outputs = queue.get_nowait()
                if apply:
                    for out in outputs:
                        consumer._apply(out)

    def round(self, step: pb.StepOutput, messages: int, apply: bool) -> float:
        """Seconds per message: `messages` dispatches, each drained (and applied) after it."""
        dispatch = self.client._dispatch
        spent = 0.0
        for _ in range(messages):
            t0 = time.perf_counter()
            dispatch(step)
            if apply:
                self.drain(apply=True)
            spent += time.perf_counter() - t0
            if not apply:
                self.drain(apply=False)
        return spent / messages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=256, help="requests (tokens) per step")
    ap.add_argument("--rounds", type=int, default=15, help="rounds per implementation")
    ap.add_argument("--messages", type=int, default=200, help="step messages per round")
    ap.add_argument("--compare", metavar="REV", help="also run the code at this git revision")
    args = ap.parse_args()
    rids, first, step = make_steps(args.requests)
    impls = {"this tree": (executor_client, generation)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.compare:
            old = (
                load_at(args.compare, "services/gateway/executor_client.py", "ec_old", Path(tmp)),
                load_at(args.compare, "services/gateway/generation.py", "gen_old", Path(tmp)),
            )
            impls = {args.compare: old, **impls}
        setups = {name: Setup(ec, gen, rids, first) for name, (ec, gen) in impls.items()}
        times: dict[tuple[str, bool], list[float]] = {}
        for _ in range(args.rounds):
            for apply in (False, True):
                for name, setup in setups.items():  # alternately, under the same host load
                    spent = setup.round(step, args.messages, apply)
                    times.setdefault((name, apply), []).append(spent)
    for name in setups:
        result: dict[str, object] = {"bench": "gateway_dispatch", "code": name}
        result["requests"] = args.requests
        for apply, key in ((False, "dispatch"), (True, "dispatch_and_apply")):
            median = statistics.median(times[name, apply])
            result[f"{key}_us_per_step"] = round(median * 1e6, 1)
            result[f"{key}_ns_per_token"] = round(median * 1e9 / args.requests)
            result[f"{key}_us_per_step_rounds"] = [round(t * 1e6) for t in times[name, apply]]
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
