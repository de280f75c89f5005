"""gRPC keepalive settings that every client and every server of pagemesh agree on.

A client pings an idle connection every KEEPALIVE_MS so that a dead peer (a killed executor, a
dropped NAT entry) is noticed in seconds. A server that allows pings less often than a client
sends them answers with GOAWAY ENHANCE_YOUR_CALM "too_many_pings" and drops the connection:
kvmanager allowed gRPC's default (one ping in 5 minutes) while the executor pinged every 30 s.
So both sides take their figures from here: servers accept pings down to half the clients'
interval (timers jitter), with or without calls in flight.

PAGEMESH_GRPC_KEEPALIVE_MS changes the interval for every process (tests use a short one).
"""

from __future__ import annotations

import os

DEFAULT_KEEPALIVE_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def keepalive_ms() -> int:
    raw = os.environ.get("PAGEMESH_GRPC_KEEPALIVE_MS", "")
    return int(raw) if raw.strip() else DEFAULT_KEEPALIVE_MS


def client_options(interval_ms: int | None = None) -> list[tuple[str, int]]:
    """Channel options: ping an idle connection every `interval_ms`, calls in flight or not."""
    interval = interval_ms if interval_ms is not None else keepalive_ms()
    return [
        ("grpc.keepalive_time_ms", interval),
        ("grpc.keepalive_timeout_ms", min(KEEPALIVE_TIMEOUT_MS, max(interval, 1000))),
        ("grpc.keepalive_permit_without_calls", 1),
        # 0: no cap on pings between data frames (the default, 2, stops an idle channel's
        # keepalive after two pings, and a dead peer goes unnoticed).
        ("grpc.http2.max_pings_without_data", 0),
    ]


def server_options(interval_ms: int | None = None) -> list[tuple[str, int]]:
    """Server options that accept the clients' pings (client_options with the same interval)."""
    interval = interval_ms if interval_ms is not None else keepalive_ms()
    return [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", max(interval // 2, 1)),
    ]
