#!/usr/bin/env bash
# One device-tool call: the fleet on one GPU (N executors sharing it, each with its own pool),
# every routing policy through the whole mesh (benchmarks/route_bench.py) on a ~1B random-weight
# Llama. Here, before the call: the wheels the device image lacks in .whl/ and SmolLM2's
# tokenizer files in .tok/ (both ignored; carry [".whl", ".tok"]). Extra arguments go to
# route_bench.py. JSON lines and logs go to $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm . || exit 1
rm -rf build
export PYTHONPATH=/tmp/pm:/tmp/site
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/device.txt"
[ -d /tmp/rand1b ] || python3 benchmarks/make_random_model.py /tmp/rand1b --tokenizer .tok \
  > "$OUT/make_model.log" 2>&1 || { tail -20 "$OUT/make_model.log"; exit 1; }
python3 benchmarks/route_bench.py --model /tmp/rand1b --device cuda "$@" \
  2> "$OUT/route.err" | tee "$OUT/route.jsonl"
tail -5 "$OUT/route.err"
