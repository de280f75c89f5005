"""The gRPC surface over real loopback: status codes with clear messages and no state change,
the columnar and packed message forms, health, reflection, GetStats, /metrics and
`pagemesh kv stats`."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pagemesh.proto import kvmanager_pb2 as pb
from pagemesh.proto import kvmanager_pb2_grpc as pb_grpc
from pagemesh.proto.packed_ids import pack
from pagemesh.services.kvmanager import cli
from pagemesh.services.kvmanager.api import InvalidRequest
from pagemesh.services.kvmanager.server import SERVICE_NAME, start_server
from pagemesh.services.kvmanager.wire import decode_extend

from tests.kvmanager.test_persistence import ROOT

C = grpc.StatusCode


@pytest.fixture
async def served():
    server = await start_server(port=0, metrics_port=0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    stub = pb_grpc.KVManagerStub(channel)
    epoch = (
        await stub.RegisterExecutor(
            pb.RegisterExecutorRequest(
                executor_id="ex", num_blocks=8, block_size=4, model_fingerprint="fp"
            )
        )
    ).epoch
    yield server, stub, epoch
    await channel.close()
    await server.stop(0)


BAD = [
    ("Allocate", dict(seq_id="s", token_data=pack([1])), C.INVALID_ARGUMENT, "already exists"),
    ("Allocate", dict(seq_id="n", token_data=b""), C.INVALID_ARGUMENT, "must not be empty"),
    ("Allocate", dict(seq_id="n", token_data=pack([1] * 33)), C.OUT_OF_RANGE, "pool has only 8"),
    ("Allocate", dict(seq_id="n", token_data=pack([1] * 28)), C.RESOURCE_EXHAUSTED, "free or evictable"),
    ("Allocate", dict(seq_id="n", token_data=pack([1]), epoch_delta=1), C.FAILED_PRECONDITION, "stale"),
    ("Allocate", dict(seq_id="n", token_data=pack([1]), executor_id="zz"), C.FAILED_PRECONDITION, "not registered"),
    ("Allocate", dict(seq_id="n", token_data=b"\x01\x00\x00"), C.INVALID_ARGUMENT, "multiple of 4"),
    ("Extend", dict(seq_ids=["nope"], num_computed_tokens=[0], num_tokens=[1]), C.NOT_FOUND, "unknown sequence"),
    ("Extend", dict(seq_ids=["s"], num_computed_tokens=[0], num_tokens=[]), C.INVALID_ARGUMENT, "differ in length"),
    ("Extend", dict(seq_ids=["s"], num_computed_tokens=[5], num_tokens=[32]), C.RESOURCE_EXHAUSTED, "free or evictable"),
    ("Commit", dict(seq_ids=["s"], block_indices=[0], token_ids=[1, 2]), C.INVALID_ARGUMENT, "block_size token ids"),
    ("Commit", dict(seq_ids=["s"], block_indices=[0, 1], token_ids=[1] * 4), C.INVALID_ARGUMENT, "block_size token ids"),
    ("Commit", dict(seq_ids=["s"], block_indices=[5], token_ids=[1] * 4), C.INVALID_ARGUMENT, "beyond its table"),
    ("Commit", dict(seq_ids=["s"], block_indices=[1], token_ids=[1] * 4), C.INVALID_ARGUMENT, "commit in order"),
    ("Commit", dict(seq_ids=["x"], block_indices=[0], token_ids=[1] * 4), C.NOT_FOUND, "unknown sequence"),
    ("Commit", dict(seq_ids=["s"], block_indices=[0], token_ids=[1] * 4, epoch_delta=1), C.FAILED_PRECONDITION, "stale"),
    ("Fork", dict(parent_seq_id="x", child_seq_ids=["c"], num_tokens=1), C.NOT_FOUND, "unknown parent"),
    ("Fork", dict(parent_seq_id="s", child_seq_ids=["c"], num_tokens=99), C.INVALID_ARGUMENT, "holds"),
    ("Release", dict(seq_ids=["x"]), C.NOT_FOUND, "already released"),
    ("Release", dict(seq_ids=["s", "s"]), C.INVALID_ARGUMENT, "twice"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "fields", "code", "text"), BAD, ids=[f"{b[0]}-{b[3]}" for b in BAD]
)
async def test_bad_input_status_codes(served, method, fields, code, text) -> None:
    server, stub, epoch = served
    for sid, toks in (("s", [1, 2, 3, 4, 5]), ("t", [9] * 4)):  # 3 of 8 blocks in use
        await stub.Allocate(
            pb.AllocateRequest(executor_id="ex", epoch=epoch, seq_id=sid, token_data=pack(toks))
        )
    before = server.manager.snapshot()
    fields = dict(fields)
    req_epoch = epoch + fields.pop("epoch_delta", 0)
    fields.setdefault("executor_id", "ex")
    req = getattr(pb, f"{method}Request")(epoch=req_epoch, **fields)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await getattr(stub, method)(req)
    assert e.value.code() == code
    assert text in e.value.details()
    assert server.manager.snapshot() == before


async def test_extend_columns_in_and_out(served) -> None:
    """Extend's columns: a copy-on-write (a forked child writing into the shared partial block)
    and plain growth, read back through the client's decoder."""
    server, stub, epoch = served
    for s in ("a", "b"):
        await stub.Allocate(
            pb.AllocateRequest(executor_id="ex", epoch=epoch, seq_id=s, token_data=pack([1, 2, 3]))
        )
    await stub.Fork(
        pb.ForkRequest(
            executor_id="ex", epoch=epoch, parent_seq_id="a", child_seq_ids=["c"], num_tokens=3
        )
    )
    r1 = await stub.Extend(
        pb.ExtendRequest(
            executor_id="ex", epoch=epoch, seq_ids=["c"], num_computed_tokens=[3], num_tokens=[6]
        )
    )
    r2 = await stub.Extend(
        pb.ExtendRequest(
            executor_id="ex",
            epoch=epoch,
            seq_ids=["a", "b"],
            num_computed_tokens=[3, 3],
            num_tokens=[5, 4],
        )
    )
    assert list(r1.updated_seq_ids) == ["c"] and list(r1.update_counts) == [2]
    assert len(r1.copy_src) == len(r1.copy_dst) == 1
    assert list(r2.updated_seq_ids) == ["a"] and not r2.copy_src  # "b" still fits its block
    d1, d2 = decode_extend(r1), decode_extend(r2)
    assert d1.updates["c"].first_index == 0 and len(d1.updates["c"].block_ids) == 2
    assert len(d1.copies) == 1
    assert d1.copies[0] == (
        server.manager.executors["ex"].seqs["a"].blocks[0],
        d1.updates["c"].block_ids[0],
    )
    assert list(d2.updates) == ["a"] and d2.updates["a"].first_index == 1 and d2.copies == []
    server.manager.check()


