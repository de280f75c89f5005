"""The gRPC BlockAllocator: what an executor uses to talk to kvmanager (grpc.aio).

Same semantics and errors as the in-process allocator (services/kvmanager/local.py).
- The hot calls (allocate, extend, commit, fork, release) go over one long-lived `Session`
  stream by default: a stream message costs about half a unary call on loopback. Unary calls
  remain (`use_session=False`, and for register/match/stats); both behave the same.
- Batched calls use the columnar message forms (parallel packed lists instead of one message per
  sequence): a 256-sequence Extend costs tens of microseconds to encode instead of hundreds.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import grpc
from pagemesh.proto import kvmanager_pb2 as pb
from pagemesh.proto import kvmanager_pb2_grpc as pb_grpc
from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    Allocation,
    AllocatorError,
    AllocatorUnavailable,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    InvalidRequest,
    OutOfBlocks,
    SequenceTooLarge,
    StaleEpoch,
    StepResult,
    TableUpdate,
    UnknownSequence,
)
from pagemesh.services.kvmanager.hashing import token_bytes

_ERRORS: dict[grpc.StatusCode, type[AllocatorError]] = {
    grpc.StatusCode.RESOURCE_EXHAUSTED: OutOfBlocks,
    grpc.StatusCode.NOT_FOUND: UnknownSequence,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.OUT_OF_RANGE: SequenceTooLarge,
    grpc.StatusCode.FAILED_PRECONDITION: StaleEpoch,
    grpc.StatusCode.UNAVAILABLE: AllocatorUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AllocatorUnavailable,
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.keepalive_time_ms", 30000),
]


def error_from(e: grpc.aio.AioRpcError) -> AllocatorError:
    cls = _ERRORS.get(e.code(), AllocatorError)
    return cls(f"kvmanager: {e.details() or e.code().name}")


def _session_error(err: pb.CallError) -> AllocatorError:
    code = _CODES.get(err.code, grpc.StatusCode.UNKNOWN)
    return _ERRORS.get(code, AllocatorError)(f"kvmanager: {err.message or code.name}")


def _fill(fill: Callable[[object], None], msg) -> None:
    """Runs a request builder; values protobuf rejects (ids >= 2**32, negatives) are the
    caller's error, raised as InvalidRequest like the in-process allocator does."""
    try:
        fill(msg)
    except (ValueError, TypeError, OverflowError) as e:
        raise InvalidRequest(
            f"{type(msg).__name__}: {e} (token ids and counts must be in [0, 2**32))"
        ) from e


class _Session:
    """One `Session` stream: requests written in order under a lock, replies matched to their
    futures by id by a reader task. A broken stream fails every pending call with
    AllocatorUnavailable; the next call opens a new one."""

    def __init__(self, stub: pb_grpc.KVManagerStub, timeout: float) -> None:
        self.stub = stub
        self.timeout = timeout
        self.call = None
        self.reader: asyncio.Task | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.lock = asyncio.Lock()

    def new_request(self) -> pb.SessionRequest:
        return pb.SessionRequest(id=next(self.ids))

    async def request(self, req: pb.SessionRequest) -> pb.SessionResponse:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending[req.id] = fut
        timer = loop.call_later(self.timeout, self._expire, req.id)
        try:
            async with self.lock:
                if self.call is None:
                    self.call = self.stub.Session()
                    self.reader = asyncio.create_task(self._read(self.call))
                try:
                    await self.call.write(req)
                except (grpc.aio.AioRpcError, asyncio.InvalidStateError) as e:
                    self.call = None
                    raise AllocatorUnavailable(f"kvmanager session: {e}") from e
            return await fut
        finally:
            timer.cancel()
            self.pending.pop(req.id, None)

    def _expire(self, rid: int) -> None:
        fut = self.pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(AllocatorUnavailable(f"kvmanager: no reply in {self.timeout}s"))

    async def _read(self, call) -> None:
        err: AllocatorError = AllocatorUnavailable("kvmanager session closed")
        try:
            while True:
                r = await call.read()
                if r is grpc.aio.EOF:
                    break
                fut = self.pending.pop(r.id, None)
                if fut is not None and not fut.done():
                    fut.set_result(r)
        except grpc.aio.AioRpcError as e:
            err = error_from(e)
            if not isinstance(err, AllocatorUnavailable):
                err = AllocatorUnavailable(str(err))
        finally:
            if self.call is call:
                self.call = None
            for fut in self.pending.values():
                if not fut.done():
                    fut.set_exception(err)
            self.pending.clear()

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
            self.call = None
        if self.reader is not None:
            await asyncio.gather(self.reader, return_exceptions=True)


