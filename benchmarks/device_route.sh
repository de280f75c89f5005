#!/usr/bin/env bash
# One device-tool call: the fleet on one GPU (N executors sharing it, each with its own pool),
# every routing policy through the whole mesh (benchmarks/route_bench.py) on a ~1B random-weight
# Llama. Here, before the call: the wheels the device image lacks in .whl/ and SmolLM2's
# tokenizer files in .tok/ (both ignored; carry [".whl", ".tok"]). Extra arguments go to
# route_bench.py. JSON lines and logs go to $OUT.
source "$(dirname "$0")/device_env.sh"
[ -d /tmp/rand1b ] || python3 benchmarks/make_random_model.py /tmp/rand1b --tokenizer .tok \
  > "$OUT/make_model.log" 2>&1 || { tail -20 "$OUT/make_model.log"; exit 1; }
python3 benchmarks/route_bench.py --model /tmp/rand1b --device cuda "$@" \
  2> "$OUT/route.err" | tee "$OUT/route.jsonl"
tail -5 "$OUT/route.err"
