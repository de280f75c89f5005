"""The gRPC BlockAllocator: what an executor uses to talk to kvmanager (grpc.aio).

Same semantics and errors as the in-process allocator (services/kvmanager/local.py). Batched
calls use the columnar message forms (parallel packed lists instead of one message per sequence):
a 256-sequence Extend costs tens of microseconds to encode instead of hundreds.
"""

from __future__ import annotations

import grpc

from proto import kvmanager_pb2 as pb
from proto import kvmanager_pb2_grpc as pb_grpc
from services.kvmanager.api import (
    Allocation,
    AllocatorError,
    AllocatorUnavailable,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    InvalidRequest,
    OutOfBlocks,
    StaleEpoch,
    TableUpdate,
    UnknownSequence,
)

_ERRORS: dict[grpc.StatusCode, type[AllocatorError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: OutOfBlocks,
    grpc.StatusCode.NOT_FOUND: UnknownSequence,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: InvalidRequest,
    grpc.StatusCode.FAILED_PRECONDITION: StaleEpoch,
    grpc.StatusCode.UNAVAILABLE: AllocatorUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AllocatorUnavailable,
}

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30000),
]


def error_from(e: grpc.aio.AioRpcError) -> AllocatorError:
    cls = _ERRORS.get(e.code(), AllocatorError)
    return cls(f"kvmanager: {e.details() or e.code().name}")


def _request(cls, **fields):
    """Builds a request message; values protobuf rejects (ids >= 2**32, negatives) are the
    caller's error, raised as InvalidRequest like the in-process allocator does."""
    try:
        return cls(**fields)
    except (ValueError, TypeError) as e:
        raise InvalidRequest(f"{cls.__name__}: {e} (token ids must be in [0, 2**32))") from e


class KVManagerClient:
    """A `BlockAllocator` over gRPC for one executor. `timeout` bounds every call; a kvmanager
    that does not answer raises AllocatorUnavailable."""

    def __init__(self, address: str, executor_id: str, timeout: float = 5.0) -> None:
        self.address = address
        self.executor_id = executor_id
        self.timeout = timeout
        self.epoch = 0
        self.block_size = 0
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.KVManagerStub(self.channel)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise error_from(e) from e

    async def register(self, num_blocks: int, block_size: int, model_fingerprint: str) -> int:
        r = await self._call(
            self.stub.RegisterExecutor,
            _request(
                pb.RegisterExecutorRequest,
                executor_id=self.executor_id,
                num_blocks=num_blocks,
                block_size=block_size,
                model_fingerprint=model_fingerprint,
            ),
        )
        self.epoch = r.epoch
        self.block_size = block_size
        return r.epoch

    async def allocate(
        self,
        seq_id: str,
        token_ids: list[int],
        cache_salt: str = "",
        num_lookahead_tokens: int = 0,
    ) -> Allocation:
        r = await self._call(
            self.stub.Allocate,
            _request(
                pb.AllocateRequest,
                executor_id=self.executor_id,
                epoch=self.epoch,
                seq_id=seq_id,
                token_ids=token_ids,
                cache_salt=cache_salt,
                num_lookahead_tokens=num_lookahead_tokens,
            ),
        )
        return Allocation(list(r.block_ids), r.num_cached_tokens)

    async def extend(self, entries: list[ExtendEntry]) -> ExtendResult:
        r = await self._call(
            self.stub.Extend,
            _request(
                pb.ExtendRequest,
                executor_id=self.executor_id,
                epoch=self.epoch,
                seq_ids=[e.seq_id for e in entries],
                num_computed_tokens=[e.num_computed_tokens for e in entries],
                num_tokens=[e.num_tokens for e in entries],
            ),
        )
        return decode_extend(r)

    async def commit(self, entries: list[CommitEntry]) -> int:
        tokens: list[int] = []
        for e in entries:
            if len(e.token_ids) != self.block_size:  # the flat columnar form cannot tell
                raise InvalidRequest(
                    f"commit {e.seq_id!r} block {e.block_index}: {len(e.token_ids)} token ids,"
                    f" expected {self.block_size}"
                )
            tokens.extend(e.token_ids)
        r = await self._call(
            self.stub.Commit,
            _request(
                pb.CommitRequest,
                executor_id=self.executor_id,
                epoch=self.epoch,
                seq_ids=[e.seq_id for e in entries],
                block_indices=[e.block_index for e in entries],
                token_ids=tokens,
            ),
        )
        return r.num_published

    async def fork(
        self, parent_seq_id: str, child_seq_ids: list[str], num_tokens: int
    ) -> dict[str, list[int]]:
        r = await self._call(
            self.stub.Fork,
            _request(
                pb.ForkRequest,
                executor_id=self.executor_id,
                epoch=self.epoch,
                parent_seq_id=parent_seq_id,
                child_seq_ids=child_seq_ids,
                num_tokens=num_tokens,
            ),
        )
        return {t.seq_id: list(t.block_ids) for t in r.tables}

    async def release(self, seq_ids: list[str]) -> int:
        r = await self._call(
            self.stub.Release,
            _request(
                pb.ReleaseRequest, executor_id=self.executor_id, epoch=self.epoch, seq_ids=seq_ids
            ),
        )
        return r.num_released

    async def match(self, token_ids: list[int], cache_salt: str = "") -> int:
        try:
            r = await self._call(
                self.stub.Match,
                _request(
                    pb.MatchRequest,
                    token_ids=token_ids,
                    cache_salt=cache_salt,
                    executor_id=self.executor_id,
                ),
            )
        except InvalidRequest:
            return 0  # not registered: nothing cached
        return r.matches[0].num_cached_tokens if r.matches else 0

    async def get_stats(self, all_executors: bool = False) -> pb.GetStatsResponse:
        return await self._call(
            self.stub.GetStats,
            _request(pb.GetStatsRequest, executor_id="" if all_executors else self.executor_id),
        )

    async def close(self) -> None:
        await self.channel.close()


def decode_extend(r: pb.ExtendResponse) -> ExtendResult:
    """Either response form -> ExtendResult."""
    if r.updates or r.copies:
        return ExtendResult(
            {u.seq_id: TableUpdate(u.first_index, list(u.block_ids)) for u in r.updates},
            [(c.src, c.dst) for c in r.copies],
        )
    flat = list(r.update_block_ids)
    updates = {}
    o = 0
    for sid, first, n in zip(r.updated_seq_ids, r.first_indices, r.update_counts, strict=True):
        updates[sid] = TableUpdate(first, flat[o : o + n])
        o += n
    return ExtendResult(updates, list(zip(r.copy_src, r.copy_dst, strict=True)))
