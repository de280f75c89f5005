#!/usr/bin/env bash
# Run X (benchmarks/RESULTS.md), one device-tool call: the host tier's GPU tests and its cost on
# the mixed workload (tier_bench --mixed-only: this tree, then .base/'s engine), the multi-turn
# TTFT (tier_bench: off, on, resident), apply's pieces
# on CUDA (guided_host_bench's h2d_probe), the TTFT breakdown at light load (ttft_breakdown.py,
# cached and sync arms). Here, before the call: .whl/, .tok/ and .base/ (git archive of the
# session's first commit); carry [".whl", ".tok", ".base"].
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/logs.txt"
echo "== host tier gpu tests"
timeout 120 python3 -P -m pytest -m gpu tests/executor/test_host_tier_gpu.py tests/kernels/test_token_mask.py -q -p no:cacheprovider 2>&1 | tail -4
echo "== mixed, this tree"
timeout 200 python3 benchmarks/tier_bench.py --conversations 32 --mixed-only 2>>"$LOG" | tail -1 | tee "$OUT/mixed_new.jsonl"
echo "== tier, multi-turn (off / on / resident) and mixed"
timeout 330 python3 benchmarks/tier_bench.py 2>>"$LOG" | tail -1 | tee "$OUT/tier.jsonl"
echo "== guided host + h2d probe"
timeout 90 python3 benchmarks/guided_host_bench.py --tokenizer .tok --steps 50 2>>"$LOG" | tail -1 | tee "$OUT/guided_host.jsonl"
echo "== ttft"
[ -d /tmp/rand1b ] || python3 benchmarks/make_random_model.py /tmp/rand1b --tokenizer .tok >>"$LOG" 2>&1
timeout 200 python3 benchmarks/ttft_breakdown.py --model /tmp/rand1b --device cuda --rate 16 \
  --num-requests 64 --arms cached,sync --gateway-workers 8 \
  --executor-arg=--max-num-batched-tokens=4096 --workdir /tmp/ttft 2>>"$LOG" | tee "$OUT/ttft.jsonl"
(cd /tmp/ttft && tar czf "$OUT/ttft_traces.tgz" . 2>/dev/null)
echo "== mixed, base tree's engine"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm_base ./.base >/dev/null 2>&1 || echo "install base failed"
rm -rf .base/build
PYTHONPATH=/tmp/pm_base:/tmp/site timeout 150 python3 benchmarks/tier_bench.py --conversations 32 --mixed-only 2>>"$LOG" | tail -1 | tee "$OUT/mixed_base.jsonl"
tail -5 "$LOG"
