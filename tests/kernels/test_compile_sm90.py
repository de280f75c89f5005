"""Every Triton kernel compiles for Hopper (sm_90), checked on a machine without a GPU.

The interpreter runs kernels as Python, so it never sees the compiler: type errors in loops,
unsupported ops or shared-memory overflows would surface only on a GPU. Triton compiles ahead
of time for a named target with its bundled ptxas; tests/kernels/compile_sm90.py does that in
a subprocess (it must import the kernels with TRITON_INTERPRET unset).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_kernels_compile_for_sm90() -> None:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PAGEMESH_KERNELS")}
    proc = subprocess.run(
        [sys.executable, "-P", str(ROOT / "tests" / "kernels" / "compile_sm90.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
