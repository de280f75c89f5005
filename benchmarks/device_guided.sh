#!/usr/bin/env bash
# One device-tool call for structured output (issue 23): the mask kernel's GPU test, the guided
# path's host time per step alone (guided_host_bench.py) and the engine's throughput with and
# without constraints (structured_bench.py). Here, before the call: the wheels the device image
# lacks in .whl/ and SmolLM2's tokenizer in .tok/ (carry [".whl", ".tok"]).
source "$(dirname "$0")/device_env.sh"
echo "== gpu test"; timeout 60 python3 -P -m pytest -m gpu tests/kernels/test_token_mask.py -q -p no:cacheprovider 2>&1 | tail -3
echo "== guided host"; timeout 120 python3 benchmarks/guided_host_bench.py --tokenizer .tok 2>"$OUT/guided_host.err" | tail -1 | tee "$OUT/guided_host.jsonl"; tail -3 "$OUT/guided_host.err"
echo "== structured"; timeout 240 python3 benchmarks/structured_bench.py --tokenizer .tok --rounds 3 2>"$OUT/structured.err" | tail -1 | tee "$OUT/structured.jsonl"; tail -4 "$OUT/structured.err"
