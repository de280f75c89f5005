#!/usr/bin/env bash
# One device-tool call: benchmarks/step_profile.py on this tree and on an older one, interleaved
# (old, new, old, new), then the GPU tests of tests/executor on this tree.
#
# Here, before the call:
#   git archive <old-commit> | (rm -rf .base && mkdir .base && tar -x -C .base)   # the old tree
# The call (carry [".base"], plus ".whl" if the device image lacks a wheel):
#   OLD_REV=<old-commit> NEW_REV=$(git rev-parse --short HEAD) bash benchmarks/device_step_ab.sh
# Both arms run this tree's step_profile.py (and throughput.py's helpers); only the installed
# pagemesh differs: the old tree installs beside the new one and goes first on PYTHONPATH.
# ROUNDS (default 2) sets the pairs; PROFILE_ARGS passes extra step_profile.py arguments.
# Logs and JSON lines go to $OUT.
source "$(dirname "$0")/device_env.sh"
echo "new tree: ${NEW_REV:-?}, old tree: ${OLD_REV:-?}" | tee -a "$OUT/device.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm_old .base \
  || exit 1
rm -rf .base/build
ROUNDS=${ROUNDS:-2}
PROFILE_ARGS=${PROFILE_ARGS:-}
for round in $(seq "$ROUNDS"); do
  PYTHONPATH=/tmp/pm_old:/tmp/site python3 benchmarks/step_profile.py $PROFILE_ARGS \
    2>"$OUT/sp_old_$round.err" | tail -1 | sed 's/^/old /' | tee -a "$OUT/step_profile.jsonl"
  python3 benchmarks/step_profile.py $PROFILE_ARGS \
    2>"$OUT/sp_new_$round.err" | tail -1 | sed 's/^/new /' | tee -a "$OUT/step_profile.jsonl"
done
python3 -P -m pytest -m gpu tests/executor -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -5
