#!/usr/bin/env bash
# Issue 26's two cuts on the GPU, one device call (about 4 minutes on an H100): the host tier's
# multi-turn TTFT and the returning turn's admitting step host time (schedule / launch: cut 1,
# kvmanager's one-pass eviction bookkeeping; run X had 3.38 / 3.43 ms on, 1.19 / 1.37 off), then
# the mixed workload, tier off / on / on without spill ahead, interleaved repeats (cut 2, spill
# ahead of eviction; run X: -0.94 to -3.4%); last the host tier's GPU tests (the CUDA copy path
# with spills ahead). Before the call: .whl/ as for device_session3c.sh; carry [".whl"].
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/logs.txt"
echo "== tier: multi-turn (off / on), then mixed off / on / on_noahead interleaved"
timeout 330 python3 benchmarks/tier_bench.py --no-resident --conversations 12 --turns 3 \
  --mixed-ab --no-ahead-arm --mixed-repeats 3 2>>"$LOG" | tail -1 | tee "$OUT/tier_cuts.jsonl"
echo "== host tier gpu tests"
timeout 90 python3 -P -m pytest -m gpu tests/executor/test_host_tier_gpu.py -q -p no:cacheprovider 2>&1 | tail -4
tail -4 "$LOG"
