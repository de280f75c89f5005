"""Shared by the engine tests: one loaded SmolLM2 (ours and transformers'), cached per process,
engines on an in-process allocator, and a driver that runs an engine until it is idle."""

from __future__ import annotations

import functools
import os
from collections import defaultdict
from pathlib import Path

import torch
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import FinishReason, SamplingParams, SequenceOutput
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.kvmanager.local import LocalAllocator
from transformers import AutoModelForCausalLM, AutoTokenizer


@functools.cache
def ours(path: Path):
    return load_model(path, "cpu", torch.float32)


@functools.cache
def tokenizer(path: Path):
    return AutoTokenizer.from_pretrained(path)


@functools.cache
def hf_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@functools.cache
def hf_greedy(path: Path, prompt: tuple[int, ...], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model(path).generate(
            torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False
        )
    return out[0, len(prompt) :].tolist()


async def make_engine(path: Path, **overrides) -> LLMEngine:
    model, config = ours(path)
    kwargs = {"model": str(path), "device": "cpu", "num_blocks": 512, **overrides}
    if os.environ.get("PAGEMESH_TEST_ASYNC") and "async_scheduling" not in overrides:
        kwargs["async_scheduling"] = True
    engine = LLMEngine(EngineConfig(**kwargs), LocalAllocator(), model=model, model_config=config)
    await engine.start()
    return engine


class Run:
    """Every output of a run, per (request id, choice index)."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, int], list[int]] = defaultdict(list)
        self.finish: dict[tuple[str, int], FinishReason] = {}
        self.outputs: list[SequenceOutput] = []

    def add(self, outputs: list[SequenceOutput]) -> None:
        for o in outputs:
            key = (o.request_id, o.index)
            assert key not in self.finish, f"output after the end of {key}"
            self.outputs.append(o)
            self.tokens[key].extend(o.token_ids)
            if o.finished:
                self.finish[key] = o.finish_reason


async def run_all(engine: LLMEngine, on_step=None, max_steps: int = 10_000) -> Run:
    run = Run()
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return run
        run.add(await engine.step())
        if on_step is not None:
            on_step(engine)
    raise AssertionError("engine did not finish")


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def blocks_in_use(engine: LLMEngine) -> int:
    ex = engine.allocator.manager.executors[engine.allocator.executor_id]
    return sum(1 for r in ex.pool.ref if r > 0)


def assert_all_free_or_cached(engine: LLMEngine) -> None:
    manager = engine.allocator.manager
    manager.check()
    ex = manager.executors[engine.allocator.executor_id]
    assert not ex.seqs, f"live sequences left: {list(ex.seqs)}"
    assert all(r == 0 for r in ex.pool.ref), "a block is still referenced"
    assert len(ex.pool.free) + len(ex.pool.cached) == ex.num_blocks
