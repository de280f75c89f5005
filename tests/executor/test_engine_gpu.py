"""The engine on CUDA (Triton kernels, CUDA graphs), with and without async scheduling: greedy
tokens equal transformers' `generate` on a random-weight Llama in float32, and every block ends
free or cached. Skipped where there is no GPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from services.executor.config import EngineConfig
from services.executor.engine import LLMEngine
from services.executor.engine_api import SamplingParams
from services.kvmanager.local import LocalAllocator
from tests.executor.engine_support import assert_all_free_or_cached, run_all

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def random_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=4096,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=512,
        max_position_embeddings=1024,
        eos_token_id=None,
        bos_token_id=None,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    # Sharper logits than the default init, so a greedy argmax is not decided by rounding.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    return path


def _hf_greedy(path: Path, prompts: list[list[int]], n: int) -> list[list[int]]:
    import transformers

    hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    hf.generation_config.eos_token_id = None
    outs = []
    with torch.inference_mode():
        for p in prompts:
            ids = hf.generate(torch.tensor([p]).cuda(), max_new_tokens=n, do_sample=False)
            outs.append(ids[0, len(p) :].tolist())
    return outs


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_cuda_engine_greedy_equals_transformers(
    random_llama: Path, async_scheduling: bool
) -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(1)
    prompts = [[rng.randrange(4096) for _ in range(rng.randint(5, 90))] for _ in range(12)]
    expected = _hf_greedy(random_llama, prompts, 24)
    config = EngineConfig(
        model=str(random_llama),
        device="cuda",
        dtype="float32",
        num_blocks=256,
        async_scheduling=async_scheduling,
    )
    engine = LLMEngine(config, LocalAllocator())
    await engine.start()
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=24))
    run = await run_all(engine)
    for i, want in enumerate(expected):
        assert run.tokens[(f"r{i}", 0)] == want, f"request {i}"
    assert_all_free_or_cached(engine)
