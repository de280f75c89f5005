"""Rows of the model runner's persistent device tables (block_tables, token_buf: one row per
running sequence, Sequence.row), handed out by the scheduler.

A request that will run k > 1 sequences at once (n > 1 choices, or a beam width k) is admitted
with one row taken and k - 1 reserved: its children are forked only after its prompt is in, and
must find rows then. Reserved rows are free rows set aside, so `available` (what a new admission
or an extra beam may take) is free minus reserved.
"""

from __future__ import annotations


class Rows:
    def __init__(self, num_rows: int) -> None:
        self.num_rows = num_rows
        # Popped from the end: row 0 first, then 1, ... (a freed row is the next one taken).
        self._free: list[int] = list(range(num_rows - 1, -1, -1))
        self.num_reserved = 0

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def available(self) -> int:
        """Free rows not set aside for children still to be forked."""
        return len(self._free) - self.num_reserved

    def take(self) -> int:
        return self._free.pop()

    def free(self, row: int) -> None:
        self._free.append(row)

    def reserve(self, n: int) -> None:
        self.num_reserved += n

    def unreserve(self, n: int) -> None:
        self.num_reserved -= n

    def free_rows(self) -> list[int]:
        """A copy of the free rows (for checks)."""
        return list(self._free)
