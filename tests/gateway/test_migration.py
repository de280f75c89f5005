"""Request migration and the errors a client sees, in the gateway's fleet mode: executors are the
real executor gRPC service around a scripted engine that continues a migrated request where its
prompt leaves off (as a greedy model does), kvmanager's Fleet service the double of
test_fleet.py. An executor "dies" by freezing its engine and stopping its server: its Serve
streams break under the requests, as a kill does."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import packed_ids
from pagemesh.services.executor.server import serve
from pagemesh.services.gateway.app import GATEWAY, Gateway, GatewayConfig, create_app
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.gateway.errors import client_safe
from pagemesh.services.gateway.migration import MigrationPolicy, continuation

from pagemesh.redis_process import free_port
from tests.gateway.scripted_engine import ScriptedEngine
from tests.gateway.test_fleet import FakeFleet, publish, start_kvmanager, until

# Long enough that a stream is cut well before its end.
ANSWER = " ".join(f"Station {i} is on the line to Dover." for i in range(8))
# What an executor's error may say (kvmanager's address, gRPC's words): never a client's to see.
INTERNAL = (
    "engine step failed: <AioRpcError of RPC that terminated with: status ="
    ' StatusCode.UNAVAILABLE details = "failed to connect to all addresses; last error: UNKNOWN:'
    ' ipv4:127.0.0.1:50051: Failed to connect to remote host: Connection refused"'
    ' debug_error_string = "UNKNOWN:Error received from peer">'
)
LEAKS = ("127.0.0.1", "ipv4", "StatusCode", "debug_error_string", "Traceback", "AioRpcError")


class Frozen(ScriptedEngine):
    """A scripted engine that can stop stepping at once, as a killed process does."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.frozen = False

    async def step(self) -> list[Any]:
        while self.frozen:
            await asyncio.sleep(3600)
        return await super().step()


@dataclass
class Node:
    executor_id: str
    port: int
    info: pb.ExecutorInfo
    engine: Frozen
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def member(self) -> Any:
        from pagemesh.proto import fleet_pb2 as fleet_pb

        return fleet_pb.FleetMember(
            executor_id=self.executor_id, address=self.address, model="smol", epoch=1, live=True
        )


@dataclass
class World:
    client: TestClient
    gw: Gateway
    fleet: FakeFleet
    nodes: dict[str, Node]
    answer_ids: list[int]
    eos: int

    def start(self, node: Node, engine: Frozen | None = None) -> None:
        node.engine = engine or node.engine
        node.stop = asyncio.Event()
        node.task = asyncio.create_task(
            serve(node.engine, node.info, "127.0.0.1", node.port, node.stop)
        )

    async def kill(self, executor_id: str) -> None:
        """The engine stops at once; the server goes (its streams break after its grace)."""
        node = self.nodes[executor_id]
        node.engine.frozen = True
        node.stop.set()
        assert node.task is not None
        with contextlib.suppress(asyncio.CancelledError):
            await node.task

    def fresh_engine(self) -> Frozen:
        return Frozen(self.answer_ids, self.eos, step_delay=0.02, resume=True)

    @property
    def url(self) -> str:
        return str(self.client.make_url("/v1"))


@contextlib.asynccontextmanager
async def make_world(
    tokenizer: Tokenizer, smollm2_path: Path, policy: MigrationPolicy, executors: int = 2
) -> AsyncIterator[World]:
    eos = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    answer_ids = tokenizer.encode(ANSWER)
    nodes = {}
    for k in range(executors):
        executor_id = f"ex-{'abc'[k]}"
        info = pb.ExecutorInfo(
            executor_id=executor_id,
            model="smol",
            model_path=str(smollm2_path),
            block_size=16,
            num_blocks=64,
            max_model_len=512,
            vocab_size=len(tokenizer.hf),
            max_beam_width=4,
        )
        engine = Frozen(answer_ids, eos, step_delay=0.02, resume=True)
        nodes[executor_id] = Node(executor_id, free_port(), info, engine)
    fleet = FakeFleet()
    kv_port = free_port()
    kv_server = await start_kvmanager(fleet, kv_port)
    config = GatewayConfig(kvmanager=f"127.0.0.1:{kv_port}", migration=policy)
    async with TestClient(TestServer(create_app(config))) as client:
        world = World(client, client.server.app[GATEWAY], fleet, nodes, answer_ids, eos)
        for node in nodes.values():
            world.start(node)
        await publish_all(world)
        yield world
        for node in nodes.values():
            node.engine.frozen = False
            node.stop.set()
        for node in nodes.values():
            if node.task is not None:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await node.task
    await kv_server.stop(None)


