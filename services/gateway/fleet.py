"""Which executors exist: a static `--executor` list, or kvmanager's fleet followed live.

Fleet mode (no `--executor`, a `--kvmanager`): the gateway keeps no list of its own. It follows
`Fleet.WatchFleet`, whose first message is the fleet now and each later one the whole fleet again
after a membership or liveness change, and mirrors every snapshot into the ModelRegistry: a new
executor gets a member (its own Serve stream, admitted in the background), one that left is
closed, one marked not live keeps its stream but takes no new request. When kvmanager restarts
the stream breaks: the gateway keeps serving from the last snapshot and reconnects with backoff.

Static mode: the listed executors, each asked GetInfo (retried while it loads) for its id and
model; they are never removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

import grpc
from pagemesh.proto import fleet_pb2 as fleet_pb
from pagemesh.proto import fleet_pb2_grpc as fleet_grpc
from pagemesh.services.gateway.executor_client import CHANNEL_OPTIONS, ExecutorClient
from pagemesh.services.gateway.served_models import Member, ModelRegistry

log = logging.getLogger("pagemesh.gateway.fleet")

# Reconnect backoff of the WatchFleet stream: kvmanager restarts in about a second.
WATCH_BACKOFF_S = (0.25, 5.0)


def apply_snapshot(registry: ModelRegistry, snapshot: fleet_pb.FleetSnapshot) -> None:
    """Makes the registry's members those of `snapshot`. An executor that moved (new address)
    or now serves another model is replaced; a new epoch at the same address keeps its member,
    whose Serve stream reconnects by itself and reads the new info."""
    wanted = {m.executor_id: m for m in snapshot.members if m.executor_id}
    for member in list(registry.members.values()):
        now = wanted.get(member.executor_id)
        if now is None or now.address != member.address or now.model != member.model:
            log.info("executor %s left the fleet", member.executor_id)
            registry.remove(member)
    for executor_id, m in wanted.items():
        known = registry.members.get(executor_id)
        if known is None:
            log.info("executor %s joined the fleet (model %r)", executor_id, m.model)
            registry.add(Member(executor_id, m.address, m.model, ExecutorClient(m.address), m.live))
        elif known.live != m.live:
            state = "live again" if m.live else "down: no new requests"
            log.warning("executor %s is %s", executor_id, state)
            known.live = m.live
    registry.synced = True


class FleetFollower:
    """Follows `Fleet.WatchFleet` into a ModelRegistry until closed."""

    def __init__(self, address: str, registry: ModelRegistry) -> None:
        self.address = address
        self.registry = registry
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        # The channel is made here, inside the running loop (grpc.aio channels bind to it).
        self._channel = grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        self._task = asyncio.create_task(self._run(), name="fleet-watch")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _run(self) -> None:
        assert self._channel is not None
        stub = fleet_grpc.FleetStub(self._channel)
        backoff = WATCH_BACKOFF_S[0]
        outage = False  # logged once per outage, not once per retry
        while True:
            call = stub.WatchFleet(fleet_pb.WatchFleetRequest())
            try:
                async for snapshot in call:
                    if outage:
                        log.info("following kvmanager's fleet again")
                        outage = False
                    backoff = WATCH_BACKOFF_S[0]
                    apply_snapshot(self.registry, snapshot)
                why = "kvmanager ended the fleet stream"
            except grpc.aio.AioRpcError as exc:
                why = f"the fleet stream failed ({exc.code().name})"
            finally:
                call.cancel()
            if not outage:
                outage = True
                log.warning(
                    "%s; serving from the last snapshot (%d executors) while reconnecting",
                    why,
                    len(self.registry.members),
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, WATCH_BACKOFF_S[1])


class StaticFleet:
    """The `--executor` addresses: each joins once it answers GetInfo (it may still be loading
    its model), under `model_name` when the operator set one, else the executor's own."""

    def __init__(
        self, addresses: Sequence[str], registry: ModelRegistry, model_name: str | None = None
    ) -> None:
        self.addresses = list(addresses)
        self.registry = registry
        self.model_name = model_name
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._join(address), name=f"static-executor-{address}")
            for address in self.addresses
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _join(self, address: str) -> None:
        client = ExecutorClient(address)
        try:
            info = await client.wait_for_info()
        except BaseException:
            await client.close()
            raise
        executor_id = info.executor_id or address
        if executor_id in self.registry.members:  # two addresses, one executor: keep one
            executor_id = address
        model = self.model_name or info.model
        self.registry.add(Member(executor_id, address, model, client))
        self.registry.synced = True