class KVManagerClient:
    """A `BlockAllocator` over gRPC for one executor. `timeout` bounds every call; a kvmanager
    that does not answer raises AllocatorUnavailable."""

    def __init__(
        self, address: str, executor_id: str, timeout: float = 5.0, use_session: bool = True
    ) -> None:
        self.address = address
        self.executor_id = executor_id
        self.timeout = timeout
        self.use_session = use_session
        self.epoch = 0
        self.block_size = 0
        self.channel = grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.KVManagerStub(self.channel)
        self._session = _Session(self.stub, timeout)

    async def _call(self, method, request):
        try:
            return await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise error_from(e) from e

    async def _hot(self, kind: str, fill: Callable[[object], None]):
        """A hot call over the session (or unary): `fill` sets the request's fields."""
        if self.use_session:
            req = self._session.new_request()
            msg = getattr(req, kind)
            msg.SetInParent()
            _fill(fill, msg)
            reply = await self._session.request(req)
            if reply.HasField("error"):
                raise _session_error(reply.error)
            return getattr(reply, kind)
        msg = getattr(pb, kind.capitalize() + "Request")()
        _fill(fill, msg)
        return await self._call(getattr(self.stub, kind.capitalize()), msg)

    async def register(self, num_blocks: int, block_size: int, model_fingerprint: str) -> int:
        msg = pb.RegisterExecutorRequest()

        def fill(m) -> None:
            m.executor_id = self.executor_id
            m.num_blocks = num_blocks
            m.block_size = block_size
            m.model_fingerprint = model_fingerprint

        _fill(fill, msg)
        r = await self._call(self.stub.RegisterExecutor, msg)
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
        def fill(m) -> None:
            m.executor_id = self.executor_id
            m.epoch = self.epoch
            m.seq_id = seq_id
            m.token_data = token_bytes(token_ids)
            m.cache_salt = cache_salt
            m.num_lookahead_tokens = num_lookahead_tokens

        r = await self._hot("allocate", fill)
        return Allocation(list(r.block_ids), r.num_cached_tokens)

    def _fill_extend(self, m, entries: list[ExtendEntry]) -> None:
        m.executor_id = self.executor_id
        m.epoch = self.epoch
        m.seq_ids.extend([e.seq_id for e in entries])
        m.num_computed_tokens.extend([e.num_computed_tokens for e in entries])
        m.num_tokens.extend([e.num_tokens for e in entries])

    def _commit_tokens(self, entries: list[CommitEntry]) -> list[int]:
        tokens: list[int] = []
        for e in entries:
            if len(e.token_ids) != self.block_size:  # the flat columnar form cannot tell
                raise InvalidRequest(
                    f"commit {e.seq_id!r} block {e.block_index}: {len(e.token_ids)} token ids,"
                    f" expected {self.block_size}"
                )
            tokens.extend(e.token_ids)
        return tokens

    def _fill_commit(self, m, entries: list[CommitEntry], tokens: list[int]) -> None:
        m.executor_id = self.executor_id
        m.epoch = self.epoch
        m.seq_ids.extend([e.seq_id for e in entries])
        m.block_indices.extend([e.block_index for e in entries])
        m.token_ids.extend(tokens)

    def _fill_release(self, m, seq_ids: list[str]) -> None:
        m.executor_id = self.executor_id
        m.epoch = self.epoch
        m.seq_ids.extend(seq_ids)

    async def extend(self, entries: list[ExtendEntry]) -> ExtendResult:
        return decode_extend(await self._hot("extend", lambda m: self._fill_extend(m, entries)))

    async def commit(self, entries: list[CommitEntry]) -> int:
        tokens = self._commit_tokens(entries)
        reply = await self._hot("commit", lambda m: self._fill_commit(m, entries, tokens))
        return reply.num_published

    async def step(
        self,
        commits: list[CommitEntry],
        releases: list[str],
        extends: list[ExtendEntry],
        admits: list[AdmitEntry] | None = None,
        admit_token_budget: int = 0,
    ) -> StepResult:
        tokens = self._commit_tokens(commits)

        def fill(m) -> None:
            if commits:
                self._fill_commit(m.commit, commits, tokens)
            if releases:
                self._fill_release(m.release, releases)
            if extends:
                self._fill_extend(m.extend, extends)
            for a in admits or ():
                m.allocate.add(
                    executor_id=self.executor_id,
                    epoch=self.epoch,
                    seq_id=a.seq_id,
                    token_data=a.token_ids
                    if isinstance(a.token_ids, bytes)
                    else token_bytes(a.token_ids),
                    cache_salt=a.cache_salt,
                    num_lookahead_tokens=a.num_lookahead_tokens,
                )
            m.allocate_token_budget = admit_token_budget

        r = await self._hot("step", fill)
        result = StepResult()
        if r.HasField("commit_error"):
            result.commit_error = _session_error(r.commit_error)
        else:
            result.num_published = r.commit.num_published
        if r.HasField("release_error"):
            result.release_error = _session_error(r.release_error)
        else:
            result.num_released = r.release.num_released
        if r.HasField("extend_error"):
            result.extend_error = _session_error(r.extend_error)
        elif extends:
            result.extend = decode_extend(r.extend)
        result.allocations = [
            Allocation(list(a.block_ids), a.num_cached_tokens) for a in r.allocate
        ]
        if r.HasField("allocate_error"):
            result.allocate_error = _session_error(r.allocate_error)
        return result

    async def fork(
        self, parent_seq_id: str, child_seq_ids: list[str], num_tokens: int
    ) -> dict[str, list[int]]:
        def fill(m) -> None:
            m.executor_id = self.executor_id
            m.epoch = self.epoch
            m.parent_seq_id = parent_seq_id
            m.child_seq_ids.extend(child_seq_ids)
            m.num_tokens = num_tokens

        r = await self._hot("fork", fill)
        return {t.seq_id: list(t.block_ids) for t in r.tables}

    async def release(self, seq_ids: list[str]) -> int:
        reply = await self._hot("release", lambda m: self._fill_release(m, seq_ids))
        return reply.num_released

    async def match(self, token_ids: list[int], cache_salt: str = "") -> int:
        msg = pb.MatchRequest()

        def fill(m) -> None:
            m.token_ids.extend(token_ids)
            m.cache_salt = cache_salt
            m.executor_id = self.executor_id

        _fill(fill, msg)
        try:
            r = await self._call(self.stub.Match, msg)
        except InvalidRequest:
            return 0  # not registered: nothing cached
        return r.matches[0].num_cached_tokens if r.matches else 0

    async def get_stats(self, all_executors: bool = False) -> pb.GetStatsResponse:
        return await self._call(
            self.stub.GetStats,
            pb.GetStatsRequest(executor_id="" if all_executors else self.executor_id),
        )

    async def close(self) -> None:
        await self._session.close()
        await self.channel.close()


def decode_extend(r: pb.ExtendResponse) -> ExtendResult:
    """Either response form -> ExtendResult."""
    if r.updates or r.copies:
        return ExtendResult(
            {u.seq_id: TableUpdate(u.first_index, list(u.block_ids)) for u in r.updates},
            [(c.src, c.dst) for c in r.copies],
        )
    if not r.updated_seq_ids and not r.copy_src:
        return ExtendResult()
    flat = list(r.update_block_ids)
    updates = {}
    o = 0
    for sid, first, n in zip(r.updated_seq_ids, r.first_indices, r.update_counts, strict=True):
        updates[sid] = TableUpdate(first, flat[o : o + n])
        o += n
    return ExtendResult(updates, list(zip(r.copy_src, r.copy_dst, strict=True)))
