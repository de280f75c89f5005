#!/usr/bin/env bash
# Run X, second call on the same machine: the decode step profile of this tree against the
# session's base (.base/, step_profile.py on both, base first), structured output's apply pieces
# (guided_host_bench's h2d_probe), the TTFT breakdown at light load (ttft_breakdown.py, the
# cached arm; ARMS=cached,sync for both). Carry [".whl", ".tok", ".base"].
source "$(dirname "$0")/device_env.sh"
LOG="$OUT/logs.txt"
python3 -m pip install -q --no-deps --no-build-isolation --no-compile --target /tmp/pm_old .base >/dev/null 2>&1 || echo "install base failed"
rm -rf .base/build
echo "== step profile base, new"
PYTHONPATH=/tmp/pm_old:/tmp/site timeout 90 python3 benchmarks/step_profile.py 2>>"$LOG" | tail -1 | sed 's/^/old /' | tee -a "$OUT/step_profile.jsonl"
timeout 90 python3 benchmarks/step_profile.py 2>>"$LOG" | tail -1 | sed 's/^/new /' | tee -a "$OUT/step_profile.jsonl"
echo "== guided host + h2d probe"
timeout 60 python3 benchmarks/guided_host_bench.py --tokenizer .tok --steps 50 2>>"$LOG" | tail -1 | tee "$OUT/guided_host.jsonl"
echo "== ttft"
[ -d /tmp/rand1b ] || python3 benchmarks/make_random_model.py /tmp/rand1b --tokenizer .tok >>"$LOG" 2>&1
timeout 120 python3 benchmarks/ttft_breakdown.py --model /tmp/rand1b --device cuda --rate 16 \
  --num-requests 64 --arms "${ARMS:-cached}" --gateway-workers 8 \
  --executor-arg=--max-num-batched-tokens=4096 --workdir /tmp/ttft 2>>"$LOG" | tee "$OUT/ttft.jsonl"
(cd /tmp/ttft && tar czf "$OUT/ttft_traces.tgz" . 2>/dev/null)
tail -4 "$LOG"
