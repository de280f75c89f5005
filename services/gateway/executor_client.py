"""The gateway's side of the executor: one `Serve` stream per gateway process.

Every HTTP request becomes a GenerateRequest written up the shared stream; every StepOutput that
comes down holds the new tokens of all this gateway's requests for one scheduler step and is
fanned out to per-request streams (request_stream.py). That keeps the token path at one gRPC
message per step. A step's plain one-token outputs come as packed columns
(proto/executor.proto), which reach a RequestStream as ColumnTokens (outputs.py).

If the stream breaks (executor restart), every request in flight fails with
`ExecutorUnavailable` (each one's Generation migrates it: migration.py) and the stream is
reopened in the background.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import uuid
from collections.abc import AsyncIterator

import grpc
from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import executor_pb2_grpc as pb_grpc
from pagemesh.proto.serve_metadata import GENERATE_BATCH, STEP_COLUMNS
from pagemesh.services.gateway.request_stream import RequestStream, fan_out

from pagemesh.grpc_keepalive import client_options

# RequestStream is part of this module's API (submit returns one): callers import it from here.
__all__ = ["ExecutorClient", "ExecutorUnavailable", "RequestStream", "pack_generates"]

log = logging.getLogger("pagemesh.gateway.executor")

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    # Keepalive as every server of the mesh accepts it (grpc_keepalive.py).
    *client_options(),
    # A restarted executor is picked up within ~2 s instead of gRPC's default backoff (up to
    # 2 minutes): the gateway is useless while it is disconnected.
    ("grpc.initial_reconnect_backoff_ms", 250),
    ("grpc.min_reconnect_backoff_ms", 250),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


def pack_generates(queued: list[pb.ServeRequest | None]) -> list[pb.ServeRequest | None]:
    """The queued messages in order, each run of two or more generate requests as one batch
    message; None (the stream's end) is kept, and nothing after it."""
    out: list[pb.ServeRequest | None] = []
    run: list[pb.GenerateRequest] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(pb.ServeRequest(generate=run[0]))
        elif run:
            out.append(pb.ServeRequest(generate_batch=pb.GenerateBatch(requests=run)))
        run.clear()

    for msg in queued:
        if msg is not None and msg.WhichOneof("kind") == "generate":
            run.append(msg.generate)
            continue
        flush()
        out.append(msg)
        if msg is None:
            return out
    flush()
    return out


class ExecutorUnavailable(Exception):
    """The executor cannot be reached or its stream broke while the request was in flight.
    `migratable`: another executor may take the request on (not when this gateway is shutting
    down and closed the stream itself)."""

    def __init__(self, message: str, migratable: bool = True) -> None:
        super().__init__(message)
        self.migratable = migratable


class ExecutorClient:
    def __init__(self, address: str) -> None:
        self.address = address
        self.info: pb.ExecutorInfo | None = None
        # Created on first use: a grpc.aio channel binds to the event loop that is running when
        # it is made, and the app object may be built before its loop (web.run_app).
        self._channel: grpc.aio.Channel | None = None
        self._stub_: pb_grpc.ExecutorStub | None = None
        self._streams: dict[str, RequestStream] = {}
        self._outbox: asyncio.Queue[pb.ServeRequest | None] | None = None
        self._batches = False  # the executor of the open stream reads generate batches
        self._connected = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Unique across gateway processes and restarts: the executor serves several gateways.
        self._prefix = f"{os.getpid():x}-{uuid.uuid4().hex[:8]}"
        self._counter = itertools.count()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @property
    def _stub(self) -> pb_grpc.ExecutorStub:
        if self._stub_ is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._stub_ = pb_grpc.ExecutorStub(self._channel)
        return self._stub_

    def new_request_id(self, kind: str) -> str:
        return f"{kind}-{self._prefix}-{next(self._counter)}"

    async def get_info(self, timeout: float = 5.0) -> pb.ExecutorInfo:
        self.info = await self._stub.GetInfo(pb.GetInfoRequest(), timeout=timeout)
        return self.info

    async def wait_for_info(self, poll: float = 0.5) -> pb.ExecutorInfo:
        """Blocks until the executor answers (it may still be loading its model)."""
        while True:
            try:
                return await self.get_info()
            except grpc.aio.AioRpcError as exc:
                log.info("waiting for executor at %s (%s)", self.address, exc.code().name)
                await asyncio.sleep(poll)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="executor-serve-stream")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_all(ExecutorUnavailable("gateway shutting down", migratable=False))
        if self._channel is not None:
            await self._channel.close()

    def submit(self, request: pb.GenerateRequest) -> RequestStream:
        if not self.connected or self._outbox is None:
            raise ExecutorUnavailable(f"executor at {self.address} is not connected")
        stream = RequestStream(request.request_id, max(1, request.params.n))
        self._streams[request.request_id] = stream
        self._outbox.put_nowait(pb.ServeRequest(generate=request))
        return stream

    def abort(self, request_id: str) -> None:
        """Fire-and-forget: the executor frees the request's blocks within one step."""
        stream = self._streams.pop(request_id, None)
        if stream is None or self._outbox is None or not self.connected:
            return
        self._outbox.put_nowait(pb.ServeRequest(abort=pb.AbortRequest(request_ids=[request_id])))

    def abort_choices(self, request_id: str, indices: list[int]) -> None:
        """Fire-and-forget: the executor ends these choices of an n > 1 request (their blocks
        freed within one step) while its other choices go on; each one's final output comes back
        as an abort."""
        if request_id not in self._streams or self._outbox is None or not self.connected:
            return
        choice = pb.ChoiceAbort(request_id=request_id, indices=indices)
        self._outbox.put_nowait(pb.ServeRequest(abort=pb.AbortRequest(choices=[choice])))

    async def _outgoing(
        self, outbox: asyncio.Queue[pb.ServeRequest | None]
    ) -> AsyncIterator[pb.ServeRequest]:
        while True:
            msg = await outbox.get()
            if msg is None:
                return
            if not self._batches:
                yield msg
                continue
            # Everything queued meanwhile goes out now, runs of generate requests as one batch:
            # each message is a write the stream awaits, and a burst's requests queued behind
            # one another's writes (~30 ms at the p50 of a 128-request burst, H200 host).
            queued: list[pb.ServeRequest | None] = [msg]
            while not outbox.empty():
                queued.append(outbox.get_nowait())
            for out in pack_generates(queued):
                if out is None:
                    return
                yield out

    async def _run(self) -> None:
        backoff = 0.2
        while True:
            outbox: asyncio.Queue[pb.ServeRequest | None] = asyncio.Queue()
            self._outbox = outbox
            call = self._stub.Serve(
                self._outgoing(outbox), metadata=(STEP_COLUMNS,), wait_for_ready=True
            )
            try:
                # Metadata arrives once the server accepted the stream: only then is it usable.
                headers = await call.initial_metadata()
                self._batches = GENERATE_BATCH in tuple(headers or ())
                # A restarted executor may have a new epoch, pool or context length.
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await self.get_info()
                self._connected.set()
                log.info("Serve stream to %s open", self.address)
                backoff = 0.2
                async for step in call:
                    self._dispatch(step)
                error: BaseException = ExecutorUnavailable("executor closed the stream")
            except asyncio.CancelledError:
                call.cancel()
                raise
            except grpc.aio.AioRpcError as exc:
                error = ExecutorUnavailable(f"executor stream failed: {exc.code().name}")
            finally:
                self._connected.clear()
                outbox.put_nowait(None)
            log.warning("%s; reopening in %.1fs", error, backoff)
            call.cancel()
            self._fail_all(error)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    def _dispatch(self, step: pb.StepOutput) -> None:
        fan_out(step, self._streams)

    def _fail_all(self, exc: BaseException) -> None:
        streams, self._streams = self._streams, {}
        for stream in streams.values():
            stream._fail(exc)
