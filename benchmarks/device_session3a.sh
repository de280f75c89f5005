#!/usr/bin/env bash
# Run X, first call (benchmarks/RESULTS.md): the GPU tests that first run this session's CUDA
# paths (the engine's step landing and batch building, the host tier's streams and staging, the
# mask kernel's variants), then the host tier's figures: the multi-turn TTFT (tier_bench: off,
# on, resident) and its cost on the mixed workload (tier_bench --mixed-only, interleaved
# repeats). Here, before the call: .whl/ and .tok/; carry [".whl", ".tok"].
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/logs.txt"
echo "== gpu tests"
timeout 150 python3 -P -m pytest -m gpu tests/executor/test_engine_gpu.py tests/executor/test_host_tier_gpu.py tests/kernels/test_token_mask.py -q -p no:cacheprovider 2>&1 | tail -6
echo "== tier, multi-turn (off / on / resident) and mixed"
timeout 300 python3 benchmarks/tier_bench.py 2>>"$LOG" | tail -1 | tee "$OUT/tier.jsonl"
echo "== mixed only, interleaved"
timeout 150 python3 benchmarks/tier_bench.py --mixed-only 2>>"$LOG" | tail -1 | tee "$OUT/mixed_ab.jsonl"
tail -4 "$LOG"
