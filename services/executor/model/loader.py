"""Load an HF safetensors checkpoint straight into LlamaForCausalLM, and fingerprint it.

The module is built on the meta device and materialised once on the target device, so no
memory or time goes to a random init; each checkpoint tensor is then copied into its (possibly
fused) parameter.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from pagemesh.services.executor.model.cache import file_sha256
from pagemesh.services.executor.model.config import ModelConfig
from pagemesh.services.executor.model.cpu_layout import use_cpu_decode_layout
from pagemesh.services.executor.model.llama import STACKED_PARAMS, LlamaForCausalLM
from pagemesh.services.executor.model.resolve import DEFAULT_MODEL, resolve_model
from safetensors import safe_open
from tqdm.auto import tqdm

__all__ = ["DEFAULT_MODEL", "load_model", "model_fingerprint", "resolve_model"]

log = logging.getLogger(__name__)


def load_model(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """`path` is an HF model directory (see resolve_model); dtype defaults to the checkpoint's."""
    path = Path(path)
    config = ModelConfig.from_dir(path)
    dtype = dtype or config.torch_dtype
    device = torch.device(device)
    start = time.monotonic()
    with torch.device("meta"):
        model = LlamaForCausalLM(config, dtype)
    model.to_empty(device=device)
    model.init_non_persistent_buffers()
    _load_weights(model, path, device)
    model.eval().requires_grad_(False)
    if device.type == "cpu":
        use_cpu_decode_layout(model)  # batch-1 decode streams its weights ~1.4x faster
    log.info(
        "loaded %s (%s, %.1fM params, %s on %s) in %.1f s",
        path.name,
        config.architecture,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(dtype).removeprefix("torch."),
        device,
        time.monotonic() - start,
    )
    return model, config


def model_fingerprint(path: str | Path) -> str:
    """A stable hash of the config and every weight file (content digest and size).

    The prefix cache keys blocks by it, so two models (or two versions of one) never share KV.
    Digests are memoised per file (cache.file_sha256), so this is cheap after the first call.
    """
    path = Path(path)
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True).encode())
    for file in _weight_files(path):
        h.update(f"\0{file.name}\0{file.stat().st_size}\0{file_sha256(file)}".encode())
    return h.hexdigest()


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / name for name in names]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {path}")
    return files


def _iter_checkpoint(path: Path, device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    files = _weight_files(path)
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            total += len(list(f.keys()))
    # safetensors reads straight onto CUDA; elsewhere tensors are read on the CPU.
    read_device = str(device) if device.type == "cuda" else "cpu"
    with tqdm(total=total, desc=f"loading {path.name}", unit="tensor", leave=False) as bar:
        for file in files:
            with safe_open(str(file), framework="pt", device=read_device) as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
                    bar.update()


def _load_weights(model: LlamaForCausalLM, path: Path, device: torch.device) -> None:
    config = model.config
    params = dict(model.named_parameters())
    # (parameter name, shard) pairs still to fill; shard None = the whole parameter
    missing: set[tuple[str, int | None]] = set()
    for name in params:
        fused = next((f for f, _ in STACKED_PARAMS.values() if f"{f}." in name), None)
        count = {"qkv_proj": 3, "gate_up_proj": 2}.get(fused or "", 0)
        missing |= {(name, i) for i in range(count)} if count else {(name, None)}

    for ckpt_name, tensor in _iter_checkpoint(path, device):
        if "rotary_emb" in ckpt_name:
            continue  # inv_freq buffers of old checkpoints: we compute our own
        if ckpt_name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        name, shard = _map_name(ckpt_name)
        if name not in params and f"model.{name}" in params:
            name = f"model.{name}"
        if name not in params:
            raise KeyError(f"checkpoint tensor {ckpt_name!r} has no place in the model")
        target = params[name].data
        if shard is not None:
            start, size = _shard_range(config, name, shard)
            target = target.narrow(0, start, size)
        if target.shape != tensor.shape:
            raise ValueError(
                f"{ckpt_name}: checkpoint {tuple(tensor.shape)} != {tuple(target.shape)}"
            )
        target.copy_(tensor)
        missing.discard((name, shard))
    if missing:
        raise KeyError(f"weights missing from the checkpoint: {sorted(n for n, _ in missing)[:8]}")


def _map_name(ckpt_name: str) -> tuple[str, int | None]:
    for proj, (fused, shard) in STACKED_PARAMS.items():
        if f".{proj}." in ckpt_name:
            return ckpt_name.replace(f".{proj}.", f".{fused}."), shard
    return ckpt_name, None


def _shard_range(config: ModelConfig, name: str, shard: int) -> tuple[int, int]:
    """Rows of fused parameter `name` that checkpoint shard `shard` fills: (start, size)."""
    if ".qkv_proj." in name:
        sizes = [config.q_size, config.kv_size, config.kv_size]
    else:
        sizes = [config.intermediate_size, config.intermediate_size]
    return sum(sizes[:shard]), sizes[shard]
