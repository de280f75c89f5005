"""The gRPC BlockAllocator: what an executor uses to talk to kvmanager (grpc.aio).

Same semantics and errors as the in-process allocator (services/kvmanager/local.py).
- The hot calls (allocate, extend, commit, fork, release) go over one long-lived `Session`
  stream by default: a stream message costs about half a unary call on loopback. Unary calls
  remain (`use_session=False`, and for register/match/stats); both behave the same.
- Messages are filled and read by wire.py (columnar batches, packed prompts), whose other end
  is the server's.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import Message
from pagemesh.proto import kvmanager_pb2 as pb
from pagemesh.proto import kvmanager_pb2_grpc as pb_grpc
from pagemesh.services.kvmanager import wire
from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    Allocation,
    AllocatorError,
    AllocatorUnavailable,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    InvalidRequest,
    LoadReport,
    StepResult,
)

from pagemesh.grpc_keepalive import client_options

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # Keepalive as kvmanager's server accepts it: 30 s against its default of one ping in 5
    # minutes drew GOAWAY "too_many_pings" every few minutes (grpc_keepalive.py).
    *client_options(),
    # A kvmanager that restarts is back within about a second: reconnect attempts at most a
    # second apart (gRPC's default backoff grows to two minutes, and every call in between
    # fails at once although kvmanager is up).
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def error_from(e: grpc.aio.AioRpcError) -> AllocatorError:
    return wire.error_from_status(e.code(), e.details())


def _fill(fill: Callable[[Any], None], msg: Message) -> None:
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
        self.call: grpc.aio.StreamStreamCall | None = None
        self.reader: asyncio.Task | None = None
        self.pending: dict[int, asyncio.Future] = {}
        self.ids = itertools.count(1)
        self.lock = asyncio.Lock()
        # Streams that ended without our closing them: kvmanager went away (maybe restarted,
        # having lost its last answers), which the executor reconciles (allocator_link.py).
        self.losses = 0

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

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
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
                self.losses += 1
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

    @property
    def connection_losses(self) -> int:
        """How many times the Session stream broke (kvmanager stopped or crashed): a caller
        that sees this grow treats it as an outage, even one too short for a call to fail."""
        return self._session.losses

    async def _call(self, method: Any, request: Message) -> Any:
        """A unary call (`method`: a stub method; grpc is untyped, and so is its reply)."""
        try:
            return await method(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as e:
            raise error_from(e) from e

    async def _hot(self, kind: str, fill: Callable[[Any], None]) -> Any:
        """A hot call over the session (or unary): `fill` sets the fields of the request for
        `kind` (a SessionRequest oneof name); returns its response. Any: the types depend on
        `kind`, and each caller knows its own."""
        if self.use_session:
            req = self._session.new_request()
            msg = getattr(req, kind)
            msg.SetInParent()
            _fill(fill, msg)
            reply = await self._session.request(req)
            if reply.HasField("error"):
                raise wire.error_from_reply(reply.error)
            return getattr(reply, kind)
        msg = getattr(pb, kind.capitalize() + "Request")()
        _fill(fill, msg)
        return await self._call(getattr(self.stub, kind.capitalize()), msg)

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
        msg = pb.RegisterExecutorRequest()

        def fill(m: pb.RegisterExecutorRequest) -> None:
            m.executor_id = self.executor_id
            m.num_blocks = num_blocks
            m.block_size = block_size
            m.model_fingerprint = model_fingerprint
            m.address = address
            m.model = model
            m.max_model_len = max_model_len
            m.num_host_blocks = num_host_blocks
            m.kv_block_bytes = kv_block_bytes

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
        def fill(m: pb.AllocateRequest) -> None:
            wire.fill_allocate(
                m,
                self.executor_id,
                self.epoch,
                seq_id,
                token_ids,
                cache_salt,
                num_lookahead_tokens,
            )

        return wire.decode_allocation(await self._hot("allocate", fill))

    async def extend(self, entries: list[ExtendEntry]) -> ExtendResult:
        def fill(m: pb.ExtendRequest) -> None:
            wire.fill_extend(m, self.executor_id, self.epoch, entries)

        return wire.decode_extend(await self._hot("extend", fill))

    async def commit(self, entries: list[CommitEntry]) -> int:
        tokens = wire.commit_tokens(entries, self.block_size)

        def fill(m: pb.CommitRequest) -> None:
            wire.fill_commit(m, self.executor_id, self.epoch, entries, tokens)

        return (await self._hot("commit", fill)).num_published

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
        tokens = wire.commit_tokens(commits, self.block_size)
        eid, epoch = self.executor_id, self.epoch

        def fill(m: pb.StepRequest) -> None:
            # A part is sent only when it has entries: an absent part is not applied.
            if commits:
                wire.fill_commit(m.commit, eid, epoch, commits, tokens)
            if releases:
                wire.fill_release(m.release, eid, epoch, releases)
            if extends:
                wire.fill_extend(m.extend, eid, epoch, extends)
            wire.fill_admits(m, eid, epoch, admits or [], admit_token_budget)
            if load is not None:
                wire.fill_load(m.load, eid, epoch, load)

        return wire.decode_step(
            await self._hot("step", fill), had_extend=bool(extends), had_load=load is not None
        )

    async def fork(
        self, parent_seq_id: str, child_seq_ids: list[str], num_tokens: int
    ) -> dict[str, list[int]]:
        def fill(m: pb.ForkRequest) -> None:
            m.executor_id = self.executor_id
            m.epoch = self.epoch
            m.parent_seq_id = parent_seq_id
            m.child_seq_ids.extend(child_seq_ids)
            m.num_tokens = num_tokens

        r = await self._hot("fork", fill)
        return {t.seq_id: list(t.block_ids) for t in r.tables}

    async def release(self, seq_ids: list[str]) -> int:
        def fill(m: pb.ReleaseRequest) -> None:
            wire.fill_release(m, self.executor_id, self.epoch, seq_ids)

        return (await self._hot("release", fill)).num_released

    async def reconcile(
        self, tables: dict[str, list[int]], num_transfers: int | None = None
    ) -> tuple[int, list[str]]:
        msg = pb.ReconcileRequest(executor_id=self.executor_id, epoch=self.epoch)
        if num_transfers is not None:
            msg.num_transfers = num_transfers
        for seq_id, table in tables.items():
            msg.seqs.add(seq_id=seq_id, block_ids=table)
        r = await self._call(self.stub.Reconcile, msg)
        return r.num_released, list(r.lost_seq_ids)

    async def match(self, token_ids: list[int], cache_salt: str = "") -> int:
        msg = pb.MatchRequest()

        def fill(m: pb.MatchRequest) -> None:
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
