"""Beam search through the whole product: three service processes on loopback, a real Redis and
kvmanager over gRPC, SmolLM2 on CPU. The official openai client asks for beams (extension
parameters in extra_body); kvmanager's own stats show the beams as sequences sharing blocks
while the search runs, and every block back to free or cached after it."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.executor.engine_support import tokenizer
from tests.executor.test_beam_search import MAX_NEW, hf_beams
from tests.support.mesh import Mesh, MeshConfig, assert_pool_consistent

API_KEY = "beam-secret"
MODEL = "SmolLM2-135M-Instruct"
BLOCK = 16
# Longer than two blocks, so that the beams have whole prompt blocks to share.
PROMPT = (
    "You are a careful assistant. Answer briefly and precisely, cite no sources, and never "
    "invent facts. When a question is ambiguous, say which reading you chose and why. "
    "List three uses of a paperclip:"
)
CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Mesh]:
    config = MeshConfig(
        model=str(smollm2_path),
        num_blocks=256,
        block_size=BLOCK,
        api_key=API_KEY,
        model_name=MODEL,
        executor_args=("--max-num-seqs", "16"),
    )
    with Mesh(tmp_path_factory.mktemp("beam"), config) as m:
        yield m


def _client(mesh: Mesh) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_beams_share_blocks_in_kvmanager(mesh: Mesh, smollm2_path: Path) -> None:
    client = _client(mesh)
    before = mesh.wait_idle()
    peaks = {"live": 0, "in_use": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            pool = mesh.pool(timeout=2.0)
            peaks["live"] = max(peaks["live"], pool.live_sequences)
            peaks["in_use"] = max(peaks["in_use"], pool.in_use)
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        resp = client.completions.create(
            model=MODEL,
            prompt=PROMPT,
            max_tokens=MAX_NEW,
            n=2,
            extra_body={"use_beam_search": True, "beam_width": 8, "early_stopping": True},
        )
    finally:
        done.set()
        watcher.join()
    prompt = tokenizer(smollm2_path)(PROMPT)["input_ids"]
    beams, _ = hf_beams(smollm2_path, tuple(prompt), 8, 2, 1.0, True)
    texts = [c.text for c in sorted(resp.choices, key=lambda c: c.index)]
    assert texts == [tokenizer(smollm2_path).decode(b, skip_special_tokens=True) for b in beams]
    # kvmanager held the 8 beams as sequences of their own, on far fewer blocks than 8 copies.
    per_beam = -(-(len(prompt) + MAX_NEW) // BLOCK)
    assert peaks["live"] >= 4, peaks
    assert 0 < peaks["in_use"] < peaks["live"] * per_beam, (peaks, per_beam)
    after = mesh.wait_idle()
    assert_pool_consistent(after)
    assert after.in_use == before.in_use == 0


def test_chat_beams_stream_like_non_stream(mesh: Mesh) -> None:
    client = _client(mesh)
    extra = {"use_beam_search": True, "beam_width": 4, "length_penalty": 0.5}
    full = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=MAX_NEW, n=2, extra_body=extra
    )
    want = [c.message.content for c in sorted(full.choices, key=lambda c: c.index)]
    assert all(want)
    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=MAX_NEW, n=2, stream=True, extra_body=extra
    )
    got = ["", ""]
    for chunk in stream:
        for ch in chunk.choices:
            got[ch.index] += ch.delta.content or ""
    assert got == want
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=MODEL,
            messages=CHAT,
            max_tokens=4,
            temperature=0.7,
            extra_body={"use_beam_search": True},
        )
    assert "beam search is deterministic" in str(err.value)
    assert_pool_consistent(mesh.wait_idle())
