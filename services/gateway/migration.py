"""Request migration: a request whose executor fails under it goes on elsewhere.

When a request's Serve stream breaks (its executor died, restarted or dropped off the network),
or the executor ends it with FINISH_ERROR and `retryable` (it dropped the request for a transient
reason: proto/executor.proto), the gateway sends it again as its continuation: the prompt plus
the tokens already received, the remaining max_tokens, the same sampling parameters. It is routed
again without the executors that failed it while another one serves the model, else to the same
one once it is back (bounded wait), at most `limit` times (Dynamo's --migration-limit). The
client's stream does not break: Generation keeps its detokenizers, stop-string state, logprobs and
usage counts across the seam (generation.py).

What migrates (decided here, documented in the README):
- n = 1, sampled or greedy: at any point. With greedy decoding (and no penalty) the continuation
  is exactly what an uninterrupted run would have produced: the model sees the same tokens.
  A seeded request goes on in its random stream where it stopped: the continuation's
  `seed_position` is the number of tokens already generated, and the executor derives each
  draw from the seed and its position (executor sampler.py), so a seeded sampled answer is the
  one an uninterrupted run draws too (up to the last-bit differences between a prefill and
  decode steps over the same tokens, which can tip a near tie). The same count tells the
  executor that those tokens at the prompt's end are output, so presence and frequency
  penalties go on counting them (a greedy request with penalties continues exactly too).
- n > 1 and beam search: only while no token of the request has come back (the request is sent
  again whole); after that the failure ends the request with an error, since its choices cannot
  be resumed as one request. A beam search sends its beams only at the end, so it always
  migrates whole.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import packed_ids
from pagemesh.services.gateway.errors import APIError
from pagemesh.services.gateway.executor_client import (
    ExecutorClient,
    ExecutorUnavailable,
    RequestStream,
)
from pagemesh.services.gateway.metrics import GatewayMetrics
from pagemesh.services.gateway.router import Router
from pagemesh.services.gateway.served_models import Member, ModelRegistry

log = logging.getLogger("pagemesh.gateway.migration")

DEFAULT_MIGRATION_LIMIT = 3  # Dynamo's default
# How long a migration waits for an executor of the model to take it: a lone executor's restart
# (its model reloaded) must fit, or a `pagemesh up` with one executor fails every request then.
DEFAULT_MIGRATION_WAIT_S = 60.0
POLL_S = 0.1  # how often the wait looks for a routable executor
# Before going back to an executor that failed this request (the only one serving its model):
# a transient failure (kvmanager out) is not met again at once, burning the attempts.
SAME_EXECUTOR_BACKOFF_S = (0.25, 2.0)

# Why a request migrated: the label of pagemesh_gateway_migrations_total.
REASON_EXECUTOR_LOST = "executor_lost"  # its Serve stream broke
REASON_RETRYABLE = "retryable_error"  # FINISH_ERROR with retryable set
REASON_REFUSED = "continuation_refused"  # a continuation's new executor refused it (its limits)
# Why a failed request was not migrated: the label of pagemesh_gateway_migrations_failed_total.
NOT_MIGRATED_LIMIT = "limit"  # it had migrated `limit` times already
NOT_MIGRATED_NO_EXECUTOR = "no_executor"  # none took the continuation within the wait
NOT_MIGRATED_STARTED = "choices_started"  # n > 1 or beams with tokens out: not resumable
NOT_MIGRATED_OFF = "disabled"  # --migration-limit 0


@dataclass(frozen=True, slots=True)
class MigrationPolicy:
    limit: int = DEFAULT_MIGRATION_LIMIT  # migrations per request; 0 = never migrate
    wait_s: float = DEFAULT_MIGRATION_WAIT_S


class MigrationFailed(Exception):
    """No executor could take the request's continuation in time."""


