"""StepOutput's token columns (proto/executor.proto): the executor's EngineLoop sends a step's
plain one-token outputs as packed columns, the gateway's ExecutorClient hands them to each
RequestStream as ColumnTokens (no SequenceOutput per token). Every RequestStream must see exactly
the outputs, in the order, that one full SequenceOutput per output gave it: a ColumnToken is
compared in the full form it stands for."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import executor_pb2_grpc as pb_grpc
from pagemesh.services.executor.engine_api import FinishReason, SequenceOutput, TokenLogprob
from pagemesh.services.executor.server import EngineLoop, Sink, output_to_proto
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.gateway.errors import APIError
from pagemesh.services.gateway.executor_client import ExecutorClient, RequestStream
from pagemesh.services.gateway.generation import Generation
from pagemesh.services.gateway.outputs import ColumnToken, Output

from tests.executor.engine_support import make_engine, tokenizer
from tests.support.executor_service import executor_service

Delivered = dict[str, list[list[pb.SequenceOutput]]]


def expected(steps: list[list[SequenceOutput]], rids: list[str]) -> Delivered:
    """What each request's stream got when every output was a full SequenceOutput: one list
    per step that had outputs of it, in the engine's order."""
    out: Delivered = {rid: [] for rid in rids}
    for step in steps:
        for rid in rids:
            mine = [output_to_proto(o) for o in step if o.request_id == rid]
            if mine:
                out[rid].append(mine)
    return out


def full_form(out: Output) -> pb.SequenceOutput:
    return out.to_proto() if isinstance(out, ColumnToken) else out


async def drain(streams: dict[str, RequestStream]) -> Delivered:
    async def one(stream: RequestStream) -> list[list[pb.SequenceOutput]]:
        return [[full_form(o) for o in outs] async for outs in stream]

    got = await asyncio.wait_for(asyncio.gather(*(one(s) for s in streams.values())), 120)
    return dict(zip(streams, got, strict=True))


def register(client: ExecutorClient, rid: str, n: int) -> RequestStream:
    """A stream as `submit` makes it, without an executor behind the client."""
    stream = RequestStream(rid, n)
    client._streams[rid] = stream
    return stream


async def test_dispatch_decodes_columns_and_full_outputs() -> None:
    client = ExecutorClient("127.0.0.1:1")  # never connects: steps are handed to _dispatch
    streams = {"a": register(client, "a", 1), "b": register(client, "b", 2)}
    SO = pb.SequenceOutput
    steps = [
        # First outputs are full: they bring the usage counts the columns stand for.
        pb.StepOutput(
            outputs=[
                SO(request_id="a", token_ids=[11], num_prompt_tokens=7, num_cached_tokens=3),
                SO(request_id="b", index=1, token_ids=[21], num_prompt_tokens=5),
                SO(request_id="b", token_ids=[22], num_prompt_tokens=5),
            ]
        ),
        # b's choice 1 in the columns, then its choice 0 finishing; one entry of a request the
        # gateway no longer knows (aborted here) is dropped.
        pb.StepOutput(
            outputs=[SO(request_id="b", token_ids=[24], finish_reason=pb.FINISH_STOP)],
            token_request_ids=["a", "gone", "b"],
            token_indices=[0, 0, 1],
            token_ids=[12, 99, 23],
        ),
        pb.StepOutput(token_request_ids=["a"], token_indices=[0], token_ids=[13]),
        pb.StepOutput(
            outputs=[
                SO(request_id="a", token_ids=[14], finish_reason=pb.FINISH_LENGTH),
                SO(
                    request_id="b",
                    index=1,
                    token_ids=[25],
                    finish_reason=pb.FINISH_LENGTH,
                    num_prompt_tokens=5,
                ),
            ]
        ),
    ]
    for step in steps:
        client._dispatch(pb.StepOutput.FromString(step.SerializeToString()))
    assert not client._streams  # both finished
    a = {"request_id": "a", "num_prompt_tokens": 7, "num_cached_tokens": 3}
    b = {"request_id": "b", "num_prompt_tokens": 5}
    assert await drain(streams) == {
        "a": [
            [SO(**a, token_ids=[11])],
            [SO(**a, token_ids=[12])],
            [SO(**a, token_ids=[13])],
            [SO(request_id="a", token_ids=[14], finish_reason=pb.FINISH_LENGTH)],
        ],
        "b": [
            [SO(**b, index=1, token_ids=[21]), SO(**b, token_ids=[22])],
            [
                SO(**b, index=1, token_ids=[23]),
                SO(request_id="b", token_ids=[24], finish_reason=pb.FINISH_STOP),
            ],
            [SO(**b, index=1, token_ids=[25], finish_reason=pb.FINISH_LENGTH)],
        ],
    }


