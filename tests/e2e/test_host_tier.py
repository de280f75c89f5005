"""The host-memory tier through the whole mesh (issue 26): Redis, kvmanager, an executor with a
small GPU pool (24 blocks) and a host tier (--host-kv-blocks 20), and the gateway, each its own
process, SmolLM2 on CPU. Everything is seen as a client and an operator see it: the chat API's
`cached_tokens` and kvmanager's GetStats.

- A conversation evicted from the GPU pool by later ones comes back from the host tier: its
  cached tokens count the restored blocks, and its greedy reply equals its cold run's, with
  some of its blocks copied out ahead of their eviction (kvmanager's spill ahead).
- A kvmanager killed and restarted restores the tier map from Redis (the executor reconciles
  with the same count of transfers, so the tier is kept) and serves a host hit after it.
- The host tier is an LRU: conversations pushed through it drop the oldest, which then runs
  cold (only the chat template's shared prefix still hits).
- An executor restart (a new epoch) drops both tiers' entries.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from pagemesh.proto import kvmanager_pb2

from tests.support.mesh import Mesh, MeshConfig, wait_for

MODEL = "SmolLM2-135M-Instruct"
BS = 16
WORDS = [
    "river",
    "stone",
    "lantern",
    "orchard",
    "violet",
    "harbor",
    "meadow",
    "copper",
    "falcon",
    "willow",
    "ember",
    "glacier",
    "canyon",
    "thistle",
    "marble",
    "comet",
    "saffron",
    "quarry",
    "pebble",
    "tundra",
    "juniper",
    "beacon",
    "cobalt",
    "prairie",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Mesh]:
    config = MeshConfig(
        model=str(smollm2_path),
        num_blocks=24,
        model_name=MODEL,
        executor_args=("--host-kv-blocks", "20"),
    )
    with Mesh(tmp_path_factory.mktemp("tier"), config) as m:
        yield m


def story(k: int) -> str:
    """About 110 words unique to k from its first word on: no two share a block past the chat
    template's own prefix."""
    rng = random.Random(k)
    return f"Story number {k}. " + " ".join(rng.choice(WORDS) for _ in range(110))


def ask(mesh: Mesh, k: int) -> tuple[str, int, int]:
    """(reply, cached tokens, prompt tokens) of a greedy 8-token reply to story k."""
    client = openai.OpenAI(base_url=mesh.url + "/v1", api_key="none", max_retries=0, timeout=120)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": story(k) + "\nSummarize it."}],
        max_tokens=8,
        temperature=0,
    )
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    content = r.choices[0].message.content or ""
    return content, r.usage.prompt_tokens_details.cached_tokens or 0, r.usage.prompt_tokens


def tier(mesh: Mesh) -> kvmanager_pb2.TierStats:
    return mesh.executor_stats().tier


def flushed(mesh: Mesh) -> None:
    wait_for(lambda: mesh.stats().redis_pending_writes == 0, 30, "Redis to hold every write")


def test_restore_lru_and_restarts(mesh: Mesh) -> None:
    cold = {}
    text, cached, n = ask(mesh, 1)
    cold[1] = text
    full = (n - 1) // BS * BS  # every full block of the prompt (the last token is recomputed)
    assert n > 9 * BS and cached < full
    for k in (2, 3):
        cold[k] = ask(mesh, k)[0]
    t = tier(mesh)
    assert t.host_blocks == 20 and t.spills > 0 and t.host_cached > 0  # story 1 went to host
    # kvmanager spilled ahead of eviction (its default watermark: a quarter of the pool), and
    # some evictions found their copy made (no bytes moved); the restore below reads them.
    assert 0 < t.spills_ahead <= t.spills and t.evicted_ahead > 0

    # kvmanager dies and comes back from Redis with the tier map; the executor's reconcile
    # agrees on the transfers, so the map stands.
    flushed(mesh)
    before = tier(mesh)
    mesh.restart("kvmanager")
    after = tier(mesh)
    assert (after.host_cached, after.host_copies, after.spills, after.restores) == (
        before.host_cached,
        before.host_copies,
        before.spills,
        before.restores,
    )

    # Story 1 again: every full block hits, some of them restored from host memory, and the
    # reply is the cold run's.
    text, cached, _ = ask(mesh, 1)
    assert text == cold[1]
    assert cached == full
    t = tier(mesh)
    assert t.restores > before.restores and t.host_hit_tokens > before.host_hit_tokens
    assert t.bytes_restored == t.restores * (t.bytes_spilled // t.spills) > 0

    # LRU: four more stories pass through the 20 host blocks and push story 2's out; it then
    # runs cold (only what a story never seen gets: the chat template's shared prefix).
    shared = ask(mesh, 99)[1]
    for k in (4, 5, 6, 7):
        ask(mesh, k)
    assert tier(mesh).host_drops > 0
    text, cached, _ = ask(mesh, 2)
    assert cached == shared and text == cold[2]

    # An executor restart is a new epoch: both tiers start empty.
    epoch = mesh.executor_stats().epoch
    mesh.restart("executor")
    mesh.wait_for_serve_streams(60)
    ex = mesh.executor_stats()
    assert ex.epoch > epoch
    assert (ex.tier.host_cached, ex.tier.host_free, ex.pool.cached) == (0, 20, 0)
    text, cached, _ = ask(mesh, 3)
    assert cached == 0 and text == cold[3]
