"""What an operator meets when starting fails, with real processes and no model loaded: a
permanent start-up error is one line with what to do, quickly and without retries (pagemesh
up's checks, exits.py's code 78 through the supervisor), and service output is prefixed line
by line even when progress bars redraw (line_prefixer.py)."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pagemesh.exits import EXIT_CONFIG
from pagemesh.line_prefixer import LinePrefixer
from pagemesh.redis_process import free_port
from pagemesh.up import Console, Service, Supervisor
from tests.support.mesh import REPO_ROOT


def _up(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], float]:
    argv = [sys.executable, "-P", "-m", "pagemesh.cli", "up", "--device", "cpu", *args]
    argv += ["--port", str(free_port()), "--kv-port", str(free_port())]
    argv += ["--executor-port", str(free_port()), "--kv-metrics-port", "0"]
    argv += ["--data-dir", str(tmp_path / "redis")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("HF_HUB_OFFLINE", None)
    started = time.monotonic()
    result = subprocess.run(
        argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    return result, time.monotonic() - started


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    out = result.stdout + result.stderr
    assert "Traceback" not in out, out
    assert "retrying" not in out and "healthy" not in out, out
    errors = [line for line in out.splitlines() if "error:" in line]
    assert len(errors) == 1, out
    assert len(out.strip().splitlines()) == 1, out  # nothing else: nothing was started
    return errors[0]


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        # No network here (as in CI): the hub is unreachable; with a network, "no model".
        ("no-such-org-pagemesh/no-such-model", ("Hugging Face hub", "--model")),
        ("/nonexistent/dir/model.Q8_0.gguf", ("GGUF file not found", "--model")),
        ("./no-such-model-dir", ("neither a model directory", "check the path")),
    ],
)
def test_a_bad_model_fails_in_one_line_without_retries(
    tmp_path: Path, model: str, expected: tuple[str, ...]
) -> None:
    result, elapsed = _up(tmp_path, "--model", model)
    assert result.returncode == 1
    line = _one_error_line(result)
    assert all(part in line for part in expected), line
    assert elapsed < 10, f"{elapsed:.1f}s"  # the bound for a bad model id


def test_an_unsupported_architecture_fails_in_one_line(tmp_path: Path) -> None:
    model = tmp_path / "bert-base"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    result, _ = _up(tmp_path, "--model", str(model))
    assert result.returncode == 1
    line = _one_error_line(result)
    assert "'bert'" in line and "supported: llama" in line, line


def test_an_unreadable_api_key_file_fails_in_one_line(tmp_path: Path, smollm2_path: Path) -> None:
    result, _ = _up(tmp_path, "--model", str(smollm2_path), "--api-key-file", "/no/such/keys")
    assert result.returncode == 1
    assert "--api-key-file" in _one_error_line(result)


def test_the_executor_alone_exits_78_with_one_line(tmp_path: Path) -> None:
    argv = [sys.executable, "-P", "-m", "pagemesh.cli", "executor", "--device", "cpu"]
    argv += ["--model", str(tmp_path / "missing.gguf"), "--port", str(free_port())]
    result = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == EXIT_CONFIG
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        f"error: GGUF file not found: {tmp_path / 'missing.gguf'}: check the path given to --model"
    ]


async def test_the_supervisor_does_not_retry_a_permanent_error() -> None:
    """A service that exits with EXIT_CONFIG is started once, and its line is the reason."""
    code = (
        "import sys; print('loading'); "
        "print('error: port 1 is in use: choose another with --port', file=sys.stderr); "
        f"sys.exit({EXIT_CONFIG})"
    )
    starts = 0

    async def never_healthy() -> bool:
        return False

    sup = Supervisor(Console(), start_timeout=60)
    spawn = sup._spawn

    async def counting_spawn(svc: Service) -> None:
        nonlocal starts
        starts += 1
        await spawn(svc)

    sup._spawn = counting_spawn  # type: ignore[method-assign]  # (counts the real spawns)
    svc = Service("kvmanager", [sys.executable, "-c", code], never_healthy)
    with pytest.raises(RuntimeError) as info:
        await sup.start(svc)
    assert str(info.value) == "kvmanager: port 1 is in use: choose another with --port"
    assert starts == 1
    # A transient failure (any other code) is retried as before.
    starts = 0
    flaky = Service("gateway", [sys.executable, "-c", "import sys; sys.exit(3)"], never_healthy)
    with pytest.raises(RuntimeError, match=r"did not become healthy \(3 attempts\)"):
        await asyncio.wait_for(sup.start(flaky), 60)
    assert starts == 3


def _prefix(name: str) -> bytes:
    return f"{name:<8} | ".encode()


@pytest.mark.parametrize("tty", [False, True])
def test_progress_bars_never_share_a_line_with_other_output(tty: bool) -> None:
    out = io.BytesIO()
    lines = LinePrefixer(out, _prefix, tty)
    lines.feed("executor", b"Downloading\n\r  0%|          | 0/90")
    lines.feed("gateway", b"gateway on http://127.0.")
    lines.feed("executor", b"\r 50%|#####     | 45/90\r")
    lines.feed("gateway", b"0.1:8000\nsecond\r\n")
    lines.feed("executor", b"100%|##########| 90/90\n")
    lines.feed("executor", b"loaded\n")
    lines.close()
    text = out.getvalue().decode()
    # What a terminal shows: each \r returns to the line's start, \x1b[K clears what follows.
    screen: list[str] = []
    for raw in text.split("\n")[:-1]:
        frames = [f.replace("\x1b[K", "") for f in raw.split("\r") if f]
        screen.append(frames[-1] if frames else "")
    assert screen == [
        *(["executor | Downloading"]),
        *(["executor |  50%|#####     | 45/90"] if tty else []),
        "gateway  | gateway on http://127.0.0.1:8000",
        "gateway  | second",
        "executor | 100%|##########| 90/90",
        "executor | loaded",
    ]
    if not tty:
        assert "\r" not in text  # a log file gets lines, not redraw frames


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [False, True])
def test_tritons_exit_noise_is_silenced(quiet: bool, smollm2_path: Path) -> None:
    """A CPU executor (in-process allocator: no kvmanager needed) started, serving, stopped
    with SIGTERM: `pagemesh executor` prints no "nanobind: leaked ..." at exit, where the same
    run without quiet_interpreter_exit() (exits.py) printed them."""
    argv = ["executor", "--model", str(smollm2_path), "--allocator", "local", "--device", "cpu"]
    argv += ["--port", str(free_port()), "--num-blocks", "64"]
    if quiet:
        cmd = [sys.executable, "-P", "-m", "pagemesh.cli", *argv]
    else:  # the command's own code, minus the silencing
        code = (
            "import asyncio, sys\n"
            "from pagemesh.cli import build_parser\n"
            "from pagemesh.services.executor import cli\n"
            "import logging; logging.basicConfig(level='INFO')\n"
            "asyncio.run(cli._main(build_parser().parse_args(sys.argv[1:])))\n"
        )
        cmd = [sys.executable, "-P", "-c", code, *argv]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        cmd, cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert proc.stderr is not None
    seen: list[str] = []
    try:
        for line in proc.stderr:
            seen.append(line)
            if " serving " in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = "".join(seen) + rest
    assert any(" serving " in line for line in seen), log[-3000:]
    if quiet:
        assert proc.returncode == 0, log[-3000:]
        assert "nanobind" not in log, log[-3000:]
    else:  # what an executor stop printed before
        assert "nanobind: leaked" in log


def test_executor_ids_are_unique_unless_set() -> None:
    """Without --executor-id two executors of one kvmanager never share an id (it is the
    address gateways reach them on); one that is set is kept."""
    from pagemesh.services.executor.cli import executor_id

    from pagemesh.cli import build_parser

    parse = build_parser().parse_args
    a = parse(["executor", "--port", "50052"])
    b = parse(["executor", "--port", "50053"])
    c = parse(["executor", "--host", "0.0.0.0", "--advertise", "gpu-7:50052"])
    assert executor_id(a) == "127.0.0.1:50052" != executor_id(b)
    assert executor_id(c) == "gpu-7:50052"
    assert executor_id(parse(["executor", "--executor-id", "executor-0"])) == "executor-0"


def test_api_key_file(tmp_path: Path) -> None:
    from pagemesh.services.gateway.cli import ApiKeyError, read_api_key_file

    keys = tmp_path / "keys"
    keys.write_text("# rotated weekly\nsk-one\n\n  sk-two , sk-three\n")
    assert read_api_key_file(str(keys)) == ["sk-one", "sk-two", "sk-three"]
    keys.write_text("# no key yet\n")
    with pytest.raises(ApiKeyError, match="holds no key"):  # never "no auth" by accident
        read_api_key_file(str(keys))
    with pytest.raises(ApiKeyError, match="cannot read"):
        read_api_key_file(str(tmp_path / "missing"))
