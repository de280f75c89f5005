"""Child processes that do not outlive the process that started them (`pagemesh up`, a gateway
with several workers)."""

from __future__ import annotations

import contextlib
import ctypes
import signal


def set_pdeathsig() -> None:
    """In the child: get SIGTERM if `pagemesh up` dies, so no service outlives it (Linux)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
