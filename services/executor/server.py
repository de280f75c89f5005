"""The executor's gRPC service around one LLMEngine.

One task (`EngineLoop.run`) owns the engine: it runs `step()` while there is work and sleeps on
an event otherwise. Each step's outputs are grouped by the stream that submitted the request and
each stream gets exactly one StepOutput per step, so the token path costs one gRPC message per
step per gateway, not one per token. On Serve streams a step's plain one-token outputs travel as
packed columns rather than a SequenceOutput each: building ~256 messages per step cost ~0.8 ms of
this thread's time, the one that also launches the GPU steps.

A stream (Serve or Generate) that goes away aborts every request it still owns: the engine
releases their blocks within one step.

The service drives the engine through engine_api.EngineClient, and reports its load
(GetInfo, the step trace) through engine_api.EngineLoad where the engine keeps one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import executor_pb2_grpc as pb_grpc
from pagemesh.proto.serve_metadata import GENERATE_BATCH, STEP_COLUMNS
from pagemesh.services.executor.engine_api import (
    EngineClient,
    EngineLoad,
    FinishReason,
    Guide,
    GuideKind,
    PackedIds,
    SamplingParams,
    SequenceOutput,
    TokenLogprob,
)
from pagemesh.services.executor.trace import StepTrace

from pagemesh.grpc_decode import DecodeErrorsAsInvalidArgument
from pagemesh.grpc_keepalive import server_options

log = logging.getLogger("pagemesh.executor.server")

# How often an idle engine loop asks the engine whether it has work of its own.
IDLE_POLL_S = 1.0

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    *server_options(),  # accepts the keepalive pings of every client (grpc_keepalive.py)
    # gRPC turns SO_REUSEPORT on by default: a second executor started on a busy port would bind
    # beside the first and split its traffic silently (seen once); it must fail to start instead.
    ("grpc.so_reuseport", 0),
]


def guide_from_proto(p: pb.SamplingParams) -> Guide | None:
    if not p.HasField("guide") or p.guide.kind == pb.GUIDE_NONE:
        return None
    try:
        kind = GuideKind(p.guide.kind)
    except ValueError:
        raise ValueError(f"unknown guide kind {p.guide.kind}") from None
    return Guide(kind, p.guide.spec)


def sampling_from_proto(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams(
        n=p.n or 1,
        temperature=p.temperature,
        top_p=p.top_p if p.top_p > 0 else 1.0,
        top_k=p.top_k,
        min_p=p.min_p,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty or 1.0,
        seed=p.seed if p.HasField("seed") else None,
        seed_position=p.seed_position,
        max_tokens=p.max_tokens or 16,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        return_logprobs=p.return_logprobs or p.logprobs > 0,
        logit_bias=dict(p.logit_bias),
        use_beam_search=p.use_beam_search,
        beam_width=p.beam_width,
        length_penalty=p.length_penalty if p.HasField("length_penalty") else 1.0,
        early_stopping="never" if p.early_stopping_never else p.early_stopping,
        prompt_logprobs=p.prompt_logprobs if p.HasField("prompt_logprobs") else None,
        guide=guide_from_proto(p),
    )


def prompt_of(request: pb.GenerateRequest) -> PackedIds | list[int]:
    """A GenerateRequest's prompt ids: prompt_token_data's u32s as they came (the engine keeps
    those bytes as the packed prompt), or prompt_token_ids."""
    data = request.prompt_token_data
    if not data:
        return list(request.prompt_token_ids)
    if len(request.prompt_token_ids):
        raise ValueError("set prompt_token_ids or prompt_token_data, not both")
    try:
        return PackedIds(data)
    except ValueError as e:
        raise ValueError(f"prompt_token_data {e}") from None


def _logprob_to_proto(lp: TokenLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        logprob=lp.logprob,
        top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top],
        rank=lp.rank,
    )


def output_to_proto(o: SequenceOutput) -> pb.SequenceOutput:
    return pb.SequenceOutput(
        request_id=o.request_id,
        index=o.index,
        token_ids=o.token_ids,
        logprobs=[_logprob_to_proto(lp) for lp in o.logprobs],
        prompt_logprobs=[_logprob_to_proto(lp) for lp in o.prompt_logprobs],
        # The stub types it as the generated enum; engine_api.FinishReason has its numbers.
        finish_reason=int(o.finish_reason),  # type: ignore[arg-type]
        num_prompt_tokens=o.num_prompt_tokens,
        num_cached_tokens=o.num_cached_tokens,
        error=o.error,
        cumulative_logprob=o.cumulative_logprob,
        retryable=o.retryable,
        rejected=o.rejected,
    )


def rejection(request_id: str, message: str) -> pb.SequenceOutput:
    return pb.SequenceOutput(
        request_id=request_id, finish_reason=pb.FINISH_ERROR, error=message, rejected=True
    )


class Sink:
    """Where one stream's step messages go; the stream's handler drains it (`take`).

    `columnar` (Serve streams): a step's plain one-token outputs go in StepOutput's token
    columns (see proto/executor.proto) instead of one SequenceOutput each.

    At most one message waits per stream: a step whose stream has not yet taken the previous
    message joins that message instead of queueing its own. A reader that falls behind (a
    gateway short of CPU, a slow network) then gets fewer, larger messages, each costing both
    ends one message's overhead, and the executor holds one message per stream rather than
    one per step. Joining keeps every request's outputs in order: the gateway reads a message's
    columns before its full outputs, so a column entry of a request that already has a full
    output in the waiting message is appended as a full output instead."""

    def __init__(self, columnar: bool = False) -> None:
        self._waiting: collections.deque[pb.StepOutput | None] = collections.deque()
        self._ready = asyncio.Event()
        # The message that may still be joined (the newest waiting one), and for each request
        # with a full output in it, the usage counts of the last one: what a joined column entry
        # of that request carries when it becomes a full output.
        self._open: pb.StepOutput | None = None
        self._open_full: dict[str, tuple[int, int]] = {}
        self.owned: set[str] = set()
        self.closing = False  # no more requests will come (half-close / single Generate)
        self.columnar = columnar
        # Request id -> (num_prompt_tokens, num_cached_tokens) of its last full output on this
        # stream: the values the gateway gives its columnar entries. None while a full output of
        # it is in the step being built: its later outputs of that step must be full too, since
        # the gateway reads the columns before the full outputs.
        self.sent: dict[str, tuple[int, int] | None] = {}
        # The step being built (EngineLoop._route).
        self.full: list[pb.SequenceOutput] = []
        self.rids: list[str] = []
        self.indices: list[int] = []
        self.tokens: list[int] = []

    @property
    def num_waiting(self) -> int:
        """Messages not yet taken by the stream (the end marker included): at most 2."""
        return len(self._waiting)

    def put(self, outputs: list[pb.SequenceOutput]) -> None:
        self._push(pb.StepOutput(outputs=outputs))

    def flush(self) -> None:
        """Sends the step built by `_route` as one StepOutput (or joins it to the waiting one)
        and starts the next."""
        self._push(
            pb.StepOutput(
                outputs=self.full,
                token_request_ids=self.rids,
                token_indices=self.indices,
                token_ids=self.tokens,
            )
        )
        self.full, self.rids, self.indices, self.tokens = [], [], [], []

    def maybe_end(self) -> None:
        if self.closing and not self.owned:
            self._waiting.append(None)
            self._open = None
            self._ready.set()

    async def take(self) -> pb.StepOutput | None:
        """The next message (None: the stream ends)."""
        while not self._waiting:
            self._ready.clear()
            await self._ready.wait()
        msg = self._waiting.popleft()
        if msg is self._open:
            self._open = None
        return msg

    def _push(self, msg: pb.StepOutput) -> None:
        if self._open is not None:
            self._join(self._open, msg)
            return
        self._open = msg
        self._open_full = {
            o.request_id: (o.num_prompt_tokens, o.num_cached_tokens) for o in msg.outputs
        }
        self._waiting.append(msg)
        self._ready.set()

    def _join(self, into: pb.StepOutput, msg: pb.StepOutput) -> None:
        full = self._open_full
        if not full:  # the usual case: no request of `into` went as a full output
            into.token_request_ids.extend(msg.token_request_ids)
            into.token_indices.extend(msg.token_indices)
            into.token_ids.extend(msg.token_ids)
        else:
            for rid, index, token in zip(
                msg.token_request_ids, msg.token_indices, msg.token_ids, strict=True
            ):
                counts = full.get(rid)
                if counts is None:
                    into.token_request_ids.append(rid)
                    into.token_indices.append(index)
                    into.token_ids.append(token)
                else:
                    into.outputs.append(
                        pb.SequenceOutput(
                            request_id=rid,
                            index=index,
                            token_ids=[token],
                            num_prompt_tokens=counts[0],
                            num_cached_tokens=counts[1],
                        )
                    )
        into.outputs.extend(msg.outputs)
        for o in msg.outputs:
            full[o.request_id] = (o.num_prompt_tokens, o.num_cached_tokens)


class EngineLoop:
    """Owns the engine: the only place `step()` is called."""

    def __init__(self, engine: EngineClient, trace: StepTrace | None = None) -> None:
        self.engine = engine
        self.trace = trace
        self._wake = asyncio.Event()
        self._owner: dict[str, Sink] = {}
        self._open_choices: dict[str, set[int]] = {}
        self.steps = 0

    @property
    def num_requests(self) -> int:
        return len(self._owner)

    @property
    def load(self) -> EngineLoad | None:
        """The engine's load figures (GetInfo, the step trace), if it keeps them. Asked each
        time: the check reads the figures, which a real engine has once it is started."""
        engine = self.engine
        return engine if isinstance(engine, EngineLoad) else None

    def add(self, request: pb.GenerateRequest, sink: Sink) -> None:
        """Raises ValueError (from the engine) for a request it refuses."""
        rid = request.request_id
        if not rid:
            raise ValueError("request_id must not be empty")
        if rid in self._owner:
            raise ValueError(f"duplicate request_id {rid!r}")
        params = sampling_from_proto(request.params)
        self.engine.add_request(rid, prompt_of(request), params, cache_salt=request.cache_salt)
        self._owner[rid] = sink
        if self.trace is not None:
            self.trace.arrive(rid)
        # One final output per choice; beam search returns its n best beams the same way.
        self._open_choices[rid] = set(range(max(1, params.n)))
        sink.owned.add(rid)
        self._wake.set()

    def abort(self, request_ids: list[str], sink: Sink | None = None, forget: bool = True) -> int:
        """Aborts requests (only `sink`'s own when given). `forget`: the stream is gone, drop
        whatever comes later; otherwise the engine's final ABORT outputs still reach it."""
        n = 0
        for rid in request_ids:
            owner = self._owner.get(rid)
            if owner is None or (sink is not None and owner is not sink):
                continue
            self.engine.abort_request(rid)
            if forget:
                self._forget(rid)
            n += 1
        if n:
            self._wake.set()  # the abort takes effect (blocks released) on the next step
        return n

    def abort_choices(self, choices: list[pb.ChoiceAbort], sink: Sink | None = None) -> int:
        """Ends single choices of requests that go on (only `sink`'s own when given); their
        ABORT outputs reach the stream like any final output. Returns the requests touched."""
        n = 0
        for choice in choices:
            owner = self._owner.get(choice.request_id)
            if owner is None or (sink is not None and owner is not sink):
                continue
            self.engine.abort_choices(choice.request_id, list(choice.indices))
            n += 1
        if n:
            self._wake.set()
        return n

    def _forget(self, rid: str) -> None:
        sink = self._owner.pop(rid, None)
        self._open_choices.pop(rid, None)
        if self.trace is not None:
            self.trace.forget(rid)
        if sink is not None:
            sink.owned.discard(rid)
            sink.sent.pop(rid, None)
            sink.maybe_end()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            if not self.engine.has_unfinished_requests():
                # Woken by a request, or every IDLE_POLL_S: an idle engine may have work of
                # its own (a kvmanager outage to reconcile, a stale epoch).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), IDLE_POLL_S)
                continue
            try:
                outputs = await self.engine.step()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("engine step failed; failing the requests in flight")
                # The client reads this: what happened and what to do, no internals (the
                # exception and its traceback are in the log above).
                self._fail_all("the executor failed on this step (an internal error, in its log)")
                await asyncio.sleep(0.1)  # no hot loop if the failure repeats
                continue
            self.steps += 1
            if self.trace is not None:  # before routing: that forgets the finished requests
                self._trace_step(outputs)
            if outputs:
                self._route(outputs)
            # Let gRPC write this step's messages and read new requests/aborts before the next
            # (after the step that ended the last request, the next one is the engine's
            # settling with kvmanager: the last tokens are on their way before it).
            await asyncio.sleep(0)

    def _trace_step(self, outputs: list[SequenceOutput]) -> None:
        assert self.trace is not None
        load = self.load
        if load is None:
            return  # (tracing needs the engine's step times)
        self.trace.first([o.request_id for o in outputs if o.token_ids])
        self.trace.last([o.request_id for o in outputs if o.finish_reason])
        self.trace.step(
            load.step_times,
            time.perf_counter(),
            load.num_waiting,
            load.num_running,
            len(outputs),
        )

    def _route(self, outputs: list[SequenceOutput]) -> None:
        # Per output: a few attribute reads and three list appends in the common case; a
        # protobuf message is built only for the rare full outputs (this loop runs on the thread
        # that launches the GPU steps, so its cost is paid once per step).
        touched: list[Sink] = []
        sent_full: list[tuple[Sink, str, tuple[int, int]]] = []
        finished: list[str] = []
        owner = self._owner
        for o in outputs:
            rid = o.request_id
            sink = owner.get(rid)
            if sink is None:
                continue  # aborted: its stream is gone or asked for it
            if not sink.full and not sink.rids:
                touched.append(sink)
            # Written for speed: `not o.finish_reason` is "NONE" (an enum member lookup costs
            # ~0.1 us); a non-columnar sink never has `sent` entries.
            if (
                not o.finish_reason
                and len(o.token_ids) == 1
                and not o.logprobs
                and not o.prompt_logprobs
                and not o.error
                and not o.cumulative_logprob
                and sink.sent.get(rid) == (o.num_prompt_tokens, o.num_cached_tokens)
            ):
                sink.rids.append(rid)
                sink.indices.append(o.index)
                sink.tokens.append(o.token_ids[0])
                continue
            sink.full.append(output_to_proto(o))
            if sink.columnar:
                sink.sent[rid] = None  # the rest of this step's outputs of rid go full
                sent_full.append((sink, rid, (o.num_prompt_tokens, o.num_cached_tokens)))
            if o.finish_reason:
                left = self._open_choices.get(rid)
                if left is not None:
                    left.discard(o.index)
                    if not left or o.finish_reason == FinishReason.ERROR:
                        finished.append(rid)
        for sink in touched:
            sink.flush()
        for sink, rid, values in sent_full:
            sink.sent[rid] = values  # what the gateway holds once it has read this step
        for rid in finished:
            self._forget(rid)

    def _fail_all(self, message: str) -> None:
        for rid, sink in list(self._owner.items()):
            with contextlib.suppress(Exception):
                self.engine.abort_request(rid)
            sink.put(
                [pb.SequenceOutput(request_id=rid, finish_reason=pb.FINISH_ERROR, error=message)]
            )
            self._forget(rid)


class ExecutorService(pb_grpc.ExecutorServicer):
    def __init__(self, loop: EngineLoop, info: pb.ExecutorInfo) -> None:
        self.loop = loop
        self._info = info
        self.num_serve_streams = 0

    async def _drain(self, sink: Sink) -> AsyncIterator[pb.StepOutput]:
        while True:
            msg = await sink.take()
            if msg is None:
                return
            yield msg

    async def Serve(
        self, request_iterator: AsyncIterator[pb.ServeRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepOutput]:
        # Headers now: the gateway treats them as "stream accepted" before sending anything.
        await context.send_initial_metadata((GENERATE_BATCH,))
        # Columns only for a gateway that says it reads them (one built before them would drop
        # every token but the first and last).
        sink = Sink(columnar=STEP_COLUMNS in (context.invocation_metadata() or ()))
        peer = context.peer()
        log.info("Serve stream opened by %s", peer)

        def add(request: pb.GenerateRequest) -> None:
            try:
                self.loop.add(request, sink)
            except ValueError as exc:
                sink.put([rejection(request.request_id, str(exc))])

        async def read() -> None:
            async for msg in request_iterator:
                kind = msg.WhichOneof("kind")
                if kind == "generate":
                    add(msg.generate)
                elif kind == "generate_batch":
                    for request in msg.generate_batch.requests:
                        add(request)
                elif kind == "abort":
                    self.loop.abort(list(msg.abort.request_ids), sink, forget=False)
                    self.loop.abort_choices(list(msg.abort.choices), sink)
            sink.closing = True  # half-closed: finish what is in flight, then end the stream
            sink.maybe_end()

        reader = asyncio.create_task(read())
        self.num_serve_streams += 1
        try:
            async for step in self._drain(sink):
                yield step
        finally:
            self.num_serve_streams -= 1
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            n = self.loop.abort(list(sink.owned), sink)
            log.info("Serve stream from %s closed (%d requests aborted)", peer, n)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StepOutput]:
        sink = Sink()
        sink.closing = True
        try:
            self.loop.add(request, sink)
        except ValueError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        try:
            async for step in self._drain(sink):
                yield step
        finally:
            self.loop.abort(list(sink.owned), sink)

    async def Abort(
        self, request: pb.AbortRequest, context: grpc.aio.ServicerContext
    ) -> pb.AbortResponse:
        n = self.loop.abort(list(request.request_ids), forget=False)
        n += self.loop.abort_choices(list(request.choices))
        return pb.AbortResponse(num_aborted=n)

    async def GetInfo(
        self, request: pb.GetInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExecutorInfo:
        info = pb.ExecutorInfo()
        info.CopyFrom(self._info)
        load = self.loop.load
        if load is not None:
            info.num_running = load.num_running
            info.num_waiting = load.num_waiting
            info.kv_tokens_held, info.kv_blocks_held, info.kv_table_blocks = load.kv_occupancy()
            info.prefix_caching = load.prefix_caching
        else:  # an engine that keeps no figures
            info.num_running = info.num_waiting = 0
            info.kv_tokens_held = info.kv_blocks_held = info.kv_table_blocks = 0
            info.prefix_caching = True
        info.num_serve_streams = self.num_serve_streams
        # A stale epoch makes the engine register again: its current epoch, not the first.
        info.epoch = getattr(self.loop.engine, "epoch", info.epoch)
        return info


async def serve(
    engine: EngineClient,
    info: pb.ExecutorInfo,
    host: str,
    port: int,
    stop: asyncio.Event | None = None,
    trace_path: str = "",
) -> None:
    """Runs the service until `stop` is set (or forever); the engine must be started.
    `trace_path`: append a JSON line per step and per request event there (trace.py)."""
    trace = StepTrace(trace_path) if trace_path else None
    loop = EngineLoop(engine, trace)
    server = grpc.aio.server(options=SERVER_OPTIONS, interceptors=[DecodeErrorsAsInvalidArgument()])
    pb_grpc.add_ExecutorServicer_to_server(ExecutorService(loop, info), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        pb.DESCRIPTOR.services_by_name["Executor"].full_name,
        health.SERVICE_NAME,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"cannot bind {host}:{port}")
    await server.start()
    engine_task = asyncio.create_task(loop.run(), name="engine-loop")
    serving = health_pb2.HealthCheckResponse.SERVING
    await health_servicer.set("", serving)
    await health_servicer.set("pagemesh.v1.Executor", serving)
    log.info("executor %s serving %s on %s:%d", info.executor_id, info.model, host, bound)
    try:
        waiters = [asyncio.create_task(server.wait_for_termination()), engine_task]
        if stop is not None:
            waiters.append(asyncio.create_task(stop.wait()))
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if engine_task in done and (error := engine_task.exception()) is not None:
            raise error
    finally:
        await health_servicer.enter_graceful_shutdown()
        await server.stop(grace=2.0)
        engine_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await engine_task
        for task in waiters:
            task.cancel()
        if trace is not None:
            trace.close()