async def publish_all(world: World) -> None:
    # publish() of test_fleet takes its Executor objects; these have the same member().
    await publish(world, *(n.member() for n in world.nodes.values()))  # type: ignore[arg-type]


@pytest.fixture
async def world(tokenizer: Tokenizer, smollm2_path: Path) -> AsyncIterator[World]:
    async with make_world(tokenizer, smollm2_path, MigrationPolicy(limit=3, wait_s=20)) as w:
        yield w


def body(stream: bool = True, **extra: Any) -> dict[str, Any]:
    b: dict[str, Any] = {
        "model": "smol",
        "messages": [{"role": "user", "content": "Which stations?"}],
        "stream": stream,
        "logprobs": True,
    }
    if stream:
        b["stream_options"] = {"include_usage": True}
    b.update(extra)
    return b


@dataclass
class Read:
    status: int
    headers: dict[str, str]
    text: str = ""
    usage: dict[str, Any] | None = None
    logprobs: int = 0
    finish: str | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    raw: bytes = b""


async def stream(world: World, payload: dict[str, Any], on_chunk: Any = None) -> Read:
    """Reads a response to its end with httpx (a truncated chunked body raises there)."""
    async with (
        httpx2.AsyncClient(timeout=60) as http,
        http.stream("POST", world.url + "/chat/completions", json=payload) as resp,
    ):
        read = Read(resp.status_code, dict(resp.headers))
        chunks = 0
        async for line in resp.aiter_lines():
            read.raw += line.encode() + b"\n"
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                read.done = True
                continue
            event = json.loads(data)
            if "error" in event:
                read.error = event["error"]
                continue
            read.usage = event.get("usage") or read.usage
            for choice in event.get("choices") or []:
                delta = choice.get("delta") or {}
                read.text += delta.get("content") or ""
                read.logprobs += len((choice.get("logprobs") or {}).get("content") or [])
                read.finish = choice.get("finish_reason") or read.finish
                chunks += 1
                if on_chunk is not None:
                    await on_chunk(chunks)
        return read


async def post(world: World, payload: dict[str, Any]) -> tuple[int, Any, Any]:
    resp = await world.client.post("/v1/chat/completions", json=payload)
    return resp.status, resp.headers, await resp.json()


