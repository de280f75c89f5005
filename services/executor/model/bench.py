"""Micro-benchmark of the model's decode step on CUDA (random ~1B Llama, bf16), eager and
replayed from a CUDA graph, against the weight-read floor. One JSON line per batch size.

    python -m pagemesh.services.executor.model.bench --batch 32 64 256 --context 512
"""

from __future__ import annotations

import argparse
import json

import torch
from pagemesh.services.executor.model.attention_metadata import AttentionMetadata
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.model.llama import LlamaForCausalLM

BLOCK_SIZE = 16
LLAMA_1B = dict(
    model_type="llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    max_position_embeddings=4096,
)


def _time_ms(fn, iters: int) -> float:
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = _time_ms(lambda: y.copy_(x), 20)
    return 2 * x.numel() / (ms / 1e3)  # bytes read + written per second


def bench(
    batch: int, context: int, model: LlamaForCausalLM, config: ModelConfig, profile: bool
) -> dict:
    dev = "cuda"
    blocks_per_seq = (context + BLOCK_SIZE) // BLOCK_SIZE + 1
    num_blocks = batch * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, config.num_kv_heads, config.head_dim)
    kv = [
        (
            torch.randn(shape, dtype=model.dtype, device=dev),
            torch.randn(shape, dtype=model.dtype, device=dev),
        )
        for _ in range(config.num_layers)
    ]
    tables = torch.randperm(num_blocks, device=dev).view(batch, blocks_per_seq).int()
    positions = torch.full((batch,), context, dtype=torch.long, device=dev)
    rows = torch.arange(batch, device=dev)
    slots = tables[rows, context // BLOCK_SIZE].long() * BLOCK_SIZE + context % BLOCK_SIZE
    attn = AttentionMetadata(
        slot_mapping=slots,
        block_tables=tables,
        seq_lens=torch.full((batch,), context + 1, dtype=torch.int32, device=dev),
        query_start_loc=torch.arange(batch + 1, dtype=torch.int32, device=dev),
        max_query_len=1,
        max_seq_len=context + 1,
    )
    input_ids = torch.randint(0, config.vocab_size, (batch,), device=dev)

    def step() -> torch.Tensor:
        return model.compute_logits(model(input_ids, positions, kv, attn))

    with torch.inference_mode():
        eager_ms = _time_ms(step, 20)
        if profile:
            import cProfile
            import pstats

            with cProfile.Profile() as prof_cpu:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
            pstats.Stats(prof_cpu).sort_stats("tottime").print_stats(15)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
        graph_ms = _time_ms(graph.replay, 50)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
    kernels = sum(e.count for e in prof.key_averages() if e.device_type.name == "CUDA")
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    kv_bytes = 2 * config.num_layers * batch * (context + 1) * config.kv_size * 2
    bw = _copy_bandwidth()
    return {
        "batch": batch,
        "context": context,
        "eager_ms": round(eager_ms, 3),
        "graph_ms": round(graph_ms, 3),
        "floor_ms": round((weight_bytes + kv_bytes) / bw * 1e3, 3),
        "cuda_kernels_per_step": kernels,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32, 64, 256])
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--profile", action="store_true", help="cProfile 10 eager steps")
    args = parser.parse_args()
    config = ModelConfig.from_dict(LLAMA_1B)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config, torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.eval()
    for batch in args.batch:
        print(json.dumps(bench(batch, args.context, model, config, args.profile)), flush=True)


if __name__ == "__main__":
    main()
