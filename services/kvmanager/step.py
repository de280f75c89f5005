"""One Step call over the core: a running executor's per-step traffic in one go. The only
implementation: the gRPC server's Step (server.py) and the in-process allocator's `step`
(local.py) both call `run_step`, each with its own input and output forms around it.

The parts run in a fixed order, commit, release, extend, then admission, each exactly as the
call it stands for would run alone: atomic (applied whole or not at all), failing on its own
with its error kept in the outcome, while the parts after it still run, as they would if the
calls were sent back to back. An absent part (None) is not run at all; a present but empty one
is (it still checks the executor and epoch). Admission allocates its entries in order while the
uncached tokens of those allocated so far stay below the budget (0: no limit), stopping at the
first that fails (Manager.allocate_many). The load report, when present, comes last
(Manager.report_load): a step with nothing but a load is an idle executor's heartbeat. A step
with any other part ends with the executor's spills ahead of eviction (Manager.spill_ahead).

Each part is the arguments of the Manager call it stands for, executor id and epoch first (on
the wire each part names its own executor and epoch).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pagemesh.services.kvmanager.api import Allocation, AllocatorError
from pagemesh.services.kvmanager.manager import CommitColumns, Manager

CommitPart = tuple[str, int, Iterable[tuple[str, int, Sequence[int]]] | CommitColumns]
ReleasePart = tuple[str, int, Sequence[str]]
# seq_ids, num_computed_tokens, num_tokens: Manager.extend's columnar batch.
ExtendPart = tuple[str, int, Sequence[str], Sequence[int], Sequence[int]]
# (seq_id, token_ids or their packed bytes, cache_salt, num_lookahead_tokens) per admission.
AdmitPart = tuple[str, int, Sequence[tuple[str, Sequence[int] | bytes, str, int]]]
# running, waiting, queued_prompt_tokens: Manager.report_load's figures.
LoadPart = tuple[str, int, int, int, int]
# What Manager.extend returns: {seq_id: (first_index, table[first_index:])}, [(src, dst)].
ExtendChanges = tuple[dict[str, tuple[int, list[int]]], list[tuple[int, int]]]


@dataclass(slots=True)
class StepOutcome:
    """What one step did, in the core's forms (api.StepResult is the same with the extend part
    as an ExtendResult; the server encodes this one straight into its reply)."""

    num_published: int = 0
    num_released: int = 0
    extend: ExtendChanges | None = None  # None: no extend part, or it failed
    extend_spills: list[tuple[int, int]] = field(default_factory=list)  # (gpu, host), see api
    commit_error: AllocatorError | None = None
    release_error: AllocatorError | None = None
    extend_error: AllocatorError | None = None
    allocations: list[Allocation] = field(default_factory=list)  # a prefix of the admissions
    allocate_error: AllocatorError | None = None  # why the next admission failed, if it did
    load_error: AllocatorError | None = None
    # Spills ahead of eviction (Manager.spill_ahead), after every other transfer of the call.
    spills_ahead: list[tuple[int, int]] = field(default_factory=list)


def run_step(
    m: Manager,
    commit: CommitPart | None = None,
    release: ReleasePart | None = None,
    extend: ExtendPart | None = None,
    admit: AdmitPart | None = None,
    admit_token_budget: int = 0,
    load: LoadPart | None = None,
) -> StepOutcome:
    out = StepOutcome()
    if commit is not None:
        try:
            out.num_published = m.commit(*commit)
        except AllocatorError as e:
            out.commit_error = e
    if release is not None:
        try:
            out.num_released = m.release(*release)
        except AllocatorError as e:
            out.release_error = e
    if extend is not None:
        try:
            out.extend = m.extend(*extend)
            out.extend_spills = m.take_spills(extend[0])
        except AllocatorError as e:
            out.extend_error = e
    if admit is not None:
        out.allocations, out.allocate_error = m.allocate_many(*admit, admit_token_budget)
    # A call that changed blocks spills ahead (a heartbeat, with nothing but a load, does not:
    # its reply is not ordered with the executor's other calls).
    part = commit or release or extend or admit
    if part is not None:
        try:
            m.executor(part[0], part[1])  # the epoch the parts named, still current
        except AllocatorError:
            pass
        else:
            out.spills_ahead = m.spill_ahead(part[0])
    if load is not None:
        try:
            m.report_load(*load)
        except AllocatorError as e:
            out.load_error = e
    return out