def continuation(
    original: pb.GenerateRequest, prompt: list[int], generated: list[int], request_id: str
) -> pb.GenerateRequest:
    """`original` resumed after `generated` (its single choice's tokens so far): those tokens
    appended to the prompt, max_tokens what is left of it, a seeded stream resumed at the token
    after them (seed_position), everything else the same."""
    request = pb.GenerateRequest()
    request.CopyFrom(original)
    request.request_id = request_id
    if generated:
        request.ClearField("prompt_token_ids")
        request.prompt_token_data = packed_ids.pack([*prompt, *generated])
        request.params.max_tokens = original.params.max_tokens - len(generated)
        request.params.seed_position = original.params.seed_position + len(generated)
        # The prompt's logprobs came with the first output, before any token: not again (and
        # the continuation keeps its prefix-cache hits).
        request.params.ClearField("prompt_logprobs")
    return request


class Migrator:
    """One request's placement: the member it runs on now and, when that fails, the next one.
    Owned by its Generation, which calls `resubmit` with the continuation to send."""

    def __init__(
        self,
        policy: MigrationPolicy,
        router: Router,
        registry: ModelRegistry,
        metrics: GatewayMetrics,
        model: str,
        cache_salt: str,
        member: Member,
        label: str = "",
    ) -> None:
        self.policy = policy
        self._router = router
        self._registry = registry
        self._metrics = metrics
        self._model = model
        self._cache_salt = cache_salt
        self.member = member
        self.label = label  # the HTTP request id, for the logs
        self.failed: dict[str, int] = {}  # executor id -> times it failed this request

    @property
    def limit(self) -> int:
        return self.policy.limit

    async def resubmit(
        self, request: pb.GenerateRequest, reason: str, detail: str
    ) -> tuple[ExecutorClient, RequestStream]:
        """Sends `request` (a continuation) to the next executor: the stream of outputs to read.
        Raises MigrationFailed when none takes it within the policy's wait."""
        failed = self.member
        self.failed[failed.executor_id] = self.failed.get(failed.executor_id, 0) + 1
        log.warning(
            "request %s: %s on executor %s (%s); migrating it as %s",
            self.label,
            reason,
            failed.executor_id,
            detail,
            request.request_id,
        )
        deadline = time.monotonic() + self.policy.wait_s
        while True:
            member = await self._next_member(request, deadline)
            tries = self.failed.get(member.executor_id, 0)
            if tries:  # the only one left is one that failed it: not at once
                low, high = SAME_EXECUTOR_BACKOFF_S
                await asyncio.sleep(min(high, low * 2 ** (tries - 1)))
                if not member.routable:
                    continue
            try:
                stream = member.client.submit(request)
            except ExecutorUnavailable:
                continue  # its stream dropped meanwhile: the wait goes on
            self.member = member
            self._metrics.migrations.labels(reason).inc()  # counted once it is on its way
            log.info(
                "request %s continues on executor %s (%d prompt tokens, max_tokens %d)",
                self.label,
                member.executor_id,
                len(request.prompt_token_data) // 4 or len(request.prompt_token_ids),
                request.params.max_tokens,
            )
            return member.client, stream

    def give_up(self, why: str, detail: str) -> None:
        """Counts and logs a failure that ends the request: `why` is the metric's label."""
        self._metrics.migrations_failed.labels(why).inc()
        log.warning(
            "request %s failed on executor %s and is not migrated (%s): %s",
            self.label,
            self.member.executor_id,
            why,
            detail,
        )

    async def _next_member(self, request: pb.GenerateRequest, deadline: float) -> Member:
        """Routed again: among the executors of the model that did not fail this request, or,
        when it has none that takes requests now, any of them (one that failed and is back)."""
        while True:
            model = self._registry.models.get(self._model)
            routable = model.routable() if model is not None else []
            if model is not None and routable:
                others = [m for m in routable if m.executor_id not in self.failed]
                exclude = list(self.failed) if others else []
                try:
                    route = await self._router.route(
                        model, request.prompt_token_data, self._cache_salt, exclude
                    )
                except APIError:  # none routable after all (a race): wait on
                    pass
                else:
                    self._metrics.routed.labels(route.member.executor_id, route.reason).inc()
                    return route.member
            if time.monotonic() >= deadline:
                raise MigrationFailed(
                    f"no executor of {self._model!r} took the request within"
                    f" {self.policy.wait_s:.0f}s"
                )
            await asyncio.sleep(POLL_S)
