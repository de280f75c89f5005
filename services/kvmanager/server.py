"""kvmanager's gRPC service (grpc.aio): the KVManager RPCs over the core, the Fleet service
(fleet_service.py: routing and membership) beside it, plus gRPC health, server reflection, the
write-behind persistence task, the executors' liveness check and the /metrics endpoint.

Handlers call the synchronous core with no await before they answer, so every RPC is atomic with
respect to the others and Redis never sits on the allocation path. Messages are read and written
by wire.py (errors as status codes: see there); Step runs step.py's run_step, the one
implementation the in-process allocator runs too.
Health: "", "pagemesh.v1.KVManager" and "pagemesh.v1.Fleet" are SERVING while the server runs
(allocation and routing work with or without Redis); "pagemesh.v1.KVManager.redis" is SERVING
only while Redis is reachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pagemesh.proto import fleet_pb2_grpc, health_names
from pagemesh.proto import kvmanager_pb2 as pb
from pagemesh.proto import kvmanager_pb2_grpc as pb_grpc
from pagemesh.services.kvmanager import fleet_service, wire
from pagemesh.services.kvmanager.api import AllocatorError
from pagemesh.services.kvmanager.fleet import DEFAULT_TIMEOUT, Fleet
from pagemesh.services.kvmanager.manager import (
    SPILL_AHEAD_MIB,
    SPILL_AHEAD_WATERMARK,
    ExecutorState,
    Manager,
)
from pagemesh.services.kvmanager.persistence import Persistence
from pagemesh.services.kvmanager.router import Router
from pagemesh.services.kvmanager.stats import HitCounts, HitWindows, Residency
from pagemesh.services.kvmanager.step import run_step
from redis.exceptions import RedisError

from pagemesh.grpc_decode import DecodeErrorsAsInvalidArgument
from pagemesh.grpc_keepalive import server_options

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger("pagemesh.kvmanager")

SERVICE_NAME = health_names.KVMANAGER
FLEET_SERVICE_NAME = fleet_service.SERVICE_NAME
REDIS_HEALTH = health_names.KVMANAGER_REDIS
MAX_MESSAGE = 64 << 20

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


def _hits(h: HitCounts) -> pb.HitStats:
    return pb.HitStats(
        query_tokens=h.query_tokens,
        hit_tokens=h.hit_tokens,
        query_requests=h.query_requests,
        hit_requests=h.hit_requests,
        token_hit_rate=h.token_hit_rate,
        request_hit_rate=h.request_hit_rate,
    )


def _windows(w: HitWindows | None, now: float) -> list[pb.WindowStats]:
    w = w if w is not None else HitWindows()
    return [pb.WindowStats(name=n, hits=_hits(c)) for n, c in w.windows(now)]


def _tier(ex: ExecutorState) -> pb.TierStats:
    p = ex.pool
    return pb.TierStats(
        host_blocks=ex.num_host_blocks,
        host_free=p.num_host_free,
        host_cached=p.num_host_cached,
        gpu_hit_tokens=ex.gpu_hit_tokens,
        host_hit_tokens=ex.host_hit_tokens,
        spills=p.num_spills,
        restores=p.num_restores,
        host_drops=p.host_drops,
        bytes_spilled=p.num_spills * ex.kv_block_bytes,
        bytes_restored=p.num_restores * ex.kv_block_bytes,
        age_at_restore=_residency(ex.age_at_restore),
        age_at_host_drop=_residency(ex.age_at_host_drop),
        host_copies=p.num_host_copies,
        spills_ahead=p.num_spills_ahead,
        evicted_ahead=p.num_evicted_ahead,
    )


def _residency(r: Residency) -> pb.Residency:
    count, mean, p50, p99 = r.summary()
    return pb.Residency(count=count, mean_seconds=mean, p50_seconds=p50, p99_seconds=p99)


class KVManagerService(pb_grpc.KVManagerServicer):
    def __init__(
        self,
        manager: Manager,
        persistence: Persistence | None = None,
        fleet: Fleet | None = None,
        router: Router | None = None,
    ) -> None:
        self.m = manager
        self.p = persistence
        self.fleet = fleet if fleet is not None else Fleet(manager)
        self.router = router if router is not None else Router(manager, self.fleet)
        self.started = time.time()
        # The hot calls by their SessionRequest oneof name. Any: each takes its own request
        # and response types, which one Callable type cannot spell.
        self._calls: dict[str, Callable[[Any, Any], None]] = {
            "allocate": self._allocate,
            "extend": self._extend,
            "commit": self._commit,
            "fork": self._fork,
            "release": self._release,
            "step": self._step,
        }

    async def _fail(self, context: grpc.aio.ServicerContext, e: AllocatorError) -> NoReturn:
        await context.abort(wire.status_for(e), str(e))
        raise AssertionError("unreachable: context.abort raises")

    def _touch(self) -> None:
        if self.p is not None:
            self.p.touch()

    async def RegisterExecutor(
        self, request: pb.RegisterExecutorRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterExecutorResponse:
        try:
            epoch = self.m.register(
                request.executor_id,
                request.num_blocks,
                request.block_size,
                request.model_fingerprint,
                request.address,
                request.model,
                request.max_model_len,
                request.num_host_blocks,
                request.kv_block_bytes,
            )
        except AllocatorError as e:
            await self._fail(context, e)
        log.info(
            "executor %s registered: epoch %d, %d blocks (+%d in host memory) of %d tokens,"
            " model %r at %r",
            request.executor_id,
            epoch,
            request.num_blocks,
            request.num_host_blocks,
            request.block_size,
            request.model,
            request.address,
        )
        self.fleet.check()  # watchers hear of it now, not at the next liveness check
        return pb.RegisterExecutorResponse(epoch=epoch)

    # The hot calls: each fills `out` (a fresh response, or a Session reply's oneof field) or
    # raises AllocatorError having changed nothing; the unary handlers and Session share them.
    def _allocate(self, r: pb.AllocateRequest, out: pb.AllocateResponse) -> None:
        a = self.m.allocate(
            r.executor_id, r.epoch, r.seq_id, r.token_data, r.cache_salt, r.num_lookahead_tokens
        )
        wire.fill_allocation(out, a)

    def _extend(self, r: pb.ExtendRequest, out: pb.ExtendResponse) -> None:
        part = wire.extend_part(r)
        changes = self.m.extend(*part)
        wire.fill_extend_response(out, changes, self.m.take_spills(part[0]))

    def _commit(self, r: pb.CommitRequest, out: pb.CommitResponse) -> None:
        out.num_published = self.m.commit(*wire.commit_part(r))

    def _fork(self, r: pb.ForkRequest, out: pb.ForkResponse) -> None:
        tables = self.m.fork(r.executor_id, r.epoch, r.parent_seq_id, r.child_seq_ids, r.num_tokens)
        for c, t in tables.items():
            out.tables.add(seq_id=c, first_index=0, block_ids=t)

    def _release(self, r: pb.ReleaseRequest, out: pb.ReleaseResponse) -> None:
        out.num_released = self.m.release(*wire.release_part(r))

    def _step(self, r: pb.StepRequest, out: pb.StepResponse) -> None:
        o = run_step(
            self.m,
            commit=wire.commit_part(r.commit) if r.HasField("commit") else None,
            release=wire.release_part(r.release) if r.HasField("release") else None,
            extend=wire.extend_part(r.extend) if r.HasField("extend") else None,
            admit=wire.admit_part(r.allocate),
            admit_token_budget=r.allocate_token_budget,
            load=wire.load_part(r.load) if r.HasField("load") else None,
        )
        wire.fill_step_response(out, r, o)

    async def _unary(
        self,
        call: Callable[[Req, Resp], None],
        request: Req,
        out: Resp,
        context: grpc.aio.ServicerContext,
    ) -> Resp:
        try:
            call(request, out)
        except AllocatorError as e:
            await self._fail(context, e)
        finally:
            self._touch()
        return out

    async def Allocate(
        self, request: pb.AllocateRequest, context: grpc.aio.ServicerContext
    ) -> pb.AllocateResponse:
        return await self._unary(self._allocate, request, pb.AllocateResponse(), context)

    async def Extend(
        self, request: pb.ExtendRequest, context: grpc.aio.ServicerContext
    ) -> pb.ExtendResponse:
        return await self._unary(self._extend, request, pb.ExtendResponse(), context)

    async def Commit(
        self, request: pb.CommitRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommitResponse:
        return await self._unary(self._commit, request, pb.CommitResponse(), context)

    async def Fork(
        self, request: pb.ForkRequest, context: grpc.aio.ServicerContext
    ) -> pb.ForkResponse:
        return await self._unary(self._fork, request, pb.ForkResponse(), context)

    async def Release(
        self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReleaseResponse:
        return await self._unary(self._release, request, pb.ReleaseResponse(), context)

    async def Step(
        self, request: pb.StepRequest, context: grpc.aio.ServicerContext
    ) -> pb.StepResponse:
        return await self._unary(self._step, request, pb.StepResponse(), context)

    async def Reconcile(
        self, request: pb.ReconcileRequest, context: grpc.aio.ServicerContext
    ) -> pb.ReconcileResponse:
        tables = {t.seq_id: list(t.block_ids) for t in request.seqs}
        if len(tables) != len(request.seqs):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "reconcile: a sequence id appears twice"
            )
        try:
            released, lost = self.m.reconcile(
                request.executor_id,
                request.epoch,
                tables,
                request.num_transfers if request.HasField("num_transfers") else None,
            )
        except AllocatorError as e:
            await self._fail(context, e)
        finally:
            self._touch()
        if released or lost:
            log.warning(
                "executor %s reconciled: %d sequences released, %d lost (recomputed)",
                request.executor_id,
                released,
                len(lost),
            )
        return pb.ReconcileResponse(num_released=released, lost_seq_ids=lost)

    async def Session(
        self, request_iterator: AsyncIterator[pb.SessionRequest], context: grpc.aio.ServicerContext
    ) -> None:
        try:
            async for req in request_iterator:
                reply = self._session_reply(req)
                self._touch()
                await context.write(reply)
        except asyncio.CancelledError:
            # The executor went away (or cancelled the stream): the RPC is over, nothing to
            # answer; every call it sent was applied atomically or not at all.
            log.debug("session stream cancelled")

    def _session_reply(self, req: pb.SessionRequest) -> pb.SessionResponse:
        reply = pb.SessionResponse(id=req.id)
        kind = req.WhichOneof("call")
        if kind is None:
            reply.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            reply.error.message = "session request without a call"
            return reply
        out = getattr(reply, kind)
        out.SetInParent()
        try:
            self._calls[kind](getattr(req, kind), out)
        except AllocatorError as e:
            reply.ClearField(kind)
            wire.fill_error(reply.error, e)
        return reply

    async def Match(
        self, request: pb.MatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.MatchResponse:
        try:
            found = self.m.match(request.token_ids, request.cache_salt, request.executor_id)
        except AllocatorError as e:
            await self._fail(context, e)
        return pb.MatchResponse(
            matches=[pb.ExecutorMatch(executor_id=e, num_cached_tokens=n) for e, n in found.items()]
        )

    async def GetStats(
        self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetStatsResponse:
        m = self.m
        now = time.time()
        if request.executor_id and request.executor_id not in m.executors:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"executor {request.executor_id!r} is not registered"
            )
        executors = []
        mono = time.monotonic()
        for eid, ex in sorted(m.executors.items()):
            if request.executor_id and eid != request.executor_id:
                continue
            p = ex.pool
            executors.append(
                pb.ExecutorStats(
                    executor_id=eid,
                    epoch=ex.epoch,
                    pool=pb.PoolStats(
                        num_blocks=ex.num_blocks,
                        block_size=ex.block_size,
                        free=p.num_free,
                        in_use=p.num_in_use,
                        cached=p.num_cached,
                        evictions=p.evictions,
                        live_sequences=len(ex.seqs),
                    ),
                    windows=_windows(m.stats.executors.get(eid), now),
                    age_at_hit=_residency(ex.age_at_hit),
                    age_at_eviction=_residency(ex.age_at_eviction),
                    address=ex.address,
                    model=ex.model,
                    max_model_len=ex.max_model_len,
                    live=self.fleet.is_live(ex, mono),
                    seconds_since_seen=self.fleet.idle_for(ex, mono),
                    load=fleet_service.load_message(ex),
                    routed=[
                        pb.RouteCount(policy=policy, reason=reason, count=n)
                        for (policy, reason), n in sorted(self.router.routed.get(eid, {}).items())
                    ],
                    tier=_tier(ex),
                )
            )
        return pb.GetStatsResponse(
            executors=executors,
            windows=_windows(m.stats.overall, now),
            tenants=[
                pb.TenantStats(cache_salt_id=t, windows=_windows(w, now))
                for t, w in sorted(m.stats.tenants.items())
            ],
            redis_connected=self.p.connected if self.p is not None else False,
            redis_pending_writes=self.p.pending if self.p is not None else 0,
            uptime_seconds=now - self.started,
        )


@dataclass
class KVManagerServer:
    """A running kvmanager: `await start_server(...)`, then `await server.stop()`."""

    server: grpc.aio.Server
    port: int
    manager: Manager
    persistence: Persistence | None
    health: health.aio.HealthServicer
    metrics_runner: web.AppRunner | None = None
    metrics_port: int = 0
    fleet: Fleet | None = None
    router: Router | None = None
    fleet_task: asyncio.Task | None = None

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        if self.fleet_task is not None:
            self.fleet_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.fleet_task
        await self.server.stop(grace)
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
        if self.persistence is not None:
            await self.persistence.stop(flush=True)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


async def start_server(
    host: str = "127.0.0.1",
    port: int = 0,
    redis_url: str | None = None,
    metrics_port: int | None = None,
    redis_prefix: str = "pagemesh:kv:",
    flush_interval: float = 0.002,
    restore_timeout: float = 5.0,
    executor_timeout: float = DEFAULT_TIMEOUT,
    spill_ahead_watermark: float = SPILL_AHEAD_WATERMARK,
    spill_ahead_mib: float = SPILL_AHEAD_MIB,
) -> KVManagerServer:
    """Restores state from Redis (waiting up to `restore_timeout` for it), then serves.
    port 0 picks a free port; metrics_port None disables /metrics, 0 picks a free port.
    An executor not heard from for `executor_timeout` seconds is down (fleet.py). The spill
    ahead settings: Manager's."""
    manager = Manager(
        track_changes=redis_url is not None,
        spill_ahead_watermark=spill_ahead_watermark,
        spill_ahead_mib=spill_ahead_mib,
    )
    persistence = None
    if redis_url:
        persistence = Persistence(manager, redis_url, prefix=redis_prefix, interval=flush_interval)
        deadline = time.monotonic() + restore_timeout
        while True:
            try:
                await persistence.restore()
                break
            except (RedisError, OSError) as e:
                if time.monotonic() >= deadline:
                    log.error(
                        "redis %s unreachable at start (%s): serving empty; it is restored"
                        " (or rewritten) when Redis answers",
                        redis_url,
                        e,
                    )
                    break
                await asyncio.sleep(0.2)

    server = grpc.aio.server(
        interceptors=[DecodeErrorsAsInvalidArgument()],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
            *server_options(),  # accepts every client's keepalive pings (grpc_keepalive.py)
        ],
    )
    fleet = Fleet(manager, executor_timeout)
    router = Router(manager, fleet)
    pb_grpc.add_KVManagerServicer_to_server(
        KVManagerService(manager, persistence, fleet, router), server
    )
    fleet_pb2_grpc.add_FleetServicer_to_server(fleet_service.FleetService(router, fleet), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
            FLEET_SERVICE_NAME,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if not bound:
        raise RuntimeError(f"cannot bind {host}:{port}")
    SERVING = health_pb2.HealthCheckResponse.SERVING
    NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
    await health_servicer.set("", SERVING)
    await health_servicer.set(SERVICE_NAME, SERVING)
    await health_servicer.set(FLEET_SERVICE_NAME, SERVING)
    if persistence is not None:
        loop = asyncio.get_running_loop()
        tasks: set[asyncio.Task] = set()

        def on_redis(ok: bool) -> None:
            t = loop.create_task(health_servicer.set(REDIS_HEALTH, SERVING if ok else NOT_SERVING))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

        persistence.on_status_change = on_redis
        await health_servicer.set(REDIS_HEALTH, SERVING if persistence.connected else NOT_SERVING)
        persistence.start()
    await server.start()
    fleet.check()  # what watchers start from: the executors restored from Redis
    out = KVManagerServer(
        server,
        bound,
        manager,
        persistence,
        health_servicer,
        fleet=fleet,
        router=router,
        fleet_task=asyncio.create_task(fleet.run(), name="kvmanager-liveness"),
    )
    if metrics_port is not None:
        from pagemesh.services.kvmanager.metrics import make_registry, start_metrics_server

        mport = metrics_port
        if mport == 0:
            from pagemesh.redis_process import free_port

            mport = free_port(host)
        try:
            out.metrics_runner = await start_metrics_server(
                make_registry(manager, persistence, fleet, router), host, mport
            )
            out.metrics_port = mport
        except OSError as e:  # metrics are auxiliary: serve allocations regardless
            log.error("cannot serve /metrics on %s:%d: %s", host, mport, e)
    log.info(
        "kvmanager serving on %s:%d (redis: %s, metrics: %s)",
        host,
        bound,
        redis_url or "none",
        f"{host}:{out.metrics_port}/metrics" if out.metrics_runner else "off",
    )
    return out