class _Engine:
    """add_request / abort_request only: these steps are made up by the test."""

    def add_request(self, *args: object, **kwargs: object) -> None:
        pass

    def abort_request(self, rid: str) -> None:
        pass


def _random_steps(
    rng: random.Random, requests: dict[str, int], num_steps: int
) -> list[list[SequenceOutput]]:
    """Steps of outputs as the engines make them: mostly one plain token per open choice, in a
    shuffled order, with first outputs, finishes, logprobs, several tokens, errors and a
    cached-token count that changes once mixed in."""
    open_choices = {rid: set(range(n)) for rid, n in requests.items()}
    cached = {rid: rng.choice([0, 16, 32]) for rid in requests}
    steps = []
    for _ in range(num_steps):
        live = [(rid, i) for rid, left in open_choices.items() for i in sorted(left)]
        rng.shuffle(live)
        step: list[SequenceOutput] = []
        failed: set[str] = set()
        for rid, i in live:
            if rid in failed:
                continue
            o = SequenceOutput(rid, i, [rng.randrange(50_000)], num_prompt_tokens=40)
            o.num_cached_tokens = cached[rid]
            roll = rng.random()
            if roll < 0.05:
                o.finish_reason = rng.choice([FinishReason.STOP, FinishReason.LENGTH])
            elif roll < 0.08:
                o.logprobs = [TokenLogprob(o.token_ids[0], -0.5, [(3, -1.0)])]
                o.cumulative_logprob = -0.5
            elif roll < 0.10:
                o.token_ids = [1, 2, 3]  # a whole beam
            elif roll < 0.11:
                cached[rid] += 16  # never seen from the real engine; still exact
                o.num_cached_tokens = cached[rid]
            elif roll < 0.12:
                failed.add(rid)  # the engine fails the whole request: one ERROR per choice
                step += [
                    SequenceOutput(rid, j, [], FinishReason.ERROR, error="boom")
                    for j in sorted(open_choices[rid])
                ]
                open_choices[rid].clear()
                continue
            step.append(o)
            if o.finished:
                open_choices[rid].discard(i)
        steps.append(step)
    # Then every choice still open ends.
    steps.append(
        [
            SequenceOutput(rid, i, [7], FinishReason.LENGTH, num_prompt_tokens=40)
            for rid, left in open_choices.items()
            for i in sorted(left)
        ]
    )
    return steps


async def test_route_then_dispatch_gives_each_request_the_full_form() -> None:
    rng = random.Random(1234)
    loop = EngineLoop(_Engine())
    # Two Serve streams (two gateways) and a Generate stream, which never gets columns.
    gateways = [ExecutorClient("127.0.0.1:1"), ExecutorClient("127.0.0.1:1")]
    sinks = [Sink(columnar=True), Sink(columnar=True), Sink()]
    requests = {f"r{k}": rng.choice([1, 1, 1, 2, 3]) for k in range(40)}
    streams: dict[str, RequestStream] = {}
    for k, (rid, n) in enumerate(requests.items()):
        sink = sinks[k % 3]
        loop.add(pb.GenerateRequest(request_id=rid, params=pb.SamplingParams(n=n)), sink)
        if sink.columnar:
            streams[rid] = register(gateways[k % 3], rid, n)
    steps = _random_steps(rng, requests, 60)
    columns = full = 0
    for step in steps:
        loop._route(step)
        for sink, gateway in zip(sinks, [*gateways, None], strict=True):
            while sink.num_waiting:
                msg = await sink.take()
                assert msg is not None
                wire = pb.StepOutput.FromString(msg.SerializeToString())
                if gateway is None:
                    assert not wire.token_request_ids  # Generate: full outputs only
                    continue
                columns += len(wire.token_request_ids)
                full += len(wire.outputs)
                gateway._dispatch(wire)
    got = await drain(streams)
    assert got == expected(steps, list(streams))
    assert columns > 2 * full  # most tokens went in the columns


def flat(delivered: Delivered) -> dict[str, list[pb.SequenceOutput]]:
    """Each request's outputs in order, whatever messages carried them."""
    return {rid: [o for outs in lists for o in outs] for rid, lists in delivered.items()}


