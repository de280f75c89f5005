"""GGUF -> HF safetensors directory, converted once and cached by the file's sha256.

transformers dequantises a GGUF file into a regular model (and builds the tokenizer and chat
template from the GGUF metadata); we save that as a plain directory so later loads are a fast
safetensors read instead of a ~20 s GGUF parse.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from pagemesh.services.executor.model.cache import cache_dir, file_lock, file_sha256

log = logging.getLogger(__name__)

_COMPLETE = ".complete"  # written last: a directory without it is not a finished conversion


def converted_dir(gguf_path: Path) -> Path:
    digest = file_sha256(gguf_path)
    return cache_dir() / "gguf" / f"{gguf_path.stem}-{digest[:16]}"


def convert_gguf(gguf_path: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Return the cached HF directory for `gguf_path`, converting it on first use.

    float32 by default: dequantised GGUF values are not all representable in 16 bits, and the
    converted weights should equal what transformers itself loads from the GGUF file.
    """
    gguf_path = Path(gguf_path).expanduser().resolve()
    out = converted_dir(gguf_path)
    if (out / _COMPLETE).exists():
        return out
    with file_lock(out.name):
        if (out / _COMPLETE).exists():  # another process converted it while we waited
            return out
        start = time.monotonic()
        log.info("converting %s to safetensors (once; cached in %s)", gguf_path.name, out)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            _convert(gguf_path, tmp, dtype)
            (tmp / _COMPLETE).write_text(gguf_path.name)
            shutil.rmtree(out, ignore_errors=True)
            os.replace(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", gguf_path.name, time.monotonic() - start)
    return out


def _convert(gguf_path: Path, out: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
    config = model.config.to_dict()
    # The weights are dequantised: the result is an ordinary checkpoint, and transformers
    # refuses to save a model that still claims to be GGUF-quantised.
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tied = bool(config.get("tie_word_embeddings", False))
    state = {
        k: v.detach().to(dtype).contiguous()
        for k, v in model.state_dict().items()
        if not (tied and k == "lm_head.weight")  # safetensors refuses shared tensors
    }
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(str(out))
