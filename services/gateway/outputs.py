"""What a request's consumer reads for each of its outputs: the executor's full SequenceOutput,
or a ColumnToken for an entry of a step's token columns (proto/executor.proto StepOutput).

Most outputs of a step are one plain token of a running choice, and the executor packs those
into three columns instead of a SequenceOutput each. The gateway used to build a SequenceOutput
again for every entry (a message, CopyFrom and two field sets: about 1 us a token, most of its
fan-out time at 256 requests a step); a ColumnToken is a slotted object of three references
instead, and it reads like the SequenceOutput the entry stands for.
"""

from __future__ import annotations

from typing import NamedTuple

from pagemesh.proto import executor_pb2 as pb


class Usage(NamedTuple):
    """What a column entry carries besides its index and token (executor.proto): the request's
    id and the usage counts of its last full output on the stream. One is shared by every entry
    until the next full output of the request brings other counts (a new Usage then, so earlier
    entries keep theirs)."""

    request_id: str
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class ColumnToken:
    """One new token of a running choice, read from a step's columns: it stands for
    SequenceOutput{request_id, index, token_ids: [token], num_prompt_tokens, num_cached_tokens}
    (the last three from `usage`), every other field unset, and answers the same attribute names
    (the unset ones as class attributes), so a reader that does not care which form it got can
    read either. A hot reader tests `isinstance(out, ColumnToken)` and reads `index` and `token`."""

    __slots__ = ("index", "token", "usage")

    # The fields a column entry leaves unset, as a SequenceOutput reads them.
    finish_reason = pb.FINISH_NONE
    rejected = False
    error = ""
    cumulative_logprob = 0.0
    logprobs: tuple[pb.TokenLogprob, ...] = ()

    def __init__(self, index: int, token: int, usage: Usage) -> None:
        self.index = index
        self.token = token
        self.usage = usage

    @property
    def request_id(self) -> str:
        return self.usage.request_id

    @property
    def token_ids(self) -> list[int]:
        return [self.token]

    @property
    def num_prompt_tokens(self) -> int:
        return self.usage.num_prompt_tokens

    @property
    def num_cached_tokens(self) -> int:
        return self.usage.num_cached_tokens

    def to_proto(self) -> pb.SequenceOutput:
        """The full form this entry stands for (tests, debugging: never on the hot path)."""
        return pb.SequenceOutput(
            request_id=self.request_id,
            index=self.index,
            token_ids=self.token_ids,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=self.num_cached_tokens,
        )

    def __repr__(self) -> str:
        return f"ColumnToken(index={self.index}, token={self.token}, usage={self.usage!r})"


# One output of a request as its RequestStream delivers it.
Output = pb.SequenceOutput | ColumnToken
