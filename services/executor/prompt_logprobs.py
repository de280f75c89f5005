"""vLLM's prompt_logprobs: for a request that asks, the logprob (and rank, and the top
alternatives) of each prompt token after the first, given the tokens before it. Evaluation
harnesses score text this way (`echo` with `logprobs` on completions).

A step that prefills such a prompt chunk keeps the hidden states of every position in the
chunk, not only the last: position j's logits score token j + 1, for j + 1 still in the prompt.
Those rows go through the LM head in slices (a slice's logits are [rows, vocab] in float32), on
the eager path, so such steps do not replay a CUDA graph. The request has no prefix-cache hits
(engine.add_request gives it a salt nothing commits to): a cached position has no logits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from pagemesh.services.executor.engine_api import TokenLogprob
from pagemesh.services.executor.sequence import Sequence

# Rows through the LM head at once: 1,024 x a 128k vocabulary in float32 is 0.5 GiB.
SLICE_ROWS = 1024


@dataclass(slots=True)
class PromptLogprobRows:
    """One step's prompt positions to score."""

    seqs: list[Sequence]
    starts: list[int]  # the first position scored, per sequence
    counts: list[int]  # how many, per sequence (rows are in this order)
    rows: torch.Tensor  # [R] rows of the step's hidden states
    targets: torch.Tensor  # [R] the prompt token each row scores
    num_top: int


def plan(
    seqs: list[Sequence], starts: np.ndarray, q_lens: np.ndarray, cu: np.ndarray, device: str
) -> PromptLogprobRows | None:
    """The positions of this step's chunks that score a prompt token (host arrays of the step:
    each sequence's first computed position, its tokens this step, their offsets)."""
    picked: list[Sequence] = []
    first: list[int] = []
    counts: list[int] = []
    rows: list[np.ndarray] = []
    targets: list[int] = []
    num_top = 0
    for i, seq in enumerate(seqs):
        k = seq.request.params.prompt_logprobs
        if k is None or seq.prompt_logprobs_done:
            continue
        s = int(starts[i])
        e = min(s + int(q_lens[i]), seq.num_prompt_tokens - 1)
        if e <= s:
            continue
        picked.append(seq)
        first.append(s)
        counts.append(e - s)
        rows.append(np.arange(cu[i], cu[i] + e - s, dtype=np.int64))
        targets.extend(seq.token_ids[s + 1 : e + 1])
        num_top = max(num_top, k)
    if not picked:
        return None
    return PromptLogprobRows(
        picked,
        first,
        counts,
        torch.from_numpy(np.concatenate(rows)).to(device),
        torch.tensor(targets, dtype=torch.int64, device=device),
        num_top,
    )


PromptTensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def compute(
    lm_head: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    p: PromptLogprobRows,
    vocab_size: int,
) -> PromptTensors:
    """(logprob [R], rank [R], top ids [R, k], top logprobs [R, k]) on the device; the tops
    are None when k is 0."""
    lps, ranks, tids, tlps = [], [], [], []
    for lo in range(0, p.rows.numel(), SLICE_ROWS):
        rows = p.rows[lo : lo + SLICE_ROWS]
        logits = lm_head(hidden.index_select(0, rows))[:, :vocab_size].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        chosen = logprobs.gather(1, p.targets[lo : lo + SLICE_ROWS].unsqueeze(1))
        lps.append(chosen.squeeze(1))
        ranks.append((logprobs > chosen).sum(dim=1) + 1)
        if p.num_top:
            v, i = logprobs.topk(p.num_top, dim=-1)
            tlps.append(v)
            tids.append(i)
    return (
        torch.cat(lps),
        torch.cat(ranks),
        torch.cat(tids) if tids else None,
        torch.cat(tlps) if tlps else None,
    )


def collect(
    p: PromptLogprobRows, t: PromptTensors
) -> list[tuple[Sequence, int, list[TokenLogprob]]]:
    """On the host: (sequence, first position, entries) for each scored chunk."""
    lp, rank, tids, tlps = (x.tolist() if x is not None else None for x in t)
    assert lp is not None and rank is not None
    targets = p.targets.tolist()
    out = []
    r = 0
    for seq, start, n in zip(p.seqs, p.starts, p.counts, strict=True):
        k = seq.request.params.prompt_logprobs or 0
        entries = []
        for j in range(r, r + n):
            top = list(zip(tids[j][:k], tlps[j][:k], strict=True)) if k and tids and tlps else []
            entries.append(TokenLogprob(targets[j], lp[j], top, rank[j]))
        out.append((seq, start, entries))
        r += n
    return out
