"""kvmanager's messages on the wire (proto/kvmanager.proto), both ends in one place: what the
client (client.py) writes the server (server.py) reads, and the other way round, so each message
has one form and its encoder sits beside its decoder.

The batched messages are columnar (parallel packed lists, not one message per sequence: a
256-sequence Extend costs tens of microseconds to encode instead of hundreds) and prompts are
packed u32 bytes (proto/packed_ids.py): those are the forms the hot path needs.

Errors travel as gRPC status codes, for a unary call's status as for a stream reply's CallError:
  OutOfBlocks -> RESOURCE_EXHAUSTED   UnknownSequence -> NOT_FOUND
  InvalidRequest -> INVALID_ARGUMENT  StaleEpoch -> FAILED_PRECONDITION
  SequenceTooLarge (bigger than the whole pool) -> OUT_OF_RANGE
and back; UNAVAILABLE and DEADLINE_EXCEEDED read as AllocatorUnavailable.
"""

from __future__ import annotations

import grpc
from google.protobuf.internal.containers import RepeatedCompositeFieldContainer
from pagemesh.proto import kvmanager_pb2 as pb
from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    Allocation,
    AllocatorError,
    AllocatorUnavailable,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    InvalidRequest,
    LoadReport,
    OutOfBlocks,
    SequenceTooLarge,
    StaleEpoch,
    StepResult,
    TableUpdate,
    UnknownSequence,
)
from pagemesh.services.kvmanager.hashing import token_bytes
from pagemesh.services.kvmanager.manager import CommitColumns
from pagemesh.services.kvmanager.step import (
    AdmitPart,
    CommitPart,
    ExtendChanges,
    ExtendPart,
    LoadPart,
    ReleasePart,
    StepOutcome,
)

