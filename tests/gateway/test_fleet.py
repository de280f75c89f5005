"""The gateway's fleet mode: following kvmanager's fleet, routing each request, serving several
models. Executors are the real executor gRPC service around a scripted engine (no model loaded);
kvmanager's Fleet service is a small test double on a real grpc.aio server on loopback (the real
one is built on the kvmanager side): snapshots and Route answers are what each test sets, so
these tests pin the gateway's own logic over the real wire."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp.test_utils import TestClient, TestServer
from grpc_health.v1 import health, health_pb2_grpc
from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import executor_pb2_grpc as pb_grpc
from pagemesh.proto import fleet_pb2 as fleet_pb
from pagemesh.proto import fleet_pb2_grpc as fleet_grpc
from pagemesh.proto import packed_ids
from pagemesh.services.executor.server import serve
from pagemesh.services.gateway import cli, router
from pagemesh.services.gateway.app import GATEWAY, Gateway, GatewayConfig, create_app
from pagemesh.services.gateway.chat import Tokenizer

from pagemesh.redis_process import free_port
from tests.gateway.scripted_engine import ScriptedEngine

ANSWER = "Paris is the capital of France."


class Refused(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FakeFleet(fleet_grpc.FleetServicer):
    """kvmanager's Fleet service as the contract (proto/fleet.proto) describes it: WatchFleet
    sends the fleet now, then the whole fleet after every change; Route (and each RouteStream
    message) answers `route_to` when set (a test stands in for kvmanager's choice), else the
    first live member of the model, and NOT_FOUND / UNAVAILABLE as kvmanager does (`refuse`: that
    status for every request). `streams` False: a kvmanager from before RouteStream."""

    def __init__(self) -> None:
        self.members: list[fleet_pb.FleetMember] = []
        self.routes: list[fleet_pb.RouteRequest] = []
        self.transports: list[str] = []  # "unary" or "stream", per routing request
        self.streams = True
        self.streams_opened = 0
        self.route_to: str | None = None
        self.refuse: grpc.StatusCode | None = None
        self.route_delay = 0.0  # seconds Route takes: a hung kvmanager
        self._version = 0
        self._changed = asyncio.Condition()

    async def publish(self, *members: fleet_pb.FleetMember) -> None:
        async with self._changed:
            self.members = list(members)
            self._version += 1
            self._changed.notify_all()

    async def WatchFleet(
        self, request: fleet_pb.WatchFleetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[fleet_pb.FleetSnapshot]:
        seen = -1
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda seen=seen: self._version != seen)
                seen = self._version
                snapshot = fleet_pb.FleetSnapshot(members=self.members)
            yield snapshot

    async def _decide(self, request: fleet_pb.RouteRequest, via: str) -> fleet_pb.RouteResponse:
        self.routes.append(request)
        self.transports.append(via)
        await asyncio.sleep(self.route_delay)
        if self.refuse is not None:
            raise Refused(self.refuse, "refused by the test")
        serving = [m for m in self.members if m.model == request.model]
        if not serving:
            raise Refused(grpc.StatusCode.NOT_FOUND, f"no executor serves {request.model}")
        live = [m for m in serving if m.live and m.executor_id not in request.exclude]
        if not live:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "no live executor")
        chosen = next((m for m in serving if m.executor_id == self.route_to), live[0])
        return fleet_pb.RouteResponse(
            executor_id=chosen.executor_id,
            address=chosen.address,
            cached_tokens=16,
            reason="prefix",
            policy=request.policy or "kv",
        )

    async def Route(
        self, request: fleet_pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> fleet_pb.RouteResponse:
        try:
            return await self._decide(request, "unary")
        except Refused as e:
            await context.abort(e.code, e.message)
            raise

    async def RouteStream(
        self,
        request_iterator: AsyncIterator[fleet_pb.RouteStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        if not self.streams:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        self.streams_opened += 1
        async for message in request_iterator:
            reply = fleet_pb.RouteStreamResponse(id=message.id)
            try:
                reply.route.CopyFrom(await self._decide(message.route, "stream"))
            except Refused as e:
                reply.error.code = e.code.value[0]
                reply.error.message = e.message
            await context.write(reply)


async def start_kvmanager(fleet: FakeFleet, port: int) -> grpc.aio.Server:
    """The double on `port`, with gRPC health as kvmanager has it (no Redis entry: "off")."""
    server = grpc.aio.server()
    fleet_grpc.add_FleetServicer_to_server(fleet, server)
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    assert server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server


@dataclass
class Executor:
    executor_id: str
    model: str
    port: int
    engine: ScriptedEngine

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def member(self, live: bool = True) -> fleet_pb.FleetMember:
        return fleet_pb.FleetMember(
            executor_id=self.executor_id,
            address=self.address,
            model=self.model,
            epoch=1,
            num_blocks=64,
            block_size=16,
            max_model_len=256,
            live=live,
        )

    async def serve_streams(self) -> int:
        """Serve streams open on this executor now (one per gateway following it)."""
        async with grpc.aio.insecure_channel(self.address) as channel:
            info = await pb_grpc.ExecutorStub(channel).GetInfo(pb.GetInfoRequest(), timeout=5)
        return info.num_serve_streams


@dataclass
class FleetMesh:
    client: TestClient
    gw: Gateway
    fleet: FakeFleet
    kv_port: int
    kv_server: grpc.aio.Server
    executors: dict[str, Executor] = field(default_factory=dict)

    def engine_of(self, executor_id: str) -> ScriptedEngine:
        return self.executors[executor_id].engine


async def until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not (await cond() if asyncio.iscoroutinefunction(cond) else cond()):
        assert time.monotonic() < deadline, f"timed out waiting for {what or cond}"
        await asyncio.sleep(0.02)


@pytest.fixture
async def mesh(tokenizer: Tokenizer, smollm2_path: Path) -> AsyncIterator[FleetMesh]:
    """Three executors (ex-a and ex-b serve "smol", ex-c serves "smol-2"), a kvmanager double
    that publishes nothing yet, and a gateway in fleet mode (no --executor)."""
    eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    stop = asyncio.Event()
    tasks = []
    executors = {}
    for executor_id, model in (("ex-a", "smol"), ("ex-b", "smol"), ("ex-c", "smol-2")):
        engine = ScriptedEngine(tokenizer.encode(ANSWER), eos)
        port = free_port()
        info = pb.ExecutorInfo(
            executor_id=executor_id,
            model=model,
            model_path=str(smollm2_path),
            block_size=16,
            num_blocks=64,
            max_model_len=256,
            vocab_size=len(tokenizer.hf),
            max_beam_width=4,
            max_num_seqs=6,
        )
        tasks.append(asyncio.create_task(serve(engine, info, "127.0.0.1", port, stop)))
        executors[executor_id] = Executor(executor_id, model, port, engine)
    fleet = FakeFleet()
    kv_port = free_port()
    kv_server = await start_kvmanager(fleet, kv_port)
    config = GatewayConfig(kvmanager=f"127.0.0.1:{kv_port}", trace_requests="")
    async with TestClient(TestServer(create_app(config))) as client:
        gw = client.server.app[GATEWAY]
        assert gw.fleet_mode
        mesh = FleetMesh(client, gw, fleet, kv_port, kv_server, executors)
        yield mesh
    await mesh.kv_server.stop(None)  # a test may have restarted it
    stop.set()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def publish(mesh: FleetMesh, *members: fleet_pb.FleetMember) -> None:
    """Publishes a snapshot and waits until the gateway has every live member ready."""
    await mesh.fleet.publish(*members)
    registry = mesh.gw.registry

    def mirrored() -> bool:
        if set(registry.members) != {m.executor_id for m in members}:
            return False
        return all(
            (mine.address, mine.model, mine.live, mine.routable)
            == (m.address, m.model, m.live, m.live)
            for m in members
            if (mine := registry.members[m.executor_id])
        )

    await until(mirrored, what="the gateway to mirror the snapshot")


async def chat(mesh: FleetMesh, model: str = "smol", **extra: Any) -> tuple[int, dict[str, Any]]:
    body = {"model": model, "messages": [{"role": "user", "content": "Capital?"}], **extra}
    resp = await mesh.client.post("/v1/chat/completions", json=body)
    return resp.status, await resp.json()


def served_by(mesh: FleetMesh) -> dict[str, int]:
    """Requests each executor's engine has received so far."""
    return {eid: len(ex.engine.prompts) for eid, ex in mesh.executors.items()}


async def test_snapshots_open_and_close_executor_streams(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    # Before any snapshot the gateway knows no model: 503 "not ready", not a 404.
    status, body = await chat(mesh)
    assert status == 503 and body["error"]["type"] == "server_error"
    assert (await mesh.client.get("/health")).status == 503

    await publish(mesh, a.member())
    assert await a.serve_streams() == 1 and await b.serve_streams() == 0
    assert (await mesh.client.get("/health")).status == 200

    await publish(mesh, a.member(), b.member())  # b joins: its own stream, a's kept
    assert await a.serve_streams() == 1 and await b.serve_streams() == 1
    a_client = mesh.gw.registry.members["ex-a"].client

    await publish(mesh, b.member())  # a leaves: its stream closed, its client gone
    await until(lambda: not a_client.connected, what="a's stream to close")

    async def a_closed() -> bool:
        return await a.serve_streams() == 0

    await until(a_closed, what="ex-a to see its Serve stream end")
    assert await b.serve_streams() == 1
    status, _ = await chat(mesh)
    assert status == 200 and served_by(mesh)["ex-a"] == 0

    await publish(mesh)  # nobody serves "smol" any more: it is unknown now
    status, body = await chat(mesh)
    assert status == 404 and body["error"]["code"] == "model_not_found"


async def test_a_member_that_leaves_finishes_its_requests_first(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    mesh.fleet.route_to = "ex-a"
    a.engine.delay = 0.03
    running = asyncio.create_task(chat(mesh))
    await until(lambda: a.engine.live, what="the request to run on ex-a")
    # ex-a leaves kvmanager's view (say kvmanager restarted without Redis): no new request
    # goes to it, the one running there ends normally, then its stream is closed.
    await publish(mesh, b.member())
    assert (await chat(mesh))[0] == 200 and served_by(mesh)["ex-b"] == 1
    status, body = await running
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER

    async def a_closed() -> bool:
        return await a.serve_streams() == 0

    await until(a_closed, what="ex-a's stream to close once drained")


async def test_requests_go_where_route_says_with_the_packed_prompt(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    mesh.fleet.route_to = "ex-b"
    status, body = await chat(mesh, cache_salt="tenant-1")
    assert status == 200 and body["choices"][0]["message"]["content"] == ANSWER
    assert served_by(mesh) == {"ex-a": 0, "ex-b": 1, "ex-c": 0}
    [route] = mesh.fleet.routes
    [prompt] = b.engine.prompts.values()
    # The prompt as every wire packs it (u32 little-endian), the request's salt, the policy.
    assert packed_ids.unpack(route.prompt).tolist() == prompt
    assert (route.model, route.cache_salt, route.policy) == ("smol", "tenant-1", "kv")
    assert list(route.exclude) == []

    mesh.fleet.route_to = "ex-a"
    assert (await chat(mesh))[0] == 200
    assert served_by(mesh) == {"ex-a": 1, "ex-b": 1, "ex-c": 0}
    metrics = await (await mesh.client.get("/metrics")).text()
    assert 'pagemesh_gateway_routed_requests_total{executor="ex-b",reason="prefix"} 1.0' in metrics
    assert 'pagemesh_gateway_routed_requests_total{executor="ex-a",reason="prefix"} 1.0' in metrics


async def test_n_and_beams_are_routed_once_and_stay_on_one_executor(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    mesh.fleet.route_to = "ex-b"
    status, body = await chat(mesh, n=3)
    assert status == 200 and len(body["choices"]) == 3
    assert len(mesh.fleet.routes) == 1 and served_by(mesh)["ex-b"] == 1
    status, body = await chat(mesh, use_beam_search=True, beam_width=2, n=2, max_tokens=4)
    assert len(mesh.fleet.routes) == 2 and served_by(mesh) == {"ex-a": 0, "ex-b": 2, "ex-c": 0}


async def test_n_beyond_the_executors_max_num_seqs_is_a_400_naming_n(mesh: FleetMesh) -> None:
    """Each of n choices runs as a sequence: n above the executors' max_num_seqs (6 here) is
    refused by the gateway, naming `n`, before any routing."""
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    status, body = await chat(mesh, n=7)
    assert status == 400 and body["error"]["param"] == "n", body
    assert "6" in body["error"]["message"] and not mesh.fleet.routes
    status, body = await chat(mesh, n=6)
    assert status == 200 and len(body["choices"]) == 6


async def test_aborts_reach_the_executor_holding_the_request(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    mesh.fleet.route_to = "ex-b"
    b.engine.delay = 0.05
    body = {"model": "smol", "messages": [{"role": "user", "content": "q"}], "stream": True}
    resp = await mesh.client.post("/v1/chat/completions", json=body)
    await resp.content.readuntil(b"\n\n")
    resp.close()  # the client goes away mid-stream
    await until(lambda: b.engine.aborted, what="ex-b to abort the request")
    assert not b.engine.live and not a.engine.prompts


async def test_a_member_marked_down_gets_no_new_requests(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    await publish(mesh, a.member(live=False), b.member())
    # Its stream stays open (requests on it would go on), but no new request reaches it, even
    # when kvmanager's answer still names it (a Route that raced the snapshot).
    assert await a.serve_streams() == 1
    mesh.fleet.route_to = "ex-a"
    for _ in range(3):
        assert (await chat(mesh))[0] == 200
    assert served_by(mesh) == {"ex-a": 0, "ex-b": 3, "ex-c": 0}
    metrics = await (await mesh.client.get("/metrics")).text()
    assert (
        'pagemesh_gateway_routed_requests_total{executor="ex-b",'
        f'reason="{router.REASON_NOT_HERE}"}} 3.0'
    ) in metrics

    # None of the model's executors live: a 503 at once, naming no address.
    await publish(mesh, a.member(live=False), b.member(live=False))
    calls = len(mesh.fleet.routes)
    started = time.monotonic()
    status, body = await chat(mesh)
    assert status == 503 and time.monotonic() - started < 2
    message = body["error"]["message"]
    assert "smol" in message and "127.0.0.1" not in message and str(a.port) not in message
    assert body["error"]["type"] == "server_error"
    assert len(mesh.fleet.routes) == calls  # no Route call for a model with nothing live

    await publish(mesh, a.member(), b.member(live=False))  # back: serving again
    mesh.fleet.route_to = None
    assert (await chat(mesh))[0] == 200 and served_by(mesh)["ex-a"] == 1


async def test_route_failure_falls_back_locally_and_logs_once(
    mesh: FleetMesh, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    caplog.set_level(logging.INFO, logger="pagemesh.gateway")
    await mesh.kv_server.stop(None)  # kvmanager goes away: the gateway serves from its snapshot
    statuses = await asyncio.gather(*(chat(mesh) for _ in range(6)))
    assert [s for s, _ in statuses] == [200] * 6
    # The local choice spreads them (fewest in flight), and says why on /metrics.
    assert served_by(mesh)["ex-a"] >= 1 and served_by(mesh)["ex-b"] >= 1
    metrics = await (await mesh.client.get("/metrics")).text()
    fallbacks = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("pagemesh_gateway_routed_requests_total")
        and f'reason="{router.REASON_KV_DOWN}"' in line
    )
    assert fallbacks == 6
    outage_logs = [r for r in caplog.records if "Route failed" in r.getMessage()]
    assert len(outage_logs) == 1, [r.getMessage() for r in outage_logs]

    # kvmanager is back (same port): the fleet stream reconnects and Route decides again.
    mesh.kv_server = await start_kvmanager(mesh.fleet, mesh.kv_port)
    mesh.fleet.route_to = "ex-b"
    routes = len(mesh.fleet.routes)

    async def routed_again() -> bool:
        await chat(mesh)
        return len(mesh.fleet.routes) > routes

    await until(routed_again, timeout=15, what="Route to be asked again")
    assert any("answers Route again" in r.getMessage() for r in caplog.records)


async def test_a_hung_kvmanager_costs_one_deadline_a_second(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    mesh.fleet.route_delay = 30.0  # answers nothing in time
    started = time.monotonic()
    for _ in range(4):
        assert (await chat(mesh))[0] == 200
    elapsed = time.monotonic() - started
    # The first request waited Route's deadline, the next ones were routed locally at once.
    assert router.ROUTE_TIMEOUT_S <= elapsed < router.ROUTE_TIMEOUT_S + 2
    assert len(mesh.fleet.routes) == 1


async def test_routing_calls_share_one_stream_and_refusals_keep_it(mesh: FleetMesh) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    mesh.fleet.route_to = "ex-b"
    statuses = await asyncio.gather(*(chat(mesh) for _ in range(4)))
    assert [s for s, _ in statuses] == [200] * 4
    assert served_by(mesh) == {"ex-a": 0, "ex-b": 4, "ex-c": 0}
    # A refusal about one request is its reply: the local choice for it, the stream goes on.
    mesh.fleet.refuse = grpc.StatusCode.INVALID_ARGUMENT
    assert (await chat(mesh))[0] == 200
    mesh.fleet.refuse = None
    mesh.fleet.route_to = "ex-a"
    assert (await chat(mesh))[0] == 200 and served_by(mesh)["ex-a"] >= 1
    assert mesh.fleet.transports == ["stream"] * 6 and mesh.fleet.streams_opened == 1
    metrics = await (await mesh.client.get("/metrics")).text()
    assert 'pagemesh_gateway_routed_requests_total{executor="ex-b",reason="prefix"} 4.0' in metrics
    assert f'reason="{router.REASON_REFUSED}"}} 1.0' in metrics


async def test_a_kvmanager_without_route_stream_gets_unary_calls(
    mesh: FleetMesh, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = mesh.executors["ex-a"], mesh.executors["ex-b"]
    await publish(mesh, a.member(), b.member())
    caplog.set_level(logging.INFO, logger="pagemesh.gateway")
    mesh.fleet.streams = False  # an older kvmanager: RouteStream is UNIMPLEMENTED
    mesh.fleet.route_to = "ex-b"
    for _ in range(3):
        assert (await chat(mesh))[0] == 200
    # Each decided by kvmanager (no local fallback), as unary Route calls.
    assert served_by(mesh) == {"ex-a": 0, "ex-b": 3, "ex-c": 0}
    assert mesh.fleet.transports == ["unary"] * 3
    assert [r.getMessage() for r in caplog.records if "no RouteStream" in r.getMessage()] == [
        "kvmanager has no RouteStream: routing with unary Route calls"
    ]
    assert not [r for r in caplog.records if "Route failed" in r.getMessage()]


async def test_two_models_each_with_its_executors(mesh: FleetMesh) -> None:
    a, b, c = (mesh.executors[e] for e in ("ex-a", "ex-b", "ex-c"))
    await publish(mesh, a.member(), b.member(), c.member())
    resp = await mesh.client.get("/v1/models")
    data = (await resp.json())["data"]
    assert [m["id"] for m in data] == ["smol", "smol-2"]  # each model once, two executors or one
    assert all(m["object"] == "model" and m["max_model_len"] == 256 for m in data)

    status, body = await chat(mesh, model="smol-2")
    assert status == 200 and body["model"] == "smol-2"
    assert served_by(mesh) == {"ex-a": 0, "ex-b": 0, "ex-c": 1}
    assert mesh.fleet.routes[-1].model == "smol-2"

    status, body = await chat(mesh, model="gpt-9")
    assert status == 404
    assert body["error"]["code"] == "model_not_found" and body["error"]["param"] == "model"
    assert body["error"]["type"] == "invalid_request_error"
    assert "smol" in body["error"]["message"]

    health = await (await mesh.client.get("/health")).json()
    assert health["status"] == "ok" and health["models"] == ["smol", "smol-2"]
    assert health["executors"] == {"total": 3, "routable": 3}


async def test_an_executor_moving_to_another_model_or_address(mesh: FleetMesh) -> None:
    a, c = mesh.executors["ex-a"], mesh.executors["ex-c"]
    await publish(mesh, a.member())
    first = mesh.gw.registry.members["ex-a"]
    # Same id, now at ex-c's address serving "smol-2" (a re-registration): a fresh member.
    moved = a.member()
    moved.address, moved.model = c.address, "smol-2"
    await publish(mesh, moved)
    second = mesh.gw.registry.members["ex-a"]
    assert second is not first and second.address == c.address
    assert list(mesh.gw.registry.models) == ["smol-2"]
    assert (await chat(mesh, model="smol-2"))[0] == 200
    assert (await chat(mesh, model="smol"))[0] == 404


async def test_trace_names_the_executor_and_reason(tmp_path: Path, mesh: FleetMesh) -> None:
    a = mesh.executors["ex-a"]
    await publish(mesh, a.member())
    trace = tmp_path / "trace.jsonl"
    config = GatewayConfig(kvmanager=f"127.0.0.1:{mesh.kv_port}", trace_requests=str(trace))
    async with TestClient(TestServer(create_app(config))) as client:
        registry = client.server.app[GATEWAY].registry
        await until(lambda: registry.ready, what="the second gateway to follow the fleet")
        body = {"model": "smol", "messages": [{"role": "user", "content": "q"}]}
        resp = await client.post("/v1/chat/completions", json=body)
        assert resp.status == 200
    [line] = trace.read_text().splitlines()
    record = json.loads(line)
    assert record["executor"] == "ex-a" and record["route_reason"] == "prefix"
    # The line is found by the id the response carried back (ttft_breakdown joins on it).
    assert record["http_id"] == resp.headers["X-Request-Id"]
    assert record["encoded"] <= record["routed"] <= record["submitted"]


def test_cli_modes_and_policies() -> None:
    assert cli.ROUTING_POLICIES == router.POLICIES
    parser = _parser()
    args = parser.parse_args(["gateway", "--kvmanager", "kv:50051"])
    assert cli._executors(args) == [] and args.routing_policy == "kv"
    args = parser.parse_args(["gateway", "--kvmanager", "kv:50051", "--executor", "e1:1"])
    assert cli._executors(args) == ["e1:1"]  # both flags: the static mode of before
    args = parser.parse_args(["gateway", "--executor", "e1:1,e2:2", "--executor", "e3:3"])
    assert cli._executors(args) == ["e1:1", "e2:2", "e3:3"]
    assert cli._executors(parser.parse_args(["gateway"])) == [cli.DEFAULT_EXECUTOR]
    args = parser.parse_args(["gateway", "--routing-policy", "round_robin"])
    assert args.routing_policy == "round_robin"
    with pytest.raises(SystemExit):
        parser.parse_args(["gateway", "--routing-policy", "random"])
    assert GatewayConfig(kvmanager="kv:1").fleet_mode
    assert not GatewayConfig(executors=["e:1"], kvmanager="kv:1").fleet_mode


def _parser() -> Any:
    import argparse

    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    return parser
