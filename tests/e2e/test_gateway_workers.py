"""`pagemesh gateway --workers 2`: two processes share the HTTP port, each with its own Serve
stream to the executor; both serve, and each response names its worker (x-pagemesh-worker). If
one dies the other serves on and the parent starts a new worker in its place, with its own Serve
stream, which serves too, taking connections only once it can serve."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import psutil

from tests.support.mesh import Mesh, MeshConfig, wait_for

QUESTION = {"role": "user", "content": "What is the capital of France?"}


def _ask(mesh: Mesh) -> tuple[str, int]:
    """(the answer, the pid of the worker that gave it)."""
    body = json.dumps(
        {"model": "smollm2", "messages": [QUESTION], "max_tokens": 12, "temperature": 0}
    ).encode()
    req = urllib.request.Request(
        mesh.url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer = json.loads(resp.read())["choices"][0]["message"]["content"]
        return answer, int(resp.headers["X-Pagemesh-Worker"])


def test_workers_share_the_port_and_a_dead_one_is_replaced(
    smollm2_path: Path, tmp_path: Path
) -> None:
    config = MeshConfig(model=str(smollm2_path), gateway_args=["--workers", "2"])
    with Mesh(tmp_path, config) as mesh:
        parent = psutil.Process(mesh.pids()["gateway"])
        workers = parent.children()
        assert len(workers) == 2
        for _ in range(4):
            answer, worker = _ask(mesh)
            assert "Paris" in answer
            assert worker in {w.pid for w in workers}
        log = (tmp_path / "executor.log").read_text()
        assert log.count("Serve stream opened") >= 2, "each worker opens its own Serve stream"
        assert mesh.executor_info().num_serve_streams == 2

        workers[0].kill()
        workers[0].wait(30)  # (a connection the dying one had accepted would be reset)
        # The other one serves on, alone, while the parent replaces the dead one.
        assert "Paris" in _ask(mesh)[0]
        replaced = wait_for(
            lambda: len(c := parent.children()) == 2 and workers[0].pid not in {w.pid for w in c},
            60,
            "a new worker in the dead one's place",
        )
        assert replaced and parent.is_running() and workers[1].is_running()
        new = next(w for w in parent.children() if w.pid != workers[1].pid)
        # While the new worker loads, every request is answered (it takes no connection before
        # it can serve: no 503 "not ready"); then the kernel gives it its share.
        deadline = time.monotonic() + 120
        while _ask(mesh)[1] != new.pid:
            assert time.monotonic() < deadline, "the new worker never answered"
        assert mesh.executor_info().num_serve_streams == 2
        assert f"restarted (pid {new.pid}," in (tmp_path / "gateway.log").read_text()