def assert_clean(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, (leak, text)


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


async def metrics(world: World) -> str:
    return await (await world.client.get("/metrics")).text()


def test_continuation_appends_the_tokens_and_leaves_the_rest() -> None:
    original = pb.GenerateRequest(
        request_id="r",
        prompt_token_data=packed_ids.pack([5, 6, 7]),
        params=pb.SamplingParams(max_tokens=10, temperature=0.5, seed=3, logprobs=2),
        cache_salt="t",
    )
    resumed = continuation(original, [5, 6, 7], [8, 9], "r.m1")
    assert packed_ids.unpack(resumed.prompt_token_data).tolist() == [5, 6, 7, 8, 9]
    assert resumed.params.max_tokens == 8 and resumed.request_id == "r.m1"
    assert (resumed.params.temperature, resumed.params.seed, resumed.cache_salt) == (0.5, 3, "t")
    assert resumed.params.logprobs == 2
    # The seeded stream goes on at the token after the two made (and after a second seam, the
    # original's count again: each continuation is built from the original with every token).
    assert resumed.params.seed_position == 2
    again = continuation(original, [5, 6, 7], [8, 9, 10, 11, 12], "r.m2")
    assert again.params.seed_position == 5 and again.params.max_tokens == 5
    whole = continuation(original, [5, 6, 7], [], "r.m1")
    assert whole.prompt_token_data == original.prompt_token_data and whole.params.max_tokens == 10
    assert whole.params.seed_position == 0


def test_client_safe_keeps_plain_refusals_only() -> None:
    plain = "prompt (600 tokens) + max_tokens (10) exceeds the context length 512"
    assert client_safe(plain, "x") == plain
    assert client_safe(INTERNAL, "fallback") == "fallback"
    assert client_safe("see ipv6:[::1]:50051", "fallback") == "fallback"


async def test_a_stream_broken_mid_way_goes_on_elsewhere_unbroken(world: World) -> None:
    baseline = await stream(world, body())
    assert baseline.text == ANSWER and baseline.done and baseline.finish == "stop"
    world.fleet.route_to = "ex-a"
    before = len(world.fleet.routes)

    async def kill_after_a_few(chunks: int) -> None:
        if chunks == 6:
            world.fleet.route_to = None
            killing.append(asyncio.create_task(world.kill("ex-a")))

    killing: list[asyncio.Task[None]] = []
    read = await stream(world, body(), kill_after_a_few)
    # One unbroken stream, the uninterrupted run's text, usage and logprobs.
    assert read.status == 200 and read.error is None and read.done, read.raw[-300:]
    assert read.text == ANSWER and read.finish == "stop"
    assert read.usage is not None and baseline.usage is not None
    assert read.usage["prompt_tokens"] == baseline.usage["prompt_tokens"]
    assert read.usage["completion_tokens"] == baseline.usage["completion_tokens"]
    assert read.logprobs == baseline.logprobs
    # ex-b got the continuation: the original prompt plus what had come back, routed without
    # ex-a, with the max_tokens left.
    [(rid, prompt)] = [
        (r, p) for r, p in world.nodes["ex-b"].engine.prompts.items() if r.endswith(".m1")
    ]
    [original] = [p for r, p in world.nodes["ex-a"].engine.prompts.items() if r == rid[:-3]]
    made = prompt[len(original) :]
    assert 4 <= len(made) < len(world.answer_ids) and made == world.answer_ids[: len(made)]
    params = world.nodes["ex-b"].engine.params[rid]
    assert params.max_tokens == world.nodes["ex-a"].engine.params[rid[:-3]].max_tokens - len(made)
    assert list(world.fleet.routes[before + 1].exclude) == ["ex-a"]
    text = await metrics(world)
    assert metric(text, 'pagemesh_gateway_migrations_total{reason="executor_lost"}') == 1


async def test_a_lone_executor_restarting_takes_its_requests_back(
    tokenizer: Tokenizer, smollm2_path: Path
) -> None:
    async with make_world(tokenizer, smollm2_path, MigrationPolicy(3, 30), executors=1) as world:
        baseline = await post(world, body(stream=False))
        node = world.nodes["ex-a"]

        async def restart() -> None:
            await until(lambda: node.engine.live, what="the request to run")
            await asyncio.sleep(0.2)  # some tokens out
            await world.kill("ex-a")
            await asyncio.sleep(1.0)  # down a while: the request waits for it
            world.start(node, world.fresh_engine())

        restarting = asyncio.create_task(restart())
        status, headers, answer = await post(world, body(stream=False))
        await restarting
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"] == ANSWER
        assert answer["usage"] == baseline[2]["usage"]
        assert len(answer["choices"][0]["logprobs"]["content"]) == len(
            baseline[2]["choices"][0]["logprobs"]["content"]
        )
        assert headers.get("X-Request-Id", "").startswith("req-"), dict(headers)
        [resumed] = node.engine.prompts  # the new engine saw only the continuation
        assert resumed.endswith(".m1")


async def test_a_retryable_error_migrates_and_never_shows(world: World) -> None:
    world.fleet.route_to = "ex-a"
    a = world.nodes["ex-a"].engine

    async def fail_after_a_few(chunks: int) -> None:
        if chunks == 4:
            world.fleet.route_to = None
            a.fail_next, a.fail_retryable = INTERNAL, True

    read = await stream(world, body(), fail_after_a_few)
    assert read.error is None and read.done and read.text == ANSWER, read.raw[-300:]
    assert_clean(read.raw.decode())
    text = await metrics(world)
    assert metric(text, 'pagemesh_gateway_migrations_total{reason="retryable_error"}') == 1


async def test_an_executor_error_is_a_clean_error_with_the_request_id(world: World) -> None:
    a = world.nodes["ex-a"].engine
    world.fleet.route_to = "ex-a"

    async def fail(chunks: int) -> None:
        if chunks == 3:
            a.fail_next, a.fail_retryable = INTERNAL, False

    read = await stream(world, body(), fail)
    assert read.status == 200 and read.done and read.raw.endswith(b"data: [DONE]\n\n")
    assert read.error is not None and read.error["type"] == "server_error"
    assert read.headers["x-request-id"] in read.error["message"]
    assert "retry" in read.error["message"]
    assert_clean(read.raw.decode())
    # Non-streaming: a 500 with the same kind of body, never the executor's words.
    a.fail_next = INTERNAL
    resp = await world.client.post(
        "/v1/chat/completions", json=body(stream=False), headers={"X-Request-Id": "mine-42"}
    )
    payload = await resp.json()
    assert resp.status == 500 and resp.headers["X-Request-Id"] == "mine-42"
    assert "mine-42" in payload["error"]["message"]
    assert_clean(json.dumps(payload))


async def test_past_the_migration_limit_the_stream_ends_cleanly(
    tokenizer: Tokenizer, smollm2_path: Path
) -> None:
    async with make_world(tokenizer, smollm2_path, MigrationPolicy(1, 10)) as world:
        world.fleet.route_to = "ex-a"
        kills: list[asyncio.Task[None]] = []

        async def break_twice(chunks: int) -> None:
            # Both executors die under it in turn: its stream breaks past the limit of 1.
            if chunks == 3:
                world.fleet.route_to = None
                kills.append(asyncio.create_task(world.kill("ex-a")))
            elif chunks == 3 + 5 and len(kills) == 1:
                kills.append(asyncio.create_task(world.kill("ex-b")))

        read = await stream(world, body(), break_twice)
        assert len(kills) == 2 and read.done and read.error is not None, read.raw[-300:]
        assert "moved to another executor 1 times" in read.error["message"]
        assert_clean(read.raw.decode())
        text = await metrics(world)
        assert metric(text, 'pagemesh_gateway_migrations_failed_total{reason="limit"}') == 1


async def test_no_executor_left_is_a_503_and_a_clean_stream_end(
    tokenizer: Tokenizer, smollm2_path: Path
) -> None:
    async with make_world(tokenizer, smollm2_path, MigrationPolicy(3, 1.0), executors=1) as world:
        node = world.nodes["ex-a"]

        async def kill_once_running() -> None:
            await until(lambda: node.engine.live, what="the request to run")
            await world.kill("ex-a")

        killing = asyncio.create_task(kill_once_running())
        status, headers, payload = await post(world, body(stream=False))
        await killing
        assert status == 503 and int(headers["Retry-After"]) >= 1, payload
        assert payload["error"]["type"] == "server_error" and "retry" in payload["error"]["message"]
        assert_clean(json.dumps(payload))
        # The official client: its documented class for a 503, with our message.
        world.start(node, world.fresh_engine())
        await until(lambda: world.gw.registry.members["ex-a"].routable, what="ex-a back")
        sdk = openai.AsyncOpenAI(base_url=world.url, api_key="x", max_retries=0)

        kills: list[asyncio.Task[None]] = []

        async def kill_after(chunks: int) -> None:
            if chunks == 3:
                kills.append(asyncio.create_task(world.kill("ex-a")))

        with pytest.raises(openai.APIError) as info:
            got = 0
            async for _ in await sdk.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "Hi"}], stream=True
            ):
                got += 1
                await kill_after(got)
        assert not isinstance(info.value, openai.APIConnectionError)
        assert "retry" in info.value.message
        assert_clean(info.value.message)
        # No executor at all now: the 503 class, and a stream read by httpx to its end.
        with pytest.raises(openai.InternalServerError):
            await sdk.chat.completions.create(
                model="smol", messages=[{"role": "user", "content": "Hi"}]
            )
        read = await stream(world, body())
        assert read.status == 503 and read.error is None
        await sdk.close()


