"""kvmanager SIGKILLed under 16 streaming clients, then restarted on the same port (and the same
with Redis stopped and started again while kvmanager is gone).

Must show: no request fails: the executor rides through the outage (running sequences keep
decoding on the blocks they hold, the others wait, admissions pause) and every stream completes;
kvmanager restores its state from Redis (same executor epoch, prefix index intact) and the
executor's reconcile makes good the calls the restart lost; afterwards no block is leaked
(free + in use + cached = total, in use back to the baseline) and the prefix index still hits.
"""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tests.reliability.client import CLEAN_ERROR, COMPLETED, LOST, chat_body, run_load, session
from tests.reliability.conftest import API_KEY, OUTAGE_BOUND_S
from tests.reliability.workload import (
    STREAM_TIMEOUT,
    SYSTEM,
    cached_tokens_of,
    streaming_chat_maker,
    wait_redis_synced,
    wait_request_ok,
)
from tests.support.mesh import Mesh, assert_pool_consistent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

DOWN_S = 3.0
CLIENTS = 16


async def _kill_kvmanager_under_load(mesh: Mesh, figures, *, stop_redis: bool) -> None:
    async with session() as http:
        # The shared system prompt is cached and hits before the fault.
        probe = chat_body("Which station comes first?", 4, system=SYSTEM)
        await cached_tokens_of(mesh, http, probe)
        cached_before = await cached_tokens_of(mesh, http, probe)
        assert cached_before > 0, "the prefix index does not hit even before the fault"
        mesh.wait_idle(30)
        await asyncio.to_thread(wait_redis_synced, mesh)
        before = mesh.executor_stats()
        baseline_in_use = before.pool.in_use

        stop = asyncio.Event()
        # Short streams, so that sequences start, extend and finish (release) while kvmanager
        # is down: each of those calls fails and must be made good once it is back.
        make = streaming_chat_maker(mesh, http, max_tokens=24, seed=1, ignore_eos=True)
        load = asyncio.create_task(
            run_load(make, concurrency=CLIENTS, total=400, duration=60, stop=stop)
        )
        await asyncio.sleep(4)  # streams in every phase: queued, prefilling, decoding

        mesh.kill("kvmanager")
        killed_at = time.monotonic()
        if stop_redis:
            await asyncio.to_thread(mesh.stop_redis)
        await asyncio.sleep(DOWN_S)  # a real outage, not just a blip
        if stop_redis:
            await asyncio.to_thread(mesh.start_redis)
        ready_s = await asyncio.to_thread(mesh.start_service, "kvmanager")
        after_restart = mesh.executor_stats()

        # Serving is back when a fresh request completes end to end.
        recovered_at = await asyncio.to_thread(wait_request_ok, mesh)
        await asyncio.sleep(3)  # some load after recovery too
        stop.set()
        report = await asyncio.wait_for(load, STREAM_TIMEOUT + 30)

        counts = report.counts()
        figures.record(
            "kvmanager SIGKILL under load" + (" (Redis restarted too)" if stop_redis else ""),
            **report.figures(),
            kvmanager_ready_s=round(ready_s, 2),
            recover_s=round(recovered_at - killed_at, 2),
        )
        assert not report.lost(), f"{report.summary()}; lost: {report.examples(LOST)}"
        failed = [r for r in report.results if r.outcome != COMPLETED]
        assert not failed, f"{report.summary()}; failed: {report.examples(failed[0].outcome)}"
        assert counts[COMPLETED] >= CLIENTS, report.summary()
        assert all(r.finish_reason == "length" for r in report.results), "a stream was cut short"

        # State restored from Redis, not rebuilt: same executor, same epoch, same pool size.
        assert after_restart.epoch == before.epoch, (
            f"epoch {before.epoch} -> {after_restart.epoch}: state was not restored from Redis"
        )
        assert after_restart.pool.num_blocks == before.pool.num_blocks

        # No block leaked: every sequence released, accounting exact.
        pool = mesh.wait_idle(timeout=30, baseline_in_use=baseline_in_use)
        assert_pool_consistent(pool)
        assert pool.in_use == baseline_in_use

        # The prefix index survived the crash.
        cached_after = await cached_tokens_of(mesh, http, probe)
        assert cached_after >= cached_before, (
            f"prefix index lost by the crash: {cached_before} cached tokens before, "
            f"{cached_after} after"
        )


