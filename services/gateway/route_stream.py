"""The gateway's end of kvmanager's `Fleet.RouteStream`: every request's routing call as one
message on a long-lived stream instead of a unary call.

The routing call is on every request's time to first token, and in Python gRPC a unary call
costs a new HTTP/2 stream, a call object and a task on both sides: on loopback a stream message
costs about half as much (benchmarks/route_call_bench.py). Requests are written in order under a
lock (grpc.aio allows one write at a time); a reader task hands each reply to its request by id.

A reply that is an error about one request raises RouteFailed with the status Route would have
answered; a stream that breaks (kvmanager gone, restarting, or one without RouteStream:
UNIMPLEMENTED) fails every request waiting on it with the stream's status, and the next request
opens a new one. A request not answered within its timeout raises RouteFailed
(DEADLINE_EXCEEDED); when its write itself is what timed out (kvmanager stopped reading),
grpc.aio cancels the stream with it.
"""

from __future__ import annotations

import asyncio
import itertools

import grpc
from pagemesh.proto import fleet_pb2 as fleet_pb
from pagemesh.proto import fleet_pb2_grpc as fleet_grpc


class RouteFailed(Exception):
    """No decision for a request: `code` is the status a unary Route would have ended with."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


# grpc.StatusCode by its numeric value (a reply's RouteError.code).
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


class RouteStream:
    """One RouteStream call at a time on `stub`'s channel, shared by every request in flight."""

    def __init__(self, stub: fleet_grpc.FleetStub) -> None:
        self._stub = stub
        self._call: grpc.aio.StreamStreamCall | None = None
        # The open call's requests waiting for their reply, by id (each call has its own: a
        # call that ends fails only its own).
        self._pending: dict[int, asyncio.Future[fleet_pb.RouteResponse]] = {}
        self._readers: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def route(self, request: fleet_pb.RouteRequest, timeout: float) -> fleet_pb.RouteResponse:
        """kvmanager's decision for `request`, or RouteFailed."""
        rid = next(self._ids)
        message = fleet_pb.RouteStreamRequest(id=rid)
        message.route.CopyFrom(request)
        fut: asyncio.Future[fleet_pb.RouteResponse] = asyncio.get_running_loop().create_future()
        pending = None
        try:
            # asyncio.timeout, not wait_for: no task per request on the hot path.
            async with asyncio.timeout(timeout):
                async with self._lock:
                    call, pending = self._open()
                    pending[rid] = fut
                    try:
                        await call.write(message)
                    except asyncio.InvalidStateError:
                        pass  # the call ended since: its reader fails `fut` with the reason
                    except asyncio.CancelledError:
                        # grpc.aio raises it for a write on a call cancelled meanwhile (another
                        # request's write timed out): that is this request's failure, not its
                        # cancellation, unless its task is being cancelled (or timed out).
                        task = asyncio.current_task()
                        if task is not None and task.cancelling():
                            raise
                        raise RouteFailed(
                            grpc.StatusCode.CANCELLED, "the routing stream was cancelled"
                        ) from None
                return await fut
        except TimeoutError:
            raise RouteFailed(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"no routing decision in {timeout:g}s"
            ) from None
        except grpc.aio.AioRpcError as exc:  # a write on a stream that failed meanwhile
            raise RouteFailed(exc.code(), exc.details() or "") from None
        finally:
            if pending is not None:
                pending.pop(rid, None)
            if fut.done() and not fut.cancelled():
                fut.exception()  # a failure it left before awaiting: retrieved, not warned of

    def _open(
        self,
    ) -> tuple[grpc.aio.StreamStreamCall, dict[int, asyncio.Future[fleet_pb.RouteResponse]]]:
        if self._call is None:
            self._call = self._stub.RouteStream()
            self._pending = {}
            reader = asyncio.create_task(
                self._read(self._call, self._pending), name="route-stream-reader"
            )
            self._readers.add(reader)
            reader.add_done_callback(self._readers.discard)
        return self._call, self._pending

    async def _read(
        self,
        call: grpc.aio.StreamStreamCall,
        pending: dict[int, asyncio.Future[fleet_pb.RouteResponse]],
    ) -> None:
        err = RouteFailed(grpc.StatusCode.UNAVAILABLE, "the routing stream ended")
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                fut = pending.pop(reply.id, None)
                if fut is None or fut.done():  # its request timed out meanwhile
                    continue
                if reply.HasField("route"):
                    fut.set_result(reply.route)
                else:
                    fut.set_exception(
                        RouteFailed(status_code(reply.error.code), reply.error.message)
                    )
        except grpc.aio.AioRpcError as exc:
            err = RouteFailed(exc.code(), exc.details() or "")
        except asyncio.CancelledError:
            # The call was cancelled (closed here, or a write that timed out): grpc.aio reads
            # of a cancelled call raise CancelledError.
            err = RouteFailed(grpc.StatusCode.CANCELLED, "the routing stream was cancelled")
            task = asyncio.current_task()
            if task is not None and task.cancelling():  # this task itself is cancelled
                raise
        finally:
            if self._call is call:
                self._call = None
            for fut in pending.values():
                if not fut.done():
                    fut.set_exception(err)
            pending.clear()

    async def close(self) -> None:
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        if self._readers:
            await asyncio.gather(*self._readers, return_exceptions=True)
