"""What add_request refuses: a ValueError with a clear message for anything invalid (the service
turns it into INVALID_ARGUMENT), checked before the request touches any engine state."""

from __future__ import annotations

from pagemesh.services.executor import beam_search
from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.engine_api import SamplingParams


def validate_request(
    num_prompt_tokens: int,
    p: SamplingParams,
    lo: int,
    hi: int,
    *,
    config: EngineConfig,
    vocab_size: int,
    max_model_len: int,
    num_blocks: int,
) -> None:
    """`lo`, `hi`: the prompt's smallest and largest id; `num_blocks`: the KV pool's size."""

    def bad(msg: str) -> None:
        raise ValueError(msg)

    if not num_prompt_tokens:
        bad("the prompt must hold at least one token")
    if lo < 0 or hi >= vocab_size:
        bad(f"prompt token ids must be in [0, {vocab_size})")
    # A search runs its beams at once: each needs a row.
    beam_search.validate(p, min(config.max_beam_width, config.max_num_seqs))
    if not 1 <= p.n <= min(config.max_n, config.max_num_seqs):
        bad(f"n must be in [1, {min(config.max_n, config.max_num_seqs)}], got {p.n}")
    if p.max_tokens < 1:
        bad(f"max_tokens must be >= 1, got {p.max_tokens}")
    if num_prompt_tokens + p.max_tokens > max_model_len:
        bad(
            f"prompt ({num_prompt_tokens} tokens) + max_tokens ({p.max_tokens}) exceeds the"
            f" context length {max_model_len}"
        )
    if not config.enable_chunked_prefill and num_prompt_tokens > config.max_num_batched_tokens:
        bad(f"prompt longer than max_num_batched_tokens ({config.max_num_batched_tokens})")
    blocks = -(-(num_prompt_tokens + p.max_tokens) // config.block_size)
    if blocks > num_blocks:
        bad(f"the request needs {blocks} KV blocks, the pool has {num_blocks}")
    if not (p.temperature >= 0.0 and p.temperature == p.temperature):
        bad(f"temperature must be >= 0, got {p.temperature}")
    if not 0.0 < p.top_p <= 1.0:
        bad(f"top_p must be in (0, 1], got {p.top_p}")
    if p.top_k < -1:
        bad(f"top_k must be -1, 0 (off) or positive, got {p.top_k}")
    if not 0.0 <= p.min_p <= 1.0:
        bad(f"min_p must be in [0, 1], got {p.min_p}")
    if not -2.0 <= p.presence_penalty <= 2.0:
        bad(f"presence_penalty must be in [-2, 2], got {p.presence_penalty}")
    if not -2.0 <= p.frequency_penalty <= 2.0:
        bad(f"frequency_penalty must be in [-2, 2], got {p.frequency_penalty}")
    if not p.repetition_penalty > 0.0:
        bad(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    if not 0 <= p.logprobs <= 20:
        bad(f"logprobs must be in [0, 20], got {p.logprobs}")
    if p.prompt_logprobs is not None:
        if not 0 <= p.prompt_logprobs <= 20:
            bad(f"prompt_logprobs must be in [0, 20], got {p.prompt_logprobs}")
        if p.use_beam_search:
            bad("prompt_logprobs is not supported with beam search")
    if p.seed is not None and p.seed < 0:
        bad(f"seed must be >= 0, got {p.seed}")
    if any(not 0 <= int(t) < vocab_size for t in p.stop_token_ids):
        bad(f"stop_token_ids must be in [0, {vocab_size})")
    if p.logit_bias:
        if any(not 0 <= int(t) < vocab_size for t in p.logit_bias):
            bad(f"logit_bias token ids must be in [0, {vocab_size})")
        if any(not -100.0 <= b <= 100.0 for b in p.logit_bias.values()):
            bad("logit_bias values must be in [-100, 100]")