async def test_kvmanager_sigkill_under_streaming_load(mesh: Mesh, figures) -> None:
    await _kill_kvmanager_under_load(mesh, figures, stop_redis=False)


async def test_kvmanager_sigkill_with_redis_restarted_meanwhile(mesh: Mesh, figures) -> None:
    await _kill_kvmanager_under_load(mesh, figures, stop_redis=True)


# What no client-visible error may hold: internal addresses, gRPC status text, tracebacks.
INTERNALS = ("127.0.0.1", "ipv4:", "ipv6:", "StatusCode", "UNAVAILABLE", "grpc", "Traceback")


def _assert_clean(text: str, mesh: Mesh) -> None:
    leaked = [s for s in (*INTERNALS, f":{mesh.kv_port}", f":{mesh.executor_port}") if s in text]
    assert not leaked, f"client-visible error shows {leaked}: {text!r}"


def _openai_errors(mesh: Mesh) -> list[BaseException]:
    """The official client's exceptions for one streamed and one plain request."""
    import openai

    client = openai.OpenAI(
        base_url=mesh.url + "/v1", api_key=API_KEY, max_retries=0, timeout=OUTAGE_BOUND_S * 4
    )
    messages = [{"role": "user", "content": "Name one station."}]
    errors: list[BaseException] = []
    with pytest.raises(openai.APIError) as streamed:
        for _ in client.chat.completions.create(
            model="smollm2", messages=messages, max_tokens=8, stream=True
        ):
            pass
    errors.append(streamed.value)
    with pytest.raises(openai.APIStatusError) as plain:
        client.chat.completions.create(model="smollm2", messages=messages, max_tokens=8)
    errors.append(plain.value)
    return errors


async def test_kvmanager_gone_past_the_bound_fails_cleanly(mesh: Mesh, figures) -> None:
    """kvmanager stays away longer than the executor's bound: the requests end with a clean
    error event and `data: [DONE]`, the official client raises its documented exception, and
    once kvmanager is back no block is leaked."""
    baseline_in_use = mesh.pool().in_use
    async with session() as http:
        make = streaming_chat_maker(mesh, http, max_tokens=400, seed=3, ignore_eos=True)
        streams = [asyncio.create_task(make(i)) for i in range(8)]
        await asyncio.sleep(3)  # running, some of them past their prefill
        mesh.kill("kvmanager")
        killed_at = time.monotonic()
        results = await asyncio.wait_for(asyncio.gather(*streams), OUTAGE_BOUND_S + 60)
        failed_after = time.monotonic() - killed_at
        # Still gone: a request that arrives now fails at once, the same way.
        errors = await asyncio.to_thread(_openai_errors, mesh)
        await asyncio.to_thread(mesh.start_service, "kvmanager")
        await asyncio.to_thread(wait_request_ok, mesh)

    figures.record(
        "kvmanager gone past the bound",
        requests=len(results),
        failed_cleanly=sum(r.outcome == CLEAN_ERROR for r in results),
        failed_after_s=round(failed_after, 1),
        bound_s=OUTAGE_BOUND_S,
    )
    for r in results:
        assert r.outcome == CLEAN_ERROR, f"expected a clean error: {r}"
        assert r.done, f"no data: [DONE] after the error event: {r}"
        _assert_clean(json.dumps(r.error), mesh)
    assert failed_after >= OUTAGE_BOUND_S * 0.9, f"failed after {failed_after:.1f}s, bound first"
    for exc in errors:
        _assert_clean(str(exc), mesh)
        _assert_clean(json.dumps(getattr(exc, "body", None)), mesh)

    pool = mesh.wait_idle(timeout=30, baseline_in_use=baseline_in_use)
    assert_pool_consistent(pool)
    assert pool.in_use == baseline_in_use
