"""What the model's attention layers need to know about a batch (built by the engine per step).

The batch packs T new tokens of B sequences; the layout and meaning of every field is the one
documented in kernels/reference.py. All tensors live on the model's device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot of each new token (-1: padding, skipped)
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32: context length including the new tokens
    query_start_loc: torch.Tensor  # [B+1] int32
    max_query_len: int  # 1 for a decode-only batch: the decode kernel runs
    max_seq_len: int

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1
