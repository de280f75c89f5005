"""Which executor takes a request: kvmanager's `Fleet.Route`, or a local choice.

kvmanager allocated every block of every executor, so it knows exactly which prefixes each one
holds and how loaded it is: in fleet mode each request costs one routing call and goes where
kvmanager says. The calls are messages on one long-lived `RouteStream` (route_stream.py: about
half a unary Route's cost on loopback, and the call is on every request's time to first token);
a kvmanager without it gets unary Route calls. Serving must not depend on it, though: when Route
fails (kvmanager restarting or unreachable), the gateway picks locally, the member with the
fewest of its own requests in flight, logs the outage once and, for a second after each failure,
does not ask again (a hung kvmanager would otherwise cost every request the call's deadline).

The choice is one per request: n > 1 and beam search are one GenerateRequest, routed once, and
stay on that executor. A request migrated off a failed executor (migration.py) is routed again
with that executor in `exclude`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass

import grpc
from pagemesh.proto import fleet_pb2 as fleet_pb
from pagemesh.proto import fleet_pb2_grpc as fleet_grpc
from pagemesh.services.gateway.executor_client import CHANNEL_OPTIONS
from pagemesh.services.gateway.route_stream import RouteFailed, RouteStream
from pagemesh.services.gateway.served_models import Member, ServedModel, no_executor

log = logging.getLogger("pagemesh.gateway.router")

POLICIES = ("kv", "least_loaded", "round_robin")
ROUTE_TIMEOUT_S = 0.5
# After a failed Route, requests are routed locally this long before kvmanager is asked again.
RETRY_AFTER_S = 1.0

# Reasons of the gateway's own choices (kvmanager's are "prefix", "load", "fallback" and the
# policies' names): labels of pagemesh_gateway_routed_requests and fields of the trace.
REASON_STATIC = "static"  # a static --executor list: the least in flight
REASON_KV_DOWN = "kvmanager_unreachable"  # Route failed: the least in flight
REASON_NOT_HERE = "route_target_unavailable"  # Route named an executor this gateway can't use
REASON_REFUSED = "route_refused"  # Route answered an error about this request: the least in flight

# Route errors that say kvmanager cannot answer at all (down, restarting, hung, too old to serve
# Fleet), as opposed to an answer about this one request (NOT_FOUND: its snapshot and this
# gateway's disagree for a moment; UNAVAILABLE is both, and counted as an outage: harmless).
OUTAGE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True, slots=True)
class Route:
    member: Member
    reason: str
    cached_tokens: int = 0  # kvmanager's count of prompt tokens cached there (0: unknown)


class _Rotation:
    """Ties between equally loaded members go round the list, not always to the first."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def least_in_flight(self, members: list[Member]) -> Member:
        start = next(self._counter) % len(members)
        turned = members[start:] + members[:start]
        return min(turned, key=lambda m: m.in_flight)


class LocalRouter:
    """Static mode: the member with the fewest requests in flight (there is usually one)."""

    def __init__(self) -> None:
        self._rotation = _Rotation()

    async def route(
        self, model: ServedModel, prompt: bytes, cache_salt: str, exclude: Collection[str] = ()
    ) -> Route:
        members = [m for m in model.routable() if m.executor_id not in exclude]
        if not members:
            raise no_executor(model.name)
        return Route(self._rotation.least_in_flight(members), REASON_STATIC)

    async def close(self) -> None:
        pass


