"""The host-memory tier of the KV cache (DESIGN.md "Memory tiers"): a second pool in host memory
that cached blocks evicted from the GPU pool are copied out to (spills), and copied back from into
fresh GPU blocks when a prompt hits them (restores). kvmanager decides every move and names the
blocks (block_pool.py); this module only copies, in the order kvmanager lists them.

Layout: one host block holds all layers' K and V contiguously, [layers, 2, block_size, kv_heads,
head_dim], so a block crosses PCIe as one copy (vLLM's offloading measured small per-layer
copies, not bandwidth, as what made offload slow). The GPU pool keeps its per-layer layout
(kv_pool.py: [layers, 2, blocks, ...]); a spill gathers the blocks into one contiguous device
buffer first, a restore scatters one back.

Order. Transfers come in batches, one per kvmanager reply that took blocks (an allocation, an
Extend), each "spills, then restores" (within a reply the restored host blocks were never spill
targets, and a GPU block may be both evicted and refilled). Consecutive batches are merged when
no copy of the later one reads or writes what the earlier one's restores or spills touch out of
order (`_merge`), and a merged group runs as: host -> staging for its restores, gather of its
spills' GPU blocks into a staging buffer, scatter of the restores into the GPU pool, staging ->
host for the spills.
Nothing is ever recomputed: a restored block's KV is the spilled copy, bit for bit.

CUDA: the copies run on a side stream, so they overlap the step in flight. The host-to-device
copies of restores start at once; the gather and the scatter wait for the work already queued on
the compute stream (a sequence that finished in the step in flight may still be writing a block
kvmanager just handed out again, under async scheduling). The next step's compute stream waits
for the side stream's last event (`fence`), so no step reads a restored block before its copy is
in, and no step writes an evicted block before its gather is done; the device-to-host copies of
spills may still be running then (they read the staging buffer, not the pool), and a later
restore of the same host block is behind them on the same stream. Host memory is pinned.
CPU: the same code without streams (plain copies in the step's worker thread, before the step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from pagemesh.services.executor.kv_pool import KVPool

log = logging.getLogger(__name__)

Pairs = list[tuple[int, int]]
# Host array -> device tensor without waiting for the device (the runner's pinned staging).
Upload = Callable[[np.ndarray], torch.Tensor]


@dataclass(slots=True)
class TransferBatch:
    """One kvmanager reply's moves: spills (gpu block, host block), then restores (host block,
    gpu block)."""

    spills: Pairs = field(default_factory=list)
    restores: Pairs = field(default_factory=list)


def _merge(batches: list[TransferBatch]) -> list[TransferBatch]:
    """Consecutive batches as few groups as keep every copy's outcome: a group runs its restores'
    host reads first and its restores' GPU writes last (module docstring), so a later batch joins
    only if none of its restores reads a host block the group spills into, none of its spills
    reads a GPU block the group restores into, and no block would be written twice in one
    group (the order of one indexed write with duplicates is undefined)."""
    out: list[TransferBatch] = []
    host_written: set[int] = set()
    gpu_written: set[int] = set()
    for b in batches:
        if not b.spills and not b.restores:
            continue
        s_host = {h for _, h in b.spills}
        r_gpu = {g for _, g in b.restores}
        if out and not (
            {h for h, _ in b.restores} & host_written
            or {g for g, _ in b.spills} & gpu_written
            or s_host & host_written
            or r_gpu & gpu_written
        ):
            cur = out[-1]
            cur.spills += b.spills
            cur.restores += b.restores
            host_written |= s_host
            gpu_written |= r_gpu
        else:
            out.append(TransferBatch(list(b.spills), list(b.restores)))
            host_written, gpu_written = set(s_host), set(r_gpu)
    return out


def _runs(ids: list[int]) -> list[tuple[int, int, int]]:
    """(position, first id, length) of each run of consecutive ids in `ids` (host blocks come
    off a FIFO free list, so a batch's are often consecutive: fewer, larger copies)."""
    out: list[tuple[int, int, int]] = []
    for i, h in enumerate(ids):
        if out and out[-1][1] + out[-1][2] == h:
            pos, first, n = out[-1]
            out[-1] = (pos, first, n + 1)
        else:
            out.append((i, h, 1))
    return out


def _restore_runs(restores: Pairs) -> tuple[Pairs, list[tuple[int, int, int]]]:
    """A group's restores in host block order, and their runs (`_runs`): the staging buffer's
    order is free, as long as the scatter reads it in the same order."""
    ordered = sorted(restores)
    return ordered, _runs([h for h, _ in ordered])


class HostTier:
    def __init__(self, pool: KVPool, num_blocks: int, device: torch.device) -> None:
        storage = pool.storage  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.num_blocks = num_blocks
        self.device = device
        self.cuda = device.type == "cuda"
        # The pool seen block-major: indexing its first dimension gathers/scatters whole blocks.
        self._gpu_blocks = storage.permute(2, 0, 1, 3, 4, 5)
        shape = (num_blocks, *self._gpu_blocks.shape[1:])
        # (empty: a host block is only ever read after a spill wrote it; no memset of GiBs)
        self.blocks = torch.empty(shape, dtype=storage.dtype, pin_memory=self.cuda)
        self.block_bytes = self.blocks[0].numel() * self.blocks.element_size()
        self.nbytes = self.blocks.numel() * self.blocks.element_size()
        self._stream = torch.cuda.Stream(device) if self.cuda else None
        self._done: torch.cuda.Event | None = None  # the side stream's last work, not fenced yet
        self.num_spills = 0
        self.num_restores = 0

    @property
    def bytes_moved(self) -> int:
        return (self.num_spills + self.num_restores) * self.block_bytes

    def run(self, batches: list[TransferBatch], upload: Upload | None = None) -> None:
        """Issues `batches` in order (CUDA: on the side stream, `fence` before the next step;
        CPU: done on return). `upload`: how block ids reach the device without a wait (the
        runner's pinned staging, valid for the step being launched); None: pinned here."""
        groups = _merge(batches)
        if not groups:
            return
        if self._stream is None:
            for g in groups:
                self._spill_out(self._group(g, None), g.spills)
            return
        compute = torch.cuda.current_stream(self.device)
        queued = torch.cuda.Event()
        queued.record(compute)
        with torch.cuda.stream(self._stream):
            for i, g in enumerate(groups):
                out = self._group(g, queued, upload)
                if i == len(groups) - 1:
                    # The GPU pool's part is done here: the next step waits for this, not for
                    # the last copies to host (they read the staging buffer).
                    done = torch.cuda.Event()
                    done.record(self._stream)
                self._spill_out(out, g.spills)
        self._done = done

    def _group(
        self, g: TransferBatch, queued: torch.cuda.Event | None, upload: Upload | None = None
    ) -> torch.Tensor | None:
        """A group's part on the GPU pool: restores staged from host, the spilled blocks
        gathered, the restores scattered in. Returns the gathered spills (`_spill_out`)."""
        dev = self.device
        staged = None
        restores = g.restores
        if restores:
            # In host block order: the staging position of each block only has to match the
            # scatter's index. kvmanager lists a prompt's restores in chain order, but a chain
            # was released tail first (and evicted, and spilled to ascending host blocks, in
            # that order), so chain order is descending host order: one copy a block (a
            # 7k-token history: ~460 copies of 512 KiB, and as many Python iterations in the
            # launch) where sorted runs need a few. (Within a group no two restores share a
            # block: `_merge`.)
            restores, runs = _restore_runs(restores)
            staged = torch.empty(
                (len(restores), *self.blocks.shape[1:]), dtype=self.blocks.dtype, device=dev
            )
            # Host -> device, one copy per run of consecutive host blocks (a block at least:
            # all its layers are contiguous). CPU: the same copies, synchronous.
            for i, h, n in runs:
                staged[i : i + n].copy_(self.blocks[h : h + n], non_blocking=self.cuda)
        if queued is not None:
            torch.cuda.current_stream(dev).wait_event(queued)
        out = None
        if g.spills:
            src = self._ids([s for s, _ in g.spills], upload)
            out = self._gpu_blocks[src]  # one gather: [n, layers, 2, ...], contiguous
        if staged is not None:
            dst = self._ids([d for _, d in restores], upload)
            self._gpu_blocks[dst] = staged  # one scatter into the pool's layout
            self.num_restores += len(restores)
        return out

    def _ids(self, ids: list[int], upload: Upload | None) -> torch.Tensor:
        """Block ids as a device index, copied without waiting. Not `torch.tensor(ids,
        device=...)`: a copy from pageable memory synchronizes the stream it is queued on, so
        the launch of the step that reads the restores waited on the host for the step in
        flight (the gather and scatter wait for it) and for every restore copy before it."""
        arr = np.asarray(ids, dtype=np.int64)
        if not self.cuda:
            return torch.from_numpy(arr)
        if upload is not None:
            return upload(arr)
        return torch.from_numpy(arr).pin_memory().to(self.device, non_blocking=True)

    def _spill_out(self, out: torch.Tensor | None, spills: Pairs) -> None:
        """The gathered spills to their host blocks."""
        if out is None:
            return
        # Device -> host, one copy per run of consecutive host blocks.
        for i, h, n in _runs([h for _, h in spills]):
            self.blocks[h : h + n].copy_(out[i : i + n], non_blocking=self.cuda)
        self.num_spills += len(spills)

    def fence(self) -> None:
        """Before a step: the compute stream waits for every transfer issued so far."""
        if self._done is not None:
            torch.cuda.current_stream(self.device).wait_event(self._done)
            self._done = None

    def synchronize(self) -> None:
        """Waits until every transfer issued so far is done (tests, benchmarks)."""
        if self._stream is not None:
            self._stream.synchronize()


def host_blocks_for(gib: float, num_blocks: int, block_bytes: int) -> int:
    """The host tier's size: `num_blocks` when set, else as many blocks as `gib` GiB holds."""
    if num_blocks:
        return num_blocks
    return int(gib * 2**30) // block_bytes if gib > 0 else 0