async def test_a_dropped_message_form_changes_nothing(served) -> None:
    """What an old client's second forms (now reserved field numbers) get: an Allocate whose
    prompt came as repeated ids has no prompt (refused as empty), and Extend or Commit entries
    as one message each are unknown fields, so those calls apply nothing."""
    server, stub, epoch = served

    def field(number: int, wire_type: int, payload: bytes) -> bytes:
        assert number < 16  # one-byte tag
        tag = bytes([number << 3 | wire_type])
        return tag + (bytes([len(payload)]) + payload if wire_type == 2 else payload)

    await stub.Allocate(
        pb.AllocateRequest(
            executor_id="ex", epoch=epoch, seq_id="s", token_data=pack([1, 2, 3, 4, 5])
        )
    )
    before = server.manager.snapshot()
    ids = field(4, 2, bytes([1, 2, 3]))  # AllocateRequest.token_ids = [1, 2, 3], packed
    old_alloc = pb.AllocateRequest(executor_id="ex", epoch=epoch, seq_id="n")
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.Allocate(pb.AllocateRequest.FromString(old_alloc.SerializeToString() + ids))
    assert e.value.code() == C.INVALID_ARGUMENT and "must not be empty" in e.value.details()
    # ExtendRequest.entries / CommitRequest.entries: one entry {seq_id "s", 4, 8} / {"s", 0, ids}
    entry = field(1, 2, b"s") + field(2, 0, bytes([4])) + field(3, 0, bytes([8]))
    old_extend = pb.ExtendRequest(executor_id="ex", epoch=epoch).SerializeToString()
    r = await stub.Extend(pb.ExtendRequest.FromString(old_extend + field(3, 2, entry)))
    assert not r.updated_seq_ids
    entry = field(1, 2, b"s") + field(2, 0, bytes([0])) + field(3, 2, bytes([1, 2, 3, 4]))
    old_commit = pb.CommitRequest(executor_id="ex", epoch=epoch).SerializeToString()
    r = await stub.Commit(pb.CommitRequest.FromString(old_commit + field(3, 2, entry)))
    assert r.num_published == 0
    assert server.manager.snapshot() == before


async def test_health_and_reflection(served) -> None:
    server, _, _ = served
    ch = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    h = health_pb2_grpc.HealthStub(ch)
    for name in ("", SERVICE_NAME):
        r = await h.Check(health_pb2.HealthCheckRequest(service=name))
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    responses = refl.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for resp in responses:
        names = {s.name for s in resp.list_services_response.service}
        break
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names
    await ch.close()


