#!/usr/bin/env bash
# One device-tool call: GPU tests of this tree, then A/B timings of this tree against an older
# one, interleaved (old, new, old, new) so that both see the same machine in the same state.
#
# Here, before the call:
#   git archive <old-commit> | (rm -rf .base && mkdir .base && tar -x -C .base)   # the old tree
#   wheels missing on the device image in .whl/ (device tool README), both folders ignored
# The call (carry [".whl", ".base"]):
#   bash benchmarks/device_ab.sh tests throughput kernels
# Set NEW_REV/OLD_REV to name the commits in the log, ROUNDS (default 2) for the pairs, TP_ARGS
# for extra throughput.py arguments. Steps: `tests` (pytest -m gpu over tests/executor and tests/kernels), `throughput`
# (benchmarks/throughput.py --skip-hf), `kernels` (benchmarks/kernels_bench.py). Logs and JSON lines go to $OUT.
# The old tree's benchmarks put its own root first on sys.path (that layout predates the one
# import name), so it runs beside the installed new tree.
source "$(dirname "$0")/device_env.sh"
echo "new tree: ${NEW_REV:-?}, old tree: ${OLD_REV:-?}" | tee -a "$OUT/device.txt"
ROUNDS=${ROUNDS:-2}
TP_ARGS=${TP_ARGS:-}

for step in "$@"; do
  case "$step" in
    tests)
      python3 -P -m pytest -m gpu tests/executor tests/kernels -q -p no:cacheprovider 2>&1 \
        | tee "$OUT/gpu_tests.log" | tail -5 ;;
    throughput)
      for round in $(seq "$ROUNDS"); do
        (cd .base && python3 benchmarks/throughput.py --skip-hf $TP_ARGS 2>"$OUT/tp_old_$round.err") \
          | tail -1 | sed 's/^/old /' | tee -a "$OUT/throughput.jsonl"
        python3 benchmarks/throughput.py --skip-hf $TP_ARGS 2>"$OUT/tp_new_$round.err" \
          | tail -1 | sed 's/^/new /' | tee -a "$OUT/throughput.jsonl"
      done ;;
    kernels)
      for round in $(seq "$ROUNDS"); do
        (cd .base && python3 benchmarks/kernels_bench.py 2>"$OUT/k_old_$round.err") \
          | tail -1 | sed 's/^/old /' | tee -a "$OUT/kernels.jsonl"
        python3 benchmarks/kernels_bench.py 2>"$OUT/k_new_$round.err" \
          | tail -1 | sed 's/^/new /' | tee -a "$OUT/kernels.jsonl"
      done ;;
    *) echo "unknown step $step" ;;
  esac
done
