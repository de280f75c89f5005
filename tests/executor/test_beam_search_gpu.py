"""Beam search on CUDA (Triton kernels, with and without CUDA graphs): a random-weight Llama in
float32 gives transformers' own beams on the same GPU; bfloat16 runs; every block ends free or
cached. Skipped without a GPU (tests/conftest.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
import transformers
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.model.loader import load_model
from pagemesh.services.kvmanager.local import LocalAllocator

pytestmark = pytest.mark.gpu
EOS = 2
MAX_NEW = 24
SETTINGS = [(2, 2, 1.0, False), (4, 2, 0.5, True), (8, 3, 1.0, "never")]


def _build(path: Path) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        eos_token_id=EOS,
        bos_token_id=1,
        pad_token_id=EOS,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1.0 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.15)  # peaked enough that beams are not near-ties
    model.eval().save_pretrained(path)
    return model


async def _run(path: Path, dtype: str, graphs: bool, cases: list) -> dict:
    model, mc = load_model(path, "cuda", getattr(torch, dtype))
    config = EngineConfig(
        model=str(path),
        device="cuda",
        dtype=dtype,
        num_blocks=256,
        max_num_seqs=64,
        use_cuda_graphs=graphs,
    )
    engine = LLMEngine(config, LocalAllocator(), model=model, model_config=mc)
    await engine.start()
    for rid, prompt, (k, n, lp, es) in cases:
        params = SamplingParams(
            n=n,
            temperature=0.0,
            max_tokens=MAX_NEW,
            use_beam_search=True,
            beam_width=k,
            length_penalty=lp,
            early_stopping=es,
        )
        engine.add_request(rid, prompt, params)
    engine.add_request("greedy", cases[0][1], SamplingParams(temperature=0.0, max_tokens=8))
    outs = {}
    while engine.has_unfinished_requests():
        for o in await engine.step():
            if o.finished:
                outs[(o.request_id, o.index)] = o.token_ids
    ex = engine.allocator.manager.executors[engine.allocator.executor_id]
    assert not ex.seqs and all(r == 0 for r in ex.pool.ref), "a block is still held"
    return outs


def test_cuda_beams_equal_transformers(tmp_path: Path) -> None:
    # Sync (asyncio.run): the GPU machines' image has pytest but not pytest-asyncio.
    asyncio.run(_check(tmp_path))


async def _check(tmp_path: Path) -> None:
    hf = _build(tmp_path / "m").cuda()
    gen = torch.Generator().manual_seed(1)
    cases = []
    for i in range(4):
        prompt = torch.randint(3, 512, (10 + 7 * i,), generator=gen).tolist()
        cases += [(f"r{i}-{s[0]}", prompt, s) for s in SETTINGS]
    refs = {}
    for rid, prompt, (k, n, lp, es) in cases:
        with torch.inference_mode():
            seqs = hf.generate(
                torch.tensor([prompt], device="cuda"),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                num_beams=k,
                num_return_sequences=n,
                length_penalty=lp,
                early_stopping=es,
            )
        for r in range(n):
            ref = seqs[r, len(prompt) :].tolist()
            refs[(rid, r)] = ref[: ref.index(EOS) + 1] if EOS in ref else ref
    for graphs in (True, False):
        outs = await _run(tmp_path / "m", "float32", graphs, cases)
        assert {key: outs[key] for key in refs} == refs, f"cuda graphs {graphs}"
    outs = await _run(tmp_path / "m", "bfloat16", True, cases)
    assert all(len(outs[key]) >= 1 for key in refs)
