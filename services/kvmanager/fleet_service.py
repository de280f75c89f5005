"""The Fleet gRPC service (proto/fleet.proto), served by kvmanager beside KVManager: Route and
RouteStream (the same decision, one message per request on a long-lived stream: what gateways
use) ask the router (router.py), WatchFleet streams the membership (fleet.py).

Route runs the synchronous router with no await before it answers, so a decision and the pending
load it adds are atomic with respect to every other call, as the KVManager calls are. Status
codes: INVALID_ARGUMENT for a malformed request (empty model or prompt, a prompt that is not
whole u32 ids, an unknown policy), NOT_FOUND when no registered executor serves the model,
UNAVAILABLE when none of those is live (or all are excluded). Messages name only what the caller
sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
from pagemesh.proto import fleet_pb2 as pb
from pagemesh.proto import fleet_pb2_grpc as pb_grpc
from pagemesh.services.kvmanager.fleet import Fleet
from pagemesh.services.kvmanager.manager import ExecutorState
from pagemesh.services.kvmanager.router import (
    BadRouteRequest,
    NoLiveExecutor,
    RouteError,
    Router,
    UnknownModel,
)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Fleet"].full_name

_STATUS: tuple[tuple[type[RouteError], grpc.StatusCode], ...] = (
    (BadRouteRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownModel, grpc.StatusCode.NOT_FOUND),
    (NoLiveExecutor, grpc.StatusCode.UNAVAILABLE),
)


def status_for(e: RouteError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


def load_message(ex: ExecutorState) -> pb.ExecutorLoad:
    """Its load as routing counts it: the last report plus what was routed to it since, and its
    free and evictable blocks (kvmanager owns the pool)."""
    x = ex.load
    return pb.ExecutorLoad(
        running=x.running,
        waiting=x.waiting + x.routed_seqs,
        free_blocks=ex.pool.num_available,
        queued_prompt_tokens=x.queued_prompt_tokens + x.routed_tokens,
    )


def snapshot(fleet: Fleet) -> pb.FleetSnapshot:
    return pb.FleetSnapshot(
        members=[
            pb.FleetMember(
                executor_id=ex.executor_id,
                address=ex.address,
                model=ex.model,
                epoch=ex.epoch,
                num_blocks=ex.num_blocks,
                block_size=ex.block_size,
                max_model_len=ex.max_model_len,
                live=live,
                load=load_message(ex),
            )
            for ex, live in fleet.members()
        ]
    )


class FleetService(pb_grpc.FleetServicer):
    def __init__(self, router: Router, fleet: Fleet) -> None:
        self.router = router
        self.fleet = fleet

    def _route(self, r: pb.RouteRequest, out: pb.RouteResponse) -> None:
        """Decides `r` into `out`, or raises a RouteError having changed nothing."""
        d = self.router.route(r.model, r.prompt, r.cache_salt, r.policy, r.exclude)
        ex = d.executor
        out.executor_id = ex.executor_id
        out.address = ex.address
        out.cached_tokens = d.cached_tokens
        out.reason = d.reason
        out.policy = d.policy

    async def Route(
        self, request: pb.RouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.RouteResponse:
        out = pb.RouteResponse()
        try:
            self._route(request, out)
        except RouteError as e:
            await context.abort(status_for(e), str(e))
            raise AssertionError("unreachable: context.abort raises") from e
        return out

    async def RouteStream(
        self,
        request_iterator: AsyncIterator[pb.RouteStreamRequest],
        context: grpc.aio.ServicerContext,
    ) -> None:
        """Each request decided as Route decides it (no await between reading it and deciding),
        answered in order; an error about one request is its reply, the stream goes on."""
        try:
            async for req in request_iterator:
                reply = pb.RouteStreamResponse(id=req.id)
                try:
                    self._route(req.route, reply.route)
                except RouteError as e:
                    reply.ClearField("route")
                    reply.error.code = status_for(e).value[0]
                    reply.error.message = str(e)
                await context.write(reply)
        except asyncio.CancelledError:
            # The gateway went away or closed the stream: every request it sent was decided
            # or not at all; nothing is left to answer.
            pass

    async def WatchFleet(
        self, request: pb.WatchFleetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.FleetSnapshot]:
        changed = self.fleet.watch()
        try:
            # Told of what changed before this first snapshot? It shows it already; the next
            # one is sent after the next change.
            self.fleet.check()
            changed.clear()
            yield snapshot(self.fleet)
            while True:
                await changed.wait()
                changed.clear()
                yield snapshot(self.fleet)
        finally:
            self.fleet.unwatch(changed)
