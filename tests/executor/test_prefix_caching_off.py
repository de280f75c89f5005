"""--no-prefix-caching: the A/B arm of the serving benchmark. A request sharing a long prefix
with an earlier one is computed cold (no cached tokens), gives the same tokens, and the pool's
accounting stays exact."""

from __future__ import annotations

from pathlib import Path

from tests.executor.engine_support import assert_all_free_or_cached, make_engine, run_all
from tests.executor.test_engine_greedy import SYSTEM, _ids, greedy, hf_greedy


async def test_prefix_caching_off_never_hits(smollm2_path: Path) -> None:
    engine = await make_engine(smollm2_path, enable_prefix_caching=False)
    first = _ids(smollm2_path, SYSTEM + "What is a prime number?")
    second = _ids(smollm2_path, SYSTEM + "Name a famous bridge.")
    engine.add_request("a", first, greedy(8))
    await run_all(engine)
    engine.add_request("b", second, greedy(8))
    run = await run_all(engine)
    assert {o.num_cached_tokens for o in run.outputs} == {0}
    assert run.tokens[("b", 0)] == hf_greedy(smollm2_path, tuple(second), 8)
    # Nothing was published, so every block is free again, none cached.
    assert_all_free_or_cached(engine)
    pool = engine.allocator.manager.executors[engine.allocator.executor_id].pool
    assert len(pool.cached) == 0 and len(pool.free) == pool.num_blocks
