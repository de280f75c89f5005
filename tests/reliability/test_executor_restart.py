"""An executor SIGKILLed under load and restarted on the same port.

Must show: no request fails (the gateway migrates each one in flight to the executor once it is
back: prompt plus the tokens already streamed), and the streams cut by the kill end with the text
and usage of a cold, uninterrupted run, greedy ones and seeded sampled ones (temperature 1: the
continuation resumes the seed's random stream at the seam); it registers with a new epoch; no
request is ever served from a stale block.

The stale-block check: greedy outputs of prompts cached before the crash are compared, after the
restart, with cold runs of the same prompts (a unique cache_salt per cold run shares nothing).
The new executor's pool holds other KV by then (a pollution phase writes different prompts into
it), so a hit on an old-epoch entry would read the wrong KV and change the output; it also shows
as cached tokens on the first request after the restart, which must be 0.
"""

from __future__ import annotations

import asyncio
import re
import time
import urllib.request
import uuid

import pytest

from tests.reliability.client import (
    CLEAN_ERROR,
    COMPLETED,
    LOST,
    StreamResult,
    chat_body,
    run_load,
    session,
    stream_request,
)
from tests.reliability.workload import (
    STREAM_TIMEOUT,
    SYSTEM,
    chat_url,
    streaming_chat_maker,
    wait_request_ok,
)
from tests.support.mesh import Mesh, assert_pool_consistent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]

# Long enough for several full blocks past the system prompt, different from each other early.
QUESTIONS = [
    "List three facts about the station at Croydon and its trains to Epsom in the morning.",
    "Describe the fastest route from Hastings to Guildford, changing trains only once.",
    "Which of Aldgate, Bexley and Dartford is closest to Faversham, and by how many stops?",
]
POLLUTION = [
    "Write a limerick about a late train to Dartford that never seemed to arrive at all.",
    "Explain, for a child, why platform numbers at Epsom start at one and not at zero.",
    "Summarise the history of the Bexley line in exactly two sentences, please, briefly.",
]
MAX_TOKENS = 10
CUT_TOKENS = 64  # long enough to be under way at the kill and still running
# Seeded sampled streams cut by the kill: longer, so that each is surely mid-stream at the kill
# (the test reads its seam from the gateway's log).
SEEDED = {
    "Tell a long, rambling tale of the mail train to Hastings.": 4242,
    "Invent a new station.": 7,
}
SEEDED_TOKENS = 160


async def _chat(
    mesh: Mesh,
    http,
    question: str,
    salt: str | None = None,
    max_tokens: int = MAX_TOKENS,
    timeout: float = 60.0,
    request_id: str | None = None,
    progress: asyncio.Event | None = None,
    **sampling: object,
) -> StreamResult:
    """A streamed chat to its end (greedy unless `sampling` says otherwise); `progress` is set
    once a few tokens have come."""
    extra = {"cache_salt": salt} if salt else {}
    body = chat_body(question, max_tokens, system=SYSTEM, ignore_eos=True, **extra, **sampling)
    headers = {**mesh.headers, **({"X-Request-Id": request_id} if request_id else {})}
    result = await stream_request(
        http,
        chat_url(mesh),
        body,
        headers=headers,
        timeout=timeout,
        progress=progress,
        progress_after=8,
    )
    assert result.outcome == COMPLETED, f"{question!r}: {result}"
    return result


def _seams(mesh: Mesh, request_id: str) -> list[int]:
    """The max_tokens each continuation of `request_id` was sent with (the gateway's log)."""
    log = mesh.services["gateway"].log_path.read_text(errors="replace")
    pattern = rf"request {re.escape(request_id)} continues on executor .* max_tokens (\d+)\)"
    return [int(m) for m in re.findall(pattern, log)]


def _migrations(mesh: Mesh) -> float:
    """The gateway's count of migrated requests (/metrics)."""
    with urllib.request.urlopen(mesh.url + "/metrics", timeout=10) as resp:
        lines = resp.read().decode().splitlines()
    prefix = "pagemesh_gateway_migrations_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(prefix))


