"""The fleet over real gRPC on loopback: registration fields, load reports and heartbeats, liveness
(down after the bound, back with the next call), the Fleet service (Route's reasons and error
codes, WatchFleet's snapshots), GetStats, /metrics and `pagemesh kv stats`, and the registration
restored by a kvmanager restart over real Redis."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import grpc
import pytest
import redis.asyncio as aioredis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pagemesh.proto import fleet_pb2 as fpb
from pagemesh.proto import fleet_pb2_grpc as fpb_grpc
from pagemesh.proto import kvmanager_pb2 as pb
from pagemesh.proto.packed_ids import pack
from pagemesh.services.kvmanager import cli
from pagemesh.services.kvmanager.api import CommitEntry, LoadReport, StaleEpoch
from pagemesh.services.kvmanager.client import KVManagerClient
from pagemesh.services.kvmanager.fleet import Fleet
from pagemesh.services.kvmanager.local import LocalAllocator
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.server import FLEET_SERVICE_NAME, KVManagerServer, start_server

C = grpc.StatusCode
BS = 4
PROMPT = list(range(100, 133))  # 33 tokens: 8 full blocks can hit
TIMEOUT = 0.5  # the executor timeout of these servers: liveness tests wait about this long


class Refused(Exception):
    """A routing request answered with an error status (unary) or an error reply (stream)."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


CODES = {c.value[0]: c for c in grpc.StatusCode}


class KV:
    """A kvmanager on loopback, its Fleet stub and the executors' clients. Routing requests go
    as unary Route calls, or as messages on one RouteStream (`transport`)."""

    def __init__(self, server: KVManagerServer) -> None:
        self.server = server
        self.address = f"127.0.0.1:{server.port}"
        self.channel = grpc.aio.insecure_channel(self.address)
        self.stub = fpb_grpc.FleetStub(self.channel)
        self.clients: dict[str, KVManagerClient] = {}
        self.transport = "unary"
        self._stream: grpc.aio.StreamStreamCall | None = None
        self._ids = 0

    async def ask(self, req: fpb.RouteRequest) -> fpb.RouteResponse:
        if self.transport == "unary":
            try:
                return await self.stub.Route(req, timeout=10)
            except grpc.aio.AioRpcError as e:
                raise Refused(e.code(), e.details() or "") from None
        if self._stream is None:
            self._stream = self.stub.RouteStream()
        self._ids += 1
        await self._stream.write(fpb.RouteStreamRequest(id=self._ids, route=req))
        reply = await asyncio.wait_for(self._stream.read(), 10)
        assert reply is not grpc.aio.EOF and reply.id == self._ids
        if reply.HasField("error"):
            raise Refused(CODES[reply.error.code], reply.error.message)
        return reply.route

    async def join(self, eid: str, model: str = "m", **kw: object) -> KVManagerClient:
        c = self.clients.get(eid) or KVManagerClient(self.address, eid, **kw)  # type: ignore[arg-type]
        self.clients[eid] = c
        await c.register(64, BS, "fp", address=f"{eid}.local:7000", model=model, max_model_len=4096)
        return c

    async def route(self, tokens: list[int] = PROMPT, **kw: object) -> fpb.RouteResponse:
        kw.setdefault("model", "m")
        return await self.ask(fpb.RouteRequest(prompt=pack(tokens), **kw))  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._stream is not None:
            self._stream.cancel()
        for c in self.clients.values():
            await c.close()
        await self.channel.close()
        await self.server.stop(0)


@pytest.fixture
async def fleet() -> AsyncIterator[KV]:
    f = KV(await start_server(port=0, metrics_port=0, executor_timeout=TIMEOUT))
    yield f
    await f.close()


async def cache(c: KVManagerClient, tokens: list[int], sid: str = "seed") -> None:
    """Leaves `tokens`' full blocks cached on the client's executor."""
    await c.allocate(sid, tokens)
    n = len(tokens) // BS
    await c.commit([CommitEntry(sid, i, tokens[i * BS : (i + 1) * BS]) for i in range(n)])
    await c.release([sid])


async def until(
    stream: grpc.aio.UnaryStreamCall, ok: Callable[[fpb.FleetSnapshot], bool], limit: float = 15
) -> fpb.FleetSnapshot:
    """Reads snapshots until one satisfies `ok` (liveness pushes may come in between)."""
    deadline = time.monotonic() + limit
    while True:
        snap = await asyncio.wait_for(stream.read(), max(0.01, deadline - time.monotonic()))
        assert snap is not grpc.aio.EOF
        if ok(snap):
            return snap


