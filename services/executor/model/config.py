"""ModelConfig: the few numbers the paged model code needs, read from an HF config.json.

We read the raw JSON rather than a transformers config object so that the same code works on
configs written by transformers 4.x (`rope_theta` + `rope_scaling`) and 5.x (`rope_parameters`),
and so that loading a model never needs the architecture's Python class.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pagemesh.services.executor.model.spec import check_model_type

# Rope types whose inverse frequencies are static (no dependence on the sequence length): the
# only ones a CUDA-graph friendly position lookup can serve exactly.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(slots=True, frozen=True)
class RopeScaling:
    rope_type: str = "default"
    factor: float = 1.0
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    # yarn (None: derived as transformers derives it)
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    truncate: bool = True


@dataclass(slots=True)
class ModelConfig:
    architecture: str  # e.g. "LlamaForCausalLM"
    model_type: str  # "llama" | "mistral" | "qwen2" | "qwen3"
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 always, Llama when attention_bias
    o_bias: bool  # Llama/Qwen3 attention_bias also puts a bias on o_proj
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    torch_dtype: torch.dtype = torch.float32
    sliding_window: int | None = None  # recorded only; full attention is always used

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def max_model_len(self) -> int:
        """The longest context served exactly: attention is always full, so a sliding-window
        model (Mistral v0.1: 4096 of 32768) is exact only up to its window."""
        if self.sliding_window:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        with open(path / "config.json") as f:
            raw = json.load(f)
        gen_path = path / "generation_config.json"
        gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
        return cls.from_dict(raw, gen)

    @classmethod
    def from_dict(
        cls, raw: dict[str, Any], generation: dict[str, Any] | None = None
    ) -> ModelConfig:
        # Multimodal/nested configs keep the language model under text_config.
        if "text_config" in raw and "hidden_size" not in raw:
            raw = {**raw["text_config"], "architectures": raw.get("architectures")}
        model_type = raw.get("model_type", "llama")
        check_model_type(raw, "the model")  # UnsupportedModel (a ValueError): permanent
        quant = raw.get("quantization_config")
        if quant and quant.get("quant_method") != "gguf":
            raise ValueError(f"quantized checkpoints are not supported: {quant}")
        archs = raw.get("architectures") or []
        hidden = int(raw["hidden_size"])
        heads = int(raw["num_attention_heads"])
        head_dim = raw.get("head_dim") or hidden // heads
        theta, scaling = _parse_rope(raw)
        attention_bias = bool(raw.get("attention_bias", False))
        if model_type == "qwen2":
            # Qwen2's q/k/v projections always carry a bias (not configurable), o_proj never.
            qkv_bias, o_bias = True, False
        else:
            qkv_bias = o_bias = attention_bias
        sliding = raw.get("sliding_window")
        if model_type == "qwen2" and not raw.get("use_sliding_window", False):
            sliding = None
        return cls(
            architecture=archs[0] if archs else f"{model_type.capitalize()}ForCausalLM",
            model_type=model_type,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            intermediate_size=int(raw["intermediate_size"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            eos_token_ids=_eos_ids(raw, generation or {}),
            bos_token_id=raw.get("bos_token_id"),
            torch_dtype=_parse_dtype(raw.get("torch_dtype") or raw.get("dtype")),
            sliding_window=int(sliding) if sliding else None,
        )


def _parse_rope(raw: dict[str, Any]) -> tuple[float, RopeScaling]:
    # transformers 5 folds theta and scaling into `rope_parameters`; 4.x has `rope_theta` and
    # an optional `rope_scaling` (older files spell the type as "type").
    params = dict(raw.get("rope_parameters") or {})
    legacy = raw.get("rope_scaling") or {}
    params = {**legacy, **params}
    theta = float(params.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ValueError(f"unsupported rope type {rope_type!r}; supported: {SUPPORTED_ROPE_TYPES}")
    known = set(RopeScaling.__dataclass_fields__)
    kwargs = {k: v for k, v in params.items() if k in known and v is not None}
    if rope_type in ("llama3", "yarn"):
        # transformers: a top-level original_max_position_embeddings wins, then the scaling
        # dict's, then max_position_embeddings.
        max_pos = raw.get("max_position_embeddings", 2048)
        original = raw.get("original_max_position_embeddings") or kwargs.get(
            "original_max_position_embeddings", max_pos
        )
        kwargs["original_max_position_embeddings"] = int(original)
        if rope_type == "yarn" and "factor" not in kwargs:
            kwargs["factor"] = max_pos / kwargs["original_max_position_embeddings"]
    return theta, RopeScaling(rope_type=rope_type, **kwargs)


def _eos_ids(raw: dict[str, Any], generation: dict[str, Any]) -> list[int]:
    ids: list[int] = []
    for source in (generation.get("eos_token_id"), raw.get("eos_token_id")):
        if source is None:
            continue
        for token in source if isinstance(source, list) else [source]:
            if int(token) not in ids:
                ids.append(int(token))
    return ids


def _parse_dtype(value: Any) -> torch.dtype:
    if isinstance(value, str):
        dtype = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(dtype, torch.dtype):
            return dtype
    return torch.float32
