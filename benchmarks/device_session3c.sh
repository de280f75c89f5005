#!/usr/bin/env bash
# Run X (benchmarks/RESULTS.md), the session's one device call, in order of need: the GPU tests
# that first run this session's CUDA paths (the engine's step landing and batch building, the
# host tier's streams and staging, the mask kernel's variants); the host tier's figures (the
# multi-turn TTFT, tier off / on, and the mixed workload; then the mixed workload alone, tier off
# and on interleaved); the decode step profile of this tree against the session's base (.base/).
# Here, before the call: .whl/, .tok/, .base/ (git archive 93293d1); carry [".whl", ".tok", ".base"].
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/logs.txt"
echo "== gpu tests"
timeout 100 python3 -P -m pytest -m gpu tests/executor/test_engine_gpu.py tests/executor/test_host_tier_gpu.py tests/kernels/test_token_mask.py -q -p no:cacheprovider 2>&1 | tail -6
echo "== tier: multi-turn (off / on) and mixed"
timeout 250 python3 benchmarks/tier_bench.py --no-resident 2>>"$LOG" | tail -1 | tee "$OUT/tier.jsonl"
echo "== mixed only, interleaved"
timeout 110 python3 benchmarks/tier_bench.py --mixed-only --mixed-repeats 3 2>>"$LOG" | tail -1 | tee "$OUT/mixed_ab.jsonl"
echo "== step profile base, new"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm_old .base >/dev/null 2>&1 || echo "install base failed"
rm -rf .base/build
PYTHONPATH=/tmp/pm_old:/tmp/site timeout 60 python3 benchmarks/step_profile.py 2>>"$LOG" | tail -1 | sed 's/^/old /' | tee -a "$OUT/step_profile.jsonl"
timeout 60 python3 benchmarks/step_profile.py 2>>"$LOG" | tail -1 | sed 's/^/new /' | tee -a "$OUT/step_profile.jsonl"
tail -4 "$LOG"
