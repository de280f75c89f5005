"""Model resolution (directory, GGUF, default, hub cache), config parsing and fingerprints."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
import transformers
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.model.loader import (
    DEFAULT_MODEL,
    load_model,
    model_fingerprint,
    resolve_model,
)
from pagemesh.services.executor.model.resolve import fetch_default_gguf
from safetensors.torch import load_file, save_file

TINY = dict(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)


def _tiny_llama(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).save_pretrained(path)
    return path


def test_default_model_is_converted_once_and_cached(smollm2_path: Path) -> None:
    start = time.monotonic()
    again = resolve_model(DEFAULT_MODEL)  # not the fixture's functools cache: the disk cache
    assert time.monotonic() - start < 3.0
    assert again == smollm2_path
    assert resolve_model(fetch_default_gguf()) == smollm2_path  # the .gguf spec, same cache
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm2_path / name).exists(), name
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_path)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    config = ModelConfig.from_dir(smollm2_path)
    assert (config.num_layers, config.num_kv_heads, config.tie_word_embeddings) == (30, 3, True)
    assert config.eos_token_ids == [2]


def test_resolve_directory_and_errors(tmp_path: Path) -> None:
    model_dir = _tiny_llama(tmp_path / "tiny")
    assert resolve_model(model_dir) == model_dir.resolve()
    assert resolve_model(str(model_dir)) == model_dir.resolve()
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path / "missing.gguf")
    with pytest.raises(FileNotFoundError):
        resolve_model(tmp_path)  # a directory without config.json
    with pytest.raises(FileNotFoundError):
        resolve_model("./not/a/model")


def test_resolve_hub_id_from_local_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as hub_constants

    # A hub cache laid out as huggingface_hub writes it; offline so that no test reaches a hub.
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / ("a" * 40)
    _tiny_llama(snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("acme/tiny-llama").resolve() == snapshot.resolve()


def test_fingerprint_is_stable_and_content_keyed(tmp_path: Path) -> None:
    a = _tiny_llama(tmp_path / "a", seed=0)
    b = _tiny_llama(tmp_path / "b", seed=1)
    copy = Path(shutil.copytree(a, tmp_path / "copy"))
    fa = model_fingerprint(a)
    assert fa == model_fingerprint(a) == model_fingerprint(copy)
    assert fa != model_fingerprint(b)
    # same shapes and config, one weight changed: a different model
    weights = load_file(copy / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] + 1
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert model_fingerprint(copy) != fa


def test_missing_weight_is_an_error(tmp_path: Path) -> None:
    path = _tiny_llama(tmp_path / "m")
    weights = load_file(path / "model.safetensors")
    del weights["model.layers.0.self_attn.k_proj.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match="qkv_proj"):
        load_model(path)


def test_config_reads_transformers_4_and_5_rope_formats() -> None:
    base = {**TINY, "model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    v4 = ModelConfig.from_dict(
        {
            **base,
            "rope_theta": 500000.0,
            "rope_scaling": {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "eos_token_id": [128001, 128009],
            "torch_dtype": "bfloat16",
        },
        {"eos_token_id": [128009, 128008]},
    )
    v5 = ModelConfig.from_dict(
        {
            **base,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            "dtype": "bfloat16",
        },
        {"eos_token_id": [128009, 128008, 128001]},
    )
    assert v4.rope_theta == v5.rope_theta == 500000.0
    assert v4.rope_scaling == v5.rope_scaling
    assert v4.rope_scaling.rope_type == "llama3"
    assert v4.torch_dtype == v5.torch_dtype == torch.bfloat16
    assert v4.eos_token_ids == [128009, 128008, 128001]
    with pytest.raises(ValueError, match="rope"):
        ModelConfig.from_dict({**base, "rope_scaling": {"type": "dynamic", "factor": 2.0}})
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_dict({**base, "model_type": "gpt2"})


def test_qwen2_bias_and_qwen3_norm_flags() -> None:
    qwen2 = ModelConfig.from_dict({**TINY, "model_type": "qwen2", "sliding_window": 4096})
    assert (qwen2.qkv_bias, qwen2.o_bias, qwen2.qk_norm, qwen2.sliding_window) == (
        True,
        False,
        False,
        None,
    )
    qwen3 = ModelConfig.from_dict({**TINY, "model_type": "qwen3", "head_dim": 128})
    assert (qwen3.qkv_bias, qwen3.qk_norm, qwen3.head_dim, qwen3.q_size) == (False, True, 128, 256)
    raw = json.loads(json.dumps({**TINY, "model_type": "mistral", "sliding_window": 4096}))
    mistral = ModelConfig.from_dict(raw)
    assert (mistral.sliding_window, mistral.max_model_len) == (4096, 64)
    mistral = ModelConfig.from_dict({**raw, "max_position_embeddings": 32768})
    assert mistral.max_model_len == 4096
