"""The engine on CUDA (Triton kernels, CUDA graphs), with and without async scheduling: greedy
tokens equal transformers' `generate` on a random-weight Llama in float32, and every block ends
free or cached. Skipped where there is no GPU."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine import LLMEngine
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.kvmanager.local import LocalAllocator

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


@pytest.mark.parametrize("prefill_graphs", [True, False])
async def test_cuda_engine_chunked_and_cached_prefills(
    random_llama: Path, prefill_graphs: bool
) -> None:
    """Prefill steps of every kind: a small step budget chunks long prompts and mixes chunks
    with decodes; prompts sharing a 64-token prefix hit the cache (prefill over a cached prefix).
    Greedy tokens equal transformers' either way (graphs replayed by token bucket, or eager)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    rng = random.Random(2)
    shared = [rng.randrange(4096) for _ in range(64)]
    prompts = [shared + [rng.randrange(4096) for _ in range(rng.randint(3, 150))] for _ in range(6)]
    prompts += [[rng.randrange(4096) for _ in range(rng.randint(100, 300))] for _ in range(4)]
    expected = _hf_greedy(random_llama, prompts, 16)
    config = EngineConfig(
        model=str(random_llama),
        device="cuda",
        dtype="float32",
        num_blocks=512,
        max_num_seqs=8,
        max_num_batched_tokens=96,
        use_prefill_cuda_graphs=prefill_graphs,
    )
    engine = LLMEngine(config, LocalAllocator())
    await engine.start()
    assert (engine.runner.prefill_graphs is not None) == prefill_graphs
    engine.add_request("r0", prompts[0], SamplingParams(temperature=0.0, max_tokens=16))
    first = await run_all(engine)  # the shared prefix is committed before the rest arrive
    for i, p in enumerate(prompts[1:], 1):
        engine.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=16))
    run = await run_all(engine)
    assert first.tokens[("r0", 0)] == expected[0]
    for i, want in enumerate(expected[1:], 1):
        assert run.tokens[(f"r{i}", 0)] == want, f"request {i}"
    hits = [o.num_cached_tokens for o in run.outputs if o.request_id in ("r1", "r2")]
    assert max(hits) >= 64, "prompts sharing the prefix must hit the cache"
    assert_all_free_or_cached(engine)


async def test_prefill_graph_equals_eager_forward(random_llama: Path) -> None:
    """The replayed prefill graph gives the eager forward's logits (of each sequence's last
    token, as sampling asks) on random ragged batches over a random cache (cached prefixes of
    any length, blocks drawn at random), for token counts on and between the buckets."""
    from pagemesh.services.executor.model.attention_metadata import AttentionMetadata

    torch.backends.cuda.matmul.allow_tf32 = False
    config = EngineConfig(model=str(random_llama), device="cuda", dtype="float32", num_blocks=1024)
    engine = LLMEngine(config, LocalAllocator())
    await engine.start()
    graphs = engine.runner.prefill_graphs
    assert graphs is not None
    gen = torch.Generator().manual_seed(3)
    for k, v in engine.pool.kv_caches:
        k.normal_()
        v.normal_()
    bs, dev, limit = config.block_size, engine.device, engine.max_model_len
    for num_tokens in (2, 16, 17, 300, 512, 1000, 1536, 2500):
        while True:  # ragged sequences, each within the model's context
            b = int(
                torch.randint(-(-num_tokens // 700), min(num_tokens, 40) + 1, (1,), generator=gen)
            )
            cuts = (torch.randperm(num_tokens - 1, generator=gen)[: b - 1] + 1).tolist()
            bounds = [0, *sorted(cuts), num_tokens]
            q_lens = torch.tensor([bounds[i + 1] - bounds[i] for i in range(b)])
            prefixes = torch.randint(0, 200, (b,), generator=gen)
            seq_lens = q_lens + prefixes
            if int(seq_lens.max()) <= limit:
                break
        blocks = torch.randperm(engine.pool.num_blocks, generator=gen).int()
        tables = torch.zeros(b, engine.max_blocks, dtype=torch.int32)
        used = 0
        for i in range(b):  # blocks of their own: no two sequences write one slot
            n = -(-int(seq_lens[i]) // bs)
            tables[i, :n] = blocks[used : used + n]
            used += n
        positions = torch.cat(
            [torch.arange(int(p), int(s)) for p, s in zip(prefixes, seq_lens, strict=True)]
        )
        rows = torch.repeat_interleave(torch.arange(b), q_lens)
        slots = tables[rows, positions // bs].long() * bs + positions % bs
        attn = AttentionMetadata(
            slot_mapping=slots.to(dev),
            block_tables=tables.to(dev),
            seq_lens=seq_lens.int().to(dev),
            query_start_loc=torch.tensor(bounds, dtype=torch.int32).to(dev),
            max_query_len=int(q_lens.max()),
            max_seq_len=int(seq_lens.max()),
        )
        ids = torch.randint(0, 4096, (num_tokens,), generator=gen).to(dev)
        last = torch.tensor(bounds[1:], device=dev) - 1
        with torch.inference_mode():
            hidden = engine.model(ids, positions.to(dev), engine.pool.kv_caches, attn)
            eager = engine.model.compute_logits(hidden.index_select(0, last))
            replayed = graphs.run(ids, positions.to(dev), attn, b, last)
            assert replayed is not None
            torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    too_long = torch.zeros(config.max_num_batched_tokens + 1, dtype=torch.int64, device=dev)
    assert graphs.run(too_long, too_long, attn, 1, last) is None
