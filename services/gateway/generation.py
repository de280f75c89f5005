"""One request's generation: executor step outputs → per-choice text deltas.

This is where the executor's token stream meets the client's view of it: detokenization, stop
strings (a choice that meets one is finished here and ended at the executor, the whole request
once every choice is done, so no step or block is spent on text nobody will see), finish reasons
and the token counts that go into `usage`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from dataclasses import dataclass, field

from pagemesh.proto import executor_pb2 as pb
from pagemesh.proto import packed_ids
from pagemesh.services.gateway.beam import apply_beam
from pagemesh.services.gateway.chat import Tokenizer
from pagemesh.services.gateway.detokenizer import Detokenizer
from pagemesh.services.gateway.errors import (
    EXECUTOR_UNAVAILABLE,
    GENERATION_FAILED,
    MIGRATIONS_EXHAUSTED,
    APIError,
    client_safe,
)
from pagemesh.services.gateway.executor_client import ExecutorClient, ExecutorUnavailable
from pagemesh.services.gateway.migration import (
    NOT_MIGRATED_LIMIT,
    NOT_MIGRATED_NO_EXECUTOR,
    NOT_MIGRATED_OFF,
    NOT_MIGRATED_STARTED,
    REASON_EXECUTOR_LOST,
    REASON_REFUSED,
    REASON_RETRYABLE,
    MigrationFailed,
    Migrator,
    continuation,
)
from pagemesh.services.gateway.outputs import ColumnToken, Output
from pagemesh.services.gateway.request_stream import RequestStream
from pagemesh.services.gateway.validation import GenerationOptions

log = logging.getLogger("pagemesh.gateway.generation")

FINISH_REASONS = {pb.FINISH_STOP: "stop", pb.FINISH_LENGTH: "length", pb.FINISH_ABORT: "abort"}


@dataclass(slots=True)
class TokenInfo:
    """A sampled token's logprob and the top alternatives, as text, with each token's own bytes
    (the text of a token that is part of a character is U+FFFD; its bytes are exact)."""

    token: str
    logprob: float
    top: list[tuple[str, float]]
    token_bytes: bytes = b""
    top_bytes: list[bytes] = field(default_factory=list)
    token_id: int = -1
    top_ids: list[int] = field(default_factory=list)
    rank: int = 0  # prompt logprobs: 1 = the most likely token


@dataclass(slots=True)
class ChoiceDelta:
    index: int
    text: str
    finish_reason: str | None = None
    logprobs: list[TokenInfo] = field(default_factory=list)


def build_request(
    request_id: str, prompt_ids: list[int], options: GenerationOptions, max_tokens: int
) -> pb.GenerateRequest:
    params = pb.SamplingParams(
        n=options.n,
        temperature=options.temperature,
        # proto3 reads 0 as "unset" (= 1, off); OpenAI's top_p=0 means "only the top token".
        top_p=options.top_p or 1e-6,
        top_k=options.top_k,
        min_p=options.min_p,
        presence_penalty=options.presence_penalty,
        frequency_penalty=options.frequency_penalty,
        repetition_penalty=options.repetition_penalty,
        max_tokens=max_tokens,
        ignore_eos=options.ignore_eos,
        logprobs=options.top_logprobs,
        return_logprobs=options.logprobs,
    )
    if options.seed is not None:
        params.seed = options.seed
    if options.logit_bias:
        params.logit_bias.update(options.logit_bias)
    if options.prompt_logprobs is not None or options.echo_logprobs:
        # echo scores the prompt with the completion's own number of alternatives
        wanted = [options.prompt_logprobs or 0]
        if options.echo_logprobs:
            wanted.append(options.top_logprobs)
        params.prompt_logprobs = max(wanted)
    apply_beam(params, options.beam)
    if options.guide is not None:
        params.guide.kind = options.guide.kind  # type: ignore[assignment]  # (the enum's int)
        params.guide.spec = options.guide.spec
    # The packed form: a copy to build, serialize and read, where ~1k repeated ids cost tens
    # of microseconds at each of those (proto/executor.proto). The caller checked
    # 0 <= id < vocab (< 2**32).
    return pb.GenerateRequest(
        request_id=request_id,
        prompt_token_data=packed_ids.pack(prompt_ids),
        params=params,
        cache_salt=options.cache_salt,
    )


class _Retry(Exception):
    """An output said the request should go on elsewhere (read by `_steps`, never raised out)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class Generation:
    """Drives one submitted request. Iterate `steps()`; call `close()` in a finally block: a
    request that did not finish (client gone, error) is aborted at the executor.

    With a `migrator`, a request whose executor fails under it (its stream breaks, or a
    FINISH_ERROR marked retryable) is sent on as its continuation (migration.py) and read from
    there: the detokenizers, stop-string state and counts carry across, so the caller sees one
    unbroken run. Every failure that ends the request comes out as an APIError whose message is
    written for the client (the details go to the log)."""

    def __init__(
        self,
        client: ExecutorClient,
        request: pb.GenerateRequest,
        prompt: list[int],
        tokenizer: Tokenizer,
        stop: list[str],
        migrator: Migrator | None = None,
    ) -> None:
        self._client = client
        self._original = request
        self._prompt = prompt
        self._migrator = migrator
        self.migrations = 0
        self.request_id = request.request_id
        self.n = max(1, request.params.n)
        self._whole_only = self.n > 1 or request.params.use_beam_search
        self._want_logprobs = request.params.return_logprobs
        self._tokenizer = tokenizer
        self._detok = [Detokenizer(tokenizer, stop, prompt) for _ in range(self.n)]
        self.finish_reasons: list[str | None] = [None] * self.n
        self.prompt_tokens = len(prompt)
        self.cached_tokens = 0
        self._counted = False  # the prompt's usage counts were read (from the first placement)
        self.completion_tokens = 0
        # SamplingParams.prompt_logprobs: prompt tokens 1.., from the request's first output.
        self.prompt_logprobs: list[TokenInfo] | None = None
        # Tokens received per choice: what a continuation appends to the prompt.
        self._generated: list[list[int]] = [[] for _ in range(self.n)]
        self._executor_done = False
        # Choices of an n > 1 request cut by a stop string while others go on, to be ended at
        # the executor after this step (beam search's beams are no choices until it ends).
        self._cut_alone = self.n > 1 and not request.params.use_beam_search
        self._cut: list[int] = []
        self._stream: RequestStream = client.submit(request)
        self._iter: AsyncGenerator[list[ChoiceDelta], None] | None = None  # by first_step

    @property
    def finished(self) -> bool:
        return all(r is not None for r in self.finish_reasons)

    def texts(self) -> list[str]:
        return [d.text for d in self._detok]

    async def first_step(self) -> list[ChoiceDelta]:
        """The first step's deltas; raises APIError(400) when the executor refused the request,
        before the caller has committed to a 200 response."""
        self._iter = self._steps()
        try:
            return await anext(self._iter)
        except StopAsyncIteration:
            return []

    async def steps(self) -> AsyncIterator[list[ChoiceDelta]]:
        """The deltas of the steps after the first."""
        assert self._iter is not None, "first_step() comes first"
        async for deltas in self._iter:
            yield deltas

    async def _steps(self) -> AsyncGenerator[list[ChoiceDelta], None]:
        while True:
            retry: _Retry | None = None
            try:
                async for outputs in self._stream:
                    deltas: list[ChoiceDelta] = []
                    for out in outputs:
                        try:
                            d = self._apply(out)
                        except _Retry as exc:
                            retry = exc  # the outputs before it still count and are sent
                            break
                        if d is not None:
                            deltas.append(d)
                    if self.finished and not self._stream.done:
                        # Every choice met a stop string: stop spending blocks and compute on it.
                        self._client.abort(self.request_id)
                        self._executor_done = True
                    elif self._cut and retry is None:
                        self._client.abort_choices(self.request_id, self._cut)
                        self._cut = []
                    yield deltas
                    if self.finished or retry is not None:
                        break
            except ExecutorUnavailable as exc:
                if not exc.migratable:
                    raise self._unavailable() from None
                retry = _Retry(REASON_EXECUTOR_LOST, str(exc))
            if retry is None or self.finished:
                self._executor_done = True
                return
            if not self._whole_only and len(self._generated[0]) >= self._original.params.max_tokens:
                # Every token it may make came back already; only its finish was lost.
                self._executor_done = True
                self.finish_reasons[0] = "length"
                yield [ChoiceDelta(0, self._detok[0].finish(), "length")]
                return
            await self._migrate(retry)

    async def _migrate(self, retry: _Retry) -> None:
        """Sends the request on as its continuation, or raises the APIError that ends it."""
        migrator = self._migrator
        self._client.abort(self.request_id)  # a retryable error's executor holds nothing more
        self._cut = []
        if migrator is None or migrator.limit <= 0:
            if migrator is not None:
                migrator.give_up(NOT_MIGRATED_OFF, retry.detail)
            raise self._unavailable()
        if self.migrations >= migrator.limit:
            migrator.give_up(NOT_MIGRATED_LIMIT, retry.detail)
            raise APIError(
                MIGRATIONS_EXHAUSTED.format(n=self.migrations), status=503, type="server_error"
            )
        generated = self._generated[0]
        if self._whole_only and any(self._generated):
            migrator.give_up(NOT_MIGRATED_STARTED, retry.detail)
            raise self._unavailable()
        self.migrations += 1
        request = continuation(
            self._original,
            self._prompt,
            [] if self._whole_only else generated,
            f"{self._original.request_id}.m{self.migrations}",
        )
        try:
            self._client, self._stream = await migrator.resubmit(
                request, retry.reason, retry.detail
            )
        except MigrationFailed as exc:
            migrator.give_up(NOT_MIGRATED_NO_EXECUTOR, str(exc))
            raise self._unavailable() from None
        self.request_id = request.request_id
        self._executor_done = False

    @staticmethod
    def _unavailable() -> APIError:
        return APIError(EXECUTOR_UNAVAILABLE, status=503, type="server_error")

    def _apply(self, out: Output) -> ChoiceDelta | None:
        if isinstance(out, ColumnToken):
            return self._apply_token(out.index, out.token)
        if out.rejected:
            self._executor_done = True
            if self.migrations:
                # The original was accepted: its continuation does not fit the executor it was
                # moved to (a shorter context, a smaller pool). Another one may take it.
                raise _Retry(REASON_REFUSED, out.error)
            raise APIError(client_safe(out.error, "The executor rejected the request."))
        if out.finish_reason == pb.FINISH_ERROR:
            self._executor_done = True
            if out.retryable:
                raise _Retry(REASON_RETRYABLE, out.error)
            # The executor's words (a step that raised, kvmanager's address) stay in the log.
            log.error(
                "request %s failed at its executor: %s", self.request_id, out.error or "unknown"
            )
            raise APIError(GENERATION_FAILED, status=500, type="server_error")
        # A continuation's prompt holds the tokens made before the seam: usage keeps the
        # original prompt's counts, read where it was first served.
        if out.num_prompt_tokens and (not self._counted or self.migrations == 0):
            self._counted = True
            self.cached_tokens = max(
                self.cached_tokens, min(out.num_cached_tokens, self.prompt_tokens)
            )
        if out.prompt_logprobs and self.prompt_logprobs is None:
            # (a continuation's prompt runs past the original's: only the original's count)
            self.prompt_logprobs = self._token_infos(out.prompt_logprobs)[: self.prompt_tokens - 1]
        i = out.index
        if i >= self.n or self.finish_reasons[i] is not None:
            return None  # a choice already cut by a stop string: the executor ran ahead
        self.completion_tokens += len(out.token_ids)
        self._generated[i].extend(out.token_ids)
        detok = self._detok[i]
        text = detok.push(list(out.token_ids))
        logprobs = self._token_infos(out.logprobs) if self._want_logprobs else []
        if detok.stopped:
            self.finish_reasons[i] = "stop"
            if self._cut_alone and out.finish_reason == pb.FINISH_NONE:
                self._cut.append(i)
        elif out.finish_reason != pb.FINISH_NONE:
            text += detok.finish()
            self.finish_reasons[i] = FINISH_REASONS.get(out.finish_reason, "stop")
        if not text and not logprobs and self.finish_reasons[i] is None:
            return None
        return ChoiceDelta(i, text, self.finish_reasons[i], logprobs)

    def _apply_token(self, i: int, token: int) -> ChoiceDelta | None:
        """`_apply` for a column entry (most tokens): one plain token of a running choice, no
        finish, logprobs or error. Its usage counts are those of the request's last full output,
        which `_apply` has read already (a stream delivers in the engine's order), so they change
        nothing here."""
        if i >= self.n or self.finish_reasons[i] is not None:
            return None  # a choice already cut by a stop string: the executor ran ahead
        self.completion_tokens += 1
        self._generated[i].append(token)
        detok = self._detok[i]
        text = detok.push([token])
        if detok.stopped:
            self.finish_reasons[i] = "stop"
            if self._cut_alone:
                self._cut.append(i)
        elif not text:
            return None
        return ChoiceDelta(i, text, self.finish_reasons[i])

    def _token_infos(self, lps: Iterable[pb.TokenLogprob]) -> list[TokenInfo]:
        text = self._tokenizer.token_text
        raw = self._tokenizer.token_bytes
        return [
            TokenInfo(
                text(lp.token_id),
                lp.logprob,
                [(text(t.token_id), t.logprob) for t in lp.top],
                raw(lp.token_id),
                [raw(t.token_id) for t in lp.top],
                lp.token_id,
                [t.token_id for t in lp.top],
                lp.rank,
            )
            for lp in lps
        ]

    async def close(self) -> None:
        if not self._executor_done and not self._stream.done:
            self._client.abort(self.request_id)
        self._executor_done = True
        if self._iter is not None:
            with contextlib.suppress(Exception):
                await self._iter.aclose()
