"""The engine's public types: what the executor's gRPC service hands to the engine and gets back,
and the Protocols the service codes against (EngineClient, EngineLoad).

    engine = LLMEngine(config, allocator)      # services/executor/engine.py
    await engine.start()                       # registers the pool with the allocator
    engine.add_request(request_id, prompt_token_ids, SamplingParams(...), cache_salt="")
    engine.abort_request(request_id)           # blocks released within one step
    outputs: list[SequenceOutput] = await engine.step()   # one scheduler step
    engine.has_unfinished_requests()

`add_request` raises `ValueError` with a clear message for anything invalid (empty prompt,
prompt + max_tokens past the context, n too large, bad sampling values): the service turns it into
INVALID_ARGUMENT. Every request ends with exactly one SequenceOutput per choice whose
finish_reason is not None.
"""

from __future__ import annotations

import enum
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
from pagemesh.services.executor.trace import StepTimes

# transformers' beam-search early stopping: True, False or "never".
EarlyStopping = bool | Literal["never"]


class FinishReason(enum.IntEnum):
    """Same numbering as proto/executor.proto's FinishReason."""

    NONE = 0
    STOP = 1  # EOS or a stop token id
    LENGTH = 2  # max_tokens or the context limit
    ABORT = 3
    ERROR = 4


class GuideKind(enum.IntEnum):
    """Same numbering as proto/executor.proto's GuideKind."""

    NONE = 0
    JSON_SCHEMA = 1  # spec: the schema as JSON text
    JSON_OBJECT = 2  # any JSON object
    REGEX = 3
    CHOICE = 4  # spec: a JSON array of the allowed strings
    GRAMMAR = 5  # spec: EBNF, rule `root`


@dataclass(slots=True, frozen=True)
class Guide:
    """Structured output: the grammar every sampled token must keep the output in
    (grammar.py compiles it, once per distinct guide)."""

    kind: GuideKind
    spec: str = ""


@dataclass(slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    # A seeded choice's k-th sampled token draws at position seed_position + k of its random
    # stream (proto SamplingParams.seed_position: a migrated continuation resumes the stream).
    # It is also the count of output tokens at the prompt's end (the continuation appended
    # them): presence/frequency penalties count those as output.
    seed_position: int = 0
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0  # top-N logprobs per token
    return_logprobs: bool = False  # the sampled token's logprob
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    use_beam_search: bool = False
    beam_width: int = 0
    length_penalty: float = 1.0
    early_stopping: EarlyStopping = False  # True, False or "never", as transformers' beam search
    # vLLM's prompt_logprobs: alternatives per prompt token (0: its own logprob only); None: off.
    prompt_logprobs: int | None = None
    guide: Guide | None = None  # structured output; None: unconstrained


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int = 0  # 1 = the most likely token; 0 = not computed (sampled tokens)


@dataclass(slots=True)
class SequenceOutput:
    request_id: str
    index: int  # choice index (n > 1) or beam rank
    token_ids: list[int]  # new tokens this step (beam search: the whole final beam)
    finish_reason: FinishReason = FinishReason.NONE
    logprobs: list[TokenLogprob] = field(default_factory=list)
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    error: str = ""
    cumulative_logprob: float = 0.0
    # SamplingParams.prompt_logprobs: prompt tokens 1.. (the first has none), in the first output.
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    # An ERROR another executor (or this one, later) could serve: kvmanager unreachable past
    # the bound, a stale epoch. The gateway sends such a request again (proto: retryable).
    retryable: bool = False
    # Refused before any work, after add_request returned (a guide that does not compile, or
    # not within the bound): the gateway answers 400, as for add_request's ValueError.
    rejected: bool = False

    @property
    def finished(self) -> bool:
        return self.finish_reason != FinishReason.NONE


class PackedIds:
    """Prompt token ids in the form the wire carries them (GenerateRequest.prompt_token_data):
    u32 little-endian bytes, 4 an id (proto/packed_ids). The service hands these bytes to the
    engine as they came, and the engine keeps them as the request's packed prompt (what
    kvmanager hashes and the device token table is filled from): they are never unpacked into
    an array and packed again. `len()` is the number of ids, so a stand-in engine can treat it
    like a list."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        if len(data) % 4:
            raise ValueError("must be whole u32 ids (a multiple of 4 bytes)")
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // 4

    def __iter__(self) -> Iterator[int]:
        return iter(np.frombuffer(self.data, "<u4").tolist())


# What add_request takes as a prompt: ids, an integer array, or the wire's packed bytes.
PromptTokens = Iterable[int] | array | PackedIds


class EngineClient(Protocol):
    """What the executor's gRPC service (server.py) drives: LLMEngine, or a scripted stand-in
    in tests. One task calls `step()` while `has_unfinished_requests()`; the other calls come
    from the gRPC handlers between steps."""

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: PromptTokens,
        params: SamplingParams,
        cache_salt: str = "",
    ) -> None:
        """Raises ValueError for a request it refuses (INVALID_ARGUMENT)."""

    def abort_request(self, request_id: str) -> None: ...

    def abort_choices(self, request_id: str, indices: list[int]) -> None: ...

    def has_unfinished_requests(self) -> bool: ...

    async def step(self) -> list[SequenceOutput]: ...


@runtime_checkable
class EngineLoad(Protocol):
    """What GetInfo and the step trace report, from an engine that keeps these figures
    (LLMEngine does; the scripted stand-ins of the gateway tests do not, and report zeros)."""

    step_times: StepTimes  # the last step's (trace.py)

    @property
    def num_running(self) -> int: ...

    @property
    def num_waiting(self) -> int: ...

    @property
    def prefix_caching(self) -> bool: ...

    def kv_occupancy(self) -> tuple[int, int, int]:
        """(tokens, distinct blocks, table blocks) held by the running sequences."""