async def _workload(stub, epoch) -> None:
    toks = list(range(9))
    await stub.Allocate(
        pb.AllocateRequest(
            executor_id="ex", epoch=epoch, seq_id="a", token_data=pack(toks), cache_salt="t"
        )
    )
    await stub.Commit(
        pb.CommitRequest(
            executor_id="ex",
            epoch=epoch,
            seq_ids=["a", "a"],
            block_indices=[0, 1],
            token_ids=toks[:8],
        )
    )
    r = await stub.Allocate(
        pb.AllocateRequest(
            executor_id="ex", epoch=epoch, seq_id="b", token_data=pack(toks), cache_salt="t"
        )
    )
    assert r.num_cached_tokens == 8
    m = await stub.Match(pb.MatchRequest(token_ids=toks, cache_salt="t"))
    assert [(x.executor_id, x.num_cached_tokens) for x in m.matches] == [("ex", 8)]


async def test_get_stats_metrics_and_cli(served, capsys) -> None:
    server, stub, epoch = served
    await _workload(stub, epoch)
    st = await stub.GetStats(pb.GetStatsRequest())
    (ex,) = st.executors
    assert (ex.executor_id, ex.epoch, ex.pool.num_blocks, ex.pool.live_sequences) == (
        "ex",
        epoch,
        8,
        2,
    )
    assert ex.pool.free + ex.pool.in_use + ex.pool.cached == 8
    since = {w.name: w.hits for w in st.windows}
    assert set(since) == {"since_start", "last_1000_requests", "last_60s"}
    h = since["since_start"]
    assert (h.query_tokens, h.hit_tokens, h.query_requests, h.hit_requests) == (18, 8, 2, 1)
    assert h.token_hit_rate == pytest.approx(8 / 18) and h.request_hit_rate == 0.5
    (tenant,) = st.tenants
    assert tenant.cache_salt_id and tenant.cache_salt_id != "t"
    assert ex.age_at_hit.count == 2
    assert not st.redis_connected and st.uptime_seconds > 0
    with pytest.raises(grpc.aio.AioRpcError) as e:
        await stub.GetStats(pb.GetStatsRequest(executor_id="nope"))
    assert e.value.code() == C.NOT_FOUND

    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{server.metrics_port}/metrics") as resp,
    ):
        text = await resp.text()
    assert resp.status == 200
    assert 'pagemesh_kv_hit_tokens_total{executor="ex"} 8.0' in text
    assert 'pagemesh_kv_query_requests_total{executor="ex"} 2.0' in text
    assert f'pagemesh_kv_tenant_hit_requests_total{{tenant="{tenant.cache_salt_id}"}} 1.0' in text
    assert 'pagemesh_kv_blocks{executor="ex",state="in_use"}' in text
    assert 'pagemesh_kv_block_age_at_hit_seconds_count{executor="ex"} 2.0' in text
    assert "hit_rate" not in text  # counters only: rates belong to PromQL

    address = f"127.0.0.1:{server.port}"
    args = argparse.Namespace(address=address, executor="", json=True, watch=None)
    assert await cli._stats(args) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["executors"][0]["pool"]["num_blocks"] == 8
    args.json = False
    assert await cli._stats(args) == 0
    out = capsys.readouterr().out
    assert "executor" in out and "since_start" in out and "44.4%" in out and "50.0%" in out


