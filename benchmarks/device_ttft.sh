#!/usr/bin/env bash
# One device-tool call: the TTFT breakdown at light load (benchmarks/ttft_breakdown.py) on a ~1B
# random-weight Llama: 16 requests/s, a 1,024-token system prompt, user parts of 64..256 tokens,
# 32 output tokens; the arms (each a fresh mesh: Redis, kvmanager, executor, gateway): cached
# (async scheduling, as served) and sync (the same with --scheduling sync: the price of async
# scheduling at light load); the serving suite's 8 gateway workers, 4,096 tokens a step.
# Here, before the call: the wheels the device image lacks in .whl/ and SmolLM2's tokenizer
# files in .tok/ (both ignored; carry [".whl", ".tok"]). Extra arguments go to
# ttft_breakdown.py; ARMS=cached,sync,uncached adds the uncached arm (a mesh start more).
# JSON lines and traces go to $OUT.
source "$(dirname "$0")/device_env.sh"
[ -d /tmp/rand1b ] || python3 benchmarks/make_random_model.py /tmp/rand1b --tokenizer .tok \
  > "$OUT/make_model.log" 2>&1 || { tail -20 "$OUT/make_model.log"; exit 1; }
# The serving suite's settings (runs M-O): 8 gateway workers, 4,096 tokens a step.
python3 benchmarks/ttft_breakdown.py --model /tmp/rand1b --device cuda --rate 16 \
  --num-requests 64 --arms "${ARMS:-cached,sync}" --gateway-workers 8 \
  --executor-arg=--max-num-batched-tokens=4096 \
  --workdir /tmp/ttft "$@" 2> "$OUT/ttft.err" | tee "$OUT/ttft.jsonl"
for arm in cached sync uncached; do
  for f in gateway executor; do cp "/tmp/ttft/$arm/$f.jsonl" "$OUT/${arm}_$f.jsonl" 2>/dev/null; done
done
tail -5 "$OUT/ttft.err"
