"""The CPU serving path (kernels/cpu.py) against the reference, on fresh random inputs:
shuffled block tables drawn from a larger pool, ragged lengths around block boundaries, GQA
ratios 1/3/4/8, decode, cold prefill and prefill over a cached prefix, outputs poisoned first."""

from __future__ import annotations

import pytest
import torch
from pagemesh.kernels import cpu, reference

BLOCK = 16


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _setup(ctx_lens: list[int], q_lens: list[int], hq: int, hkv: int, d: int, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    max_blocks = max((n + BLOCK - 1) // BLOCK for n in ctx_lens)
    pool = len(ctx_lens) * max_blocks + 7
    k_cache = torch.randn(pool, BLOCK, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(pool, BLOCK, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(pool, generator=g)[: len(ctx_lens) * max_blocks]
    tables = perm.view(len(ctx_lens), max_blocks).to(torch.int32)
    q = torch.randn(sum(q_lens), hq, d, generator=g).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    return q, k_cache, v_cache, tables, torch.tensor(ctx_lens, dtype=torch.int32), qsl


@pytest.mark.parametrize("group", [1, 3, 4, 8])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
def test_cpu_attention_matches_reference(group: int, dtype: torch.dtype, tol: float) -> None:
    hkv, d = 2, 64
    # decode (1), cold prefill (q == ctx), chunk over a cached prefix, exact block multiples,
    # one past a block.
    ctx_lens = [1, 16, 17, 33, 48, 70]
    q_lens = [1, 16, 5, 1, 48, 20]
    q, kc, vc, tables, seq_lens, qsl = _setup(ctx_lens, q_lens, hkv * group, hkv, d, dtype, group)
    ref = reference.paged_attention(q, kc, vc, tables, seq_lens, qsl, d**-0.5)
    out = torch.full_like(q, float("nan"))
    cpu.paged_attention(q, kc, vc, tables, seq_lens, qsl, d**-0.5, out=out)
    assert not out.isnan().any(), "an output row was not written"
    assert _rel(out, ref) < tol


# Short contexts run on one thread (cpu.SERIAL_DECODE_ELEMENTS), long ones on the team: both.
@pytest.mark.parametrize("ctx_lens", [[1, 15, 16, 17, 100], [3, 1100]])
def test_cpu_decode_matches_reference(ctx_lens: list[int]) -> None:
    b = len(ctx_lens)
    q, kc, vc, tables, seq_lens, _ = _setup(ctx_lens, [1] * b, 8, 2, 64, torch.float32, 7)
    ref = reference.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125)
    out = torch.full_like(q, float("nan"))
    threads = torch.get_num_threads()
    cpu.paged_decode_attention(q, kc, vc, tables, seq_lens, 0.125, out=out)
    assert torch.get_num_threads() == threads, "the caller's thread count is restored"
    assert _rel(out, ref) < 1e-5


@pytest.mark.parametrize("padding", [False, True])
def test_cpu_kv_write_matches_reference(padding: bool) -> None:
    g = torch.Generator().manual_seed(int(padding))
    pool, hkv, d, t = 9, 2, 32, 20
    slots = torch.randperm(pool * BLOCK, generator=g)[:t]
    if padding:
        slots[::4] = -1
    # The strided value view mirrors the model, which passes a slice of its fused qkv output.
    qkv = torch.randn(t, 3, hkv, d, generator=g)
    key, value = qkv[:, 1], qkv[:, 2]
    caches = [torch.full((pool, BLOCK, hkv, d), float("nan")) for _ in range(4)]
    reference.write_kv_cache(key, value, caches[0], caches[1], slots)
    cpu.write_kv_cache(key, value, caches[2], caches[3], slots)
    assert torch.equal(caches[0].nan_to_num(7.0), caches[2].nan_to_num(7.0))
    assert torch.equal(caches[1].nan_to_num(7.0), caches[3].nan_to_num(7.0))
