"""Rotary position embeddings, looked up by position from a precomputed cos/sin table.

The inverse frequencies follow transformers' `modeling_rope_utils` operation for operation (same
dtypes, same order), so the tables match transformers bit for bit in float32. A table indexed by
`positions` has a static shape, needs no host sync and suits CUDA graphs; that is why only the
static rope types (default, linear, llama3, yarn) are supported.
"""

from __future__ import annotations

import math

import torch
from pagemesh.services.executor.model.config import ModelConfig
from torch import nn


def rope_inv_freq(config: ModelConfig, device: torch.device | str | None = None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] float32, exactly as transformers computes them."""
    dim = config.head_dim
    base = config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float)
    inv_freq = 1.0 / (base ** (exponents / dim))
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        return _llama3(inv_freq, scaling.factor, scaling)
    if scaling.rope_type == "yarn":
        return _yarn(base ** (exponents / dim), dim, base, scaling)
    return inv_freq


def rope_attention_scaling(config: ModelConfig) -> float:
    """The factor transformers multiplies cos and sin by (yarn's mscale; 1 otherwise)."""
    scaling = config.rope_scaling
    if scaling.rope_type != "yarn":
        return 1.0
    if scaling.attention_factor is not None:
        return scaling.attention_factor

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    if scaling.mscale and scaling.mscale_all_dim:
        return float(
            get_mscale(scaling.factor, scaling.mscale)
            / get_mscale(scaling.factor, scaling.mscale_all_dim)
        )
    return get_mscale(scaling.factor)


def _yarn(pos_freqs: torch.Tensor, dim: int, base: float, scaling) -> torch.Tensor:
    def correction_dim(num_rotations: float) -> float:
        original = scaling.original_max_position_embeddings
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low = correction_dim(scaling.beta_fast or 32)
    high = correction_dim(scaling.beta_slow or 1)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # prevent a division by zero, as transformers does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_factor = (1 - ramp).to(pos_freqs.device)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (scaling.factor * pos_freqs)
    return (
        inv_freq_interpolation * (1 - extrapolation_factor)
        + inv_freq_extrapolation * extrapolation_factor
    )


def _llama3(inv_freq: torch.Tensor, factor: float, scaling) -> torch.Tensor:
    old_context_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_context_len / scaling.low_freq_factor
    high_freq_wavelen = old_context_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by the factor, short ones kept, the band between interpolated.
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin tables [max_positions, head_dim]; ops.qk_norm_rope applies them
    (the "rotate half" convention of HF Llama checkpoints)."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.config = config
        self.dtype = dtype
        self.register_buffer("cos", torch.empty(0, dtype=dtype), persistent=False)
        self.register_buffer("sin", torch.empty(0, dtype=dtype), persistent=False)
        if not self.cos.is_meta:
            self.build(self.cos.device)

    def build(self, device: torch.device | str) -> None:
        """(Re)compute the tables on `device`: called after the module is materialised from
        the meta device, since non-persistent buffers are not part of the checkpoint."""
        inv_freq = rope_inv_freq(self.config, device)
        positions = torch.arange(self.config.max_position_embeddings, device=device)
        freqs = positions[:, None].float() * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        scale = rope_attention_scaling(self.config)
        # Scale and cast after cos/sin, like transformers: the tables equal its per-step values.
        self.cos = (emb.cos() * scale).to(self.dtype)
        self.sin = (emb.sin() * scale).to(self.dtype)