def test_cli_entry_points() -> None:
    """The real command line: `kv stats` against nothing answers with a clear error and rc 1."""
    r = subprocess.run(
        [
            sys.executable,
            "-P",
            "-m",
            "pagemesh.services.kvmanager.cli",
            "kv",
            "stats",
            "--address",
            "127.0.0.1:1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    # One line for an operator, without gRPC's debug string.
    assert r.returncode == 1 and "no kvmanager answers at 127.0.0.1:1" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    from pagemesh.env import env_default

    assert env_default("NO_SUCH_OPTION_XYZ", 7, int) == 7
    parser = argparse.ArgumentParser()
    cli.add_commands(parser.add_subparsers())
    a = parser.parse_args(["kvmanager", "--port", "1234", "--redis-url", "redis://x"])
    assert (a.port, a.redis_url, a.host, a.func) == (
        1234,
        "redis://x",
        "127.0.0.1",
        cli.run_service,
    )
    a = parser.parse_args(["kv", "stats", "--watch"])
    assert a.watch == 2.0 and a.func == cli.run_stats


async def test_session_concurrency_and_reconnect() -> None:
    from pagemesh.services.kvmanager.api import AllocatorUnavailable, ExtendEntry, StaleEpoch
    from pagemesh.services.kvmanager.client import KVManagerClient

    from pagemesh.redis_process import free_port

    port = free_port()
    server = await start_server(port=port)
    c = KVManagerClient(f"127.0.0.1:{port}", "ex", timeout=2.0)
    await c.register(256, 4, "fp")
    # Many calls in flight on one stream: each gets its own reply.
    allocs = await asyncio.gather(*(c.allocate(f"s{i}", [i] * (i % 7 + 1)) for i in range(64)))
    assert len({b for a in allocs for b in a.block_ids}) == sum(len(a.block_ids) for a in allocs)
    results = await asyncio.gather(
        *(c.extend([ExtendEntry(f"s{i}", i % 7 + 1, 9)]) for i in range(64)),
        c.release(["nope"]),
        return_exceptions=True,
    )
    assert isinstance(results[-1], InvalidRequest)
    assert all(len(r.updates[f"s{i}"].block_ids) >= 1 for i, r in enumerate(results[:-1]))
    server.manager.check()
    # kvmanager goes away: a clear AllocatorUnavailable; once back, the stream reopens.
    await server.stop(0)
    with pytest.raises(AllocatorUnavailable):
        await c.allocate("x", [1])
    server = await start_server(port=port)
    for _ in range(50):
        try:
            await c.allocate("x", [1])
        except AllocatorUnavailable:
            await asyncio.sleep(0.1)
        except StaleEpoch:  # no Redis: the new process does not know this executor
            break
    else:
        raise AssertionError("session did not reconnect")
    await c.register(8, 4, "fp")
    assert (await c.allocate("x", [1])).block_ids == [0]
    await c.close()
    await server.stop(0)


async def test_session_raw_stream_errors_keep_it_open(served) -> None:
    """Over the raw Session stream: an error reply carries the unary status code and the stream
    goes on; replies echo ids in order."""
    _, stub, epoch = served
    call = stub.Session()
    await call.write(pb.SessionRequest(id=1))  # no call at all
    await call.write(
        pb.SessionRequest(
            id=2, release=pb.ReleaseRequest(executor_id="ex", epoch=epoch, seq_ids=["x"])
        )
    )
    await call.write(
        pb.SessionRequest(
            id=3,
            allocate=pb.AllocateRequest(
                executor_id="ex", epoch=epoch, seq_id="a", token_data=pack([1])
            ),
        )
    )
    replies = [await call.read() for _ in range(3)]
    assert [r.id for r in replies] == [1, 2, 3]
    assert replies[0].error.code == C.INVALID_ARGUMENT.value[0]
    assert (
        replies[1].error.code == C.NOT_FOUND.value[0]
        and "unknown sequence" in replies[1].error.message
    )
    assert not replies[2].HasField("error") and list(replies[2].allocate.block_ids) == [0]
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF


async def test_token_data_is_the_same_prompt_as_token_ids(served) -> None:
    """The packed prompt (u32 little-endian) is the same prompt as its ids: it allocates and
    hits exactly as Match, which takes the repeated ids, finds it cached."""
    server, stub, epoch = served
    prompt = [70000, 2, 3, 4, 5, 6, 7, 8, 9]  # 2 full blocks + 1 (an id above 16 bits)

    def alloc(sid: str, ids: list[int]) -> pb.AllocateRequest:
        data = b"".join(t.to_bytes(4, "little") for t in ids)
        return pb.AllocateRequest(executor_id="ex", epoch=epoch, seq_id=sid, token_data=data)

    async def match(ids: list[int]) -> int:
        r = await stub.Match(pb.MatchRequest(token_ids=ids, executor_id="ex"))
        return r.matches[0].num_cached_tokens

    await stub.Allocate(alloc("first", prompt))
    assert await match(prompt) == 0
    await stub.Commit(
        pb.CommitRequest(
            executor_id="ex", epoch=epoch, seq_ids=["first"] * 2, block_indices=[0, 1],
            token_ids=prompt[:8],
        )
    )  # fmt: skip
    assert await match(prompt) == 8
    r = await stub.Allocate(alloc("again", prompt))
    assert r.num_cached_tokens == 8
    assert list(r.block_ids[:2]) == server.manager.executors["ex"].seqs["first"].blocks[:2]
    # One id different in the second block: the hit stops after the first, in both forms.
    other = [*prompt[:5], 99, *prompt[6:]]
    r = await stub.Allocate(alloc("other", other))
    assert r.num_cached_tokens == await match(other) == 4