def silence(server: KVManagerServer, eid: str, seconds: float) -> None:
    """As if `eid` had made no call for `seconds`: the liveness check notes the calls it made
    so far (the hot path only counts them), then its last sign of life moves back."""
    assert server.fleet is not None
    server.fleet.check()
    server.manager.executors[eid].last_seen -= seconds


def members(snap: fpb.FleetSnapshot) -> dict[str, fpb.FleetMember]:
    return {m.executor_id: m for m in snap.members}


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_route_reasons_and_addresses(fleet: KV, transport: str) -> None:
    fleet.transport = transport
    a = await fleet.join("a")
    b = await fleet.join("b")
    await fleet.join("x", model="other")
    await cache(b, PROMPT)
    r = await fleet.route()
    assert (r.executor_id, r.address, r.cached_tokens, r.reason, r.policy) == (
        "b",
        "b.local:7000",
        32,
        "prefix",
        "kv",
    )
    # b is far more loaded than a: the guard sends the request to a.
    await b.step([], [], [], load=LoadReport(running=50))
    await a.step([], [], [], load=LoadReport(running=1))
    r = await fleet.route()
    assert (r.executor_id, r.reason, r.cached_tokens) == ("a", "load", 0)
    r = await fleet.route([9, *PROMPT])
    assert (r.executor_id, r.reason) == ("a", "fallback")
    r = await fleet.route(policy="least_loaded")
    assert (r.executor_id, r.reason, r.policy) == ("a", "least_loaded", "least_loaded")
    picks = [(await fleet.route(policy="round_robin")).executor_id for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]
    r = await fleet.route(model="other", exclude=["a"])
    assert (r.executor_id, r.reason) == ("x", "fallback")
    await b.step([], [], [], load=LoadReport(running=1))
    r = await fleet.route(cache_salt="someone-else")
    assert r.reason == "fallback"  # b's blocks are not this tenant's


