"""`pagemesh executor --trace-steps FILE`: a JSON line per engine step and per request event.

For finding where a request's time goes (admission, host time of a step, the device). Lines are
written through a 64 KiB buffer (a write per step would cost the loop that launches the steps),
flushed when full and at a clean exit. Times are
`time.perf_counter()` seconds: CLOCK_MONOTONIC on Linux, one clock for every process on the
host, so a client's send time and the executor's arrival time compare directly.

Lines:
  {"ev": "step", "t": start, "sched": s, "kv_wait": s, "launch": s, "land": s, "landed": t,
   "end": end, "seqs": n, "tokens": n, "prefill_seqs": n, "admitted": n, "waiting": n, "running": n, "outputs": n,
   "admitted_rids": [id, ...]}          (only on a step that admitted requests: the ones it did)
  {"ev": "arrive", "t": t, "rid": id}     the executor read the request
  {"ev": "first", "t": t, "rid": id}      its first output came out of a step (it is queued
                                           for the gateway's stream right after)
  {"ev": "last", "t": t, "rid": id}       an output of it that ends a choice came out of a step
`landed` is when the outputs the step returns had landed (0: it landed none): `end - landed`
is what they waited for on the host before routing.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import IO


@dataclass(slots=True)
class StepTimes:
    """What the engine's last step spent where (seconds); filled by every step, traced or not
    (a few perf_counter calls)."""

    start: float = 0.0
    schedule: float = 0.0  # scheduler.schedule(), kvmanager calls it awaited included
    kv_wait: float = 0.0  # of which awaiting kvmanager (admission rounds, extends, settling)
    launch: float = 0.0  # batch build + launching the device work (eager prefill: the kernels)
    land: float = 0.0  # waiting for and post-processing the step that lands
    landed: float = 0.0  # when that ended (perf_counter; 0: no step landed)
    num_seqs: int = 0
    num_tokens: int = 0
    num_prefill_seqs: int = 0
    num_admitted: int = 0
    # The request ids admitted by this step: which step took a request in (TTFT breakdowns,
    # benchmarks/ttft_breakdown.py). Filled only when the step admits, which decode steps do not.
    admitted_rids: list[str] = field(default_factory=list)

    def begin(self) -> None:
        self.start = time.perf_counter()
        self.schedule = self.launch = self.land = self.kv_wait = self.landed = 0.0
        self.num_seqs = self.num_tokens = self.num_prefill_seqs = self.num_admitted = 0
        if self.admitted_rids:
            self.admitted_rids = []

    def scheduled(self, kv_wait: float) -> None:
        self.schedule = time.perf_counter() - self.start
        self.kv_wait = kv_wait

    def launched(self, num_new_tokens: list[int], admitted_rids: list[str]) -> None:
        self.launch = time.perf_counter() - self.start - self.schedule
        self.num_seqs = len(num_new_tokens)
        self.num_tokens = sum(num_new_tokens)
        # Decode-only steps (every sequence one token) skip the count.
        if self.num_tokens > self.num_seqs:
            self.num_prefill_seqs = sum(1 for n in num_new_tokens if n > 1)
        self.num_admitted = len(admitted_rids)
        if admitted_rids:
            self.admitted_rids = admitted_rids


class StepTrace:
    def __init__(self, path: str) -> None:
        self._file: IO[str] = open(path, "a", buffering=1 << 16)  # noqa: SIM115 (closed in close)
        self._seen: set[str] = set()

    def _write(self, record: dict) -> None:
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def arrive(self, rid: str) -> None:
        self._write({"ev": "arrive", "t": time.perf_counter(), "rid": rid})

    def first(self, rids: list[str]) -> None:
        now = time.perf_counter()
        for rid in rids:
            if rid not in self._seen:
                self._seen.add(rid)
                self._write({"ev": "first", "t": now, "rid": rid})

    def last(self, rids: list[str]) -> None:
        now = time.perf_counter()
        for rid in rids:
            self._write({"ev": "last", "t": now, "rid": rid})

    def step(self, times: StepTimes, end: float, waiting: int, running: int, outputs: int) -> None:
        record = {
            "ev": "step",
            "t": times.start,
            "sched": round(times.schedule, 6),
            "kv_wait": round(times.kv_wait, 6),
            "launch": round(times.launch, 6),
            "land": round(times.land, 6),
            "landed": times.landed,
            "end": end,
            "seqs": times.num_seqs,
            "tokens": times.num_tokens,
            "prefill_seqs": times.num_prefill_seqs,
            "admitted": times.num_admitted,
            "waiting": waiting,
            "running": running,
            "outputs": outputs,
        }
        if times.admitted_rids:
            record["admitted_rids"] = times.admitted_rids
        self._write(record)

    def forget(self, rid: str) -> None:
        self._seen.discard(rid)

    def close(self) -> None:
        self._file.close()
