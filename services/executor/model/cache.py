"""The local cache directory (downloads, converted GGUF models, file digests) and its locking.

Several processes (test workers, executors) may resolve the same model at once: every slow
step runs under an exclusive file lock and publishes its result with an atomic rename, so a
reader never sees a half-written directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "PAGEMESH_CACHE_DIR"
_MEMO_MIN_BYTES = 64 << 20


def cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "pagemesh"
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def file_lock(name: str) -> Iterator[None]:
    lock_path = cache_dir() / "locks" / f"{name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised by (real path, size, mtime) so big files hash once.

    A file inside the huggingface_hub cache is a link to a blob named by its sha256 (for LFS
    files), which we take as is.
    """
    real = path.resolve()
    if len(real.name) == 64 and all(c in "0123456789abcdef" for c in real.name):
        return real.name
    stat = real.stat()
    if stat.st_size < _MEMO_MIN_BYTES:  # cheap to hash again; keeps the memo file small
        return _sha256(real)
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    memo_path = cache_dir() / "digests.json"
    memo = _read_json(memo_path)
    if key in memo:
        return memo[key]
    digest = _sha256(real)
    with file_lock("digests"):
        memo = _read_json(memo_path)
        memo[key] = digest
        _write_json_atomic(memo_path, memo)
    return digest


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
    os.replace(tmp, path)