class FleetRouter:
    """Fleet mode: one routing call per request (RouteStream, else Route), a local choice while
    it fails."""

    def __init__(
        self,
        address: str,
        policy: str = "kv",
        timeout: float = ROUTE_TIMEOUT_S,
        stream: bool = True,
    ) -> None:
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r} (one of {', '.join(POLICIES)})")
        self.address = address
        self.policy = policy
        self.timeout = timeout
        self._rotation = _Rotation()
        # Made on first use, inside the running loop (grpc.aio channels bind to their loop).
        self._channel: grpc.aio.Channel | None = None
        self._stub: fleet_grpc.FleetStub | None = None
        # Route calls go over one RouteStream (route_stream.py) unless `stream` is False or
        # kvmanager turns out to have none.
        self._use_stream = stream
        self._stream: RouteStream | None = None
        self._retry_at = 0.0  # monotonic time before which Route is not asked (after a failure)
        self._outage = False

    async def route(
        self, model: ServedModel, prompt: bytes, cache_salt: str, exclude: Collection[str] = ()
    ) -> Route:
        """`prompt`: the token ids packed as on every wire (packed_ids.pack); `exclude`: the
        executors not to choose (a migrated request's failed ones)."""
        members = [m for m in model.routable() if m.executor_id not in exclude]
        if not members:  # nothing to ask kvmanager about: a 503 now, no call
            raise no_executor(model.name)
        if time.monotonic() < self._retry_at:
            return Route(self._rotation.least_in_flight(members), REASON_KV_DOWN)
        # Members kvmanager thinks live that this gateway can't reach yet (stream reconnecting,
        # still admitting) are excluded, so that kvmanager's choice is one this gateway can use.
        unusable = [m.executor_id for m in model.members.values() if m.live and not m.routable]
        request = fleet_pb.RouteRequest(
            model=model.name,
            prompt=prompt,
            cache_salt=cache_salt,
            policy=self.policy,
            exclude=sorted({*unusable, *exclude}),
        )
        try:
            reply = await self.ask(request)
        except RouteFailed as exc:
            if exc.code not in OUTAGE_CODES:
                log.debug("Route refused a request for %r: %s", model.name, exc.code.name)
                return Route(self._rotation.least_in_flight(members), REASON_REFUSED)
            self._failed(exc.code)
            return Route(self._rotation.least_in_flight(members), REASON_KV_DOWN)
        if self._outage:
            self._outage = False
            log.info("kvmanager answers Route again: routing by %s", self.policy)
        chosen = model.members.get(reply.executor_id)
        if chosen is None or not chosen.routable or chosen.executor_id in exclude:
            # A member this gateway has not admitted yet (its snapshot or GetInfo is on the way)
            # or whose stream just dropped: the local choice rather than a failed request.
            return Route(self._rotation.least_in_flight(members), REASON_NOT_HERE)
        return Route(chosen, reply.reason or reply.policy or self.policy, reply.cached_tokens)

    async def ask(self, request: fleet_pb.RouteRequest) -> fleet_pb.RouteResponse:
        """kvmanager's decision, over the RouteStream (a unary Route with a kvmanager that has
        none), or RouteFailed with the status Route would have answered."""
        stub = self._fleet()
        stream = self._stream
        if stream is not None:
            try:
                return await stream.route(request, self.timeout)
            except RouteFailed as exc:
                if exc.code != grpc.StatusCode.UNIMPLEMENTED:
                    raise
            # A kvmanager from before RouteStream (an upgrade in progress): unary calls, for as
            # long as this gateway runs.
            if self._stream is stream:
                log.info("kvmanager has no RouteStream: routing with unary Route calls")
                self._use_stream = False
                self._stream = None
                await stream.close()
        try:
            return await stub.Route(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise RouteFailed(exc.code(), exc.details() or "") from None

    def _failed(self, code: grpc.StatusCode) -> None:
        self._retry_at = time.monotonic() + RETRY_AFTER_S
        if not self._outage:
            self._outage = True
            log.warning(
                "kvmanager's Route failed (%s): routing locally (fewest in flight) until it "
                "answers again",
                code.name,
            )

    def _fleet(self) -> fleet_grpc.FleetStub:
        if self._stub is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            self._stub = fleet_grpc.FleetStub(self._channel)
            if self._use_stream:
                self._stream = RouteStream(self._stub)
        return self._stub

    async def close(self) -> None:
        if self._stream is not None:
            await self._stream.close()
            self._stream = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._stub = None


Router = LocalRouter | FleetRouter
