"""Generate batches on the Serve stream (proto/executor.proto GenerateBatch): the gateway's
client packs the requests queued behind one write into one message, in order, aborts and the
stream's end kept in place; the executor service advertises that it reads them and runs every
request of a batch (SmolLM2 on CPU, loopback gRPC)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway import executor_client
from pagemesh.services.gateway.executor_client import RequestStream, pack_generates

from tests.executor.engine_support import make_engine
from tests.support.executor_service import executor_service


def _gen(rid: str) -> pb.ServeRequest:
    return pb.ServeRequest(generate=pb.GenerateRequest(request_id=rid, prompt_token_ids=[1, 2]))


def _abort(rid: str) -> pb.ServeRequest:
    return pb.ServeRequest(abort=pb.AbortRequest(request_ids=[rid]))


def _shape(msgs: list[pb.ServeRequest | None]) -> list[object]:
    out: list[object] = []
    for m in msgs:
        if m is None:
            out.append(None)
        elif m.WhichOneof("kind") == "generate_batch":
            out.append([r.request_id for r in m.generate_batch.requests])
        elif m.WhichOneof("kind") == "generate":
            out.append(m.generate.request_id)
        else:
            out.append(("abort", *m.abort.request_ids))
    return out


@pytest.mark.parametrize(
    ("queued", "packed"),
    [
        (["a"], ["a"]),
        (["a", "b", "c"], [["a", "b", "c"]]),
        (
            ["a", "b", "-a", "c", "d", "-x", "e"],
            [["a", "b"], ("abort", "a"), ["c", "d"], ("abort", "x"), "e"],
        ),
        (["a", "b", None, "c"], [["a", "b"], None]),
        (["-a", None], [("abort", "a"), None]),
    ],
)
def test_pack_generates_keeps_order(queued: list, packed: list) -> None:
    msgs = [None if q is None else _abort(q[1:]) if q.startswith("-") else _gen(q) for q in queued]
    assert _shape(pack_generates(msgs)) == packed


async def _count(stream: RequestStream) -> int:
    n = 0
    async for outs in stream:
        n += sum(len(o.token_ids) for o in outs)
    return n


async def _outputs(stream: RequestStream) -> list[pb.SequenceOutput]:
    return [o async for outs in stream for o in outs]


async def test_executor_runs_every_request_of_a_batch(
    smollm2_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent: list[pb.ServeRequest | None] = []

    def spy(queued: list[pb.ServeRequest | None]) -> list[pb.ServeRequest | None]:
        out = pack_generates(queued)
        sent.extend(out)
        return out

    monkeypatch.setattr(executor_client, "pack_generates", spy)
    engine = await make_engine(smollm2_path)
    async with executor_service(engine) as client:
        assert client._batches  # the executor's Serve headers said so
        params = pb.SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
        # Submitted back to back: they queue behind the first write and go out together.
        streams = [
            client.submit(
                pb.GenerateRequest(
                    request_id=f"r{i}", prompt_token_ids=[5, 6, 7, 8 + i], params=params
                )
            )
            for i in range(6)
        ]
        bad = client.submit(  # refused by the engine: rejected alone, the batch runs
            pb.GenerateRequest(request_id="bad", prompt_token_ids=[], params=params)
        )
        counts = await asyncio.wait_for(asyncio.gather(*(_count(s) for s in streams)), 120)
        assert counts == [3] * 6
        refused = await asyncio.wait_for(_outputs(bad), 60)
        assert [o.finish_reason for o in refused] == [pb.FINISH_ERROR] and refused[0].error
    batches = [m for m in sent if m is not None and m.WhichOneof("kind") == "generate_batch"]
    assert batches, _shape(sent)
    ids = [
        rid for m in _shape(sent) if m is not None for rid in (m if isinstance(m, list) else [m])
    ]
    assert ids == [f"r{i}" for i in range(6)] + ["bad"]


def _packed(ids: list[int]) -> bytes:
    return b"".join(t.to_bytes(4, "little") for t in ids)


async def test_packed_prompts_run_as_repeated_ids_do(smollm2_path: Path) -> None:
    """prompt_token_data (the gateway's form) and prompt_token_ids give the same greedy tokens;
    a request with both, or with a partial id, is refused alone."""
    engine = await make_engine(smollm2_path)
    async with executor_service(engine) as client:
        params = pb.SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
        prompts = [[5, 6, 7, 8], [30, 40, 2000, 49151], [9]]
        by_ids = [
            client.submit(pb.GenerateRequest(request_id=f"i{k}", prompt_token_ids=p, params=params))
            for k, p in enumerate(prompts)
        ]
        by_data = [
            client.submit(
                pb.GenerateRequest(request_id=f"d{k}", prompt_token_data=_packed(p), params=params)
            )
            for k, p in enumerate(prompts)
        ]
        both = client.submit(
            pb.GenerateRequest(
                request_id="both",
                prompt_token_ids=[1],
                prompt_token_data=_packed([1]),
                params=params,
            )
        )
        partial = client.submit(
            pb.GenerateRequest(
                request_id="partial", prompt_token_data=b"\x01\x00\x00", params=params
            )
        )
        outs = await asyncio.wait_for(asyncio.gather(*map(_outputs, by_ids + by_data)), 120)
        tokens = [[t for o in out for t in o.token_ids] for out in outs]
        assert all(len(t) == 4 for t in tokens)
        assert tokens[:3] == tokens[3:]
        for stream, text in ((both, "not both"), (partial, "multiple of 4")):
            refused = await asyncio.wait_for(_outputs(stream), 60)
            assert [o.finish_reason for o in refused] == [pb.FINISH_ERROR]
            assert text in refused[0].error
