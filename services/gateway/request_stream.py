"""One request's outputs as its consumer reads them, and the fan-out of a step message to them.

Every StepOutput that comes down a Serve stream holds the new outputs of all this gateway's
requests for one scheduler step (several steps, if the gateway was behind): `fan_out` splits it
into one list per request, in the engine's order, and hands each to its RequestStream. Column
entries become ColumnTokens (outputs.py), not SequenceOutputs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from pagemesh.proto import executor_pb2 as pb
from pagemesh.services.gateway.outputs import ColumnToken, Output, Usage


class RequestStream:
    """The outputs of one request: one list of outputs per scheduler step (per step message).
    The stream ends after the list in which its last open choice finished, or the request was
    rejected; it raises what `_fail` was given (the executor's stream broke)."""

    def __init__(self, request_id: str, n: int) -> None:
        self.request_id = request_id
        self._queue: asyncio.Queue[list[Output] | BaseException] = asyncio.Queue()
        self._open_choices = set(range(n))
        self.done = False
        # What this request's column entries stand for besides index and token.
        self._usage = Usage(request_id)

    def _note_full(self, out: pb.SequenceOutput) -> None:
        """Reads a full output's usage counts and finish; column entries bring neither."""
        usage = self._usage
        if (
            out.num_prompt_tokens != usage.num_prompt_tokens
            or out.num_cached_tokens != usage.num_cached_tokens
        ):
            self._usage = Usage(self.request_id, out.num_prompt_tokens, out.num_cached_tokens)
        if out.finish_reason != pb.FINISH_NONE:
            self._open_choices.discard(out.index)
        if out.rejected:
            self._open_choices.clear()

    def _deliver(self, outputs: list[Output]) -> None:
        if not self._open_choices:
            self.done = True
        self._queue.put_nowait(outputs)

    def _fail(self, exc: BaseException) -> None:
        self.done = True
        self._queue.put_nowait(exc)

    def __aiter__(self) -> AsyncIterator[list[Output]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[Output]]:
        while True:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if self.done and self._queue.empty():
                return


def fan_out(step: pb.StepOutput, streams: dict[str, RequestStream]) -> None:
    """Hands each request of `streams` its outputs of `step`, in the engine's order, as one list;
    a request whose stream is done leaves `streams`. Outputs of a request not in `streams`
    (aborted here already: the executor ran ahead) are dropped."""
    by_stream: dict[RequestStream, list[Output]] = {}
    get = streams.get
    # The token columns first: the executor puts none of a request's outputs there after a full
    # one of the same message, so this keeps each request's order.
    for rid, index, token in zip(
        step.token_request_ids, step.token_indices, step.token_ids, strict=True
    ):
        stream = get(rid)
        if stream is None:
            continue
        entry = ColumnToken(index, token, stream._usage)
        outputs = by_stream.get(stream)
        if outputs is None:
            by_stream[stream] = [entry]
        else:
            outputs.append(entry)
    for out in step.outputs:
        stream = get(out.request_id)
        if stream is None:
            continue
        # Its counts hold from the next message on: this one's column entries came before it.
        stream._note_full(out)
        by_stream.setdefault(stream, []).append(out)
    for stream, outputs in by_stream.items():
        stream._deliver(outputs)
        if stream.done:
            del streams[stream.request_id]