@pytest.mark.parametrize("transport", ["unary", "stream"])
async def test_route_errors(fleet: KV, transport: str) -> None:
    """The same codes and messages as a unary Route's status or a RouteStream reply's error;
    the stream goes on after each."""
    fleet.transport = transport
    await fleet.join("a")
    cases = [
        (dict(model=""), C.INVALID_ARGUMENT, "model must not be empty"),
        (dict(prompt=b""), C.INVALID_ARGUMENT, "prompt must not be empty"),
        (dict(prompt=b"\x01\x00\x00\x00\x02"), C.INVALID_ARGUMENT, "multiple of 4"),
        (dict(policy="fastest"), C.INVALID_ARGUMENT, "unknown policy"),
        (dict(model="nobody-serves-this"), C.NOT_FOUND, "no executor serves model"),
        (dict(exclude=["a"]), C.UNAVAILABLE, "is available"),
    ]
    for fields, code, text in cases:
        req = fpb.RouteRequest(model="m", prompt=pack(PROMPT))
        for k, v in fields.items():
            if k == "exclude":
                req.exclude.extend(v)  # type: ignore[arg-type]
            else:
                setattr(req, k, v)
        with pytest.raises(Refused) as e:
            await fleet.ask(req)
        assert e.value.code == code, fields
        assert text in e.value.details, (fields, e.value.details)
        assert "a.local" not in e.value.details  # never an internal address
    # Down: not heard from for longer than the bound.
    silence(fleet.server, "a", 2 * TIMEOUT)
    with pytest.raises(Refused) as e:
        await fleet.route()
    assert e.value.code == C.UNAVAILABLE
    # Bytes that do not parse as a request: INVALID_ARGUMENT (pagemesh/grpc_decode.py); on the
    # stream, it ends the stream (no id to answer).
    if transport == "unary":
        raw = fleet.channel.unary_unary("/pagemesh.v1.Fleet/Route")
        with pytest.raises(grpc.aio.AioRpcError) as e2:
            await raw(b"\xff\xff\xff\xff", timeout=10)
    else:
        stream = fleet.channel.stream_stream("/pagemesh.v1.Fleet/RouteStream")()
        await stream.write(b"\xff\xff\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError) as e2:
            await asyncio.wait_for(stream.read(), 10)
    assert e2.value.code() == C.INVALID_ARGUMENT
    assert fleet.server.router is not None
    assert fleet.server.router.failures == {
        "BadRouteRequest": 4,
        "UnknownModel": 1,
        "NoLiveExecutor": 2,
    }


async def test_route_stream_answers_pipelined_messages_in_order(fleet: KV) -> None:
    """Several requests written before any reply: each answered, in order, under its own id;
    an error reply between them leaves the stream serving."""
    await fleet.join("a")
    b = await fleet.join("b")
    await cache(b, PROMPT)
    stream = fleet.stub.RouteStream()
    good = fpb.RouteRequest(model="m", prompt=pack(PROMPT))
    bad = fpb.RouteRequest(model="nobody-serves-this", prompt=pack(PROMPT))
    for rid, req in ((7, good), (3, bad), (9, good)):
        await stream.write(fpb.RouteStreamRequest(id=rid, route=req))
    replies = [await asyncio.wait_for(stream.read(), 10) for _ in range(3)]
    assert [r.id for r in replies] == [7, 3, 9]
    assert (replies[0].route.executor_id, replies[0].route.cached_tokens) == ("b", 32)
    assert replies[1].WhichOneof("result") == "error"
    assert replies[1].error.code == C.NOT_FOUND.value[0]
    assert replies[2].route.executor_id in ("a", "b")  # the first one's pending load counts
    await stream.done_writing()
    assert await asyncio.wait_for(stream.read(), 10) is grpc.aio.EOF
    assert await stream.code() == C.OK


async def test_watch_fleet_snapshots(fleet: KV) -> None:
    a = await fleet.join("a")
    stream = fleet.stub.WatchFleet(fpb.WatchFleetRequest())
    first = await asyncio.wait_for(stream.read(), 10)
    m = members(first)["a"]
    assert (m.address, m.model, m.epoch, m.num_blocks, m.block_size, m.max_model_len, m.live) == (
        "a.local:7000",
        "m",
        1,
        64,
        BS,
        4096,
        True,
    )
    assert m.load.free_blocks == 64
    # A registration is pushed at once, a new epoch too.
    b = await fleet.join("b", model="m2")
    snap = await until(stream, lambda s: "b" in members(s))
    assert members(snap)["b"].model == "m2"
    await fleet.join("a")
    await until(stream, lambda s: members(s)["a"].epoch == 2)
    # Silence past the bound: down, pushed by the background check; a heartbeat brings it back.
    t0 = time.monotonic()
    await until(stream, lambda s: not members(s)["a"].live and not members(s)["b"].live)
    assert time.monotonic() - t0 >= TIMEOUT * 0.5
    await a.step([], [], [], load=LoadReport(running=3, waiting=2, queued_prompt_tokens=700))
    snap = await until(stream, lambda s: members(s)["a"].live)
    load = members(snap)["a"].load
    assert (load.running, load.waiting, load.queued_prompt_tokens) == (3, 2, 700)
    assert not members(snap)["b"].live
    await b.allocate("s", [1, 2, 3])  # any call is a sign of life
    await until(stream, lambda s: members(s)["b"].live)
    stream.cancel()


async def test_heartbeats_load_and_last_seen(fleet: KV) -> None:
    """A Step with only a load is a heartbeat; every call (Session and unary) is a sign of
    life; a report from a replaced epoch comes back as load_error (StaleEpoch)."""
    m = fleet.server.manager
    live = fleet.server.fleet
    assert live is not None
    a = await fleet.join("a")
    u = await fleet.join("u", use_session=False)
    for c in (a, u):
        eid = c.executor_id
        ex = m.executors[eid]
        silence(fleet.server, eid, 100)
        assert not live.is_live(ex) and live.idle_for(ex) >= 100
        r = await c.step([], [], [], load=LoadReport(running=4, waiting=1))
        assert r.load_error is None and r.extend is None
        assert live.is_live(ex) and live.idle_for(ex) == 0
        assert (ex.load.running, ex.load.waiting, ex.load.reports) == (4, 1, 1)
        live.check()
        assert time.monotonic() - ex.last_seen < 5
        silence(fleet.server, eid, 100)
        await c.allocate("s", [1, 2, 3])
        assert live.is_live(ex)
    # Load rides along with the step's other parts, without changing their results.
    r = await a.step([], ["s"], [], load=LoadReport(queued_prompt_tokens=64))
    assert r.num_released == 1 and m.executors["a"].load.queued_prompt_tokens == 64
    # The executor restarted elsewhere (a new epoch): the old process's report is refused.
    other = KVManagerClient(fleet.address, "a")
    await other.register(64, BS, "fp", model="m")
    r = await a.step([], [], [], load=LoadReport(running=9))
    assert isinstance(r.load_error, StaleEpoch)
    assert m.executors["a"].load.running == 0
    await other.close()
    # kvmanager lost the executor (no Redis, restarted): the heartbeat says so.
    r = await LocalAllocator("nobody", Manager()).step([], [], [], load=LoadReport())
    assert isinstance(r.load_error, StaleEpoch)


async def test_down_after_the_bound_and_back_with_the_next_call() -> None:
    """The liveness check on the real core with a short bound: silence past it is down (the
    watchers are woken), the next call is live at once (and woken again)."""
    m = Manager()
    f = Fleet(m, timeout=0.2)
    m.register("a", 8, BS, "fp", model="m")
    ex = m.executors["a"]
    woken = f.watch()
    assert f.check() and woken.is_set()  # the registration
    woken.clear()
    await asyncio.sleep(0.15)
    m.report_load("a", 1, 1, 0, 0)  # a call within the bound
    await asyncio.sleep(0.1)
    assert f.is_live(ex) and not f.check() and not woken.is_set()
    await asyncio.sleep(0.25)
    assert not f.is_live(ex)
    assert f.check() and woken.is_set()
    woken.clear()
    m.allocate("a", 1, "s", [1, 2])  # any call naming it and its epoch
    assert f.is_live(ex) and f.idle_for(ex) == 0
    assert f.check() and woken.is_set()
    m.register("a", 8, BS, "fp", model="m")  # a new epoch
    woken.clear()
    assert f.check() and woken.is_set()
    f.unwatch(woken)


async def test_local_allocator_takes_loads_and_registration() -> None:
    m = Manager()
    a = LocalAllocator("a", m)
    await a.register(16, BS, "fp", address="h:1", model="m", max_model_len=512)
    ex = m.executors["a"]
    assert (ex.address, ex.model, ex.max_model_len) == ("h:1", "m", 512)
    r = await a.step([], [], [], load=LoadReport(running=2, waiting=3, queued_prompt_tokens=5))
    assert r.load_error is None
    assert (ex.load.running, ex.load.waiting, ex.load.queued_prompt_tokens) == (2, 3, 5)
    r = await a.step([], [], [], load=LoadReport(running=-1))
    assert r.load_error is not None and "must be >= 0" in str(r.load_error)


async def test_stats_metrics_and_cli_show_the_fleet(fleet: KV, capsys) -> None:
    a = await fleet.join("a")
    b = await fleet.join("b")
    await cache(b, PROMPT)
    await a.step([], [], [], load=LoadReport(running=2))
    assert (await fleet.route()).reason == "prefix"
    assert (await fleet.route(policy="round_robin")).executor_id == "a"
    silence(fleet.server, "a", 2 * TIMEOUT)
    st = await b.get_stats(all_executors=True)
    ex = {e.executor_id: e for e in st.executors}
    assert (ex["a"].address, ex["a"].model, ex["a"].max_model_len) == ("a.local:7000", "m", 4096)
    assert not ex["a"].live and ex["a"].seconds_since_seen >= TIMEOUT
    assert ex["b"].live and ex["b"].epoch == 1
    assert ex["a"].load.running == 2 and ex["a"].load.waiting == 1  # one routed since
    assert [(c.policy, c.reason, c.count) for c in ex["b"].routed] == [("kv", "prefix", 1)]
    assert [(c.policy, c.reason, c.count) for c in ex["a"].routed] == [
        ("round_robin", "round_robin", 1)
    ]

    args = argparse.Namespace(address=fleet.address, executor="", json=False, watch=None)
    assert await cli._stats(args) == 0
    out = capsys.readouterr().out
    rows: dict[str, str] = {}
    for ln in out.splitlines():  # the fleet table comes first
        if ln.startswith(("a ", "b ")):
            rows.setdefault(ln.split()[0], ln)
    assert "a.local:7000" in rows["a"] and "DOWN" in rows["a"] and "round_robin 1" in rows["a"]
    assert "b.local:7000" in rows["b"] and " yes " in rows["b"] and "prefix 1" in rows["b"]
    assert "fleet: 2 executor(s), 1 live, 2 requests routed" in out
    assert "prefix-cache hit rate" in out
    args.json = True
    assert await cli._stats(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert {e["executor_id"]: e["live"] for e in d["executors"]} == {"a": False, "b": True}

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{fleet.server.metrics_port}/metrics") as resp,
    ):
        text = await resp.text()
    for line in (
        'pagemesh_kv_routed_requests_total{executor="b",policy="kv",reason="prefix"} 1.0',
        'pagemesh_kv_routed_requests_total{executor="a",policy="round_robin",reason="round_robin"} 1.0',
        'pagemesh_kv_executor_live{executor="a"} 0.0',
        'pagemesh_kv_executor_live{executor="b"} 1.0',
        'pagemesh_kv_executor_info{address="a.local:7000",executor="a",model="m"} 1.0',
        'pagemesh_kv_executor_sequences{executor="a",state="running"} 2.0',
        'pagemesh_kv_executor_load{executor="a"}',
    ):
        assert line in text, line


async def test_fleet_health_and_reflection(fleet: KV) -> None:
    health = health_pb2_grpc.HealthStub(fleet.channel)
    r = await health.Check(health_pb2.HealthCheckRequest(service=FLEET_SERVICE_NAME), timeout=10)
    assert FLEET_SERVICE_NAME == "pagemesh.v1.Fleet"
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(fleet.channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for reply in refl.ServerReflectionInfo(ask()):
        names = {s.name for s in reply.list_services_response.service}
        assert FLEET_SERVICE_NAME in names and "pagemesh.v1.KVManager" in names
        break


async def test_registration_survives_a_restart(redis_url: str) -> None:
    """address, model and max_model_len are kept in Redis with the pool and come back with a
    restarted kvmanager, which routes to the executor at once (a restore counts as a call:
    the executor has one timeout to show up)."""
    server = await start_server(port=0, redis_url=redis_url, executor_timeout=TIMEOUT)
    f = KV(server)
    c = await f.join("a")
    await cache(c, PROMPT)
    await f.join("b", model="m2")
    assert server.persistence is not None
    await server.persistence.wait_flushed()
    snap_before = server.manager.snapshot()
    await f.close()

    server = await start_server(port=0, redis_url=redis_url, executor_timeout=TIMEOUT)
    f = KV(server)
    try:
        assert server.manager.snapshot() == snap_before
        ex = server.manager.executors["a"]
        assert (ex.address, ex.model, ex.max_model_len, ex.epoch) == (
            "a.local:7000",
            "m",
            4096,
            1,
        )
        r = await f.route()
        assert (r.executor_id, r.address, r.reason, r.cached_tokens) == (
            "a",
            "a.local:7000",
            "prefix",
            32,
        )
        stream = f.stub.WatchFleet(fpb.WatchFleetRequest())
        snap = await asyncio.wait_for(stream.read(), 10)
        assert {(m.executor_id, m.model, m.live) for m in snap.members} == {
            ("a", "m", True),
            ("b", "m2", True),
        }
        # Nobody calls: both go down after the bound.
        await until(stream, lambda s: not any(m.live for m in s.members))
        stream.cancel()
        # A new epoch drops the old one's entries and takes the new registration.
        c = KVManagerClient(f.address, "a")
        f.clients["a"] = c
        await c.register(32, BS, "fp", address="a2.local:7001", model="m")
        r = await f.route()
        assert (r.address, r.reason) == ("a2.local:7001", "fallback")
    finally:
        await f.close()


async def test_records_from_before_the_fleet_restore_with_empty_fields(redis_url: str) -> None:
    """An executor record written before registrations had address/model/max_model_len."""
    server = await start_server(port=0, redis_url=redis_url)
    c = KVManagerClient(f"127.0.0.1:{server.port}", "old")
    await c.register(8, BS, "fp")
    await c.close()
    await server.stop()
    r = aioredis.from_url(redis_url)
    raw = json.loads(await r.hget("pagemesh:kv:executors", "old"))
    for k in ("address", "model", "max_model_len"):
        del raw[k]
    await r.hset("pagemesh:kv:executors", "old", json.dumps(raw))
    await r.aclose()
    server = await start_server(port=0, redis_url=redis_url)
    try:
        ex = server.manager.executors["old"]
        assert (ex.epoch, ex.num_blocks, ex.address, ex.model, ex.max_model_len) == (
            1,
            8,
            "",
            "",
            0,
        )
    finally:
        await server.stop()


def test_executor_timeout_option() -> None:
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    assert parser.parse_args(["kvmanager"]).executor_timeout == 10.0
    assert parser.parse_args(["kvmanager", "--executor-timeout", "2.5"]).executor_timeout == 2.5


def test_register_request_fields() -> None:
    """The registration's new fields are plain optional fields: an old executor's request
    (without them) still parses, as an executor with no model (never routed to)."""
    old = pb.RegisterExecutorRequest(executor_id="e", num_blocks=1, block_size=1)
    new = pb.RegisterExecutorRequest.FromString(old.SerializeToString())
    assert (new.address, new.model, new.max_model_len) == ("", "", 0)
