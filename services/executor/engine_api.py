"""The engine's public types: what the executor's gRPC service hands to the engine and gets back.

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
from dataclasses import dataclass, field


class FinishReason(enum.IntEnum):
    """Same numbering as proto/executor.proto's FinishReason."""

    NONE = 0
    STOP = 1  # EOS or a stop token id
    LENGTH = 2  # max_tokens or the context limit
    ABORT = 3
    ERROR = 4


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
    max_tokens: int = 16
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = 0  # top-N logprobs per token
    return_logprobs: bool = False  # the sampled token's logprob
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    use_beam_search: bool = False
    beam_width: int = 0
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True, False or "never", as transformers' beam search


@dataclass(slots=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


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

    @property
    def finished(self) -> bool:
        return self.finish_reason != FinishReason.NONE
