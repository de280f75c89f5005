"""The gateway's read-only view of kvmanager: its stats for /metrics and its health for /health.

Neither is on the token path (the executor talks to kvmanager, not the gateway); each call has a
short deadline and a kvmanager that does not answer in time is reported as unreachable."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pagemesh.proto import health_names
from pagemesh.proto import kvmanager_pb2 as kv_pb
from pagemesh.proto import kvmanager_pb2_grpc as kv_grpc

from pagemesh.grpc_keepalive import client_options

log = logging.getLogger("pagemesh.gateway.kvmanager")


class KVManagerLink:
    def __init__(self, address: str) -> None:
        self.address = address
        # Made on first use, inside the running loop (grpc.aio channels bind to their loop).
        self._channel: grpc.aio.Channel | None = None
        self._kv: kv_grpc.KVManagerStub | None = None
        self._health: health_pb2_grpc.HealthStub | None = None

    def _connect(self) -> None:
        if self._channel is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=client_options())
            self._kv = kv_grpc.KVManagerStub(self._channel)
            self._health = health_pb2_grpc.HealthStub(self._channel)

    async def stats(self, timeout: float = 1.0) -> kv_pb.GetStatsResponse | None:
        """GetStats, or None when kvmanager does not answer."""
        self._connect()
        assert self._kv is not None
        try:
            return await self._kv.GetStats(kv_pb.GetStatsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            log.debug("kvmanager GetStats failed: %s", exc.code().name)
            return None

    async def health(self, timeout: float = 0.5) -> dict[str, str]:
        """{"kvmanager": "serving" | "unreachable", "redis": "connected" | "unreachable" |
        "off" | "unknown"}, from one health check of kvmanager's Redis entry."""
        self._connect()
        assert self._health is not None
        request = health_pb2.HealthCheckRequest(service=health_names.KVMANAGER_REDIS)
        try:
            reply = await self._health.Check(request, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # kvmanager runs without Redis
                return {"kvmanager": "serving", "redis": "off"}
            log.debug("kvmanager health check failed: %s", exc.code().name)
            return {"kvmanager": "unreachable", "redis": "unknown"}
        serving = reply.status == health_pb2.HealthCheckResponse.SERVING
        return {"kvmanager": "serving", "redis": "connected" if serving else "unreachable"}

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
