"""Test support for the model code: the default model's directory, and a minimal paged runner.

The runner is deliberately dumb (no scheduler): it packs the new tokens of a few sequences into
one batch, builds AttentionMetadata for them, and runs the model over a real paged KV pool.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from pagemesh.services.executor.model.attention_metadata import AttentionMetadata
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.model.llama import LlamaForCausalLM
from pagemesh.services.executor.model.loader import DEFAULT_MODEL, resolve_model


@functools.cache
def smollm2_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) as an HF directory, converted once per cache."""
    return resolve_model(DEFAULT_MODEL)


@dataclass(slots=True)
class PagedSequence:
    block_table: list[int]
    num_computed: int = 0  # tokens whose KV is in the cache
    token_ids: list[int] = field(default_factory=list)


class PagedRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        config: ModelConfig,
        num_blocks: int = 64,
        block_size: int = 16,
    ) -> None:
        self.model = model
        self.block_size = block_size
        device = model.model.embed_tokens.weight.device
        shape = (num_blocks, block_size, config.num_kv_heads, config.head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=model.dtype, device=device),
                torch.zeros(shape, dtype=model.dtype, device=device),
            )
            for _ in range(config.num_layers)
        ]
        self.device = device

    @torch.inference_mode()
    def step(self, seqs: list[PagedSequence], new_tokens: list[list[int]]) -> torch.Tensor:
        """Run the new tokens of each sequence; returns logits of every new token [T, V]."""
        input_ids, positions, slots, q_starts, seq_lens = [], [], [], [0], []
        for seq, tokens in zip(seqs, new_tokens, strict=True):
            for i, token in enumerate(tokens):
                pos = seq.num_computed + i
                input_ids.append(token)
                positions.append(pos)
                block = seq.block_table[pos // self.block_size]
                slots.append(block * self.block_size + pos % self.block_size)
            seq.num_computed += len(tokens)
            seq.token_ids.extend(tokens)
            q_starts.append(q_starts[-1] + len(tokens))
            seq_lens.append(seq.num_computed)
        max_blocks = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (max_blocks - len(s.block_table)) for s in seqs]

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=self.device)

        attn = AttentionMetadata(
            slot_mapping=tensor(slots, torch.int64),
            block_tables=tensor(tables, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            query_start_loc=tensor(q_starts, torch.int32),
            max_query_len=max(len(t) for t in new_tokens),
            max_seq_len=max(seq_lens),
        )
        hidden = self.model(
            tensor(input_ids, torch.int64), tensor(positions, torch.int64), self.kv_caches, attn
        )
        return self.model.compute_logits(hidden)

    def greedy(self, prompts: list[list[int]], max_new_tokens: int, tables: list[list[int]]):
        """Batched greedy generation: one prefill step, then one decode step per token."""
        seqs = [PagedSequence(block_table=t) for t in tables]
        logits = self.step(seqs, prompts)
        last = torch.tensor([len(p) for p in prompts]).cumsum(0) - 1
        next_tokens = logits[last].argmax(-1).tolist()
        outputs = [[t] for t in next_tokens]
        for _ in range(max_new_tokens - 1):
            logits = self.step(seqs, [[t] for t in next_tokens])
            next_tokens = logits.argmax(-1).tolist()
            for out, token in zip(outputs, next_tokens, strict=True):
                out.append(token)
        return outputs
