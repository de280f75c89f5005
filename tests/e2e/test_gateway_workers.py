"""`pagemesh gateway --workers 2`: two processes share the HTTP port, each with its own Serve
stream to the executor; both serve; if one dies the parent stops the other and exits, so the
supervisor restarts the whole gateway."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import psutil

from tests.support.mesh import Mesh, MeshConfig, wait_for

QUESTION = {"role": "user", "content": "What is the capital of France?"}


def test_workers_share_the_port_and_fail_together(smollm2_path: Path, tmp_path: Path) -> None:
    config = MeshConfig(model=str(smollm2_path), gateway_args=["--workers", "2"])
    with Mesh(tmp_path, config) as mesh:
        body = json.dumps(
            {"model": "smollm2", "messages": [QUESTION], "max_tokens": 12, "temperature": 0}
        ).encode()
        for _ in range(6):
            req = urllib.request.Request(
                mesh.url + "/v1/chat/completions", body, {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(req, timeout=120) as resp:
                answer = json.loads(resp.read())["choices"][0]["message"]["content"]
            assert "Paris" in answer
        parent = psutil.Process(mesh.pids()["gateway"])
        workers = parent.children()
        assert len(workers) == 2
        log = (tmp_path / "executor.log").read_text()
        assert log.count("Serve stream opened") >= 2, "each worker opens its own Serve stream"
        assert mesh.executor_info().num_serve_streams == 2
        workers[0].kill()
        wait_for(lambda: not parent.is_running() or parent.status() == "zombie", 30, "exit")
        wait_for(lambda: not workers[1].is_running() or workers[1].status() == "zombie", 30, "stop")
