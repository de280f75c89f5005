"""The models this gateway serves and the executors behind each: what a request's `model` picks.

Executors come and go (fleet.py says which exist); each member has its own Serve stream
(ExecutorClient). A model exists while at least one executor serves it, live or not: an unknown
name is a 404 (a 400 in the static mode, as before), a known one with no executor ready for new requests a 503. Each model has its own
tokenizer, read from its first member's model_path (the executors of one model share it), and
its limits (context length, pool, vocabulary, beam width) are the tightest over its members, so a
request accepted here fits whichever of them is chosen for it.

A member is admitted in the background (GetInfo, the model's tokenizer, then its Serve stream)
and only then takes requests: a snapshot that names a new executor never waits on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field, replace

import grpc
from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.gateway.errors import APIError
from pagemesh.services.gateway.executor_client import ExecutorClient
from pagemesh.services.gateway.validation import Limits

from pagemesh.heap import freeze_startup_heap

log = logging.getLogger("pagemesh.gateway.models")

# A tokenizer that failed to load (a model path this host cannot read) is tried again, slower
# each time: an operator may fix the mount while the gateway runs.
TOKENIZER_RETRY_S = (1.0, 30.0)
MAX_NAMES_IN_ERRORS = 8
# A member that left is closed once its requests in flight are done: checked this often.
DRAIN_POLL_S = 0.2
# GetInfo of a new member is retried this often (backoff) until it answers or leaves.
INFO_RETRY_S = (0.25, 5.0)


# An executor whose last FAILING_AFTER requests all failed, the latest less than FAILING_FOR_S
# ago, is "failing": /health answers 503 when every executor is failing or gone. The window lets
# a load balancer that stopped sending traffic on the 503 see the gateway again.
FAILING_AFTER = 3
FAILING_FOR_S = 30.0


@dataclass(eq=False, slots=True)
class Member:
    """One executor as this gateway sees it."""

    executor_id: str  # kvmanager's id (static mode: the executor's own, else its address)
    address: str
    model: str  # the served model name requests ask for
    client: ExecutorClient
    # kvmanager's view: False while the executor stopped reporting. Its stream stays open (the
    # requests on it go on) but it takes no new request until it is live again.
    live: bool = True
    admitted: bool = False  # info read, tokenizer ready, Serve stream started
    task: asyncio.Task[None] | None = field(default=None, repr=False)
    # Requests it failed in a row (a server error, not a refusal) and when the last one failed:
    # an executor failing every step still looks live and connected, /health must not say "ok".
    failures: int = 0
    last_failure: float = 0.0

    def note_result(self, failed: bool) -> None:
        if failed:
            self.failures += 1
            self.last_failure = time.monotonic()
        else:
            self.failures = 0

    @property
    def failing(self) -> bool:
        """Failed its last FAILING_AFTER requests, the latest within FAILING_FOR_S. Routing is
        not changed by it (the next success clears it); /health reports it."""
        return (
            self.failures >= FAILING_AFTER and time.monotonic() - self.last_failure < FAILING_FOR_S
        )

    @property
    def routable(self) -> bool:
        """Takes new requests now."""
        return self.live and self.admitted and self.client.connected

    @property
    def info(self) -> pb.ExecutorInfo | None:
        return self.client.info  # refreshed whenever its Serve stream reopens

    @property
    def in_flight(self) -> int:
        return self.client.num_in_flight


@dataclass(frozen=True, slots=True)
class Bounds:
    """What every executor of a model accepts: the tightest of their limits."""

    max_model_len: int
    capacity: int  # the smallest KV pool in tokens (0: unknown)
    vocab_size: int  # 0: unknown


class ServedModel:
    def __init__(self, name: str, limits: Limits) -> None:
        self.name = name
        self.members: dict[str, Member] = {}
        self.tokenizer: Tokenizer | None = None
        # A copy: the beam width comes from this model's executors, not another model's.
        self.limits = replace(limits)
        self._operator_beam_width = limits.max_beam_width
        self._operator_max_n = limits.max_n
        self.created = int(time.time())

    @property
    def ready(self) -> bool:
        """Can take a request now: a tokenizer and at least one executor taking requests."""
        return self.tokenizer is not None and any(m.routable for m in self.members.values())

    def routable(self) -> list[Member]:
        return [m for m in self.members.values() if m.routable]

    def bounds(self) -> Bounds:
        """The limits a request must fit, from the admitted members' current info (an executor
        restarted with a smaller pool tightens them at once)."""
        infos = [m.info for m in self.members.values() if m.admitted and m.info is not None]
        if not infos:
            return Bounds(0, 0, 0)
        capacities = [i.num_blocks * i.block_size for i in infos if i.num_blocks]
        vocabs = [i.vocab_size for i in infos if i.vocab_size]
        return Bounds(
            max_model_len=min(i.max_model_len for i in infos),
            capacity=min(capacities, default=0),
            vocab_size=min(vocabs, default=0),
        )

    @property
    def max_model_len(self) -> int:
        return self.bounds().max_model_len

    def refresh_limits(self) -> None:
        """The beam width and `n` the API accepts: the operator's bounds, unless the executors
        state theirs (each beam and each of n choices runs as a sequence of its own, so an
        executor's max_num_seqs bounds both: a larger n is the gateway's 400 naming `n`, not
        an executor's refusal after routing)."""
        widths = []
        seq_caps = []
        for m in self.members.values():
            info = m.info
            if not m.admitted or info is None:
                continue
            if info.max_num_seqs:
                seq_caps.append(info.max_num_seqs)
            if info.max_beam_width:
                width = info.max_beam_width
                if info.max_num_seqs:
                    width = min(width, info.max_num_seqs)
                widths.append(width)
        self.limits.max_beam_width = min(widths) if widths else self._operator_beam_width
        self.limits.max_n = min([self._operator_max_n, *seq_caps])


class ModelRegistry:
    """Every member executor, grouped by the model it serves. fleet.py adds and removes members;
    request handlers resolve a model name (404/503) and the router picks among its members."""

    def __init__(self, limits: Limits, tokenizer_path: str | None = None) -> None:
        self._limits = limits
        self._tokenizer_path = tokenizer_path  # operator's override (static mode only)
        self.models: dict[str, ServedModel] = {}
        self.members: dict[str, Member] = {}
        # The gateway has learned the fleet at least once (a snapshot, or a static executor
        # answered): until then every model name is "not ready" rather than unknown.
        self.synced = False
        self._tokenizers: dict[str, asyncio.Task[Tokenizer]] = {}  # by path, shared by models
        self._closing: set[asyncio.Task[None]] = set()
        self._shutting_down = False
        self._heap_frozen = False

    # -- requests ---------------------------------------------------------------------------

    def resolve(self, name: str) -> ServedModel:
        """The model a request named, ready to take it; else an APIError: 404 for a model no
        executor serves, 503 while it cannot take requests. Messages never carry addresses."""
        model = self.models.get(name)
        if model is None:
            if not self.synced:
                raise _not_ready("The model is not ready yet; retry shortly.")
            names = sorted(self.models)
            served = ", ".join(repr(n) for n in names[:MAX_NAMES_IN_ERRORS])
            more = ", ..." if len(names) > MAX_NAMES_IN_ERRORS else ""
            raise APIError(
                f"The model '{name}' does not exist"
                + (f"; this server serves {served}{more}." if names else "."),
                status=404,  # OpenAI's answer to an unknown model
                param="model",
                code="model_not_found",
            )
        if model.tokenizer is None or not any(m.admitted for m in model.members.values()):
            raise _not_ready(f"The model '{name}' is not ready yet; retry shortly.")
        if not model.routable():
            raise no_executor(name)
        return model

    def reconnecting(self, name: str) -> bool:
        """The model takes no request now only because its executors' streams are reopening
        (an executor restarting: kvmanager still counts it live, or there is no kvmanager to
        say otherwise): worth a bounded wait rather than a 503 at once."""
        model = self.models.get(name)
        if model is None or model.tokenizer is None or model.routable():
            return False
        return any(m.live and m.admitted and not m.client.connected for m in model.members.values())

    @property
    def ready(self) -> bool:
        return any(m.ready for m in self.models.values())

    @property
    def loading(self) -> bool:
        """No model has its tokenizer yet (start-up)."""
        return not any(m.tokenizer is not None for m in self.models.values())

    # -- membership ---------------------------------------------------------------------------

    def add(self, member: Member) -> None:
        """Takes `member` in and admits it in the background."""
        assert member.executor_id not in self.members, member.executor_id
        self.members[member.executor_id] = member
        model = self.models.get(member.model)
        if model is None:
            model = self.models[member.model] = ServedModel(member.model, self._limits)
        model.members[member.executor_id] = member
        member.task = asyncio.create_task(
            self._admit(member, model), name=f"admit-{member.executor_id}"
        )

    def remove(self, member: Member, drain: bool = True) -> None:
        """Drops `member`: it takes no new request at once. Its stream is closed once the
        requests on it have finished (`drain`; an executor that is really gone fails them at
        once, one that only left kvmanager's view, e.g. a kvmanager restarted without Redis,
        finishes them), else now. A model left without members is forgotten: its name becomes
        unknown."""
        if self.members.pop(member.executor_id, None) is None:
            return
        model = self.models.get(member.model)
        if model is not None:
            model.members.pop(member.executor_id, None)
            if model.members:
                model.refresh_limits()
            else:
                del self.models[member.model]
        task = asyncio.create_task(self._close(member, drain), name=f"close-{member.executor_id}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        """Shutdown: every stream closed now."""
        self._shutting_down = True  # members still draining close now too
        for member in list(self.members.values()):
            self.remove(member, drain=False)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        for tokenizer_task in self._tokenizers.values():
            tokenizer_task.cancel()

    async def _close(self, member: Member, drain: bool) -> None:
        try:
            if member.task is not None:
                member.task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await member.task
            while drain and member.client.num_in_flight and not self._shutting_down:
                await asyncio.sleep(DRAIN_POLL_S)
        finally:
            await member.client.close()

    async def _admit(self, member: Member, model: ServedModel) -> None:
        """GetInfo (waiting while the executor loads its model), the model's tokenizer, then
        the Serve stream. Cancelled when the member leaves first."""
        info = member.info if member.info is not None else await self._info(member)
        delay = TOKENIZER_RETRY_S[0]
        while model.tokenizer is None:
            path = self._tokenizer_path or info.model_path or info.model
            try:
                model.tokenizer = await self._tokenizer(path)
            except Exception as exc:
                log.error("model %r: cannot load its tokenizer (%s); retrying", model.name, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, TOKENIZER_RETRY_S[1])
        if not self._heap_frozen:  # start-up is done once the first model can serve
            self._heap_frozen = True
            freeze_startup_heap()
        member.client.start()
        member.admitted = True
        model.refresh_limits()
        log.info(
            "executor %s serves %r (max_model_len %d)",
            member.executor_id,
            model.name,
            info.max_model_len,
        )

    async def _info(self, member: Member) -> pb.ExecutorInfo:
        """GetInfo, retried with backoff while the executor does not answer (still loading its
        model, or not reachable from here): logged once, not at every try."""
        delay = INFO_RETRY_S[0]
        logged = False
        while True:
            try:
                return await member.client.get_info()
            except grpc.aio.AioRpcError as exc:
                if not logged:
                    logged = True
                    log.warning(
                        "executor %s at %s does not answer GetInfo (%s); retrying",
                        member.executor_id,
                        member.address,
                        exc.code().name,
                    )
            await asyncio.sleep(delay)
            delay = min(delay * 2, INFO_RETRY_S[1])

    async def _tokenizer(self, path: str) -> Tokenizer:
        """One load per path, shared by every model and member that needs it."""
        task = self._tokenizers.get(path)
        if task is None:
            log.info("loading tokenizer from %s", path)
            task = asyncio.create_task(asyncio.to_thread(Tokenizer.load, path))
            self._tokenizers[path] = task
        try:
            # shield: one admission cancelled (its member left) must not cancel a load that
            # others wait on too.
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            raise
        except Exception:
            if self._tokenizers.get(path) is task:
                del self._tokenizers[path]  # the next try loads again
            raise


def _not_ready(message: str) -> APIError:
    return APIError(message, status=503, type="server_error")


def no_executor(model: str) -> APIError:
    """A 503 for a known model with no executor taking requests (down, or not connected)."""
    return _not_ready(f"No executor is available for the model '{model}' right now; retry shortly.")
