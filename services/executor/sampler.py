"""Batched sampling on the logits' device.

One call samples one token for every row of a [B, V] float32 logits batch. Per-row parameters
arrive as tensors (SamplingTensors, built once per step from the rows' SamplingParams); the work
that no row needs (penalties, top-k/top-p sorting, min-p, logprobs) is skipped for the batch.

Sampling is the exponential race: argmax(p / q) with q ~ Exp(1) draws from p exactly (Gumbel-max
in another guise). A seeded row's q is one [V] draw from a generator seeded for that draw alone,
by `draw_seed(stream seed, position)`: the position-th output of SplitMix64 started at the
choice's seed. The draw of a row's k-th sampled token therefore depends on its seed and k only:
never on the batch it runs in, nor on what ran before it in this process, so a request migrated
after k tokens (its continuation says "start at position k", SamplingParams.seed_position) or a
sequence recomputed after preemption samples what an uninterrupted run would have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pagemesh.services.executor.engine_api import SamplingParams
from pagemesh.services.executor.staging import PinnedStaging

_GREEDY_EPS = 1e-5  # temperatures below this are greedy
_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (2^64 / golden ratio, odd)


def draw_seed(stream_seed: int, position: int) -> int:
    """The seed of a seeded row's draw at `position` (0 = its first sampled token) of the stream
    `stream_seed`: SplitMix64's output number `position` from state `stream_seed`, computed
    directly (its state after k steps is seed + (k+1) * gamma), so any position is addressable
    without replaying the ones before it."""
    z = (stream_seed + (position + 1) * _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


@dataclass(slots=True)
class SamplingTensors:
    temperature: torch.Tensor | None  # [B] float32, 1.0 on greedy rows (None: all greedy)
    greedy: torch.Tensor | None  # [B] bool (None: all greedy)
    top_k: torch.Tensor | None  # [B] int64, V = off
    top_p: torch.Tensor | None  # [B] float32
    min_p: torch.Tensor | None  # [B] float32
    presence: torch.Tensor | None  # [B] float32 (None: no row has any penalty)
    frequency: torch.Tensor | None
    repetition: torch.Tensor | None
    # logit_bias of the rows that have one, flat: (rows [K] int64, token ids [K] int64, biases
    # [K] float32); None when no row has any.
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    seeded: list[tuple[int, int]]  # (row, draw_seed of its draw this step) of seeded rows
    all_greedy: bool
    num_top_logprobs: int  # max over rows; 0 = none
    need_logprobs: bool  # some row wants its sampled token's logprob


@dataclass(slots=True)
class SamplerOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor | None = None  # [B] float32: the sampled tokens' logprobs
    top_ids: torch.Tensor | None = None  # [B, N] int64
    top_logprobs: torch.Tensor | None = None  # [B, N] float32


def is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _GREEDY_EPS


def build_sampling_tensors(
    params: list[SamplingParams],
    draws: list[int | None],
    vocab_size: int,
    device: torch.device,
    staging: PinnedStaging | None = None,
) -> SamplingTensors:
    """One pass over the rows' params; the batch flags decide which stages run at all.
    `draws`: per row, the draw_seed of its draw this step (None: unseeded, the sampler's own
    generator). `staging`: the step's pinned memory for the uploads (the engine's; staging.py)."""
    greedy = [is_greedy(p) for p in params]
    all_greedy = all(greedy)
    any_penalty = any(
        p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 or p.repetition_penalty != 1.0
        for p in params
    )
    num_top = max((p.logprobs for p in params), default=0)
    need_logprobs = num_top > 0 or any(p.return_logprobs for p in params)

    def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
        t = torch.tensor(values, dtype=dtype)
        if staging is not None:  # pinned: the copy never waits for queued device work
            return staging.to_device(t.numpy())
        if device.type == "cuda":
            t = t.pin_memory()
        return t.to(device, non_blocking=True)

    temperature = greedy_mask = top_k = top_p = min_p = None
    seeded: list[tuple[int, int]] = []
    if not all_greedy:
        temps = [1.0 if g else p.temperature for p, g in zip(params, greedy, strict=True)]
        temperature = tensor(temps, torch.float32)
        greedy_mask = tensor(greedy, torch.bool)
        ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        if any(k < vocab_size for k in ks):
            top_k = tensor(ks, torch.int64)
        if any(p.top_p < 1.0 for p in params):
            top_p = tensor([p.top_p for p in params], torch.float32)
        if any(p.min_p > 0.0 for p in params):
            min_p = tensor([p.min_p for p in params], torch.float32)
        seeded = [
            (i, d)
            for i, (d, gr) in enumerate(zip(draws, greedy, strict=True))
            if d is not None and not gr
        ]
    bias = None
    if any(p.logit_bias for p in params):
        rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
        ids = [t for p in params for t in p.logit_bias]
        values = [b for p in params for b in p.logit_bias.values()]
        bias = (tensor(rows, torch.int64), tensor(ids, torch.int64), tensor(values, torch.float32))
    presence = frequency = repetition = None
    if any_penalty:
        presence = tensor([p.presence_penalty for p in params], torch.float32)
        frequency = tensor([p.frequency_penalty for p in params], torch.float32)
        repetition = tensor([p.repetition_penalty for p in params], torch.float32)
    return SamplingTensors(
        temperature=temperature,
        greedy=greedy_mask,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        presence=presence,
        frequency=frequency,
        repetition=repetition,
        bias=bias,
        seeded=seeded,
        all_greedy=all_greedy,
        num_top_logprobs=num_top,
        need_logprobs=need_logprobs,
    )


def token_counts(
    tokens: torch.Tensor,  # [B, L] int64 (prompt + outputs, padded)
    prompt_lens: torch.Tensor,  # [B] int64
    seq_lens: torch.Tensor,  # [B] int64
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output token counts [B, V] float32, seen-anywhere mask [B, V] bool)."""
    batch, length = tokens.shape
    pos = torch.arange(length, device=tokens.device).unsqueeze(0)
    valid = pos < seq_lens.unsqueeze(1)
    is_output = valid & (pos >= prompt_lens.unsqueeze(1))
    # Invalid positions go to a dump column V, dropped afterwards.
    idx = torch.where(valid, tokens, vocab_size)
    out_counts = torch.zeros(batch, vocab_size + 1, device=tokens.device)
    out_counts.scatter_add_(1, idx, is_output.float())
    seen = torch.zeros(batch, vocab_size + 1, device=tokens.device)
    seen.scatter_(1, idx, 1.0)
    return out_counts[:, :vocab_size], seen[:, :vocab_size] > 0


