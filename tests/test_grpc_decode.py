"""Both gRPC servers answer a request that does not parse with INVALID_ARGUMENT, whatever the
method's kind (pagemesh/grpc_decode.py), and still serve well-formed calls of every kind,
health's streamed Watch (a coroutine handler, not a generator) among them."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import kvmanager_pb2 as kv_pb
from pagemesh.services.executor.server import serve
from pagemesh.services.kvmanager.server import start_server

from pagemesh.redis_process import free_port

GARBAGE = b"\xff\xff\xff\xff"  # a field tag that never ends


class _Idle:
    """An engine with nothing to do (these calls never reach it)."""

    def add_request(self, *args: object, **kwargs: object) -> None:
        raise ValueError("no requests here")

    def abort_request(self, rid: str) -> None:
        pass

    def abort_choices(self, rid: str, indices: list[int]) -> None:
        pass

    def has_unfinished_requests(self) -> bool:
        return False


def test_garbage_does_not_parse() -> None:
    for message in (
        kv_pb.AllocateRequest,
        kv_pb.SessionRequest,
        pb.ServeRequest,
        pb.GenerateRequest,
    ):
        with pytest.raises(DecodeError):
            message.FromString(GARBAGE)


async def _code(call: object) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:  # type: ignore[attr-defined]
                pass
        else:
            await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_undecodable_requests_are_invalid_argument() -> None:
    kv = await start_server(port=0)
    port = free_port()
    stop = asyncio.Event()
    info = pb.ExecutorInfo(executor_id="x", model="m", block_size=16, num_blocks=1)
    executor = asyncio.create_task(serve(_Idle(), info, "127.0.0.1", port, stop))
    kv_channel = grpc.aio.insecure_channel(f"127.0.0.1:{kv.port}")
    ex_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(ex_channel.channel_ready(), 30)

        async def garbage_stream():
            yield GARBAGE

        calls = {
            "KVManager.Allocate (unary)": kv_channel.unary_unary("/pagemesh.v1.KVManager/Allocate")(
                GARBAGE, timeout=10
            ),
            "KVManager.Session (stream)": kv_channel.stream_stream(
                "/pagemesh.v1.KVManager/Session"
            )(garbage_stream(), timeout=10),
            "Executor.Generate (unary, streamed replies)": ex_channel.unary_stream(
                "/pagemesh.v1.Executor/Generate"
            )(GARBAGE, timeout=10),
            "Executor.Serve (stream)": ex_channel.stream_stream("/pagemesh.v1.Executor/Serve")(
                garbage_stream(), timeout=10
            ),
            "Executor.Abort (unary)": ex_channel.unary_unary("/pagemesh.v1.Executor/Abort")(
                GARBAGE, timeout=10
            ),
        }
        for what, call in calls.items():
            assert await _code(call) == grpc.StatusCode.INVALID_ARGUMENT, what

        # Well-formed calls of each kind still go through.
        stats = await kv_channel.unary_unary(
            "/pagemesh.v1.KVManager/GetStats",
            request_serializer=kv_pb.GetStatsRequest.SerializeToString,
            response_deserializer=kv_pb.GetStatsResponse.FromString,
        )(kv_pb.GetStatsRequest(), timeout=10)
        assert stats.windows
        health = health_pb2_grpc.HealthStub(ex_channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health.Watch(health_pb2.HealthCheckRequest(), timeout=10)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        serve_call = ex_channel.stream_stream(
            "/pagemesh.v1.Executor/Serve",
            request_serializer=pb.ServeRequest.SerializeToString,
            response_deserializer=pb.StepOutput.FromString,
        )

        async def one_request():
            yield pb.ServeRequest(generate=pb.GenerateRequest(request_id="r", prompt_token_ids=[1]))

        replies = [m async for m in serve_call(one_request(), timeout=10)]
        assert [o.rejected for m in replies for o in m.outputs] == [True]  # the engine said no
    finally:
        await kv_channel.close()
        await ex_channel.close()
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await executor
        await kv.stop()
