"""Shared fixtures. Redis is real (see tests/support/redis.py); fault tests that stop and restart
Redis use `redis_process`, which they control."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

# Triton decides once, when it is first imported, whether its own library functions (tl.max,
# tl.sum, ...) are interpreted or compiled, and transformers imports Triton while other test
# folders are collected. Without CUDA the kernel tests need the interpreter, so it is set here,
# before any test module is imported (tests/kernels/conftest.py is too late in a full run).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from pagemesh.redis_process import RedisProcess
from tests.support.redis import redis_url as _redis_url


def _register_benchmarks() -> None:
    """Tests use the benchmarks' workloads and clients as `benchmarks.*`: benchmarks/_repo.py maps
    that name to the folder without putting the checkout's root on sys.path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_repo.py"
    spec = importlib.util.spec_from_file_location("_repo", path)
    assert spec is not None and spec.loader is not None
    module = sys.modules["_repo"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)


_register_benchmarks()


def _has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def redis_url() -> Iterator[str]:
    with _redis_url() as url:
        yield url


@pytest.fixture
def redis_process() -> Iterator[RedisProcess]:
    """A local redis-server the test may stop, kill and restart (AOF persistence on)."""
    proc = RedisProcess().start()
    try:
        yield proc
    finally:
        proc.cleanup()


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """SmolLM2-135M-Instruct as an HF directory (downloaded and converted once, then cached)."""
    from tests.support.model import smollm2_dir

    return smollm2_dir()
