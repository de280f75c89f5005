"""The host-memory tier of the KV cache (DESIGN.md "Memory tiers"): a second pool in host memory
that cached blocks evicted from the GPU pool are copied out to (spills), and copied back from into
fresh GPU blocks when a prompt hits them (restores). kvmanager decides every move and names the
blocks (block_pool.py); this module only copies, in the order kvmanager lists them.

Layout: one host block holds all layers' K and V contiguously, [layers, 2, block_size, kv_heads,
head_dim], so a block crosses PCIe as one copy (vLLM's offloading measured small per-layer
copies, not bandwidth, as what made offload slow). The GPU pool keeps its per-layer layout
(kv_pool.py: [layers, 2, blocks, ...]); a spill gathers its blocks (all layers, one kernel) into
a contiguous device staging buffer first, a restore scatters one back.

Order. Transfers come in batches, one per kvmanager reply that took blocks (an allocation, an
Extend), each "spills, then restores" (within a reply the restored host blocks were never spill
targets, and a GPU block may be both evicted and refilled), and one more of spills only for a
Step call's spills ahead of eviction (cached blocks copied out before kvmanager evicts them, so
that the eviction moves nothing: a burst of spills larger than the staging ring makes the
compute stream's gathers wait for the ring's device-to-host copies). Consecutive batches are merged when
running the group's spills before its restores gives what running them batch by batch gives
(`_merge`). A group runs as: gather of its spills' GPU blocks into staging, staging -> host;
then host -> staging for its restores, scatter into the GPU pool.
Nothing is ever recomputed: a restored block's KV is the spilled copy, bit for bit.

CUDA, no host wait. The gathers and scatters (device-local, microseconds) run on the compute
stream, queued by `run` when a step is launched, before the step's forward: a step in flight
that still writes a block kvmanager just evicted is ahead of the gather in stream order, and the
step that writes the evicted block next is behind it, so no step waits on a side stream for a
spill. The PCIe copies run on two copy streams, one a direction, overlapping the steps: a
spill's device-to-host copy waits (an event) for its gather only; a restore's host-to-device
copy starts at once (not behind spills' copies, which wait for the step in flight) and its
scatter waits for it. A host block copied both ways is ordered by events: a restore of a block
whose spill may still be running waits for the spill stream, and a spill into a block a restore
may still be reading waits for the restore stream. The block indices go up through pinned
memory, never a pageable (synchronous) copy: a host wait for the device there stalls the launch
until the step in flight ends, which is the overlap async scheduling exists for (the tier's
cost on the mixed workload, issue 26).
Staging is preallocated (the GPU pool's sizing counts it: `staging_blocks_for`), a ring of
NUM_SLOTS slots each way used in turn; a transfer larger than a slot goes in slot-sized pieces,
and a slot's next writer waits (on the device) for an event after its last reader.
Host memory is pinned. CPU: the same order without streams or staging (plain copies in the
step's worker thread, before the step).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from operator import itemgetter

import numpy as np
import torch
from pagemesh.services.executor.kv_pool import KVPool

log = logging.getLogger(__name__)

Pairs = list[tuple[int, int]]
ToDevice = Callable[[np.ndarray], torch.Tensor]

# Staging slots used in turn: a slot is written again only after its previous copy is done, so
# with several slots a burst's pieces overlap their gathers with the earlier pieces' copies.
NUM_SLOTS = 4


@dataclass(slots=True)
class TransferBatch:
    """One kvmanager reply's moves: spills (gpu block, host block), then restores (host block,
    gpu block)."""

    spills: Pairs = field(default_factory=list)
    restores: Pairs = field(default_factory=list)


def _merge(batches: list[TransferBatch]) -> list[TransferBatch]:
    """Consecutive batches as few groups as keep every copy's outcome: a group runs all its
    spills (GPU reads, host writes) before all its restores (host reads, GPU writes), so a later
    batch joins only if none of its spills reads a GPU block the group restores into (it would
    read the old KV) or writes a host block the group restores from (the restore would read the
    new one), and no block would be written twice in one group (the order of one indexed write
    with duplicates is undefined). A later restore of what the group spilled is fine: spills
    come first."""
    if len(batches) == 1:  # (the common launch: one reply's transfers; no sets to build)
        b = batches[0]
        return [TransferBatch(list(b.spills), list(b.restores))] if b.spills or b.restores else []
    out: list[TransferBatch] = []
    host_read: set[int] = set()  # the group's restore sources
    host_written: set[int] = set()  # the group's spill targets
    gpu_written: set[int] = set()  # the group's restore targets
    for b in batches:
        if not b.spills and not b.restores:
            continue
        s_gpu = {g for g, _ in b.spills}
        s_host = {h for _, h in b.spills}
        r_host = {h for h, _ in b.restores}
        r_gpu = {g for _, g in b.restores}
        if out and not (
            s_gpu & gpu_written
            or s_host & host_read
            or s_host & host_written
            or r_gpu & gpu_written
        ):
            cur = out[-1]
            cur.spills += b.spills
            cur.restores += b.restores
            host_read |= r_host
            host_written |= s_host
            gpu_written |= r_gpu
        else:
            out.append(TransferBatch(list(b.spills), list(b.restores)))
            host_read, host_written, gpu_written = r_host, s_host, r_gpu
    return out


def _in_host_order(g: TransferBatch) -> TransferBatch:
    """A group's spills and restores sorted by host block, in place (the order within a group
    is free: no block is written twice in one, `_merge`). kvmanager lists a prompt's restores
    in chain order, but a chain released tail first was spilled to ascending host blocks, so
    chain order is descending host order: one copy a block (a 7k-token history: ~460 copies of
    512 KiB, and as many Python iterations in the step's launch) where sorted runs need a few."""
    g.spills.sort(key=itemgetter(1))
    g.restores.sort()
    return g


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


def staging_blocks_for(
    staging_mib: int, block_bytes: int, max_num_batched_tokens: int, block_size: int, max_seqs: int
) -> int:
    """The device staging buffers' size in blocks (CUDA; the GPU pool's sizing sets it aside):
    `staging_mib` MiB for the two rings (spills, restores), each no larger than one step can
    move (a step allocates at most its prefill tokens' blocks plus one a sequence), at least a
    block a slot, in whole slots."""
    most = -(-max_num_batched_tokens // block_size) + max_seqs
    per_ring = min((staging_mib << 20) // block_bytes // 2, most)
    per_slot = max(1, per_ring // NUM_SLOTS)
    return 2 * NUM_SLOTS * per_slot


def _pinned_to_device(device: torch.device) -> ToDevice:
    """Index uploads for callers without the engine's staging (tests, benchmarks): through
    PyTorch's pinned allocator, which keeps a block until the copy that read it is done."""

    def to_device(array: np.ndarray) -> torch.Tensor:
        return (
            torch.from_numpy(np.ascontiguousarray(array)).pin_memory().to(device, non_blocking=True)
        )

    return to_device


class _Ring:
    """NUM_SLOTS staging slots used in turn, each with the event after its last reader."""

    def __init__(self, slots: torch.Tensor) -> None:
        self.slots = slots  # [NUM_SLOTS, slot_blocks, *block]
        self.free: list[torch.cuda.Event | None] = [None] * NUM_SLOTS
        self.next = 0

    def take(self, writer: torch.cuda.Stream) -> tuple[int, torch.Tensor]:
        """The next slot, once `writer` has waited for its last reader."""
        i = self.next
        self.next = (i + 1) % NUM_SLOTS
        free = self.free[i]
        if free is not None:
            writer.wait_event(free)
        return i, self.slots[i]

    def release(self, i: int, reader: torch.cuda.Stream) -> None:
        """Slot `i`'s last reader is queued on `reader`."""
        ev = torch.cuda.Event()
        ev.record(reader)
        self.free[i] = ev


class HostTier:
    def __init__(
        self, pool: KVPool, num_blocks: int, device: torch.device, staging_blocks: int = 0
    ) -> None:
        """`staging_blocks`: the device staging buffer (CUDA: `staging_blocks_for`; fewer than
        2 * NUM_SLOTS: a block a slot). CPU has no staging; the size only cuts transfers in
        the same pieces (tests)."""
        storage = pool.storage  # [layers, 2, blocks, block_size, kv_heads, head_dim]
        self.num_blocks = num_blocks
        self.device = device
        self.cuda = device.type == "cuda"
        # The pool seen block-major: indexing its first dimension gathers/scatters whole blocks.
        self._gpu_blocks = storage.permute(2, 0, 1, 3, 4, 5)
        block_shape = tuple(self._gpu_blocks.shape[1:])
        # (empty: a host block is only ever read after a spill wrote it; no memset of GiBs)
        self.blocks = torch.empty(
            (num_blocks, *block_shape), dtype=storage.dtype, pin_memory=self.cuda
        )
        self.block_bytes = self.blocks[0].numel() * self.blocks.element_size()
        self.nbytes = self.blocks.numel() * self.blocks.element_size()
        # Blocks a piece (CPU, without staging: pieces of that size when asked, as tests do,
        # else a group in one piece).
        self._slot_blocks = max(1, staging_blocks // (2 * NUM_SLOTS))
        if not self.cuda and not staging_blocks:
            self._slot_blocks = 1 << 62
        self.staging_bytes = 0
        if self.cuda:
            # One copy stream a direction: a restore's host-to-device copy starts at once, not
            # behind the spills' copies to host (which wait for their gathers, so for the step
            # in flight). Host blocks both copy ways touch are ordered by events (_pending).
            self._d2h = torch.cuda.Stream(device)
            self._h2d = torch.cuda.Stream(device)
            shape = (NUM_SLOTS, self._slot_blocks, *block_shape)
            self._spill_ring = _Ring(torch.empty(shape, dtype=storage.dtype, device=device))
            self._restore_ring = _Ring(torch.empty(shape, dtype=storage.dtype, device=device))
            self.staging_bytes = 2 * self._spill_ring.slots.nbytes
            # Host blocks written by a spill / read by a restore whose copy may still be running,
            # with the event after the last copy each way: a copy the other way that touches one
            # waits for it.
            self._spilled: set[int] = set()
            self._restored: set[int] = set()
            self._d2h_last: torch.cuda.Event | None = None
            self._h2d_last: torch.cuda.Event | None = None
        self.num_spills = 0
        self.num_restores = 0

    @property
    def bytes_moved(self) -> int:
        return (self.num_spills + self.num_restores) * self.block_bytes

    def run(self, batches: list[TransferBatch], to_device: ToDevice | None = None) -> None:
        """Issues `batches` in order. CUDA: queued on the current (compute) stream and the copy
        streams, without waiting for the device; the next work on the compute stream sees every
        restore in and every spilled block read. `to_device`: uploads the block indices (the
        engine's pinned step staging). CPU: done on return."""
        groups, array = self.plan(batches)
        if not groups:
            return
        if not self.cuda:
            ids = torch.from_numpy(array)
        else:
            # Copies the other way that are done need no ordering any more.
            if self._d2h_last is None or self._d2h_last.query():
                self._spilled.clear()
            if self._h2d_last is None or self._h2d_last.query():
                self._restored.clear()
            ids = (to_device or _pinned_to_device(self.device))(array)
        s_at, r_at = 0, sum(len(grp.spills) for grp in groups)
        step = self._slot_blocks
        spill = self._spill_piece if self.cuda else self._spill_piece_cpu
        restore = self._restore_piece if self.cuda else self._restore_piece_cpu
        for g in groups:
            for at in range(0, len(g.spills), step):
                piece = g.spills[at : at + step]
                spill(piece, ids[s_at + at : s_at + at + len(piece)])
            for at in range(0, len(g.restores), step):
                piece = g.restores[at : at + step]
                restore(piece, ids[r_at + at : r_at + at + len(piece)])
            s_at += len(g.spills)
            r_at += len(g.restores)
            self.num_spills += len(g.spills)
            self.num_restores += len(g.restores)

    @staticmethod
    def plan(batches: list[TransferBatch]) -> tuple[list[TransferBatch], np.ndarray]:
        """`run`'s host-side preparation: the groups (merged, in host order) and every GPU block
        index of the call in one array (spills' first, then restores'), which goes up in one
        copy that the pieces slice."""
        groups = _merge(batches)
        for g in groups:
            _in_host_order(g)
        gpu_ids = [g for grp in groups for g, _ in grp.spills]
        gpu_ids += [g for grp in groups for _, g in grp.restores]
        return groups, np.asarray(gpu_ids, np.int64)

    def _spill_piece_cpu(self, spills: Pairs, src: torch.Tensor) -> None:
        out = self._gpu_blocks.index_select(0, src)  # contiguous: all layers of each block
        for at, h, k in _runs([h for _, h in spills]):
            self.blocks[h : h + k].copy_(out[at : at + k])

    def _restore_piece_cpu(self, restores: Pairs, dst: torch.Tensor) -> None:
        runs = _runs([h for h, _ in restores])
        self._gpu_blocks[dst] = torch.cat([self.blocks[h : h + k] for _, h, k in runs])

    def _spill_piece(self, spills: Pairs, src: torch.Tensor) -> None:
        """Gather on the compute stream into a slot; the slot to host on the D2H stream."""
        compute = torch.cuda.current_stream(self.device)
        i, slot = self._spill_ring.take(compute)
        n = len(spills)
        torch.index_select(self._gpu_blocks, 0, src, out=slot[:n])
        gathered = torch.cuda.Event()
        gathered.record(compute)
        self._d2h.wait_event(gathered)
        hosts = [h for _, h in spills]
        if self._h2d_last is not None and not self._restored.isdisjoint(hosts):
            self._d2h.wait_event(self._h2d_last)  # a restore still reading one of them
        with torch.cuda.stream(self._d2h):
            # Device -> host, one copy per run of consecutive host blocks.
            for at, h, k in _runs(hosts):
                self.blocks[h : h + k].copy_(slot[at : at + k], non_blocking=True)
        self._spill_ring.release(i, self._d2h)
        self._d2h_last = self._spill_ring.free[i]
        self._spilled.update(hosts)

    def _restore_piece(self, restores: Pairs, dst: torch.Tensor) -> None:
        """Host to a slot on the H2D stream; the scatter on the compute stream after it."""
        compute = torch.cuda.current_stream(self.device)
        i, slot = self._restore_ring.take(self._h2d)
        n = len(restores)
        hosts = [h for h, _ in restores]
        if self._d2h_last is not None and not self._spilled.isdisjoint(hosts):
            self._h2d.wait_event(self._d2h_last)  # a spill still writing one of them
        with torch.cuda.stream(self._h2d):
            for at, h, k in _runs(hosts):
                slot[at : at + k].copy_(self.blocks[h : h + k], non_blocking=True)
        landed = torch.cuda.Event()
        landed.record(self._h2d)
        self._h2d_last = landed
        self._restored.update(hosts)
        compute.wait_event(landed)
        self._gpu_blocks[dst] = slot[:n]  # one scatter into the pool's layout
        self._restore_ring.release(i, compute)

    def synchronize(self) -> None:
        """Waits until every transfer issued so far is done (tests, benchmarks)."""
        if self.cuda:
            self._d2h.synchronize()
            self._h2d.synchronize()
            torch.cuda.current_stream(self.device).synchronize()


def host_blocks_for(gib: float, num_blocks: int, block_bytes: int) -> int:
    """The host tier's size: `num_blocks` when set, else as many blocks as `gib` GiB holds."""
    if num_blocks:
        return num_blocks
    return int(gib * 2**30) // block_bytes if gib > 0 else 0
