"""Kernel tests: on a machine without CUDA, run the Triton kernels through Triton's interpreter
(TRITON_INTERPRET=1) on CPU tensors; with CUDA, run them on the GPU. PAGEMESH_KERNELS is set per
test, so other test folders keep the reference path. TRITON_INTERPRET is set here at import,
before any test module imports a kernel module: Triton fixes a kernel as compiled or interpreted
when its module is imported (without CUDA, interpreting is the only way Triton runs at all)."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(autouse=True)
def _triton_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PAGEMESH_KERNELS", "triton")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
