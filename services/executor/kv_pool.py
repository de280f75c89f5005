"""The physical KV pool: per layer, K and V of shape [num_blocks, block_size, num_kv_heads,
head_dim] (the layout of kernels/reference.py). kvmanager hands out indices into it.

Sizing on CUDA (vLLM's rule): after the weights are loaded, run the largest batch the scheduler
can form (max_num_batched_tokens tokens, max_num_seqs logits rows) with no KV cache behind it,
take the peak memory, and give the pool gpu_memory_utilization of the device minus that peak
and minus the buffers allocated after the pool (the host tier's staging: host_tier.py).
On CPU the pool has a set size (EngineConfig.num_blocks, DEFAULT_CPU_NUM_BLOCKS by default).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from pagemesh.services.executor.config import DEFAULT_CPU_NUM_BLOCKS, EngineConfig
from pagemesh.services.executor.model.config import ModelConfig

log = logging.getLogger(__name__)

KVCache = tuple[torch.Tensor, torch.Tensor]


def bytes_per_block(model_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * model_config.num_kv_heads * model_config.head_dim * elem
    return per_layer * model_config.num_layers


class KVPool:
    def __init__(
        self,
        model_config: ModelConfig,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.num_blocks = num_blocks
        self.block_size = block_size
        shape = (num_blocks, block_size, model_config.num_kv_heads, model_config.head_dim)
        # One tensor for all layers so the pool is a single allocation; layers get views.
        self._storage = torch.zeros(
            (model_config.num_layers, 2, *shape), dtype=dtype, device=device
        )
        self.kv_caches: list[KVCache] = [(layer[0], layer[1]) for layer in self._storage]
        self.nbytes = self._storage.numel() * self._storage.element_size()

    @property
    def storage(self) -> torch.Tensor:
        """All layers' K and V: [layers, 2, blocks, block_size, kv_heads, head_dim]."""
        return self._storage

    @property
    def key_caches(self) -> list[torch.Tensor]:
        return [k for k, _ in self.kv_caches]

    @property
    def value_caches(self) -> list[torch.Tensor]:
        return [v for _, v in self.kv_caches]

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


def pool_blocks_for_budget(total: int, utilization: float, used: int, per_block: int) -> int:
    """Blocks of `per_block` bytes in `utilization` of `total` device bytes once `used` (the
    profiled peak, memory outside PyTorch, buffers allocated after the pool) is taken off."""
    return int((total * utilization - used) // per_block)


def determine_num_blocks(
    config: EngineConfig,
    model_config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    profile_run: Callable[[], None] | None = None,
    reserved_bytes: int = 0,
) -> int:
    """The pool size in blocks: the configured one, or on CUDA what the profile leaves once
    `reserved_bytes` (device buffers allocated after the pool: the host tier's staging) are set
    aside."""
    if config.num_blocks is not None:
        return config.num_blocks
    if device.type != "cuda":
        return DEFAULT_CPU_NUM_BLOCKS
    assert profile_run is not None, "CUDA pool sizing needs a profile run"
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    profile_run()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    free, total = torch.cuda.mem_get_info(device)
    # Memory outside PyTorch's allocator (CUDA context, other processes) is total - free -
    # reserved; it stays, so it comes off the budget too.
    non_torch = total - free - torch.cuda.memory_reserved(device)
    per_block = bytes_per_block(model_config, config.block_size, dtype)
    num_blocks = pool_blocks_for_budget(
        total, config.gpu_memory_utilization, peak + max(non_torch, 0) + reserved_bytes, per_block
    )
    if num_blocks <= 0:
        raise RuntimeError(
            f"no memory left for the KV cache: peak {peak / 2**30:.2f} GiB"
            f" (+ {reserved_bytes / 2**30:.2f} GiB host-tier staging) of"
            f" {total / 2**30:.2f} GiB at gpu_memory_utilization={config.gpu_memory_utilization}"
        )
    log.info(
        "profiled peak %.2f GiB (weights + activations), %.2f GiB reserved, pool gets %.2f GiB",
        peak / 2**30,
        reserved_bytes / 2**30,
        num_blocks * per_block / 2**30,
    )
    torch.cuda.empty_cache()
    return num_blocks
