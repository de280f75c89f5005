"""Pinned host memory for a step's host<->device copies, reused step after step.

A copy between the device and pageable host memory waits for the device; the step's uploads
and its tokens' download must not, so they go through pinned memory. PyTorch's pinned
allocator only hands a freed block back once the device has passed the point where it was
freed, which under async scheduling is after the step in flight; a step wanting a size with no
such block calls cudaHostAlloc, and that waits for the device too (measured on an H200: 13-17
ms of a prefill step's launch in a burst of admissions, the whole step in flight).

Here two slots serve alternate steps. Invariant: when step t starts filling slot t % 2, step
t - 2, the slot's previous user, has landed (its inputs were consumed and its outputs read on
the host), so nothing reads or writes the slot any more. The engine keeps it: a step is
launched only after the step before the one in flight has landed (engine._step_async).

A step that overflows its slot falls back to PyTorch's allocator for the rest of its copies,
and the slot grows before its next use.
"""

from __future__ import annotations

import numpy as np
import torch

_ALIGN = 64


class PinnedStaging:
    def __init__(self, device: torch.device, nbytes: int = 4 << 20) -> None:
        self.device = device
        self._slots = [self._alloc(nbytes), self._alloc(nbytes)]
        self._slot = 0
        self._offset = 0
        self._wanted = 0  # bytes the largest step so far asked for
        self.num_overflows = 0

    @staticmethod
    def _alloc(nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def next_step(self) -> None:
        """Called once per step, before its first copy."""
        self._wanted = max(self._wanted, self._offset)
        self._slot ^= 1
        self._offset = 0
        if self._slots[self._slot].numel() < self._wanted:
            size = 1 << (self._wanted - 1).bit_length()
            self._slots[self._slot] = self._alloc(size)  # the old one is free: see above

    def _take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        start = self._offset
        self._offset = start + -(-nbytes // _ALIGN) * _ALIGN
        buf = self._slots[self._slot]
        if self._offset > buf.numel():
            self.num_overflows += 1
            return None
        return buf[start : start + nbytes].view(dtype).view(shape)

    def to_device(self, array: np.ndarray) -> torch.Tensor:
        array = np.ascontiguousarray(array)
        tensor = torch.from_numpy(array)
        host = self._take(array.shape, tensor.dtype)
        if host is None:
            host = tensor.pin_memory()
        else:
            host.numpy()[...] = array
        return host.to(self.device, non_blocking=True)

    def to_host(self, t: torch.Tensor) -> torch.Tensor:
        """Starts the copy of `t` to the host; read the result only after the device is done."""
        host = self._take(tuple(t.shape), t.dtype)
        if host is None:
            return t.to("cpu", non_blocking=True)
        host.copy_(t, non_blocking=True)
        return host
