"""An executor's load as routing counts it: what the executor last reported (a Step's load part,
api.LoadReport) plus what was routed to it since (pending load).

Reports come with the executor's Step calls, so between two of them a burst of Route calls
would all see the same figures and all pick the same executor. Every routed request therefore
counts at once, as one more waiting sequence with its uncached prompt tokens queued, until the
executor's next report, which counts it itself (or, when the request has not reached it yet,
briefly does not: the report is the executor's truth and supersedes the estimate).
"""

from __future__ import annotations

from dataclasses import dataclass

# How many queued prompt tokens weigh as much as one sequence in the load figure. A waiting
# prompt costs its prefill before it decodes; a chunk of about this size is what a step
# prefills beside a decode batch, so each such chunk holds the queue back about one more step,
# roughly as one more sequence would. A weight, not a measurement: it only has to rank
# executors, and it keeps a few long prompts from looking like no load at all.
TOKENS_PER_SEQ = 512


@dataclass(slots=True)
class Load:
    running: int = 0
    waiting: int = 0
    queued_prompt_tokens: int = 0
    # Routed here since the last report: requests, and their prompt tokens not cached here.
    routed_seqs: int = 0
    routed_tokens: int = 0
    reports: int = 0  # reports taken (0: nothing known beyond what was routed)

    def report(self, running: int, waiting: int, queued_prompt_tokens: int) -> None:
        """The executor's own figures replace the previous ones and the pending estimate."""
        self.running = running
        self.waiting = waiting
        self.queued_prompt_tokens = queued_prompt_tokens
        self.routed_seqs = 0
        self.routed_tokens = 0
        self.reports += 1

    def add_routed(self, uncached_tokens: int) -> None:
        self.routed_seqs += 1
        self.routed_tokens += uncached_tokens

    @property
    def value(self) -> float:
        """Sequences, running or waiting (pending included), plus queued prompt tokens counted
        TOKENS_PER_SEQ to a sequence: the one figure routing compares."""
        return (
            self.running
            + self.waiting
            + self.routed_seqs
            + (self.queued_prompt_tokens + self.routed_tokens) / TOKENS_PER_SEQ
        )
