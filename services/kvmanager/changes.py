"""What the Redis write-behind still has to write, folded from the core's change events
(events.py), and what Redis holds of each live sequence: persistence's own account, kept out of
the core.

Folding coalesces: the sets name blocks, hashes and sequences, and a batch writes their values as
they are when it is built, so a block changed fifty times between two batches is written once.
Folding is cheap and changes nothing in Redis, so `PendingChanges.collect` runs whenever the
pending count is read, not only when a batch is built.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagemesh.services.kvmanager.events import (
    BLOCK,
    BLOCK_STORED,
    BLOCKS,
    EXECUTOR_REGISTERED,
    HASH_REMOVED,
    HOST_BLOCKS,
    SEQ_REPLACED,
    SEQ_STORED,
    SEQS_GREW,
    SEQS_REMOVED,
    Event,
    take,
)
from pagemesh.services.kvmanager.manager import ExecutorState, Manager

NOT_REPLACED = 1 << 62  # `replaced_from` of a sequence no copy-on-write touched


@dataclass(slots=True)
class SeqChanges:
    """An executor's sequences to write in the next batch (taken out of ExecutorChanges)."""

    seqs: set[str]
    replaced_from: dict[str, int]  # lowest table index copy-on-write replaced, per sequence
    released: dict[str, tuple[int, int]]  # released: (blocks, hashes) Redis holds, to delete


@dataclass(slots=True)
class ExecutorChanges:
    """One executor epoch's changes not yet in a batch, and what Redis holds of its sequences."""

    epoch: int
    blocks: set[int] = field(default_factory=set)  # records to rewrite
    hashes: set[bytes] = field(default_factory=set)  # index entries to rewrite or delete
    seqs: set[str] = field(default_factory=set)  # sequences to rewrite (or delete)
    host_blocks: set[int] = field(default_factory=set)  # host-tier records to rewrite
    replaced_from: dict[str, int] = field(default_factory=dict)
    released: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Live sequences Redis holds (or the batch being written will hold) -> (blocks, hashes) of
    # them: a sequence it holds is written from its first changed entry on, a new one whole.
    held: dict[str, tuple[int, int]] = field(default_factory=dict)

    def fold(self, events: list[Event]) -> None:
        blocks, hashes, seqs = self.blocks, self.hashes, self.seqs
        for kind, x in events:  # the most frequent kinds first
            if kind == BLOCK:
                blocks.add(x)
            elif kind == BLOCKS:
                blocks.update(x)
            elif kind == SEQS_GREW:
                seqs.update(x)
            elif kind == BLOCK_STORED:
                blocks.add(x[0])
                hashes.add(x[1])
            elif kind == SEQ_STORED:
                seqs.add(x)
            elif kind == HASH_REMOVED:
                hashes.add(x)
            elif kind == SEQS_REMOVED:
                seqs.update(x)
                for sid in x:
                    self._released(sid)
            elif kind == HOST_BLOCKS:
                self.host_blocks.update(x)
            elif kind == SEQ_REPLACED:
                sid, first = x
                seqs.add(sid)
                if first < self.replaced_from.get(sid, NOT_REPLACED):
                    self.replaced_from[sid] = first

    def _released(self, sid: str) -> None:
        """What Redis holds of a released sequence goes (its id may be allocated again before
        the next batch: that one is written whole, after these fields are deleted)."""
        self.replaced_from.pop(sid, None)
        held = self.held.pop(sid, None)
        if held is not None:
            prev = self.released.get(sid, (0, 0))
            self.released[sid] = (max(prev[0], held[0]), max(prev[1], held[1]))

    @property
    def count(self) -> int:
        return len(self.blocks) + len(self.hashes) + len(self.seqs) + len(self.host_blocks)

    def take_blocks(self) -> tuple[set[int], set[bytes]]:
        out = self.blocks, self.hashes
        self.blocks, self.hashes = set(), set()
        return out

    def take_host_blocks(self) -> set[int]:
        out, self.host_blocks = self.host_blocks, set()
        return out

    def take_seqs(self) -> SeqChanges:
        out = SeqChanges(self.seqs, self.replaced_from, self.released)
        self.seqs, self.replaced_from, self.released = set(), {}, {}
        return out


class PendingChanges:
    """Every executor's changes, plus registrations: executors whose descriptor to write and old
    epochs whose keys to drop."""

    def __init__(self) -> None:
        self.executors: set[str] = set()
        self.dropped_epochs: list[tuple[str, int]] = []
        self.per_executor: dict[str, ExecutorChanges] = {}

    def of(self, ex: ExecutorState) -> ExecutorChanges:
        """The changes of `ex`'s epoch (an older epoch's account is dropped)."""
        ch = self.per_executor.get(ex.executor_id)
        if ch is None or ch.epoch != ex.epoch:
            ch = self.per_executor[ex.executor_id] = ExecutorChanges(ex.epoch)
        return ch

    def collect(self, m: Manager) -> None:
        """Folds every event the core recorded since the last call. Registrations first: a
        re-registered executor's old epoch went with its ExecutorState, events and all."""
        if m.events:
            for kind, (eid, replaced_epoch) in take(m.events):
                assert kind == EXECUTOR_REGISTERED
                self.executors.add(eid)
                if replaced_epoch:
                    self.dropped_epochs.append((eid, replaced_epoch))
        for ex in m.executors.values():
            ch = self.of(ex)
            if ex.events:
                ch.fold(take(ex.events))

    def count(self, m: Manager) -> int:
        """Changes not yet in a batch (after collecting, which leaves an account for each
        current executor epoch and no other)."""
        self.collect(m)
        n = len(self.executors) + len(self.dropped_epochs)
        for ch in self.per_executor.values():
            n += ch.count
        return n

    def take_registrations(self) -> tuple[set[str], list[tuple[str, int]]]:
        out = self.executors, self.dropped_epochs
        self.executors, self.dropped_epochs = set(), []
        return out

    def reset(self, m: Manager) -> None:
        """Forgets everything pending and every account of what Redis holds (a full rewrite
        follows, or Redis was just read): events recorded so far are dropped."""
        if m.events is not None:
            m.events.clear()
        for ex in m.executors.values():
            if ex.events is not None:
                ex.events.clear()
        self.executors, self.dropped_epochs = set(), []
        self.per_executor = {eid: ExecutorChanges(ex.epoch) for eid, ex in m.executors.items()}
