"""`pagemesh gateway --trace-requests FILE`: a JSON line per generation request, for finding
where a request's time goes before and after the executor (the executor's side:
services/executor/trace.py). Times are `time.perf_counter()` seconds (CLOCK_MONOTONIC on Linux:
one clock for every process on the host). Worker processes append to the same file; each line
is one write, so lines do not interleave.

  {"rid": id, "pid": worker, "entry": handler start, "parsed": body read and validated,
   "encoded": prompt tokenized, "routed": its executor chosen (router.py),
   "submitted": handed to the executor stream, "first_step": the executor's first output read,
   "first_write": first SSE bytes written, "executor": the chosen executor's id,
   "route_reason": why it was chosen, "http_id": the HTTP request's id (X-Request-Id, which
   every response carries back: a client's own record finds the line by it)}
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass


@dataclass(slots=True)
class RequestTimes:
    entry: float = 0.0
    parsed: float = 0.0
    encoded: float = 0.0
    routed: float = 0.0
    submitted: float = 0.0
    first_step: float = 0.0
    first_write: float = 0.0
    executor: str = ""
    route_reason: str = ""
    http_id: str = ""

    @staticmethod
    def now() -> float:
        return time.perf_counter()


class RequestTrace:
    def __init__(self, path: str) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._pid = os.getpid()

    def write(self, request_id: str, times: RequestTimes) -> None:
        line = json.dumps({"rid": request_id, "pid": self._pid, **asdict(times)}) + "\n"
        os.write(self._fd, line.encode())

    def close(self) -> None:
        os.close(self._fd)
