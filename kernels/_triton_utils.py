"""Shared helpers of the Triton kernels: when to dispatch to Triton, device properties."""

from __future__ import annotations

import functools
import os

import torch

# PAGEMESH_KERNELS=triton forces the Triton kernels (on CPU tensors they then need
# TRITON_INTERPRET=1: that is how the kernel tests reach them without a GPU);
# PAGEMESH_KERNELS=reference forces the PyTorch reference; unset: Triton on CUDA tensors.
ENV_VAR = "PAGEMESH_KERNELS"


def use_triton(t: torch.Tensor) -> bool:
    mode = os.environ.get(ENV_VAR, "auto").lower()
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    return t.is_cuda


def use_reference() -> bool:
    """PAGEMESH_KERNELS=reference: the plain reference instead of the CPU path."""
    return os.environ.get(ENV_VAR, "auto").lower() == "reference"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=8)
def num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a nominal figure so that the split logic still runs


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
