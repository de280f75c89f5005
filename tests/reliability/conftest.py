"""One mesh for the whole reliability suite: starting the executor (model load) is the expensive
part on a 2-core CPU machine, so every test shares it and brings it back to health first.

The mesh runs with an API key (the security tests need one; everyone else sends it) and leaves
kvmanager and the executor on their default bind address (the loopback test checks that).

Set PAGEMESH_RELIABILITY_FIGURES=/path/file.jsonl to collect the figures each test measured
(requests completed / failed cleanly / lost, recovery times) for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.mesh import Mesh, MeshConfig

API_KEY = "sk-reliability-test-key"
NUM_BLOCKS = int(os.environ.get("PAGEMESH_RELIABILITY_NUM_BLOCKS", "768"))
# The executor's kvmanager outage bound (--kvmanager-outage-timeout, 30 s by default): short
# enough for a test to outlast it, long enough for every kvmanager restart the suite makes.
OUTAGE_BOUND_S = 15.0


@pytest.fixture(scope="session")
def mesh_model(request: pytest.FixtureRequest) -> str:
    """The CPU model every service runs: tests/conftest.py's SmolLM2 fixture."""
    return str(request.getfixturevalue("smollm2_path"))


@pytest.fixture(scope="session")
def shared_mesh(tmp_path_factory: pytest.TempPathFactory, mesh_model: str) -> Iterator[Mesh]:
    config = MeshConfig(
        model=mesh_model,
        api_key=API_KEY,
        num_blocks=NUM_BLOCKS,
        executor_args=("--kvmanager-outage-timeout", str(OUTAGE_BOUND_S)),
    )
    mesh = Mesh(tmp_path_factory.mktemp("mesh"), config)
    mesh.start()
    try:
        yield mesh
    finally:
        mesh.close()


@pytest.fixture
def mesh(shared_mesh: Mesh) -> Mesh:
    """The shared mesh, healthy and quiet, whatever the previous test did to it: a leak is that
    test's to report, so blocks a previous test left in use are cleared by restarting the
    executor (its new epoch drops them) rather than failing every test after it."""
    shared_mesh.ensure_healthy()
    try:
        shared_mesh.wait_idle(timeout=20)
    except TimeoutError:
        shared_mesh.restart("executor")
        shared_mesh.wait_idle(timeout=30)
    return shared_mesh


class Figures:
    """Figures for the RESULTS.md table, one record per test."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, test: str, **values: Any) -> None:
        entry = {"test": test, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        entry.update(values)
        self.records.append(entry)
        print(f"FIGURES {json.dumps(entry, sort_keys=True)}")


@pytest.fixture(scope="session")
def figures() -> Iterator[Figures]:
    collected = Figures()
    yield collected
    out = os.environ.get("PAGEMESH_RELIABILITY_FIGURES")
    if out and collected.records:
        with Path(out).open("a") as f:
            for entry in collected.records:
                f.write(json.dumps(entry, sort_keys=True) + "\n")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """On a failure, attach the last lines of every service's log to the report."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "shared_mesh" in getattr(item, "fixturenames", ()):
        mesh = item.funcargs.get("mesh") or item.funcargs.get("shared_mesh")
        if isinstance(mesh, Mesh):
            report.sections.append(("service logs", mesh.tails(60)))


# Faults that need an unevicted index first (Redis key-set comparison), the executor restart
# (which empties the pool with its new epoch) before the tests that fill it, the soak last.
MODULE_ORDER = (
    "test_redis_outage",
    "test_kvmanager_crash",
    "test_executor_restart",
    "test_security",
    "test_fuzz",
    "test_disconnect_storm",
    "test_soak",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    slots = [i for i, item in enumerate(items) if Path(item.path).parent == here]

    def rank(item: pytest.Item) -> int:
        stem = Path(item.path).stem
        return MODULE_ORDER.index(stem) if stem in MODULE_ORDER else len(MODULE_ORDER)

    ordered = sorted((items[i] for i in slots), key=rank)  # stable: order within a module kept
    for slot, item in zip(slots, ordered, strict=True):
        items[slot] = item
