#!/usr/bin/env python3
"""Container health probes, one per kind of service (exit 0 when healthy, 1 otherwise):

pagemesh-healthcheck grpc HOST:PORT    gRPC health protocol: SERVING (kvmanager, executor)
pagemesh-healthcheck http URL          HTTP 200 (the gateway's /health)
pagemesh-healthcheck redis URL         a PING answered (Redis)
"""

from __future__ import annotations

import sys
import urllib.request


def grpc_ok(address: str) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=3.0
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3.0) as resp:
        return resp.status == 200


def redis_ok(url: str) -> bool:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=3.0, socket_connect_timeout=3.0)
    try:
        return bool(client.ping())
    finally:
        client.close()


PROBES = {"grpc": grpc_ok, "http": http_ok, "redis": redis_ok}


def main(argv: list[str]) -> int:
    if len(argv) != 3 or argv[1] not in PROBES:
        print(__doc__, file=sys.stderr)
        return 2
    try:
        ok = PROBES[argv[1]](argv[2])
    except Exception as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