async def test_n_migrates_only_before_its_first_token(world: World) -> None:
    world.fleet.route_to = "ex-a"
    a = world.nodes["ex-a"].engine
    a.fail_next, a.fail_retryable = INTERNAL, True  # at its very first step
    status, _, payload = await post(world, body(stream=False, n=2))
    assert status == 200, payload
    assert [c["message"]["content"] for c in payload["choices"]] == [ANSWER, ANSWER]
    world.fleet.route_to = "ex-a"

    async def fail(chunks: int) -> None:
        if chunks == 6:
            a.fail_next, a.fail_retryable = INTERNAL, True

    read = await stream(world, body(n=2), fail)
    assert read.done and read.error is not None and read.error["type"] == "server_error"
    text = await metrics(world)
    assert metric(text, 'pagemesh_gateway_migrations_failed_total{reason="choices_started"}') == 1


async def test_a_continuation_refused_by_a_smaller_executor_goes_to_another(
    tokenizer: Tokenizer, smollm2_path: Path
) -> None:
    """The request fitted every executor when it came; the one it is moved to has since become
    smaller (its pool): that refusal is not the client's 400, the continuation goes on."""
    async with make_world(tokenizer, smollm2_path, MigrationPolicy(3, 20), executors=3) as world:
        world.nodes["ex-b"].engine.capacity = 64  # refuses anything this long
        world.fleet.route_to = "ex-a"

        async def kill_after_a_few(chunks: int) -> None:
            if chunks == 5:
                world.fleet.route_to = None  # the double then answers ex-b first
                kills.append(asyncio.create_task(world.kill("ex-a")))

        kills: list[asyncio.Task[None]] = []
        read = await stream(world, body(max_tokens=200), kill_after_a_few)
        assert read.error is None and read.done and read.text == ANSWER, read.raw[-300:]
        assert not any(r.endswith(".m1") for r in world.nodes["ex-b"].engine.prompts)
        assert any(r.endswith(".m2") for r in world.nodes["ex-c"].engine.prompts)
        text = await metrics(world)
        assert metric(text, 'pagemesh_gateway_migrations_total{reason="continuation_refused"}') == 1
