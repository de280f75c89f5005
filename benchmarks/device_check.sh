#!/usr/bin/env bash
# One device-tool call that checks and times what changed on the GPU: structured output's
# throughput (benchmarks/structured_bench.py, the ~1B random-weight model with SmolLM2's
# tokenizer) and its host time per step (benchmarks/guided_host_bench.py), the GPU tests
# (pytest -m gpu over tests/executor and tests/kernels), and one routing call's cost on the GPU
# host's CPU (benchmarks/route_call_bench.py). Here, before the call: the wheels the device image lacks in .whl/ (xgrammar and its dependencies among them)
# and SmolLM2's tokenizer files in .tok/ (carry [".whl", ".tok"]). JSON lines and logs go to
# $OUT.
source "$(dirname "$0")/device_env.sh"
python3 benchmarks/structured_bench.py --tokenizer .tok 2> "$OUT/structured.err" \
  | tee "$OUT/structured.jsonl"
tail -3 "$OUT/structured.err"
# Structured output's host time per step (accept, fill, apply; before/after; fill threads; GIL).
python3 benchmarks/guided_host_bench.py --tokenizer .tok 2> "$OUT/guided_host.err" \
  | tee "$OUT/guided_host.jsonl"
tail -3 "$OUT/guided_host.err"
python3 -P -m pytest -m gpu tests/executor tests/kernels -q -p no:cacheprovider 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -8
python3 benchmarks/route_call_bench.py --calls 2000 2> "$OUT/route_call.err" \
  | tee "$OUT/route_call.jsonl"
tail -3 "$OUT/route_call.err"
