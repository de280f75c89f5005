#!/usr/bin/env bash
# Run V's one device-tool call (benchmarks/RESULTS.md): GPU tests, the routing call twice,
# structured output, the host tier, then the decode step profile of two other trees. Here,
# before the call: wheels in .whl/, SmolLM2's tokenizer in .tok/, the base tree in .base/ (git
# archive fd4926d, with benchmarks/step_profile.py copied in), the other tree in .speed/ (git
# archive of the branch); carry [".whl", ".base", ".speed", ".tok"].
source "$(dirname "$0")/device_env.sh"
for t in base speed; do
  python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm_$t ./.$t >/dev/null 2>&1 || echo "install $t failed"
  rm -rf .$t/build
done
echo "== gpu tests main"; timeout 120 python3 -P -m pytest -m gpu tests/executor tests/kernels -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -6
echo "== route"; for r in 1 2; do timeout 45 python3 benchmarks/route_call_bench.py --calls 2000 2>>"$OUT/route_call.err" | tee -a "$OUT/route_call.jsonl"; done
echo "== structured"; timeout 120 python3 benchmarks/structured_bench.py --tokenizer .tok --rounds 2 2>"$OUT/structured.err" | tail -1 | tee "$OUT/structured.jsonl"; tail -3 "$OUT/structured.err"
echo "== tier"; timeout 150 python3 benchmarks/tier_bench.py --conversations 32 2>"$OUT/tier.err" | tail -1 | tee "$OUT/tier.jsonl"; tail -5 "$OUT/tier.err"
echo "== gpu tests speed"; (cd .speed && PYTHONPATH=/tmp/pm_speed:/tmp/site timeout 50 python3 -P -m pytest -m gpu tests/kernels/test_fused_ops.py tests/executor/test_model_gpu.py -q -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests_speed.log" | tail -6)
echo "== profile"; for t in base speed; do
  (cd .$t && PYTHONPATH=/tmp/pm_$t:/tmp/site timeout 60 python3 benchmarks/step_profile.py 2>"$OUT/prof_$t.err" | tail -1 | sed "s/^/$t /" | tee -a "$OUT/prof.jsonl")
done
