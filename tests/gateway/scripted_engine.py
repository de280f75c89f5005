"""A scripted engine behind the real executor gRPC service (services/executor/server.py): the
gateway's tests run the wire and the gateway for real, without loading a model."""

from __future__ import annotations

import asyncio

from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.executor.engine_api import FinishReason, SamplingParams, SequenceOutput


class ScriptedEngine:
    """Emits a fixed answer one token per step (choice i: `choice_answers[i]` if set); honours
    n, max_tokens, abort, single-choice abort and EOS.

    `resume`: a prompt that ends with the first k tokens of the answer (a migrated request's
    continuation) goes on from token k, as a deterministic (greedy) model would.
    `fail_next`: the next step ends every live request with FINISH_ERROR carrying this text
    (`fail_retryable` sets its retryable flag), as the real engine fails them."""

    def __init__(
        self, answer_ids: list[int], eos: int, step_delay: float = 0.005, resume: bool = False
    ) -> None:
        self.answer = answer_ids
        self.eos = eos
        self.delay = step_delay
        self.live: dict[str, tuple[SamplingParams, list[int], int]] = {}
        self.aborted: list[str] = []
        self._aborts: list[str] = []
        self.capacity = 1 << 30
        self.step_sizes: list[int] = []
        self.cached = 0
        self.choice_answers: dict[int, list[int]] = {}
        self.choice_aborts: list[tuple[str, list[int]]] = []
        self._cuts: list[tuple[str, list[int]]] = []
        self.generated: dict[tuple[str, int], int] = {}  # tokens made per (request, choice)
        self.prompts: dict[str, list[int]] = {}  # every request's prompt, as it arrived
        self.params: dict[str, SamplingParams] = {}  # and its parameters
        self.resume = resume
        self._starts: dict[str, int] = {}  # answer tokens a continuation's prompt held
        self.fail_next = ""
        self.fail_retryable = False

    def add_request(
        self, rid: str, prompt: list[int], params: SamplingParams, cache_salt: str = ""
    ) -> None:
        if not prompt:
            raise ValueError("empty prompt")
        if len(prompt) + params.max_tokens > self.capacity:  # as the real engine's pool check
            raise ValueError(f"the request needs more than the pool's {self.capacity} tokens")
        start = self._resumed_at(list(prompt)) if self.resume else 0
        self._starts[rid] = start
        self.live[rid] = (params, [start] * params.n, len(prompt))
        self.prompts[rid] = list(prompt)
        self.params[rid] = params

    def _resumed_at(self, prompt: list[int]) -> int:
        script = self.answer
        for k in range(min(len(script), len(prompt)), 0, -1):
            if prompt[-k:] == script[:k]:
                return k
        return 0

    def abort_request(self, rid: str) -> None:
        if rid in self.live and rid not in self._aborts:
            self._aborts.append(rid)

    def abort_choices(self, rid: str, indices: list[int]) -> None:
        if rid in self.live:
            self.choice_aborts.append((rid, indices))
            self._cuts.append((rid, indices))

    def has_unfinished_requests(self) -> bool:
        return bool(self.live)

    async def step(self) -> list[SequenceOutput]:
        await asyncio.sleep(self.delay)
        outs = []
        if self.fail_next:
            for rid, (params, pos, plen) in self.live.items():
                outs += [
                    SequenceOutput(
                        rid,
                        i,
                        [],
                        FinishReason.ERROR,
                        num_prompt_tokens=plen,
                        error=self.fail_next,
                        retryable=self.fail_retryable,
                    )
                    for i in range(params.n)
                    if pos[i] >= 0
                ]
            self.live.clear()
            self.fail_next = ""
            return outs
        # Like the real engine: aborts are taken at the next step, each open choice ending
        # with an ABORT output.
        for rid in self._aborts:
            params, pos, plen = self.live.pop(rid)
            outs += [
                SequenceOutput(rid, i, [], FinishReason.ABORT, [], plen)
                for i in range(params.n)
                if pos[i] >= 0
            ]
            self.aborted.append(rid)
        self._aborts.clear()
        for rid, indices in self._cuts:
            if rid not in self.live:
                continue
            params, pos, plen = self.live[rid]
            for i in indices:
                if i < params.n and pos[i] >= 0:
                    outs.append(SequenceOutput(rid, i, [], FinishReason.ABORT, [], plen))
                    pos[i] = -1
            if all(p < 0 for p in pos):
                del self.live[rid]
        self._cuts.clear()
        for rid, (params, pos, plen) in list(self.live.items()):
            for i in range(params.n):
                if pos[i] < 0:
                    continue
                script = [*self.choice_answers.get(i, self.answer), self.eos]
                self.generated[rid, i] = self.generated.get((rid, i), 0) + 1
                tok = script[min(pos[i], len(script) - 1)]
                pos[i] += 1
                reason = FinishReason.NONE
                if tok == self.eos:
                    reason = FinishReason.STOP
                elif pos[i] - self._starts.get(rid, 0) >= params.max_tokens:
                    reason = FinishReason.LENGTH
                outs.append(SequenceOutput(rid, i, [tok], reason, [], plen, self.cached))
                if reason != FinishReason.NONE:
                    pos[i] = -1
            if all(p < 0 for p in pos):
                del self.live[rid]
        self.step_sizes.append(len(outs))
        return outs


def scripted_info(vocab_size: int, model_path: str) -> pb.ExecutorInfo:
    """The ExecutorInfo a scripted engine's server advertises: model "smol" (SmolLM2's tokenizer
    at `model_path`), a 64-block pool of 16-token blocks, a 256-token context."""
    return pb.ExecutorInfo(
        executor_id="fake",
        model="smol",
        model_path=model_path,
        block_size=16,
        num_blocks=64,
        max_model_len=256,
        vocab_size=vocab_size,
    )
