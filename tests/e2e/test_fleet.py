"""The fleet end to end: Redis, kvmanager, three executors (SmolLM2 on the CPU, 64-block pools:
a few long contexts fill one) and a gateway that follows the fleet through kvmanager, each its
own process on loopback. Where a request went is kvmanager's own count of its route decisions.

The tests share one fleet and run in order: executors are added and stopped as they go.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest

from tests.support.fleet import Fleet, FleetConfig
from tests.support.mesh import wait_for

MODEL = "smol"
# A context of a few hundred tokens: many whole blocks, so a hit is unmistakable.
WORDS = [
    "apple",
    "river",
    "stone",
    "cloud",
    "amber",
    "violet",
    "north",
    "garden",
    "silver",
    "window",
    "candle",
    "forest",
]


def context(seed: int, words: int = 220) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(words))


def messages(system: str, question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Fleet]:
    config = FleetConfig(model=str(smollm2_path), executors=3, num_blocks=64)
    with Fleet(tmp_path_factory.mktemp("fleet"), config) as f:
        yield f


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {ex: n - before.get(ex, 0) for ex, n in after.items() if n - before.get(ex, 0)}


def concurrently(fleet: Fleet, bodies: list[tuple[str, list[dict[str, str]]]], **kw: Any) -> list:
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: fleet.chat(b[0], b[1], **kw), bodies))


def test_second_request_lands_where_its_prefix_is(fleet: Fleet) -> None:
    system = context(1)
    before = fleet.routed_total()
    status, first = fleet.chat(MODEL, messages(system, "Name a colour."))
    assert status == 200, first
    (first_ex,) = delta(before, fleet.routed_total())
    mid = fleet.routed()
    status, second = fleet.chat(MODEL, messages(system, "Name a fruit."))
    assert status == 200, second
    assert delta(before, fleet.routed_total()) == {first_ex: 2}
    assert fleet.routed()[first_ex].get("prefix", 0) == mid[first_ex].get("prefix", 0) + 1
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 200


def test_tenants_spread_over_the_fleet_and_keep_their_executor(fleet: Fleet) -> None:
    tenants = [context(100 + t) for t in range(6)]  # 6 x ~15 blocks: more than one pool holds
    homes: dict[int, str] = {}
    for round_ in range(3):
        for t, system in enumerate(tenants):
            before = fleet.routed_total()
            status, body = fleet.chat(MODEL, messages(system, f"Question {round_}?"))
            assert status == 200, body
            (ex,) = delta(before, fleet.routed_total())
            if round_ == 0:
                homes[t] = ex
            else:
                assert ex == homes[t], (t, round_, homes)
                assert body["usage"]["prompt_tokens_details"]["cached_tokens"] > 150
    assert len(set(homes.values())) == 3, homes  # every executor holds some tenants


def test_hot_prefix_spreads_once_the_load_guard_trips(fleet: Fleet) -> None:
    hot = context(7)
    status, _ = fleet.chat(MODEL, messages(hot, "Warm up."))
    assert status == 200
    before = fleet.routed_total()
    reasons_before = fleet.routed()
    bodies = [(MODEL, messages(hot, f"Request {i}: count to ten.")) for i in range(24)]
    results = concurrently(fleet, bodies, max_tokens=12)
    assert all(status == 200 for status, _ in results), [b for s, b in results if s != 200]
    spread = delta(before, fleet.routed_total())
    assert len(spread) >= 2, spread  # not all on the executor holding the prefix
    after = fleet.routed()
    by_load = sum(
        after[ex].get("load", 0) - reasons_before.get(ex, {}).get("load", 0) for ex in after
    )
    assert by_load > 0, after


def test_an_executor_added_at_runtime_gets_traffic(fleet: Fleet) -> None:
    new = fleet.add_executor(MODEL)
    wait_for(lambda: fleet.live().get(new, False), 30, f"{new} to be live at kvmanager")
    before = fleet.routed_total()
    attempt = iter(range(100))

    # Within seconds: the gateway learns it from WatchFleet and kvmanager routes to it. Fresh
    # contexts each time: a context already cached stays where it is (prefix affinity).
    def got_traffic() -> bool:
        base = 500 + 10 * next(attempt)
        bodies = [(MODEL, messages(context(base + i), "Hello?")) for i in range(8)]
        results = concurrently(fleet, bodies)
        assert all(status == 200 for status, _ in results), results
        return delta(before, fleet.routed_total()).get(new, 0) > 0

    wait_for(got_traffic, 60, f"{new} to be routed to", interval=1.0)


def test_a_stopped_executor_is_routed_around(fleet: Fleet) -> None:
    gone = "executor-1"
    fleet.stop_executor(gone)
    # Right away (kvmanager has not marked it down yet): no request fails.
    results = concurrently(fleet, [(MODEL, messages(context(900 + i), "Hi")) for i in range(8)])
    assert all(status == 200 for status, _ in results), results
    wait_for(lambda: not fleet.live()[gone], 30, f"kvmanager to mark {gone} down")
    before = fleet.routed_total()
    results = concurrently(fleet, [(MODEL, messages(context(950 + i), "Hi")) for i in range(8)])
    assert all(status == 200 for status, _ in results), results
    assert gone not in delta(before, fleet.routed_total())


def test_two_models_side_by_side(fleet: Fleet) -> None:
    other = fleet.add_executor("smol-b")
    wait_for(lambda: fleet.models() == ["smol", "smol-b"], 60, "the gateway to list smol-b")
    before = fleet.routed_total()
    answers: list[tuple[int, dict]] = []

    # Listed as soon as the gateway knows it; served once its Serve stream is up: meanwhile a
    # 503 that says to retry (no Route call is made for it).
    def served() -> bool:
        answers.append(fleet.chat("smol-b", messages(context(3), "Which model are you?")))
        status, body = answers[-1]
        assert status in (200, 503), body
        return status == 200

    wait_for(served, 60, "smol-b to be served", interval=0.5)
    assert answers[-1][1]["model"] == "smol-b", answers[-1]
    assert all("Retry" in str(body) or "retry" in str(body) for _, body in answers[:-1]), answers
    assert delta(before, fleet.routed_total()) == {other: 1}
    status, body = fleet.chat("gpt-9", messages("x", "y"))
    assert status == 404 and body["error"]["code"] == "model_not_found", body

    # Its only executor gone: a clear 503, at once, without an internal address.
    fleet.stop_executor(other)
    wait_for(lambda: not fleet.live()[other], 30, "kvmanager to mark it down")

    def refused() -> bool:
        status, body = fleet.chat("smol-b", messages("x", "y"))
        return status == 503 and "127.0.0.1" not in str(body)

    wait_for(refused, 30, "a 503 for smol-b", interval=0.5)


def test_stats_and_metrics_count_the_traffic(fleet: Fleet) -> None:
    before = fleet.routed_total()
    results = concurrently(fleet, [(MODEL, messages(context(700 + i), "Ok?")) for i in range(6)])
    assert all(status == 200 for status, _ in results)
    assert sum(delta(before, fleet.routed_total()).values()) == 6
    # The gateway's own count, per executor, agrees with kvmanager's.
    text = fleet.metrics()
    gateway_counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("pagemesh_gateway_routed_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            ex = labels.split('executor="', 1)[1].split('"', 1)[0]
            gateway_counts[ex] = gateway_counts.get(ex, 0) + float(value)
    kv_counts = fleet.routed_total()
    for ex, n in gateway_counts.items():
        assert kv_counts.get(ex) == n, (ex, gateway_counts, kv_counts)
    assert sum(gateway_counts.values()) == sum(kv_counts.values())


# ----- request migration and the errors a client sees (issue 20) -----

LEAKS = ("127.0.0.1", "ipv4", "StatusCode", "debug_error_string", "Traceback", "grpc")


@dataclass
class Streamed:
    status: int = 0
    text: str = ""
    chunks: int = 0
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    done: bool = False
    raw: str = ""


def stream_chat(fleet: Fleet, msgs: list[dict[str, str]], seen: Streamed, **extra: Any) -> None:
    """Streams one chat into `seen` (read as it comes, so another thread can watch it), with
    httpx reading the body to its end: a truncated chunked body raises there."""
    body = {"model": MODEL, "messages": msgs, "stream": True, **extra}
    body["stream_options"] = {"include_usage": True}
    with (
        httpx2.Client(timeout=300) as http,
        http.stream("POST", fleet.url + "/v1/chat/completions", json=body) as resp,
    ):
        seen.status = resp.status_code
        for line in resp.iter_lines():
            seen.raw += line + "\n"
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                seen.done = True
                continue
            event = json.loads(line[6:])
            if "error" in event:
                seen.error = event["error"]
            seen.usage = event.get("usage") or seen.usage
            for choice in event.get("choices") or []:
                seen.text += (choice.get("delta") or {}).get("content") or ""
                seen.chunks += 1


def assert_clean(text: str) -> None:
    for leak in LEAKS:
        assert leak not in text, (leak, text)


def gateway_metric(fleet: Fleet, prefix: str) -> float:
    lines = fleet.metrics().splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


def test_an_executor_killed_under_load_loses_no_request(fleet: Fleet) -> None:
    """kill -9 of one of the three executors serving the model while 8 greedy streams run: every
    stream ends whole, with the text of a cold run and its usage (migration)."""
    n, max_tokens = 8, 40
    prompts = [messages(context(1200 + i, words=60), f"Count from {i} upwards.") for i in range(n)]
    greedy = {"temperature": 0, "max_tokens": max_tokens, "ignore_eos": True}
    cold = [Streamed() for _ in prompts]
    with ThreadPoolExecutor(n) as pool:  # a fresh salt each: nothing cached, nothing shared
        list(pool.map(lambda k: stream_chat(fleet, prompts[k], cold[k], cache_salt=f"cold-{k}",
                                            **greedy), range(n)))  # fmt: skip
    assert all(c.done and c.error is None and c.text for c in cold), [c.raw[-200:] for c in cold]
    serving = [ex for ex, live in fleet.live().items() if live and fleet.executors[ex].alive()]
    serving = [ex for ex in serving if fleet.executor_info(ex).model == MODEL]
    assert len(serving) == 3, serving
    migrated_before = gateway_metric(fleet, "pagemesh_gateway_migrations_total")

    runs = [Streamed() for _ in prompts]
    with ThreadPoolExecutor(n) as pool:
        futures = [pool.submit(stream_chat, fleet, prompts[k], runs[k], **greedy) for k in range(n)]
        wait_for(lambda: all(r.chunks >= 3 for r in runs), 240, "every stream to be under way")
        running = {ex: fleet.executor_info(ex).num_running for ex in serving}
        victim = max(running, key=lambda ex: running[ex])
        assert running[victim] > 0, running
        fleet.kill_executor(victim)
        for f in futures:
            f.result()
    for k, (run, ref) in enumerate(zip(runs, cold, strict=True)):
        assert run.status == 200 and run.error is None and run.done, (k, run.raw[-300:])
        assert run.text == ref.text, (k, run.text, ref.text)
        assert run.usage is not None and ref.usage is not None
        assert run.usage["prompt_tokens"] == ref.usage["prompt_tokens"], (run.usage, ref.usage)
        assert run.usage["completion_tokens"] == max_tokens == ref.usage["completion_tokens"]
    migrated = gateway_metric(fleet, "pagemesh_gateway_migrations_total") - migrated_before
    assert migrated >= running[victim] - 1, (migrated, running)  # one may have just finished
    assert migrated >= 1
    wait_for(lambda: not fleet.live()[victim], 30, f"kvmanager to mark {victim} down")


def test_errors_a_client_sees_are_clean(fleet: Fleet) -> None:
    """A request too large for one executor of the fleet (a shorter context joined), and a
    model whose only executor is gone: OpenAI-shaped errors with a request id, no address, no
    gRPC words, no traceback; the official client raises its documented classes."""
    sdk = openai.OpenAI(base_url=fleet.url + "/v1", api_key="unused", max_retries=0)
    short = fleet.add_executor(MODEL, extra_args=("--max-model-len", "256"))
    wait_for(lambda: fleet.live().get(short, False), 60, f"{short} to be live")

    def bounded() -> bool:
        status, _ = fleet.chat(MODEL, messages(context(5, words=300), "Hi"), max_tokens=8)
        return status == 400

    wait_for(bounded, 60, "the fleet's context bound to include the short executor", 0.5)
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(
            model=MODEL, messages=messages(context(5, words=300), "Hi"), max_tokens=8
        )
    assert "context" in bad.value.message
    assert_clean(str(bad.value.body))

    # smol-b's only executor was stopped (test_two_models_side_by_side): a 503 for the SDK...
    with pytest.raises(openai.InternalServerError) as gone:
        sdk.chat.completions.create(model="smol-b", messages=messages("x", "y"), max_tokens=4)
    assert gone.value.status_code == 503 and "retry" in gone.value.message
    assert gone.value.response.headers.get("retry-after")
    assert gone.value.response.headers.get("x-request-id")
    assert_clean(str(gone.value.body))
    # ... and for a stream, read to the end of a complete body by httpx.
    seen = Streamed()
    stream_chat_model = {"model": "smol-b"}
    with (
        httpx2.Client(timeout=60) as http,
        http.stream(
            "POST",
            fleet.url + "/v1/chat/completions",
            json={**stream_chat_model, "messages": messages("x", "y"), "stream": True},
        ) as resp,
    ):
        seen.status = resp.status_code
        seen.raw = resp.read().decode()
    assert seen.status == 503 and "retry" in seen.raw
    assert_clean(seen.raw)
    sdk.close()
