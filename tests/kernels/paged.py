"""Random paged KV layouts for the kernel tests: every block table is a shuffled draw from a
pool larger than needed, every cache row that holds no token is NaN (a kernel that reads past
a sequence's end, or into an unused block, turns its output into NaN)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Paged:
    key_cache: torch.Tensor  # [num_blocks, page, Hkv, D]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32


def make_paged(
    seq_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    page: int,
    dtype: torch.dtype,
    device: torch.device,
    gen: torch.Generator,
    spare_blocks: int = 7,
    extra_table_cols: int = 2,
) -> Paged:
    need = [-(-n // page) for n in seq_lens]
    num_blocks = sum(need) + spare_blocks
    shape = (num_blocks, page, num_kv_heads, head_dim)
    key_cache = torch.full(shape, float("nan"), dtype=dtype)
    value_cache = torch.full(shape, float("nan"), dtype=dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(need) + extra_table_cols
    # Unused table entries point at a spare (all-NaN) block.
    block_tables = torch.full((len(seq_lens), max_blocks), int(perm[-1]), dtype=torch.int32)
    used = 0
    for b, (n, nb) in enumerate(zip(seq_lens, need, strict=True)):
        ids = perm[used : used + nb]
        used += nb
        block_tables[b, :nb] = ids.to(torch.int32)
        k = torch.randn((nb * page, num_kv_heads, head_dim), generator=gen)[:n]
        v = torch.randn((nb * page, num_kv_heads, head_dim), generator=gen)[:n]
        for i in range(nb):
            rows = slice(i * page, min((i + 1) * page, n))
            key_cache[ids[i], : rows.stop - rows.start] = k[rows].to(dtype)
            value_cache[ids[i], : rows.stop - rows.start] = v[rows].to(dtype)
    return Paged(
        key_cache.to(device),
        value_cache.to(device),
        block_tables.to(device),
        torch.tensor(seq_lens, dtype=torch.int32, device=device),
    )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere gives inf."""
    out64, ref64 = out.double(), ref.double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return float((out64 - ref64).norm() / ref64.norm())


TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}
