"""CUDA graphs for decode steps: a small model's decode is bound by kernel launches, not math.

One graph per captured batch size (1, 2, 4, 8, then every 16 up to the maximum); a batch of B
decodes replays the smallest captured size >= B. The graphs read static input buffers and write
a static logits buffer; padding rows get slot -1 (no KV write) and seq_len 1 (a one-token read).
All graphs share one memory pool, captured largest first so smaller ones reuse its blocks.
"""

from __future__ import annotations

import bisect

import torch

from services.executor.model.attention_metadata import AttentionMetadata

KVCache = tuple[torch.Tensor, torch.Tensor]


def capture_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CUDAGraphRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[KVCache],
        max_batch_size: int,
        max_blocks: int,
        max_model_len: int,
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = capture_sizes(max_batch_size)
        self.max_model_len = max_model_len
        m = self.sizes[-1]
        self.input_ids = torch.zeros(m, dtype=torch.int64, device=device)
        self.positions = torch.zeros(m, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((m,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(m, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(m, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(m + 1, dtype=torch.int32, device=device)
        self.logits = torch.zeros(m, vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _metadata(self, bs: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:bs],
            block_tables=self.block_tables[:bs],
            seq_lens=self.seq_lens[:bs],
            query_start_loc=self.query_start_loc[: bs + 1],
            max_query_len=1,
            # A captured graph must serve any context: its kernels are sized for the longest.
            max_seq_len=self.max_model_len,
        )

    def _forward(self, bs: int) -> None:
        hidden = self.model(
            self.input_ids[:bs], self.positions[:bs], self.kv_caches, self._metadata(bs)
        )
        self.logits[:bs] = self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        for bs in reversed(self.sizes):
            self._forward(bs)  # warm-up: autotuning and lazy init stay out of the graph
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        batch_size: int,
    ) -> torch.Tensor | None:
        """The decode step's logits [B, V], or None if B exceeds every captured size."""
        i = bisect.bisect_left(self.sizes, batch_size)
        if i == len(self.sizes):
            return None
        bs = self.sizes[i]
        b = batch_size
        self.input_ids[:b].copy_(input_ids)
        self.positions[:b].copy_(positions)
        self.slot_mapping[:b].copy_(attn.slot_mapping)
        self.block_tables[:b].copy_(attn.block_tables)
        self.seq_lens[:b].copy_(attn.seq_lens)
        if bs > b:
            self.slot_mapping[b:bs].fill_(-1)
            self.seq_lens[b:bs].fill_(1)
        self.graphs[bs].replay()
        return self.logits[:b]