async def test_a_reader_behind_gets_steps_joined_in_order() -> None:
    """A stream that takes its messages only now and then: each step finds at most one message
    waiting and joins it, and every request still gets exactly its outputs, in order, with the
    usage counts of their full form (a column entry after a full output of its request in the
    same message goes full)."""
    rng = random.Random(99)
    loop = EngineLoop(_Engine())
    gateway = ExecutorClient("127.0.0.1:1")
    sink = Sink(columnar=True)
    requests = {f"r{k}": rng.choice([1, 1, 2, 3]) for k in range(30)}
    streams = {}
    for rid, n in requests.items():
        loop.add(pb.GenerateRequest(request_id=rid, params=pb.SamplingParams(n=n)), sink)
        streams[rid] = register(gateway, rid, n)
    steps = _random_steps(rng, requests, 80)
    messages = converted = 0
    for step in steps:
        loop._route(step)
        assert sink.num_waiting <= 1
        if sink.num_waiting and rng.random() < 0.3:  # the reader gets its turn
            msg = await sink.take()
            assert msg is not None
            messages += 1
            wire = pb.StepOutput.FromString(msg.SerializeToString())
            converted += sum(
                1
                for o in wire.outputs
                if len(o.token_ids) == 1 and not o.finish_reason and not o.logprobs
            )
            gateway._dispatch(wire)
    while sink.num_waiting:
        msg = await sink.take()
        assert msg is not None
        messages += 1
        gateway._dispatch(pb.StepOutput.FromString(msg.SerializeToString()))
    got = await drain(streams)
    assert flat(got) == flat(expected(steps, list(streams)))
    assert messages < len(steps) / 2  # steps were joined
    assert converted > 0  # and some column entries had to go full to keep the order


async def test_real_executor_sends_columns_the_gateway_reads_as_before(smollm2_path: Path) -> None:
    """The executor service (real engine, SmolLM2 on CPU) and the gateway's client over loopback
    gRPC: per request, the gateway gets the engine's outputs unchanged, most tokens travel in
    the columns, and a prefix hit's cached-token count reaches every output."""
    engine = await make_engine(smollm2_path)
    engine_steps: list[list[SequenceOutput]] = []
    step = engine.step

    async def recording_step() -> list[SequenceOutput]:
        outputs = await step()
        engine_steps.append(list(outputs))
        return outputs

    engine.step = recording_step  # type: ignore[method-assign]
    wire: list[pb.StepOutput] = []
    async with executor_service(engine) as client:
        # Nothing comes down the stream before a request goes up: no step is missed.
        dispatch = client._dispatch

        def spy(step_output: pb.StepOutput) -> None:
            wire.append(step_output)
            dispatch(step_output)

        client._dispatch = spy  # type: ignore[method-assign]
        ids = tokenizer(smollm2_path)(
            "Once upon a time, in a small village by the sea, there lived an old fisherman who "
            "rose before dawn every day, mended his nets by the harbour wall and told the"
        )["input_ids"]
        assert len(ids) >= 2 * engine.config.block_size

        def request(rid: str, **params: object) -> pb.GenerateRequest:
            return pb.GenerateRequest(
                request_id=rid, prompt_token_ids=ids, params=pb.SamplingParams(**params)
            )

        first = {"warm": client.submit(request("warm", temperature=0, max_tokens=4))}
        await drain(first)  # its blocks are cached now: the next prompts hit them

        async def old_gateway() -> list[pb.StepOutput]:
            """A Serve stream opened without the columns metadata, as a gateway built before
            them does."""

            async def up() -> AsyncIterator[pb.ServeRequest]:
                yield pb.ServeRequest(generate=request("old", temperature=0, max_tokens=8))

            stub = pb_grpc.ExecutorStub(client._channel)
            return [step async for step in stub.Serve(up())]

        old = asyncio.create_task(old_gateway())
        streams = {
            rid: client.submit(req)
            for rid, req in [
                ("greedy", request("greedy", temperature=0, max_tokens=12)),
                ("n2", request("n2", temperature=1.0, seed=7, n=2, max_tokens=10)),
                ("lp", request("lp", temperature=0, max_tokens=6, logprobs=2)),
                ("one", request("one", temperature=0, max_tokens=1)),
            ]
        }
        got = await drain(streams)
        old_steps = await asyncio.wait_for(old, 120)
    # Per request, the engine's outputs in order (a step may have joined the one before it
    # when the stream had not taken that yet, Sink's docstring).
    assert flat(got) == flat(expected(engine_steps, list(streams)))
    assert not any(step.token_request_ids for step in old_steps)
    old_outputs = [o for step in old_steps for o in step.outputs]
    assert old_outputs == flat(expected(engine_steps, ["old"]))["old"]
    assert sum(len(outs) for outs in got["n2"]) == 20
    cached = {o.num_cached_tokens for outs in got["greedy"] for o in outs}
    assert len(cached) == 1 and cached.pop() >= engine.config.block_size
    columns = sum(len(s.token_request_ids) for s in wire)
    full = sum(len(s.outputs) for s in wire)
    # greedy: 12 tokens (first and last full), n2: 2 x 10, lp and one: full only.
    assert columns >= 20 and columns > full
    # Logprobs and single-output requests never go in the columns.
    assert not {"lp", "one"} & {rid for s in wire for rid in s.token_request_ids}


