"""Request and sequence state (the scheduler, scheduler.py, is the one that changes it).

A Request is what add_request receives; it owns n Sequences (one per choice). With n > 1 only the
first sequence is prefilled: when its prompt is done, n - 1 children are forked from it and share
its prompt blocks (copy-on-write). Each sequence is scheduled on its own from then on.

Token accounting of a sequence (the invariant the scheduler relies on):
    token_ids = prompt + outputs
    num_computed_tokens <= len(token_ids): KV written for token_ids[:num_computed_tokens]
    block_table covers at least num_computed_tokens tokens
A step feeds token_ids[num_computed : num_computed + k]; when that reaches the end of token_ids,
the logits of the last fed token sample the next token. A decoding sequence therefore always has
exactly one token (the last sampled) whose KV is not written yet.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pagemesh.services.executor.beam_search import BeamSearch
from pagemesh.services.executor.engine_api import (
    FinishReason,
    SamplingParams,
    SequenceOutput,
    TokenLogprob,
)

# A sampled token still on its way from the device (async scheduling): token_ids holds this
# until the step that sampled it lands.
PLACEHOLDER = -1


class SeqStatus(enum.Enum):
    WAITING = 0
    RUNNING = 1
    FINISHED = 2


# Appended to the cache salt of a request with prompt_logprobs (engine.add_request).
PROMPT_LOGPROBS_SALT = "\x00pagemesh-prompt-logprobs"


@dataclass(slots=True, eq=False)
class Request:
    request_id: str
    params: SamplingParams
    cache_salt: str
    num_prompt_tokens: int
    seqs: list[Sequence] = field(default_factory=list)
    forked: bool = False  # n > 1: children exist (beam search: the first round is done)
    num_cached_tokens: int = -1  # of the first admission; -1 until admitted
    beam: BeamState | None = None  # beam search (beam_engine.py)
    # The prompt packed as u32 (proto/packed_ids), for kvmanager and the token table; b"" when
    # the request did not come through LLMEngine.add_request.
    prompt_data: bytes = b""

    @property
    def num_rows(self) -> int:
        """Sequences the request runs at once after its prefill: n, or the beam width."""
        return self.params.beam_width if self.beam is not None else self.params.n

    def error_outputs(
        self, indices: list[int] | range, error: str, retryable: bool = False
    ) -> list[SequenceOutput]:
        """The final ERROR output of each of these choices (`retryable`: see SequenceOutput)."""
        return [
            SequenceOutput(
                self.request_id,
                i,
                [],
                FinishReason.ERROR,
                error=error,
                num_prompt_tokens=self.num_prompt_tokens,
                retryable=retryable,
            )
            for i in indices
        ]


@dataclass(slots=True, eq=False)
class Sequence:
    seq_id: str
    request: Request
    index: int  # choice index
    token_ids: list[int]
    num_prompt_tokens: int
    arrival: int  # admission order key: preemption takes the newest first
    status: SeqStatus = SeqStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_committed_blocks: int = 0  # blocks of block_table whose hash kvmanager has
    block_table: list[int] = field(default_factory=list)
    num_synced_blocks: int = 0  # block_table[:num_synced_blocks] is in the device table row
    row: int = -1  # row in the engine's persistent device tables while running
    # A seeded request's random stream for this choice (seed + index); None: unseeded. Each
    # sampled token's draw derives from it and the token's position (sampler.draw_seed).
    seed: int | None = None
    finish_reason: FinishReason = FinishReason.NONE
    # Per-step outputs, drained by the engine.
    new_token_ids: list[int] = field(default_factory=list)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    reported_prompt: bool = False
    num_preemptions: int = 0
    # A seq whose table may hold a shared partial block (just forked): its next Extend must run
    # before it writes, so kvmanager can answer with a copy-on-write.
    needs_extend: bool = False
    # Table coverage (tokens) asked of kvmanager by a look-ahead Extend still in flight: the
    # scheduler does not ask again for what is on its way.
    lookahead_sent: int = 0
    # SamplingParams.prompt_logprobs: entry j scores prompt token j + 1; sent with the first
    # output, then done (a recompute after preemption does not send them again).
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs_done: bool = False
    # Chained keys of the prompt's full blocks (inflight_prefill.py), made on first use.
    prompt_block_keys: list[int] | None = None
    # Structured output: the xgrammar GrammarMatcher of the request's guide, advanced with each
    # landed token (grammar.py); None for an unconstrained sequence.
    matcher: Any = None

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def penalty_prompt_len(self) -> int:
        """Where output starts for presence/frequency penalties: a migrated continuation's
        prompt ends with the seed_position tokens the interrupted run already made, which that
        run's penalties counted as output (and so must this one's)."""
        return max(0, self.num_prompt_tokens - self.request.params.seed_position)

    @property
    def draw_position(self) -> int:
        """Where the token sampled next draws in the choice's seeded stream: its output index,
        plus the stream position a migrated continuation resumes at. Derived from the tokens
        alone, so a recompute after preemption samples at the same position again."""
        return self.request.params.seed_position + self.num_output_tokens

    @property
    def packed_prompt(self) -> bytes:
        """The request's packed prompt (Request.prompt_data) while this sequence holds that
        prompt alone, no token of its own yet; b"" otherwise or when the request has none."""
        return self.request.prompt_data if self.num_tokens == self.num_prompt_tokens else b""

    @property
    def is_finished(self) -> bool:
        return self.status == SeqStatus.FINISHED

    @property
    def is_prefill(self) -> bool:
        """More than the one unwritten (last sampled) token is still to be computed."""
        return self.num_tokens - self.num_computed_tokens > 1

    def num_table_tokens(self, block_size: int) -> int:
        return len(self.block_table) * block_size

    def apply_update(self, first_index: int, block_ids: list[int]) -> None:
        del self.block_table[first_index:]
        self.block_table.extend(block_ids)
        self.num_synced_blocks = min(self.num_synced_blocks, first_index)


def new_sequence(req: Request, index: int, token_ids: list[int]) -> Sequence:
    """Choice `index` of `req` (added to req.seqs), with its own random stream when the request
    is seeded: seed + index (as vLLM seeds the children of n > 1), so each choice's samples
    depend only on its seed and its own tokens."""
    seed = None if req.params.seed is None else (req.params.seed + index) % 2**63
    suffix = f"#{index}" if req.params.n > 1 else ""
    seq = Sequence(
        seq_id=f"{req.request_id}{suffix}",
        request=req,
        index=index,
        token_ids=token_ids,
        num_prompt_tokens=req.num_prompt_tokens,
        arrival=0,
        seed=seed,
    )
    req.seqs.append(seq)
    return seq


@dataclass(slots=True, eq=False)
class Fork:
    """Children that will share `parent`'s KV blocks covering its first `num_tokens` tokens
    (copy-on-write): n > 1 children after the prompt, or a beam's extra candidates. Each child
    holds a row already; Scheduler.fork makes them run."""

    parent: Sequence
    children: list[Sequence]
    num_tokens: int


@dataclass(slots=True)
class BeamState:
    """A beam-search request's search state (Request.beam; driven by beam_engine.py)."""

    search: BeamSearch
    beams: list[Sequence]  # running beams, in the order of the search's parent indices
    # This round's candidates so far: beam -> (top logprobs [K], token ids [K]).
    reports: dict[Sequence, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    next_id: int = 1  # for the seq ids of forked beams
