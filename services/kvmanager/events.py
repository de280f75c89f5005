"""Change events: what the core (block_pool.py, manager.py) records as it changes, for whoever
mirrors its state elsewhere (the Redis write-behind, persistence.py). As vLLM's block pool queues
KV cache events for a consumer to take, the core appends to an event list and the consumer takes
its contents; with no consumer the list is None and nothing is recorded.

An event names what changed, never the new value: the consumer reads the current values from the
core when it writes, so a block changed fifty times between two writes is written once, and what
it writes is the state of one moment. Events are plain `(kind, payload)` tuples, not objects: they
are recorded on the allocation path (a tuple and an append cost half a slotted dataclass), and
a batched call records one event for all its sequences or blocks, not one each.

Per executor (`ExecutorState.events`, shared with its `BlockPool.events`), in order:
  kind            payload           meaning
  BLOCK           block id          the block's record (ref count, queue stamp, hash) changed
  BLOCKS          [block ids]       the same for several blocks (a bulk take, prefix hits, a
                                    released table); the list is the event's own, never mutated
  BLOCK_STORED    (block, hash)     the block was published under the hash (record and index)
  HASH_REMOVED    hash              the hash left the index (its block was evicted; the block's
                                    own change comes as the BLOCK(S) event of the take)
  HOST_BLOCKS     [host block ids]  host-tier blocks whose record (hash, stamp) changed
  SEQ_STORED      seq id            a new table (allocate, fork)
  SEQS_GREW       [seq ids]         blocks appended to their tables, or hashes to their chains
  SEQ_REPLACED    (seq id, index)   copy-on-write replaced table[index:] (blocks may follow)
  SEQS_REMOVED    [seq ids]         the sequences were released, in that order
Manager-wide (`Manager.events`):
  EXECUTOR_REGISTERED  (executor id, replaced epoch or 0)
                                    a new epoch; the replaced epoch's state is gone (its events
                                    went with its ExecutorState)
Order matters for sequences (an id released and allocated again between two takes) and for
registrations; the other kinds coalesce.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any


class Kind(IntEnum):
    BLOCK = 0
    BLOCKS = 1
    BLOCK_STORED = 2
    HASH_REMOVED = 3
    SEQ_STORED = 4
    SEQS_GREW = 5
    SEQ_REPLACED = 6
    SEQS_REMOVED = 7
    EXECUTOR_REGISTERED = 8
    HOST_BLOCKS = 9


# Module-level names for the recording sites: a global lookup, not an enum attribute access.
BLOCK = Kind.BLOCK
BLOCKS = Kind.BLOCKS
BLOCK_STORED = Kind.BLOCK_STORED
HASH_REMOVED = Kind.HASH_REMOVED
SEQ_STORED = Kind.SEQ_STORED
SEQS_GREW = Kind.SEQS_GREW
SEQ_REPLACED = Kind.SEQ_REPLACED
SEQS_REMOVED = Kind.SEQS_REMOVED
EXECUTOR_REGISTERED = Kind.EXECUTOR_REGISTERED
HOST_BLOCKS = Kind.HOST_BLOCKS

# The payload's type depends on the kind (table above); consumers dispatch on the kind first.
Event = tuple[Kind, Any]


def take(events: list[Event]) -> list[Event]:
    """The events recorded so far, leaving the list empty. The list itself stays: the core's
    recording sites hold it (a pool and its executor share one)."""
    out = events[:]
    events.clear()
    return out