async def test_executor_restart_under_load(mesh: Mesh, figures) -> None:
    async with session() as http:
        # Cold references: a fresh salt each, so nothing is shared with anything.
        cold = {q: (await _chat(mesh, http, q, salt=uuid.uuid4().hex)).text for q in QUESTIONS}
        # Warm the unsalted index with the same prompts; cached runs must already match.
        for q in QUESTIONS:
            await _chat(mesh, http, q)
            warm = await _chat(mesh, http, q)
            assert warm.cached_tokens > 0, f"no prefix hit before the fault for {q!r}"
            assert warm.text == cold[q], (
                "a prefix hit changes the greedy output even without a fault"
            )

        mesh.wait_idle(30)
        epoch_before = mesh.executor_stats().epoch
        executor_id = mesh.executor_id

        # Streams that will be cut by the kill, and their cold (uninterrupted) references.
        # Their text shares nothing with QUESTIONS and POLLUTION past the system prompt: the
        # stale-block check below reads cached-token counts of those.
        cut_questions = [
            f"Story {k}: tell a long tale of the night train from Aldgate to Dover."
            for k in range(6)
        ]
        refs = [
            _chat(mesh, http, q, salt=uuid.uuid4().hex, max_tokens=CUT_TOKENS, timeout=240)
            for q in cut_questions
        ]
        seeded_refs = [
            _chat(
                mesh, http, q, salt=uuid.uuid4().hex, max_tokens=SEEDED_TOKENS, timeout=240,
                temperature=1.0, seed=seed,
            )
            for q, seed in SEEDED.items()
        ]  # fmt: skip
        cold_runs = await asyncio.gather(*refs, *seeded_refs)
        cut_cold = dict(zip(cut_questions, cold_runs[: len(refs)], strict=True))
        seeded_cold = cold_runs[len(refs) :]
        migrated_before = _migrations(mesh)

        stop = asyncio.Event()
        make = streaming_chat_maker(mesh, http, max_tokens=32, seed=2, ignore_eos=True)
        load = asyncio.create_task(
            run_load(make, concurrency=8, total=1000, duration=90, stop=stop)
        )
        cut = [
            asyncio.create_task(_chat(mesh, http, q, max_tokens=CUT_TOKENS, timeout=240))
            for q in cut_questions
        ]
        seeded_ids = [f"seeded-{uuid.uuid4().hex}" for _ in SEEDED]
        seeded_going = [asyncio.Event() for _ in SEEDED]
        seeded_cut = [
            asyncio.create_task(
                _chat(
                    mesh, http, q, max_tokens=SEEDED_TOKENS, timeout=240, request_id=rid,
                    progress=going, temperature=1.0, seed=seed,
                )
            )
            for (q, seed), rid, going in zip(SEEDED.items(), seeded_ids, seeded_going, strict=True)
        ]  # fmt: skip
        await asyncio.sleep(4)
        # The seeded streams have tokens out: the kill cuts them mid-stream (at a seam k > 0).
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in seeded_going)), 120)
        in_flight = mesh.executor_info().num_running
        mesh.kill("executor")
        killed_at = time.monotonic()
        ready_s = await asyncio.to_thread(mesh.start_service, "executor")
        recovered_at = await asyncio.to_thread(wait_request_ok, mesh)
        await asyncio.sleep(2)
        stop.set()
        report = await asyncio.wait_for(load, STREAM_TIMEOUT + 30)
        counts = report.counts()
        cut_runs = await asyncio.gather(*cut)
        seeded_runs = await asyncio.gather(*seeded_cut)
        migrated = _migrations(mesh) - migrated_before

        figures.record(
            "executor SIGKILL under load",
            **report.figures(),
            in_flight_at_kill=in_flight,
            executor_ready_s=round(ready_s, 2),
            recover_s=round(recovered_at - killed_at, 2),
            migrations=migrated,
        )
        assert not report.lost(), f"{report.summary()}; lost: {report.examples(LOST)}"
        assert counts[CLEAN_ERROR] == 0, (
            f"requests failed: {report.summary()}; {report.examples(CLEAN_ERROR)}"
        )
        assert in_flight > 0 and migrated > 0, (in_flight, migrated)
        # The streams the kill cut: one unbroken stream each, the cold run's text and usage.
        for q, run in zip(cut_questions, cut_runs, strict=True):
            ref = cut_cold[q]
            assert run.text == ref.text, f"{q!r}: {run.text!r} != cold {ref.text!r}"
            assert run.usage is not None and ref.usage is not None
            assert run.usage["prompt_tokens"] == ref.usage["prompt_tokens"]
            assert run.usage["completion_tokens"] == CUT_TOKENS == ref.usage["completion_tokens"]
        # The seeded sampled streams: cut mid-stream (their continuation had tokens before it),
        # and still the uninterrupted run's text: the same seed, the random stream resumed.
        for rid, run, ref in zip(seeded_ids, seeded_runs, seeded_cold, strict=True):
            seams = _seams(mesh, rid)
            assert seams and 0 < seams[0] < SEEDED_TOKENS, f"{rid} was not cut mid-stream: {seams}"
            assert run.text == ref.text, f"seeded {rid}: {run.text!r} != uninterrupted {ref.text!r}"
            assert run.usage is not None and run.usage["completion_tokens"] == SEEDED_TOKENS

        # A new epoch, same executor identity; the old epoch's blocks are gone from the pool.
        assert mesh.executor_id == executor_id
        stats = mesh.executor_stats()
        assert stats.epoch > epoch_before, f"epoch {epoch_before} -> {stats.epoch}"
        pool = mesh.wait_idle(30)
        assert_pool_consistent(pool)
        assert pool.in_use == 0

        # Fill the new pool with other KV, then replay the pre-crash prompts.
        # The pollution prompts share only the template and system prompt with the questions: what
        # the last of them finds cached is exactly the legitimate (new-epoch) shared prefix.
        shared_prefix = 0
        for q in POLLUTION:
            shared_prefix = (await _chat(mesh, http, q)).cached_tokens
        for q in QUESTIONS:
            first = await _chat(mesh, http, q)
            assert first.cached_tokens <= shared_prefix, (
                f"{q!r}: {first.cached_tokens} cached tokens right after the restart: a stale "
                "entry of the old epoch was hit"
            )
            assert first.text == cold[q], f"{q!r}: {first.text!r} != cold {cold[q]!r}"
            again = await _chat(mesh, http, q)
            assert again.cached_tokens > first.cached_tokens
            assert again.text == cold[q], f"{q!r} (cached): {again.text!r} != cold {cold[q]!r}"
