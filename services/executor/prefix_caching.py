"""Prefix caching off (`pagemesh executor --no-prefix-caching`), for A/B figures.

The switch sits at the allocator boundary: an allocator that never publishes a block to the
prefix index (commits are dropped) can never be hit, so every prompt is computed cold, while
allocation, copy-on-write and release behave exactly as with caching on.
"""

from __future__ import annotations

from typing import Any

from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    BlockAllocator,
    CommitEntry,
    ExtendEntry,
    LoadReport,
    StepResult,
)


class CommitsDropped:
    """Wraps a BlockAllocator; every call passes through unchanged but `commit` (and a step's
    commit part), which publishes nothing."""

    def __init__(self, inner: BlockAllocator) -> None:
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    async def commit(self, entries: list[CommitEntry]) -> int:
        return 0

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
        return await self._inner.step([], releases, extends, admits, admit_token_budget, load=load)
