"""The model on CUDA (Triton kernels): logits against transformers in float32 and bfloat16, a
decode step captured in a CUDA graph, and the load time of a ~1B checkpoint. Skipped without
a GPU (tests/conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import transformers
from pagemesh.services.executor.model.attention_metadata import AttentionMetadata
from pagemesh.services.executor.model.loader import load_model

from tests.executor.test_model_random_weights import CONFIGS, _build_hf, _shuffled_tables
from tests.support.model import PagedRunner, PagedSequence

pytestmark = pytest.mark.gpu
NUM_BLOCKS = 48


def _run_chunks(runner: PagedRunner, tokens: list[list[int]], cut: int) -> torch.Tensor:
    seqs = [PagedSequence(block_table=t) for t in _shuffled_tables(len(tokens), 10, seed=3)]
    first = runner.step(seqs, [t[:cut] for t in tokens])
    second = runner.step(seqs, [t[cut:-1] for t in tokens])
    last = runner.step(seqs, [t[-1:] for t in tokens])  # decode kernel
    rows = []
    n2 = len(tokens[0]) - 1 - cut
    for i in range(len(tokens)):
        rows += [first[i * cut : (i + 1) * cut], second[i * n2 : (i + 1) * n2], last[i : i + 1]]
    return torch.cat(rows).float()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_logits_match_transformers(name: str, tmp_path: Path) -> None:
    hf = _build_hf(name, tmp_path / name).cuda()
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, 128, (30,), generator=gen).tolist() for _ in range(3)]
    with torch.no_grad():
        ref32 = torch.cat([hf(torch.tensor([t], device="cuda")).logits[0] for t in tokens])
        hf16 = hf.to(torch.bfloat16)
        ref16 = torch.cat([hf16(torch.tensor([t], device="cuda")).logits[0] for t in tokens])
    for dtype in (torch.float32, torch.bfloat16):
        model, config = load_model(tmp_path / name, "cuda", dtype)
        runner = PagedRunner(model, config, num_blocks=NUM_BLOCKS, block_size=4)
        ours = _run_chunks(runner, tokens, cut=17)
        if dtype == torch.float32:
            torch.testing.assert_close(ours, ref32.float(), atol=1e-3, rtol=1e-3)
        else:
            # bf16 differs from float32 for transformers too: ours must be about as close.
            ours_err = (ours - ref32).abs().max().item()
            hf_err = (ref16.float() - ref32).abs().max().item()
            assert ours_err <= 2 * hf_err + 1e-2, (ours_err, hf_err)


def test_decode_step_replays_in_cuda_graph(tmp_path: Path) -> None:
    _build_hf("llama3", tmp_path / "m")
    model, config = load_model(tmp_path / "m", "cuda", torch.bfloat16)
    runner = PagedRunner(model, config, num_blocks=NUM_BLOCKS, block_size=4)
    batch, max_blocks = 4, 8
    tables = _shuffled_tables(batch, max_blocks, seed=5)
    seqs = [PagedSequence(block_table=t) for t in tables]
    prompts = [[(7 * i + j) % 128 for j in range(9 + i)] for i in range(batch)]
    runner.step(seqs, prompts)

    # static inputs, updated in place before each replay (as the engine does)
    dev = "cuda"
    input_ids = torch.zeros(batch, dtype=torch.long, device=dev)
    positions = torch.zeros(batch, dtype=torch.long, device=dev)
    attn = AttentionMetadata(
        slot_mapping=torch.zeros(batch, dtype=torch.long, device=dev),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
        seq_lens=torch.zeros(batch, dtype=torch.int32, device=dev),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        max_query_len=1,
        max_seq_len=max_blocks * 4,
    )

    def fill(step: int) -> None:
        pos = [len(p) + step for p in prompts]
        input_ids.copy_(torch.tensor([(3 * step + i) % 128 for i in range(batch)]))
        positions.copy_(torch.tensor(pos))
        slots = [tables[i][p // 4] * 4 + p % 4 for i, p in enumerate(pos)]
        attn.slot_mapping.copy_(torch.tensor(slots))
        attn.seq_lens.copy_(torch.tensor([p + 1 for p in pos], dtype=torch.int32))

    def step() -> torch.Tensor:
        return model.compute_logits(model(input_ids, positions, runner.kv_caches, attn))

    with torch.inference_mode():
        fill(0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # warm-up (Triton compiles) outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = step()
        for s in range(3):
            fill(s)
            eager = step().clone()
            graph.replay()
            torch.testing.assert_close(static_logits, eager, atol=2e-2, rtol=2e-2)


def test_load_time_1b_bf16(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
    )
    with torch.device("cuda"):
        hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    hf.save_pretrained(tmp_path / "1b")
    del hf
    torch.cuda.synchronize()
    start = time.monotonic()
    model, _ = load_model(tmp_path / "1b", "cuda", torch.bfloat16)
    torch.cuda.synchronize()
    elapsed = time.monotonic() - start
    params = sum(p.numel() for p in model.parameters())
    print(f"\nload 1B bf16 on cuda: {params / 1e9:.2f}B params in {elapsed:.2f} s")
    assert elapsed < 60
