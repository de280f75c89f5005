"""kvmanager's gRPC service (grpc.aio): the KVManager RPCs over the core, plus gRPC health,
server reflection, the write-behind persistence task and the /metrics endpoint.

Handlers call the synchronous core with no await before they answer, so every RPC is atomic with
respect to the others and Redis never sits on the allocation path. Errors map to status codes:
  OutOfBlocks -> RESOURCE_EXHAUSTED   UnknownSequence -> NOT_FOUND
  InvalidRequest -> INVALID_ARGUMENT  StaleEpoch -> FAILED_PRECONDITION
  SequenceTooLarge (bigger than the whole pool) -> OUT_OF_RANGE
Health: "" and "pagemesh.v1.KVManager" are SERVING while the server runs (allocation works with
or without Redis); "pagemesh.v1.KVManager.redis" is SERVING only while Redis is reachable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pagemesh.proto import health_names
from pagemesh.proto import kvmanager_pb2 as pb
from pagemesh.proto import kvmanager_pb2_grpc as pb_grpc
from pagemesh.services.kvmanager.api import (
    AllocatorError,
    InvalidRequest,
    OutOfBlocks,
    SequenceTooLarge,
    StaleEpoch,
    UnknownSequence,
)
from pagemesh.services.kvmanager.manager import Manager
from pagemesh.services.kvmanager.persistence import Persistence
from pagemesh.services.kvmanager.stats import HitCounts, HitWindows, Residency
from redis.exceptions import RedisError

from pagemesh.grpc_decode import DecodeErrorsAsInvalidArgument

log = logging.getLogger("pagemesh.kvmanager")

SERVICE_NAME = health_names.KVMANAGER
REDIS_HEALTH = health_names.KVMANAGER_REDIS
MAX_MESSAGE = 64 << 20


def status_for(e: AllocatorError) -> grpc.StatusCode:
    if isinstance(e, SequenceTooLarge):
        return grpc.StatusCode.OUT_OF_RANGE
    if isinstance(e, OutOfBlocks):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, UnknownSequence):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(e, StaleEpoch):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(e, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def fill_error(err: pb.CallError, e: AllocatorError) -> None:
    """A failed call's error inside a reply (Session, Step): the status its unary call would
    have returned, and the message."""
    err.code = status_for(e).value[0]
    err.message = str(e)


def prompt_of(a: pb.AllocateRequest):
    """An AllocateRequest's prompt: token_data's bytes, or its token_ids."""
    if a.token_data:
        if len(a.token_ids):
            raise InvalidRequest("set token_ids or token_data, not both")
        return a.token_data
    return a.token_ids


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


def _residency(r: Residency) -> pb.Residency:
    count, mean, p50, p99 = r.summary()
    return pb.Residency(count=count, mean_seconds=mean, p50_seconds=p50, p99_seconds=p99)


class KVManagerService(pb_grpc.KVManagerServicer):
    def __init__(self, manager: Manager, persistence: Persistence | None = None) -> None:
        self.m = manager
        self.p = persistence
        self.started = time.time()

    async def _fail(self, context: grpc.aio.ServicerContext, e: AllocatorError) -> None:
        await context.abort(status_for(e), str(e))

    async def RegisterExecutor(self, request, context):
        try:
            epoch = self.m.register(
                request.executor_id,
                request.num_blocks,
                request.block_size,
                request.model_fingerprint,
            )
        except AllocatorError as e:
            await self._fail(context, e)
        log.info(
            "executor %s registered: epoch %d, %d blocks of %d tokens",
            request.executor_id,
            epoch,
            request.num_blocks,
            request.block_size,
        )
        return pb.RegisterExecutorResponse(epoch=epoch)

    # Each _do_* fills `out` (a fresh response, or a Session reply's oneof field) and raises
    # AllocatorError; the unary handlers and Session share them.
    def _do_allocate(self, request, out) -> None:
        a = self.m.allocate(
            request.executor_id,
            request.epoch,
            request.seq_id,
            prompt_of(request),
            request.cache_salt,
            request.num_lookahead_tokens,
        )
        out.block_ids.extend(a.block_ids)
        out.num_cached_tokens = a.num_cached_tokens

    def _do_extend(self, request, out) -> None:
        entries = request.entries
        columnar = not entries
        if columnar:
            ids, nc, nt = request.seq_ids, request.num_computed_tokens, request.num_tokens
        else:
            ids = [e.seq_id for e in entries]
            nc = [e.num_computed_tokens for e in entries]
            nt = [e.num_tokens for e in entries]
            ids.extend(request.seq_ids)
            nc.extend(request.num_computed_tokens)
            nt.extend(request.num_tokens)
        updates, copies = self.m.extend(request.executor_id, request.epoch, ids, nc, nt)
        if columnar:
            if updates:
                ups = updates.values()
                out.updated_seq_ids.extend(updates.keys())
                out.first_indices.extend([u[0] for u in ups])
                out.update_counts.extend([len(u[1]) for u in ups])
                out.update_block_ids.extend([b for u in ups for b in u[1]])
            if copies:
                out.copy_src.extend([s for s, _ in copies])
                out.copy_dst.extend([d for _, d in copies])
            return
        for sid, (first, blocks) in updates.items():
            out.updates.add(seq_id=sid, first_index=first, block_ids=blocks)
        for src, dst in copies:
            out.copies.add(src=src, dst=dst)

    def _do_commit(self, request, out) -> None:
        entries = [(e.seq_id, e.block_index, e.token_ids) for e in request.entries]
        if request.seq_ids:
            bs = self.m.executor(request.executor_id, request.epoch).block_size  # or StaleEpoch
            toks = request.token_ids
            n = len(request.seq_ids)
            if len(toks) != bs * n or len(request.block_indices) != n:
                raise InvalidRequest(
                    "commit: columnar form needs one block index and block_size token ids"
                    " per seq_id"
                )
            entries.extend(
                (s, i, toks[k * bs : (k + 1) * bs])
                for k, (s, i) in enumerate(zip(request.seq_ids, request.block_indices, strict=True))
            )
        out.num_published = self.m.commit(request.executor_id, request.epoch, entries)

    def _do_fork(self, request, out) -> None:
        tables = self.m.fork(
            request.executor_id,
            request.epoch,
            request.parent_seq_id,
            request.child_seq_ids,
            request.num_tokens,
        )
        for c, t in tables.items():
            out.tables.add(seq_id=c, first_index=0, block_ids=t)

    def _do_release(self, request, out) -> None:
        out.num_released = self.m.release(request.executor_id, request.epoch, request.seq_ids)

    def _do_step(self, request, out) -> None:
        # Each part as its own call would be: applied atomically or not at all, its error kept
        # in the reply (the parts after it still run, as they would if sent back to back).
        for part in ("commit", "release", "extend"):
            if not request.HasField(part):
                continue
            result = getattr(out, part)
            result.SetInParent()
            try:
                getattr(self, "_do_" + part)(getattr(request, part), result)
            except AllocatorError as e:
                out.ClearField(part)
                fill_error(getattr(out, part + "_error"), e)
        if request.allocate:
            allocs, error = self.m.allocate_many(
                request.allocate[0].executor_id,
                request.allocate[0].epoch,
                [
                    (a.seq_id, prompt_of(a), a.cache_salt, a.num_lookahead_tokens)
                    for a in request.allocate
                ],
                request.allocate_token_budget,
            )
            for a in allocs:
                out.allocate.add(block_ids=a.block_ids, num_cached_tokens=a.num_cached_tokens)
            if error is not None:
                fill_error(out.allocate_error, error)

    async def _unary(self, do, request, out, context):
        try:
            do(request, out)
        except AllocatorError as e:
            await self._fail(context, e)
        finally:
            self._touch()
        return out

    def _touch(self) -> None:
        if self.p is not None:
            self.p.touch()

    async def Allocate(self, request, context):
        return await self._unary(self._do_allocate, request, pb.AllocateResponse(), context)

    async def Extend(self, request, context):
        return await self._unary(self._do_extend, request, pb.ExtendResponse(), context)

    async def Commit(self, request, context):
        return await self._unary(self._do_commit, request, pb.CommitResponse(), context)

    async def Fork(self, request, context):
        return await self._unary(self._do_fork, request, pb.ForkResponse(), context)

    async def Release(self, request, context):
        return await self._unary(self._do_release, request, pb.ReleaseResponse(), context)

    async def Step(self, request, context):
        return await self._unary(self._do_step, request, pb.StepResponse(), context)

    async def Session(self, request_iterator, context):
        do = {
            "allocate": self._do_allocate,
            "extend": self._do_extend,
            "commit": self._do_commit,
            "fork": self._do_fork,
            "release": self._do_release,
            "step": self._do_step,
        }
        try:
            async for req in request_iterator:
                reply = self._session_reply(req, do)
                self._touch()
                await context.write(reply)
        except asyncio.CancelledError:
            # The executor went away (or cancelled the stream): the RPC is over, nothing to
            # answer; every call it sent was applied atomically or not at all.
            log.debug("session stream cancelled")

    def _session_reply(self, req: pb.SessionRequest, do: dict) -> pb.SessionResponse:
        reply = pb.SessionResponse(id=req.id)
        kind = req.WhichOneof("call")
        if kind is None:
            reply.error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            reply.error.message = "session request without a call"
            return reply
        out = getattr(reply, kind)
        out.SetInParent()
        try:
            do[kind](getattr(req, kind), out)
        except AllocatorError as e:
            reply.ClearField(kind)
            fill_error(reply.error, e)
        return reply

    async def Match(self, request, context):
        try:
            found = self.m.match(request.token_ids, request.cache_salt, request.executor_id)
        except AllocatorError as e:
            await self._fail(context, e)
        return pb.MatchResponse(
            matches=[pb.ExecutorMatch(executor_id=e, num_cached_tokens=n) for e, n in found.items()]
        )

    async def GetStats(self, request, context):
        m = self.m
        now = time.time()
        if request.executor_id and request.executor_id not in m.executors:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"executor {request.executor_id!r} is not registered"
            )
        executors = []
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
    metrics_runner: object | None = None
    metrics_port: int = 0

    async def stop(self, grace: float = 1.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()  # type: ignore[attr-defined]
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
) -> KVManagerServer:
    """Restores state from Redis (waiting up to `restore_timeout` for it), then serves.
    port 0 picks a free port; metrics_port None disables /metrics, 0 picks a free port."""
    manager = Manager(track_changes=redis_url is not None)
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
        ],
    )
    pb_grpc.add_KVManagerServicer_to_server(KVManagerService(manager, persistence), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (
            SERVICE_NAME,
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
    out = KVManagerServer(server, bound, manager, persistence, health_servicer)
    if metrics_port is not None:
        from pagemesh.services.kvmanager.metrics import make_registry, start_metrics_server

        mport = metrics_port
        if mport == 0:
            from pagemesh.redis_process import free_port

            mport = free_port(host)
        try:
            out.metrics_runner = await start_metrics_server(
                make_registry(manager, persistence), host, mport
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