# -- errors ---------------------------------------------------------------------------------------
# Most specific first: a SequenceTooLarge is also an OutOfBlocks and an InvalidRequest.
_STATUS: tuple[tuple[type[AllocatorError], grpc.StatusCode], ...] = (
    (SequenceTooLarge, grpc.StatusCode.OUT_OF_RANGE),
    (OutOfBlocks, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (UnknownSequence, grpc.StatusCode.NOT_FOUND),
    (StaleEpoch, grpc.StatusCode.FAILED_PRECONDITION),
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
)
_ERRORS: dict[grpc.StatusCode, type[AllocatorError]] = {
    **{code: cls for cls, code in _STATUS},
    grpc.StatusCode.ALREADY_EXISTS: InvalidRequest,
    grpc.StatusCode.UNAVAILABLE: AllocatorUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: AllocatorUnavailable,
}
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_for(e: AllocatorError) -> grpc.StatusCode:
    for cls, code in _STATUS:
        if isinstance(e, cls):
            return code
    return grpc.StatusCode.INTERNAL


def fill_error(err: pb.CallError, e: AllocatorError) -> None:
    """A failed call's error inside a reply (Session, Step): the status its unary call would
    have returned, and the message."""
    err.code = status_for(e).value[0]
    err.message = str(e)


def error_from_status(code: grpc.StatusCode, details: str) -> AllocatorError:
    return _ERRORS.get(code, AllocatorError)(f"kvmanager: {details or code.name}")


def error_from_reply(err: pb.CallError) -> AllocatorError:
    """The exception a CallError stands for (the unary call's, for the same status code)."""
    return error_from_status(_CODES.get(err.code, grpc.StatusCode.UNKNOWN), err.message)


# -- requests: the client fills them, the server reads them ---------------------------------------
def fill_allocate(
    m: pb.AllocateRequest,
    executor_id: str,
    epoch: int,
    seq_id: str,
    token_ids: list[int] | bytes,
    cache_salt: str,
    num_lookahead_tokens: int,
) -> None:
    """`token_ids` as ids, or already packed (AdmitEntry may carry the bytes the executor packed
    once for the prompt)."""
    m.executor_id = executor_id
    m.epoch = epoch
    m.seq_id = seq_id
    m.token_data = token_ids if isinstance(token_ids, bytes) else token_bytes(token_ids)
    m.cache_salt = cache_salt
    m.num_lookahead_tokens = num_lookahead_tokens


def fill_extend(
    m: pb.ExtendRequest, executor_id: str, epoch: int, entries: list[ExtendEntry]
) -> None:
    m.executor_id = executor_id
    m.epoch = epoch
    m.seq_ids.extend([e.seq_id for e in entries])
    m.num_computed_tokens.extend([e.num_computed_tokens for e in entries])
    m.num_tokens.extend([e.num_tokens for e in entries])


def extend_part(r: pb.ExtendRequest) -> ExtendPart:
    return (r.executor_id, r.epoch, r.seq_ids, r.num_computed_tokens, r.num_tokens)


def commit_tokens(entries: list[CommitEntry], block_size: int) -> list[int]:
    """The entries' token ids end to end, each entry's checked first: the flat list cannot show
    where one entry ends, so a wrong count is the caller's error here, as the core reports it."""
    tokens: list[int] = []
    for e in entries:
        if len(e.token_ids) != block_size:
            raise InvalidRequest(
                f"commit {e.seq_id!r} block {e.block_index}: {len(e.token_ids)} token ids,"
                f" expected {block_size}"
            )
        tokens.extend(e.token_ids)
    return tokens


def fill_commit(
    m: pb.CommitRequest,
    executor_id: str,
    epoch: int,
    entries: list[CommitEntry],
    tokens: list[int],
) -> None:
    """`tokens`: commit_tokens(entries, block size), checked before any message is built."""
    m.executor_id = executor_id
    m.epoch = epoch
    m.seq_ids.extend([e.seq_id for e in entries])
    m.block_indices.extend([e.block_index for e in entries])
    m.token_ids.extend(tokens)


def commit_part(r: pb.CommitRequest) -> CommitPart:
    return (r.executor_id, r.epoch, CommitColumns(r.seq_ids, r.block_indices, r.token_ids))


def fill_release(m: pb.ReleaseRequest, executor_id: str, epoch: int, seq_ids: list[str]) -> None:
    m.executor_id = executor_id
    m.epoch = epoch
    m.seq_ids.extend(seq_ids)


def release_part(r: pb.ReleaseRequest) -> ReleasePart:
    return (r.executor_id, r.epoch, r.seq_ids)


def fill_admits(
    m: pb.StepRequest, executor_id: str, epoch: int, admits: list[AdmitEntry], budget: int
) -> None:
    for a in admits:
        fill_allocate(
            m.allocate.add(),
            executor_id,
            epoch,
            a.seq_id,
            a.token_ids,
            a.cache_salt,
            a.num_lookahead_tokens,
        )
    m.allocate_token_budget = budget


def admit_part(entries: RepeatedCompositeFieldContainer[pb.AllocateRequest]) -> AdmitPart | None:
    """A Step's admissions; all are allocated for the executor and epoch of the first."""
    if not entries:
        return None
    first = entries[0]
    return (
        first.executor_id,
        first.epoch,
        [(a.seq_id, a.token_data, a.cache_salt, a.num_lookahead_tokens) for a in entries],
    )


def fill_load(m: pb.LoadReport, executor_id: str, epoch: int, load: LoadReport) -> None:
    m.executor_id = executor_id
    m.epoch = epoch
    m.load.running = load.running
    m.load.waiting = load.waiting
    m.load.queued_prompt_tokens = load.queued_prompt_tokens


def load_part(r: pb.LoadReport) -> LoadPart:
    x = r.load
    return (r.executor_id, r.epoch, x.running, x.waiting, x.queued_prompt_tokens)


# -- replies: the server fills them, the client reads them ----------------------------------------
def fill_allocation(out: pb.AllocateResponse, a: Allocation) -> None:
    out.block_ids.extend(a.block_ids)
    out.num_cached_tokens = a.num_cached_tokens
    if a.spills:
        out.spill_src.extend([g for g, _ in a.spills])
        out.spill_dst.extend([h for _, h in a.spills])
    if a.restores:
        out.restore_src.extend([h for h, _ in a.restores])
        out.restore_dst.extend([g for _, g in a.restores])


def decode_allocation(r: pb.AllocateResponse) -> Allocation:
    a = Allocation(list(r.block_ids), r.num_cached_tokens)
    if r.spill_src:
        a.spills = list(zip(r.spill_src, r.spill_dst, strict=True))
    if r.restore_src:
        a.restores = list(zip(r.restore_src, r.restore_dst, strict=True))
    return a


def fill_extend_response(
    out: pb.ExtendResponse, changes: ExtendChanges, spills: list[tuple[int, int]]
) -> None:
    """`spills`: what the extend evicted into the host tier (Manager.take_spills)."""
    if spills:
        out.spill_src.extend([g for g, _ in spills])
        out.spill_dst.extend([h for _, h in spills])
    updates, copies = changes
    if updates:
        ups = updates.values()
        out.updated_seq_ids.extend(updates.keys())
        out.first_indices.extend([u[0] for u in ups])
        out.update_counts.extend([len(u[1]) for u in ups])
        out.update_block_ids.extend([b for u in ups for b in u[1]])
    if copies:
        out.copy_src.extend([s for s, _ in copies])
        out.copy_dst.extend([d for _, d in copies])


def decode_extend(r: pb.ExtendResponse) -> ExtendResult:
    spills = list(zip(r.spill_src, r.spill_dst, strict=True)) if r.spill_src else []
    if not r.updated_seq_ids and not r.copy_src:
        return ExtendResult(spills=spills)
    flat = list(r.update_block_ids)
    updates = {}
    o = 0
    for sid, first, n in zip(r.updated_seq_ids, r.first_indices, r.update_counts, strict=True):
        updates[sid] = TableUpdate(first, flat[o : o + n])
        o += n
    return ExtendResult(updates, list(zip(r.copy_src, r.copy_dst, strict=True)), spills)


def fill_step_response(out: pb.StepResponse, request: pb.StepRequest, o: StepOutcome) -> None:
    """A part the request carried gets its result or its error; an absent part neither."""
    if request.HasField("commit"):
        if o.commit_error is not None:
            fill_error(out.commit_error, o.commit_error)
        else:
            out.commit.SetInParent()
            out.commit.num_published = o.num_published
    if request.HasField("release"):
        if o.release_error is not None:
            fill_error(out.release_error, o.release_error)
        else:
            out.release.SetInParent()
            out.release.num_released = o.num_released
    if request.HasField("extend"):
        if o.extend is None:
            assert o.extend_error is not None
            fill_error(out.extend_error, o.extend_error)
        else:
            out.extend.SetInParent()
            fill_extend_response(out.extend, o.extend, o.extend_spills)
    for a in o.allocations:
        fill_allocation(out.allocate.add(), a)
    if o.allocate_error is not None:
        fill_error(out.allocate_error, o.allocate_error)
    if o.load_error is not None:
        fill_error(out.load_error, o.load_error)
    if o.spills_ahead:
        out.ahead_src.extend([g for g, _ in o.spills_ahead])
        out.ahead_dst.extend([h for _, h in o.spills_ahead])


def decode_step(r: pb.StepResponse, had_extend: bool, had_load: bool = False) -> StepResult:
    """`had_load`: the request carried a load (only then can a load_error come back, and only
    then is it looked for: this runs on the executor's thread every step)."""
    result = StepResult()
    if r.HasField("commit_error"):
        result.commit_error = error_from_reply(r.commit_error)
    else:
        result.num_published = r.commit.num_published
    if r.HasField("release_error"):
        result.release_error = error_from_reply(r.release_error)
    else:
        result.num_released = r.release.num_released
    if r.HasField("extend_error"):
        result.extend_error = error_from_reply(r.extend_error)
    elif had_extend:
        result.extend = decode_extend(r.extend)
    result.allocations = [decode_allocation(a) for a in r.allocate]
    if r.HasField("allocate_error"):
        result.allocate_error = error_from_reply(r.allocate_error)
    if had_load and r.HasField("load_error"):
        result.load_error = error_from_reply(r.load_error)
    if r.ahead_src:
        result.spills_ahead = list(zip(r.ahead_src, r.ahead_dst, strict=True))
    return result
