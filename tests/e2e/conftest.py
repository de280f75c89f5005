"""One mesh for the whole e2e module: Redis, kvmanager, executor (SmolLM2 on CPU) and gateway,
each its own process on loopback (tests/support/mesh.py). Starting it is most of the time, so
the tests share it and leave it idle (blocks back to baseline) when they finish."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.mesh import Mesh, MeshConfig

API_KEY = "e2e-secret"
MODEL = "SmolLM2-135M-Instruct"
NUM_BLOCKS = 512


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory, smollm2_path: Path) -> Iterator[Mesh]:
    config = MeshConfig(
        model=str(smollm2_path),
        num_blocks=NUM_BLOCKS,
        api_key=API_KEY,
        model_name=MODEL,
        # Two sequences at once makes "queued" easy to reach; small prefill chunks make "during
        # prefill" last several steps on a CPU.
        executor_args=("--max-num-seqs", "2", "--max-num-batched-tokens", "256"),
    )
    with Mesh(tmp_path_factory.mktemp("e2e"), config) as m:
        yield m
