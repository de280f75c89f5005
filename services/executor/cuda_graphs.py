"""CUDA graphs for the model's forward: a small model is bound by kernel launches, not math.

Decode steps: one graph per captured batch size (1, 2, 4, 8, then every 16 up to the maximum);
a batch of B decodes replays the smallest captured size >= B. The graphs read static input
buffers and write a static logits buffer; padding rows get slot -1 (no KV write) and seq_len 1
(a one-token read).

Prefill and mixed steps: one graph per token bucket (16 .. 512 by powers of two, then every 512
up to the step budget). Launched eagerly, a prefill forward of a 1B model took 15-40 ms of host
time for 16 layers (torch.compile'd ops and Triton launches, ~1 ms a layer), longer than the
device needs for a few thousand tokens: the host set the pace of every prefill step and of a
request's first token. A step of T tokens of B sequences replays the smallest bucket Tp >= T
with Bp = min(Tp, max_num_seqs) sequence slots: tokens past T get slot -1 (no KV write; their
rows of hidden state are garbage and never read: every op but attention is row-wise, and
attention reads only the cache), slots past B get q_len 0 (the prefill kernel's programs for
them exit at once). The prefill kernel takes no host value that varies with the batch but the
sequence count, which the bucket fixes.

All graphs share one memory pool, captured largest first so smaller ones reuse its blocks.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from pagemesh.services.executor.model.attention_metadata import AttentionMetadata
from pagemesh.services.executor.model.llama import LlamaForCausalLM

if TYPE_CHECKING:
    # A graph memory pool's handle (CUDAGraph.pool()); torch.cuda names it for typing only.
    from torch.cuda import _POOL_HANDLE as GraphPool

KVCache = tuple[torch.Tensor, torch.Tensor]


def capture_graphs(
    sizes: list[int],
    forward: Callable[[int], None],
    pool: GraphPool | None,
    prepare: Callable[[int], None] | None = None,
) -> tuple[dict[int, torch.cuda.CUDAGraph], GraphPool | None]:
    """A graph of `forward(size)` per size, largest first into `pool` (a new one if None), so
    smaller ones reuse its blocks; returns the graphs and the pool. Each size runs once eagerly
    first: compiles, autotuning and lazy init stay out of the graph. `prepare(size)` sets the
    static inputs a size needs, outside the graph."""
    graphs: dict[int, torch.cuda.CUDAGraph] = {}
    for size in reversed(sizes):
        if prepare is not None:
            prepare(size)
        forward(size)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            forward(size)
        pool = graph.pool()
        graphs[size] = graph
    torch.cuda.synchronize()
    return graphs, pool


def bucket(sizes: list[int], n: int) -> int | None:
    """The smallest captured size >= n, or None if n exceeds them all."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def capture_sizes(max_batch_size: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_batch_size]
    sizes += list(range(16, max_batch_size + 1, 16))
    if sizes[-1] != max_batch_size:
        sizes.append(max_batch_size)
    return sizes


class CUDAGraphRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
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
    def capture(self, pool: GraphPool | None = None) -> GraphPool | None:
        """Captures every size into `pool` (a new one if None); returns the pool."""
        self.graphs, pool = capture_graphs(self.sizes, self._forward, pool)
        return pool

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        batch_size: int,
    ) -> torch.Tensor | None:
        """The decode step's logits [B, V], or None if B exceeds every captured size."""
        bs = bucket(self.sizes, batch_size)
        if bs is None:
            return None
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


def prefill_capture_sizes(max_tokens: int) -> list[int]:
    sizes = {s for s in (16, 32, 64, 128, 256, 512) if s < max_tokens}
    sizes.update(range(1024, max_tokens, 512))
    sizes.add(max_tokens)
    return sorted(sizes)


class PrefillGraphRunner:
    """Graphs of the forward and the sampled rows' logits for steps with more than one new
    token in some sequence."""

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        max_tokens: int,
        max_seqs: int,
        max_blocks: int,
        max_model_len: int,
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.sizes = prefill_capture_sizes(max_tokens)
        self.max_seqs = max_seqs
        self.max_model_len = max_model_len
        t, b = self.sizes[-1], max_seqs
        self.input_ids = torch.zeros(t, dtype=torch.int64, device=device)
        self.positions = torch.zeros(t, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((t,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(b, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(b, dtype=torch.int32, device=device)
        self.query_start_loc = torch.zeros(b + 1, dtype=torch.int32, device=device)
        # The rows to sample (at most one per sequence slot; padding reads row 0) and their
        # logits: computed inside the graph, so the lm_head GEMM has one shape per bucket. Run
        # eagerly, each new number of sampled rows could pick a cuBLAS kernel not loaded yet,
        # and CUDA's lazy module loading waits for the device (38-66 ms in an H200 burst).
        self.logits_index = torch.zeros(b, dtype=torch.int64, device=device)
        self.logits = torch.zeros(b, vocab_size, dtype=torch.float32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def _slots(self, num_tokens: int) -> int:
        # Every sequence of a step has at least one new token: B <= T.
        return min(num_tokens, self.max_seqs)

    def _forward(self, num_tokens: int) -> None:
        b = self._slots(num_tokens)
        attn = AttentionMetadata(
            slot_mapping=self.slot_mapping[:num_tokens],
            block_tables=self.block_tables[:b],
            seq_lens=self.seq_lens[:b],
            query_start_loc=self.query_start_loc[: b + 1],
            max_query_len=num_tokens,  # > 1: the prefill kernel, whatever the batch
            max_seq_len=self.max_model_len,
        )
        hidden = self.model(
            self.input_ids[:num_tokens], self.positions[:num_tokens], self.kv_caches, attn
        )
        rows = hidden.index_select(0, self.logits_index[:b])
        self.logits[:b] = self.model.compute_logits(rows)

    def _dummy_batch(self, num_tokens: int) -> None:
        """One sequence holding every token, reading block 0 (no KV write: slots are -1)."""
        self.query_start_loc.fill_(num_tokens)
        self.query_start_loc[0] = 0
        self.seq_lens.zero_()
        self.seq_lens[0] = num_tokens

    @torch.inference_mode()
    def capture(self, pool: GraphPool | None = None) -> GraphPool | None:
        """Captures every bucket into `pool` (a new one if None) on a dummy batch; returns the
        pool."""
        self.graphs, pool = capture_graphs(self.sizes, self._forward, pool, self._dummy_batch)
        self.query_start_loc.zero_()
        self.seq_lens.zero_()
        return pool

    def run(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        num_seqs: int,
        logits_index: torch.Tensor,
    ) -> torch.Tensor | None:
        """Logits [S, V] of the S rows `logits_index` picks from the step's T tokens (S <= the
        number of sequences), or None if T exceeds every bucket."""
        t = input_ids.shape[0]
        tp = bucket(self.sizes, t)
        if tp is None:
            return None
        b, bp = num_seqs, self._slots(tp)
        self.input_ids[:t].copy_(input_ids)
        self.positions[:t].copy_(positions)
        self.slot_mapping[:t].copy_(attn.slot_mapping)
        if tp > t:
            self.slot_mapping[t:tp].fill_(-1)
        self.block_tables[:b].copy_(attn.block_tables)
        self.seq_lens[:b].copy_(attn.seq_lens)
        self.query_start_loc[: b + 1].copy_(attn.query_start_loc)
        if bp > b:
            self.query_start_loc[b + 1 : bp + 1].fill_(t)  # empty sequences after the last
        s = logits_index.shape[0]
        self.logits_index[:s].copy_(logits_index)
        self.logits_index[s:bp].zero_()
        self.graphs[tp].replay()
        return self.logits[:s]