class Sampler:
    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.generator = torch.Generator(device=device)  # unseeded rows
        self.generator.manual_seed(seed)
        # Seeded rows: re-seeded for each draw (draw_seed), so it carries nothing between them.
        self._draw_generator = torch.Generator(device=device)

    def apply_penalties(
        self,
        logits: torch.Tensor,
        st: SamplingTensors,
        out_counts: torch.Tensor,
        seen: torch.Tensor,
    ) -> torch.Tensor:
        assert st.repetition is not None and st.frequency is not None and st.presence is not None
        # Repetition (HF/CTRL): over prompt and outputs, divide positive logits, multiply negative.
        rep = st.repetition.unsqueeze(1)
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
        # Frequency and presence (OpenAI): over the outputs only.
        logits = logits - st.frequency.unsqueeze(1) * out_counts
        return logits - st.presence.unsqueeze(1) * (out_counts > 0).float()

    def __call__(
        self,
        logits: torch.Tensor,  # [B, V] float32
        st: SamplingTensors,
        counts: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> SamplerOutput:
        logits = logits[:, : self.vocab_size]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if st.need_logprobs else None
        if st.presence is not None:
            assert counts is not None, "penalties need token counts"
            logits = self.apply_penalties(logits, st, *counts)
        if st.bias is not None:  # after the logprobs: those are the model's own distribution
            logits = logits.index_put(st.bias[:2], st.bias[2], accumulate=True)
        greedy_ids = logits.argmax(dim=-1)
        if st.all_greedy:
            token_ids = greedy_ids
        else:
            assert st.greedy is not None
            token_ids = torch.where(st.greedy, greedy_ids, self._sample(logits, st))
        out = SamplerOutput(token_ids=token_ids)
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1)
            if st.num_top_logprobs > 0:
                out.top_logprobs, out.top_ids = raw_logprobs.topk(st.num_top_logprobs, dim=-1)
        return out

    def _sample(self, logits: torch.Tensor, st: SamplingTensors) -> torch.Tensor:
        assert st.temperature is not None
        logits = logits / st.temperature.unsqueeze(1)
        if st.top_k is not None or st.top_p is not None:
            logits = self._top_k_top_p(logits, st.top_k, st.top_p)
        probs = torch.softmax(logits, dim=-1)
        if st.min_p is not None:
            top = probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < st.min_p.unsqueeze(1) * top, 0.0)
        q = torch.empty_like(probs).exponential_(generator=self.generator)
        for row, seed in st.seeded:
            self._draw_generator.manual_seed(seed)
            q[row].exponential_(generator=self._draw_generator)
        return (probs / q).argmax(dim=-1)

    @staticmethod
    def _top_k_top_p(
        logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
    ) -> torch.Tensor:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        if top_k is not None:
            rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
            sorted_logits = sorted_logits.masked_fill(rank >= top_k.unsqueeze(1), float("-inf"))
        if top_p is not None:
            probs = torch.softmax(sorted_logits, dim=-1)
            # Drop a token when the mass strictly before it already reaches top_p (the first
            # token always stays).
            before = probs.cumsum(dim=-1) - probs
            sorted_logits = sorted_logits.masked_fill(before >= top_p.unsqueeze(1), float("-inf"))
        return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


# The batch of a step whose every row is plain greedy: no per-row tensors at all.
ALL_GREEDY = SamplingTensors(
    temperature=None,
    greedy=None,
    top_k=None,
    top_p=None,
    min_p=None,
    presence=None,
    frequency=None,
    repetition=None,
    bias=None,
    seeded=[],
    all_greedy=True,
    num_top_logprobs=0,
    need_logprobs=False,
)
