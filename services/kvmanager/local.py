"""The in-process BlockAllocator: kvmanager's own core (`Manager`) in the executor's process.

Same semantics and errors as the gRPC client (services/kvmanager/client.py), no network hop and
no persistence: what the A/B figure of the gRPC overhead is measured against, and what unit tests
of the scheduler use.
"""

from __future__ import annotations

from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    Allocation,
    AllocatorError,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    LoadReport,
    StepResult,
    TableUpdate,
)
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.step import ExtendChanges, ExtendPart, run_step


class LocalAllocator:
    """A `BlockAllocator` over an in-process `Manager` (one is created unless given; several
    LocalAllocators may share one Manager to model several executors)."""

    def __init__(self, executor_id: str = "local", manager: Manager | None = None) -> None:
        self.executor_id = executor_id
        self.manager = manager if manager is not None else Manager()
        self.epoch = 0
        self.block_size = 0

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
        self.epoch = self.manager.register(
            self.executor_id,
            num_blocks,
            block_size,
            model_fingerprint,
            address,
            model,
            max_model_len,
            num_host_blocks,
            kv_block_bytes,
        )
        self.block_size = block_size
        return self.epoch

    async def allocate(
        self,
        seq_id: str,
        token_ids: list[int],
        cache_salt: str = "",
        num_lookahead_tokens: int = 0,
    ) -> Allocation:
        return self.manager.allocate(
            self.executor_id, self.epoch, seq_id, token_ids, cache_salt, num_lookahead_tokens
        )

    async def extend(self, entries: list[ExtendEntry]) -> ExtendResult:
        changes = self.manager.extend(*self._extend_part(entries))
        return _extend_result(changes, self.manager.take_spills(self.executor_id))

    def _extend_part(self, entries: list[ExtendEntry]) -> ExtendPart:
        return (
            self.executor_id,
            self.epoch,
            [e.seq_id for e in entries],
            [e.num_computed_tokens for e in entries],
            [e.num_tokens for e in entries],
        )

    async def commit(self, entries: list[CommitEntry]) -> int:
        return self.manager.commit(self.executor_id, self.epoch, _commit_tuples(entries))

    async def fork(
        self, parent_seq_id: str, child_seq_ids: list[str], num_tokens: int
    ) -> dict[str, list[int]]:
        return self.manager.fork(
            self.executor_id, self.epoch, parent_seq_id, child_seq_ids, num_tokens
        )

    async def release(self, seq_ids: list[str]) -> int:
        return self.manager.release(self.executor_id, self.epoch, seq_ids)

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
        eid, epoch = self.executor_id, self.epoch
        o = run_step(
            self.manager,
            commit=(eid, epoch, _commit_tuples(commits)) if commits else None,
            release=(eid, epoch, releases) if releases else None,
            extend=self._extend_part(extends) if extends else None,
            admit=(
                (
                    eid,
                    epoch,
                    [(a.seq_id, a.token_ids, a.cache_salt, a.num_lookahead_tokens) for a in admits],
                )
                if admits
                else None
            ),
            admit_token_budget=admit_token_budget,
            load=(
                (eid, epoch, load.running, load.waiting, load.queued_prompt_tokens)
                if load is not None
                else None
            ),
        )
        return StepResult(
            num_published=o.num_published,
            num_released=o.num_released,
            extend=_extend_result(o.extend, o.extend_spills) if o.extend is not None else None,
            commit_error=o.commit_error,
            release_error=o.release_error,
            extend_error=o.extend_error,
            allocations=o.allocations,
            allocate_error=o.allocate_error,
            load_error=o.load_error,
            spills_ahead=o.spills_ahead,
        )

    async def reconcile(
        self, tables: dict[str, list[int]], num_transfers: int | None = None
    ) -> tuple[int, list[str]]:
        return self.manager.reconcile(self.executor_id, self.epoch, tables, num_transfers)

    async def match(self, token_ids: list[int], cache_salt: str = "") -> int:
        try:
            return self.manager.match(token_ids, cache_salt, self.executor_id)[self.executor_id]
        except AllocatorError:
            return 0  # not registered: nothing cached

    async def close(self) -> None:
        return None


def _commit_tuples(entries: list[CommitEntry]) -> list[tuple[str, int, list[int]]]:
    return [(e.seq_id, e.block_index, e.token_ids) for e in entries]


def _extend_result(changes: ExtendChanges, spills: list[tuple[int, int]]) -> ExtendResult:
    updates, copies = changes
    return ExtendResult({s: TableUpdate(f, b) for s, (f, b) in updates.items()}, copies, spills)
