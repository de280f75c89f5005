"""The block-allocator contract between an executor and kvmanager.

Two implementations satisfy `BlockAllocator`: the gRPC client (`pagemesh.services.kvmanager.client`) and
the in-process allocator (`pagemesh.services.kvmanager.local`), which runs kvmanager's own core in the
executor's process. Both behave identically; the in-process one exists for tests and to measure
what the gRPC hop costs (an A/B flag on the executor).

Invariants the executor may rely on:
- A block table is append-only except for copy-on-write replacements, which kvmanager reports
  explicitly (`TableUpdate.first_index`) together with the copies the executor must run first.
- Allocate never reports a cached prefix that covers the last prompt token: that token's logits
  are needed, so it is always recomputed.
- Only blocks committed after their KV was written are ever shared with another sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class AllocatorError(Exception):
    """Base of every error an allocator raises."""


class OutOfBlocks(AllocatorError):
    """Not enough free or evictable blocks; the state is unchanged (gRPC RESOURCE_EXHAUSTED)."""


class InvalidRequest(AllocatorError):
    """Unknown sequence, duplicate id, bad lengths... (gRPC INVALID_ARGUMENT / NOT_FOUND)."""


class UnknownSequence(InvalidRequest):
    """A sequence id kvmanager does not hold (never allocated, or released already): gRPC
    NOT_FOUND. A subclass, so `except InvalidRequest` still catches it."""


class SequenceTooLarge(OutOfBlocks, InvalidRequest):
    """The sequence needs more blocks than the whole pool holds, so it can never fit (gRPC
    OUT_OF_RANGE). Both an OutOfBlocks (a scheduler that fails a request when OutOfBlocks comes
    with nothing running stays correct) and an InvalidRequest (one that checks for it can fail
    the request at once instead of waiting). The state is unchanged."""


class StaleEpoch(AllocatorError):
    """The executor re-registered since; this caller must re-register (gRPC FAILED_PRECONDITION)."""


class AllocatorUnavailable(AllocatorError):
    """kvmanager cannot be reached (gRPC UNAVAILABLE / DEADLINE_EXCEEDED)."""


@dataclass(slots=True)
class Allocation:
    block_ids: list[int]
    num_cached_tokens: int
    # The host tier (DESIGN.md "Memory tiers"), in this order before the step that reads the
    # blocks: spills (gpu block -> host block: cached blocks this allocation evicted, copied out
    # before the GPU block is written again), then restores (host block -> gpu block: prefix
    # hits found in host memory, copied into the fresh GPU blocks of the table).
    spills: list[tuple[int, int]] = field(default_factory=list)
    restores: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class ExtendEntry:
    seq_id: str
    num_computed_tokens: int  # KV already written; this step writes from here
    num_tokens: int  # the table must cover this many tokens afterwards


@dataclass(slots=True)
class TableUpdate:
    first_index: int  # table[first_index:] is replaced by block_ids
    block_ids: list[int]


@dataclass(slots=True)
class ExtendResult:
    updates: dict[str, TableUpdate] = field(default_factory=dict)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst), run before the step
    # (gpu, host): cached blocks the fresh ones were evicted from, copied out to the host tier
    # before the copies and the step (see Allocation).
    spills: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class CommitEntry:
    seq_id: str
    block_index: int
    token_ids: list[int]  # exactly block_size ids


@dataclass(slots=True)
class StepResult:
    """What one `step` call did: each part succeeded (its figure or result) or failed on its own
    (its error; the other parts were still applied)."""

    num_published: int = 0
    num_released: int = 0
    extend: ExtendResult | None = None  # None: no extend part, or it failed
    commit_error: AllocatorError | None = None
    release_error: AllocatorError | None = None
    extend_error: AllocatorError | None = None
    allocations: list[Allocation] = field(default_factory=list)  # a prefix of the admissions
    allocate_error: AllocatorError | None = None  # why the next admission failed, if it did
    # Why the load report was not taken (StaleEpoch: kvmanager does not know this executor's
    # epoch, e.g. it restarted without Redis: re-register). Set only for a call with a load.
    load_error: AllocatorError | None = None
    # Host tier: cached GPU blocks to copy out ahead of their eviction, (gpu block, host block),
    # after every other transfer of the call (its extend's and allocations'): they stay cached.
    spills_ahead: list[tuple[int, int]] = field(default_factory=list)


@dataclass(slots=True)
class LoadReport:
    """An executor's load, sent with `step` for routing (kvmanager's router, Fleet.Route). Each
    report replaces the previous one. An idle executor sends one about every second as a step
    with no parts (a heartbeat): an executor kvmanager has not heard from for longer than its
    --executor-timeout is routed around. Free blocks are not reported: kvmanager owns the pool."""

    running: int = 0  # sequences in the running batch
    waiting: int = 0  # sequences queued for admission
    queued_prompt_tokens: int = 0  # prompt tokens of the waiting sequences, not yet prefilled


@dataclass(slots=True)
class AdmitEntry:
    """One waiting sequence offered for admission in a `step` call."""

    seq_id: str
    token_ids: list[int] | bytes  # or their packed form (proto/packed_ids)
    cache_salt: str = ""
    num_lookahead_tokens: int = 0


class BlockAllocator(Protocol):
    """What the executor's scheduler needs from kvmanager. All calls are batched where they can
    be, so a scheduler step makes at most one call of each kind."""

    block_size: int

    async def register(
        self,
        num_blocks: int,
        block_size: int,
        model_fingerprint: str,
        *,
        address: str = "",
        model: str = "",
        max_model_len: int = 0,
        num_host_blocks: int = 0,
        kv_block_bytes: int = 0,
    ) -> int:
        """Announce the pool; returns the new epoch. `address` (the gRPC host:port gateways
        reach this executor on), `model` (the served model name requests ask for) and
        `max_model_len` are what the fleet routes by: an executor without a model is never
        routed to. `num_host_blocks`: its host-memory tier (0: none); `kv_block_bytes`: the
        bytes of one block, all layers' K and V (for the bytes-moved statistics)."""

    async def allocate(
        self,
        seq_id: str,
        token_ids: list[int],
        cache_salt: str = "",
        num_lookahead_tokens: int = 0,
    ) -> Allocation: ...

    async def extend(self, entries: list[ExtendEntry]) -> ExtendResult: ...

    async def commit(self, entries: list[CommitEntry]) -> int: ...

    async def fork(
        self, parent_seq_id: str, child_seq_ids: list[str], num_tokens: int
    ) -> dict[str, list[int]]:
        """Children share the parent's blocks covering num_tokens; returns each child's table."""

    async def release(self, seq_ids: list[str]) -> int: ...

    async def step(
        self,
        commits: list[CommitEntry],
        releases: list[str],
        extends: list[ExtendEntry],
        admits: list[AdmitEntry] | None = None,
        admit_token_budget: int = 0,
        *,
        load: LoadReport | None = None,
    ) -> StepResult:
        """commit, release, extend, then admit, in one call (a part with no entries is
        skipped); each part fails on its own, reported in the result. Admissions are allocated
        in order while their uncached tokens stay below `admit_token_budget` (0: no limit).
        `load`, when given, is taken last (its failure in `load_error`); a call with only a
        load is a heartbeat. Raises only when the call as a whole fails (AllocatorUnavailable:
        kvmanager unreachable, nothing known to be applied)."""

    async def reconcile(
        self, tables: dict[str, list[int]], num_transfers: int | None = None
    ) -> tuple[int, list[str]]:
        """After kvmanager was unreachable: `tables` holds every sequence this executor holds
        blocks for, each with its whole table. kvmanager releases the sequences it holds that
        are not there, and returns (their number, the ids of `tables` it does not hold with
        that table): the executor drops those sequences' blocks and recomputes them.
        `num_transfers`: the spills and restores received since registering; the host tier
        is kept only when kvmanager counts the same (None: dropped)."""

    async def match(self, token_ids: list[int], cache_salt: str = "") -> int:
        """Cached prefix length on this executor, without allocating."""

    async def close(self) -> None: ...