async def test_column_entries_arrive_as_column_tokens() -> None:
    """No SequenceOutput is built for a column entry: the stream gets a ColumnToken, which
    reads like the full form (the fields a column entry leaves unset included)."""
    client = ExecutorClient("127.0.0.1:1")
    stream = register(client, "a", 1)
    SO = pb.SequenceOutput
    first = SO(request_id="a", token_ids=[11], num_prompt_tokens=7, num_cached_tokens=3)
    client._dispatch(pb.StepOutput(outputs=[first]))
    client._dispatch(pb.StepOutput(token_request_ids=["a"], token_indices=[0], token_ids=[12]))
    client._dispatch(
        pb.StepOutput(outputs=[SO(request_id="a", token_ids=[13], finish_reason=pb.FINISH_STOP)])
    )
    got = [o async for outs in stream for o in outs]
    assert [type(o) for o in got] == [SO, ColumnToken, SO]
    token = got[1]
    assert (token.index, token.token_ids, token.request_id) == (0, [12], "a")
    assert (token.num_prompt_tokens, token.num_cached_tokens) == (7, 3)
    assert token.finish_reason == pb.FINISH_NONE and not token.rejected and not token.error
    assert not token.logprobs and token.cumulative_logprob == 0.0
    assert token.to_proto() == SO(
        request_id="a", token_ids=[12], num_prompt_tokens=7, num_cached_tokens=3
    )


class _Submits:
    """What Generation needs of an ExecutorClient when it is fed outputs by hand."""

    def submit(self, request: pb.GenerateRequest) -> RequestStream:
        return RequestStream(request.request_id, max(1, request.params.n))


def _read(gen: Generation, outputs: list[Output]) -> list[object]:
    """What Generation._apply makes of each output, then what it holds after each."""
    seen: list[object] = []
    for out in outputs:
        try:
            seen.append(gen._apply(out))
        except APIError as exc:
            seen.append(("raised", exc.status, str(exc)))
            break
        seen.append(
            (list(gen.finish_reasons), gen.completion_tokens, gen.prompt_tokens, gen.cached_tokens)
        )
        seen.append(list(gen._cut))
    return seen


async def test_generation_reads_column_tokens_as_their_full_form(tokenizer: Tokenizer) -> None:
    """Generation's fast path for ColumnTokens gives the deltas, finishes, stop-string cuts and
    counts that the full SequenceOutputs they stand for give, output by output."""
    rng = random.Random(7)
    loop = EngineLoop(_Engine())
    gateway = ExecutorClient("127.0.0.1:1")
    sink = Sink(columnar=True)
    requests = {f"r{k}": rng.choice([1, 1, 2, 3]) for k in range(30)}
    stops = {rid: rng.choice([[], ["e"], [" the", "in"]]) for rid in requests}
    streams = {}
    for rid, n in requests.items():
        loop.add(pb.GenerateRequest(request_id=rid, params=pb.SamplingParams(n=n)), sink)
        streams[rid] = register(gateway, rid, n)
    for step in _random_steps(rng, requests, 40):
        loop._route(step)
        while sink.num_waiting:
            msg = await sink.take()
            assert msg is not None
            gateway._dispatch(pb.StepOutput.FromString(msg.SerializeToString()))
    delivered = {rid: [o async for outs in stream for o in outs] for rid, stream in streams.items()}
    tokens = cut = 0
    for rid, outputs in delivered.items():
        tokens += sum(isinstance(o, ColumnToken) for o in outputs)
        request = pb.GenerateRequest(request_id=rid, params=pb.SamplingParams(n=requests[rid]))

        def generation(rid: str = rid, request: pb.GenerateRequest = request) -> Generation:
            client = _Submits()  # only submit is called: a stand-in for the ExecutorClient
            return Generation(client, request, [1, 2, 3], tokenizer, stops[rid])  # type: ignore[arg-type]

        got = _read(generation(), outputs)
        assert got == _read(generation(), [full_form(o) for o in outputs])
        cut += sum(1 for seen in got if isinstance(seen, list) and seen)
    assert tokens > 100 and cut > 0  # column tokens, and choices cut alone among them
