"""Kernel tests: on a machine without CUDA, run the Triton kernels through Triton's interpreter
(TRITON_INTERPRET=1) on CPU tensors; with CUDA, run them on the GPU. Set per test, so other
test folders keep the reference path."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEMESH_KERNELS", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
