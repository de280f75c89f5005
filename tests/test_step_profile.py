"""benchmarks/step_profile.py's trace analysis on hand-made profiler traces: kernels are split
by kind (a kernel launched from inside the sampler counts as sampling, by its launch's
correlation id), device busy time is the union of device intervals, the host gap the rest of
the steps' wall time; on CPU an op's time is its self time."""

from __future__ import annotations

import pytest

from benchmarks.step_profile import SAMPLE, STEP, analyse


def _x(name: str, cat: str, ts: float, dur: float, tid: int, **args: int) -> dict:
    return {"ph": "X", "name": name, "cat": cat, "ts": ts, "dur": dur, "tid": tid, "args": args}


def test_cuda_trace_split() -> None:
    host, stream = 1, 7
    events = [
        _x(STEP, "user_annotation", 0, 100, host),
        _x(STEP, "user_annotation", 100, 100, host),
        _x(SAMPLE, "user_annotation", 80, 10, host),
        _x("cudaGraphLaunch", "cuda_runtime", 10, 2, host, correlation=1),
        _x("cudaLaunchKernel", "cuda_runtime", 85, 1, host, correlation=2),
        _x("cudaMemcpyAsync", "cuda_runtime", 95, 1, host, correlation=3),
        _x("cudaGraphLaunch", "cuda_runtime", 110, 2, host, correlation=4),
        _x("nvjet_tst_128x64_gemm", "kernel", 20, 30, stream, correlation=1),
        _x("_decode_kernel", "kernel", 50, 10, stream, correlation=1),
        _x("_rms_norm_kernel", "kernel", 60, 10, stream, correlation=1),
        # an argmax-looking name outside the sampler would be sampling too; this one is
        # "elementwise"-named but launched inside it
        _x("reduce_kernel", "kernel", 86, 2, stream, correlation=2),
        _x("Memcpy DtoH (Device -> Pinned)", "gpu_memcpy", 96, 2, stream, correlation=3),
        _x("nvjet_tst_128x64_gemm", "kernel", 120, 30, stream, correlation=4),
        _x("_rms_norm_kernel", "kernel", 140, 20, 8, correlation=4),  # overlaps: counted once
    ]
    split, table = analyse({"traceEvents": events}, cuda=True)
    assert split["profiled_step_ms"] == pytest.approx(0.1)
    per_step = {"gemm": 30.0, "attention": 5.0, "elementwise": 15.0, "sampling": 1.0, "memcpy": 1.0}
    assert split["device_ms"] == {k: pytest.approx(v / 1e3) for k, v in per_step.items()}
    # busy: 20-70, 86-88, 96-98, 120-160 = 50 + 2 + 2 + 40 = 94 us over 2 steps
    assert split["device_busy_ms"] == pytest.approx(0.047)
    assert split["host_gap_ms"] == pytest.approx(0.1 - 0.047)
    assert split["kernels_per_step"] == 3.5
    assert table[0]["name"] == "nvjet_tst_128x64_gemm" and table[0]["us_per_step"] == 30.0
    assert {r["name"]: r["kind"] for r in table}["reduce_kernel"] == "sampling"


def test_cpu_trace_uses_self_times() -> None:
    events = [
        _x(STEP, "user_annotation", 0, 100, 1),
        _x("aten::linear", "cpu_op", 0, 50, 1),
        _x("aten::addmm", "cpu_op", 1, 48, 1),
        _x("aten::resolve_conj", "cpu_op", 2, 1, 1),
        _x(SAMPLE, "user_annotation", 60, 20, 1),
        _x("aten::argmax", "cpu_op", 61, 10, 1),
    ]
    split, table = analyse({"traceEvents": events}, cuda=False)
    kinds = {r["name"]: (r["kind"], r["us_per_step"]) for r in table}
    assert kinds["aten::addmm"] == ("gemm", 47.0)
    assert kinds["aten::linear"] == ("elementwise", 2.0)
    assert kinds["aten::resolve_conj"] == ("elementwise", 1.0)
    assert kinds["aten::argmax"] == ("sampling", 10.0)
    assert split["device_busy_ms"] == pytest.approx(0.060)
    assert split["host_gap_ms"] == pytest.approx(0.040)
