#!/usr/bin/env bash
# One device-tool call for the host tier's cost on the mixed workload (issue 26): the host-tier
# GPU tests, then benchmarks/tier_bench.py --mixed-only (tier off and on interleaved, 5 paired
# repeats) on this tree, and, when .base/ holds an older tree, the same script on that tree's
# package (its engine, this script), for the before/after.
#
# Here, before the call (optional, the before/after):
#   git archive <old-commit> | (rm -rf .base && mkdir .base && tar -x -C .base)
# The call (carry [".whl"] or [".whl", ".base"]):
#   bash benchmarks/device_spill.sh
source "$(dirname "$0")/device_env.sh"
echo "== host tier gpu tests"
timeout 150 python3 -P -m pytest -m gpu tests/executor/test_host_tier_gpu.py -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -4
echo "== mixed, this tree"
timeout 240 python3 benchmarks/tier_bench.py --conversations 32 --mixed-only 2>"$OUT/mixed_new.err" \
  | tail -1 | tee "$OUT/mixed_new.jsonl"
tail -3 "$OUT/mixed_new.err"
if [ -d .base ]; then
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm_base ./.base >/dev/null 2>&1 \
    || echo "install base failed"
  rm -rf .base/build
  echo "== mixed, base tree's engine"
  PYTHONPATH=/tmp/pm_base:/tmp/site timeout 240 python3 benchmarks/tier_bench.py --conversations 32 --mixed-only \
    2>"$OUT/mixed_base.err" | tail -1 | tee "$OUT/mixed_base.jsonl"
  tail -3 "$OUT/mixed_base.err"
fi
