"""The executor's one link to kvmanager: every call to the BlockAllocator goes through here.

Most traffic rides on batched `Step` calls, overlapped with the steps:
- After a step is launched, `issue_lookahead` decides whether this step sends kvmanager one
  Step call: the blocks earlier steps filled (commits), the sequences that ended (releases) and
  the blocks coming steps will write into (a batched Extend). Each gRPC message costs the thread
  that drives the GPU a few hundred microseconds, so the call goes out only when a sequence's
  table is about to run short (URGENT_TOKENS), and then reserves for every one of them within the
  look-ahead window: a call every ~(num_lookahead_tokens - URGENT_TOKENS) steps at most, whatever
  the batch size. Commits and releases ride along (or go after FLUSH_STEPS steps, or before
  anything that must see them: an admission, a synchronous Extend, idling (the engine's next
  step once the last request's outputs are out), a fork).
- Calls are chained (a sequence's commits land before its release; a later call never overtakes
  an earlier one). Their Extend results are handed to the scheduler (`apply`) only from `land`
  (the start of a step's schedule) or `settle`, never mid-step: a table changes only where no
  one is reading it. The scheduler owns the tables; this module only carries the messages.
- A release kvmanager could not take (unreachable) is kept and retried until it does.

Ride-through (kvmanager unreachable: a crash, a restart from Redis): the first call that finds it
unreachable starts an outage (`riding`). From then on nothing goes out but `reconnect`, which the
scheduler calls at most every RETRY_MAX_S (backoff from RETRY_MIN_S): sequences keep running on
the tables they have, those short of a block wait, admissions pause. A kvmanager killed may have
lost what it answered last before its write-behind reached Redis, so `reconnect` is a Reconcile
call: kvmanager releases what this executor no longer holds (a lost release), and names the
sequences it does not hold as this executor does (a lost allocation or Extend), which the
scheduler recomputes. Only then do the Step calls resume; the engine fails requests (retryably)
once the outage outlasts its bound (EngineConfig.kvmanager_outage_timeout).

A stale epoch (kvmanager has another registration of this executor id, or none after a restart
without Redis) sets `stale`: the engine re-registers (`reregister`) and ends the requests whose
blocks belonged to the old epoch.

The other calls: an admission round (one Step call carrying the waiting commits and releases),
the synchronous Extend of a step whose tables fall short, a preemption's release, the forks
(n > 1 and beams alike), and `register` at start.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import cast

from pagemesh.services.executor.config import EngineConfig
from pagemesh.services.executor.prefix_caching import CommitsDropped
from pagemesh.services.executor.sequence import Fork, Sequence
from pagemesh.services.kvmanager.api import (
    AdmitEntry,
    AllocatorError,
    AllocatorUnavailable,
    BlockAllocator,
    CommitEntry,
    ExtendEntry,
    ExtendResult,
    LoadReport,
    OutOfBlocks,
    StaleEpoch,
    StepResult,
    UnknownSequence,
)

log = logging.getLogger(__name__)

# A look-ahead Extend goes out once a sequence's table covers fewer than this many tokens beyond
# its next write: the reply then has a step or two to come back before any step needs it.
URGENT_TOKENS = 2
# Commits and releases wait at most this many steps for a call to ride on.
FLUSH_STEPS = 8
# An idle executor reports its load this often (kvmanager marks one it has not heard from for
# its --executor-timeout, 10 s by default, as down).
HEARTBEAT_SECONDS = 1.0
# While kvmanager is unreachable, a Reconcile call tries it again after RETRY_MIN_S, then after
# twice as long each time, at most RETRY_MAX_S apart (a kvmanager restart takes about a second).
RETRY_MIN_S = 0.1
RETRY_MAX_S = 1.0


class AllocatorLink:
    def __init__(
        self,
        allocator: BlockAllocator,
        config: EngineConfig,
        max_model_len: int,
        apply: Callable[[StepResult], None],
        load: Callable[[], LoadReport],
    ) -> None:
        """`apply`: the scheduler's hook for a landed look-ahead's Step result (its Extend's
        table updates, copy-on-write copies and spills, and the call's spills ahead of
        eviction), called in the order the calls were sent. `load`: the
        scheduler's load now, sent with every Step call for kvmanager's router."""
        # Prefix caching off: nothing is ever published to the index (see prefix_caching.py).
        self.allocator: BlockAllocator = (
            allocator if config.enable_prefix_caching else CommitsDropped(allocator)
        )
        self.config = config
        self.block_size = config.block_size
        self.num_lookahead_tokens = config.num_lookahead_tokens
        self._load = load
        self._last_call = time.monotonic()  # the heartbeat's clock (heartbeats)
        self.max_model_len = max_model_len
        self._apply = apply
        # What the next Step call carries, and the calls in flight (oldest first), each with the
        # sequences whose look-ahead it carries.
        self._commits: list[CommitEntry] = []
        self._releases: list[str] = []
        self._calls: deque[tuple[asyncio.Task, list[Sequence]]] = deque()
        self._steps_since_call = 0
        self._retry: asyncio.TimerHandle | None = None
        self.num_step_calls = 0
        # Ride-through (see the module's docstring): when the outage began, when to try again.
        self.down_since: float | None = None
        self._retry_at = 0.0
        self._retry_delay = RETRY_MIN_S
        self.num_outages = 0
        # kvmanager does not know this epoch: re-register (the engine's job, `reregister`).
        self.stale = False
        self._registration: tuple[int, int, str, int, int] | None = None
        self._losses_seen = 0  # the client's connection_losses, when it counts them
        # Host-tier spills and restores received since registering (the scheduler counts them
        # as replies land): a Reconcile keeps the host tier only if kvmanager counts as many.
        self.num_transfers = 0
        # Seconds the current step's schedule() spent awaiting kvmanager (the step trace's
        # kv_wait: what of a slow schedule is the allocator's round trips); the scheduler
        # zeroes it when a step begins.
        self.kv_wait = 0.0

    async def register(
        self,
        num_blocks: int,
        block_size: int,
        fingerprint: str,
        num_host_blocks: int = 0,
        kv_block_bytes: int = 0,
    ) -> int:
        """Announces the pool (the engine's start), with what the fleet routes by and the host
        tier (0 blocks: none); returns the new epoch."""
        self._registration = (num_blocks, block_size, fingerprint, num_host_blocks, kv_block_bytes)
        return await self.allocator.register(
            num_blocks,
            block_size,
            fingerprint,
            address=self.config.advertise,
            model=self.config.served_model_name,
            max_model_len=self.max_model_len,
            num_host_blocks=num_host_blocks,
            kv_block_bytes=kv_block_bytes,
        )

    async def heartbeats(self, interval: float = HEARTBEAT_SECONDS) -> None:
        """Runs for the engine's life: while no Step call has gone out for `interval` (an idle
        executor makes none), sends one with nothing but the load, so kvmanager keeps it live
        and its router sees the load fall to zero. Never overlaps a call in flight."""
        while True:
            # At least a tenth of the interval: while a call hangs (kvmanager unreachable) the
            # clock runs past the interval and this must not spin.
            wait = interval - (time.monotonic() - self._last_call)
            await asyncio.sleep(max(wait, interval / 10))
            if self._calls or time.monotonic() - self._last_call < interval:
                continue
            self._check_connection()
            if self.riding or self.stale:
                continue  # the engine's reconnect or reregister is kvmanager's news
            self._last_call = time.monotonic()
            try:
                result = await self.allocator.step([], [], [], load=self._load())
            except AllocatorUnavailable as exc:  # an idle executor learns of an outage here
                self._unavailable(exc)
            except StaleEpoch as exc:
                self._stale(exc)
            except AllocatorError as exc:
                log.debug("heartbeat: %s", exc)
            else:
                if isinstance(result.load_error, StaleEpoch):
                    self._stale(result.load_error)

    # -- ride-through ---------------------------------------------------------------------------

    @property
    def riding(self) -> bool:
        """kvmanager is unreachable (or was, and `reconnect` has not reconciled yet)."""
        return self.down_since is not None

    def outage_seconds(self) -> float:
        return 0.0 if self.down_since is None else time.monotonic() - self.down_since

    def _unavailable(self, exc: AllocatorError) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            self.num_outages += 1
            self._retry_delay = RETRY_MIN_S
            self._retry_at = self.down_since + RETRY_MIN_S
            log.warning(
                "kvmanager unreachable (%s): running sequences go on with the blocks they hold,"
                " admissions pause; retrying",
                exc,
            )

    def _check_connection(self) -> None:
        """A kvmanager that restarted between two calls (an idle executor calls once a second)
        fails none of them, but its restart may have lost their last answers: a broken
        connection counts as an outage, so that `reconnect` reconciles."""
        losses = getattr(self.allocator, "connection_losses", 0)
        if losses > self._losses_seen:
            self._losses_seen = losses
            self._unavailable(AllocatorUnavailable("kvmanager connection lost"))

    def _stale(self, exc: AllocatorError) -> None:
        if not self.stale:
            log.warning("kvmanager: %s; re-registering", exc)
        self.stale = True

    async def wait_retry(self) -> None:
        """Sleeps until the next `reconnect` is due (a step with nothing to run, during an
        outage, must not spin)."""
        delay = self._retry_at - time.monotonic()
        await asyncio.sleep(min(max(delay, 0.0), RETRY_MAX_S))

    async def reconnect(self, held: Callable[[], dict[str, list[int]]]) -> list[str] | None:
        """During an outage, when a retry is due: one Reconcile call with `held()` (every
        sequence this executor holds blocks for, with its table, read once the calls in flight
        have landed). Returns the ids of the sequences kvmanager does not hold as this executor
        does (their blocks must be dropped and the sequences recomputed), or None while
        kvmanager is still unreachable or the epoch turned out stale."""
        if self.down_since is None or self.stale or time.monotonic() < self._retry_at:
            return None
        await self._await_calls()
        tables = held()
        try:
            with self._awaiting_kvmanager():
                released, lost = await self.allocator.reconcile(tables, self.num_transfers)
        except AllocatorUnavailable:
            self._retry_at = time.monotonic() + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX_S)
            return None
        except StaleEpoch as exc:
            self._stale(exc)
            return None
        log.warning(
            "kvmanager reachable again after %.1fs: %d sequences held, %d released there, %d"
            " to recompute",
            self.outage_seconds(),
            len(tables),
            released,
            len(lost),
        )
        self.down_since = None
        # Releases waiting are kvmanager's already (it released whatever is not in `tables`);
        # sent now, one could release a sequence readmitted under the same id. Commits wait
        # for the sequences whose tables kvmanager agreed with.
        self._releases.clear()
        keep = set(tables).difference(lost)
        self._commits = [c for c in self._commits if c.seq_id in keep]
        self._last_call = time.monotonic()
        return lost

    async def reregister(self) -> int:
        """After a stale epoch: registers again (a new epoch: kvmanager holds nothing of this
        executor any more, so nothing waiting is sent). Raises AllocatorError (unreachable:
        `stale` stays set, the engine tries again)."""
        assert self._registration is not None, "register() first"
        await self._await_calls()
        try:
            epoch = await self.register(*self._registration)
        except AllocatorUnavailable as exc:
            self._unavailable(exc)
            raise
        self._commits.clear()
        self._releases.clear()
        self.num_transfers = 0  # a new epoch: both tiers start empty on both sides
        self.stale = False
        self.down_since = None
        self._last_call = time.monotonic()
        log.warning("re-registered with kvmanager: epoch %d", epoch)
        return epoch

    def lookahead_target(self, seq: Sequence, num_tokens: int) -> int:
        """Table coverage (tokens) to ask for when `seq` must hold `num_tokens`."""
        return min(num_tokens + self.num_lookahead_tokens, self.max_model_len)

    # -- the Step calls overlapped with the steps ----------------------------------------------

    def issue_lookahead(self, seqs: list[Sequence]) -> None:
        """After a step is launched: sends one Step call if a table of `seqs` (this step's
        sampling sequences; num_computed_tokens already counts this step) is about to run short,
        reserving for every one of them within the look-ahead window, or if commits and releases
        have waited FLUSH_STEPS steps. Its result is applied by a later `land` or `settle`."""
        self._steps_since_call += 1
        if self._lookahead_urgent(seqs):
            self._send(self._lookahead_entries(seqs))
        elif self._steps_since_call >= FLUSH_STEPS and (self._commits or self._releases):
            self._send([])

    def _wants_lookahead(self, seq: Sequence) -> tuple[int, int] | None:
        """(table coverage it has or has asked for, the coverage to ask for) when `seq` (a
        sampling sequence, num_computed_tokens counting this step) is short of its look-ahead
        target; None when it is not, or when it will not write again."""
        end = seq.num_computed_tokens  # the next step writes the sampled token here
        target = self.lookahead_target(seq, end + 1)
        covered = max(len(seq.block_table) * self.block_size, seq.lookahead_sent)
        if covered >= target:
            return None  # covered, or asked for already: most sequences, most steps
        if len(seq.token_ids) - seq.num_prompt_tokens + 1 >= seq.request.params.max_tokens:
            return None  # finishes this step
        if end + 1 >= self.max_model_len:
            return None
        return covered, target

    def _lookahead_urgent(self, seqs: list[Sequence]) -> bool:
        """Some table of `seqs` covers fewer than URGENT_TOKENS beyond its next write. Every
        step asks this; only a step that answers yes builds the entries (most steps do not)."""
        bs = self.block_size
        ahead = min(URGENT_TOKENS, self.num_lookahead_tokens)
        max_len = self.max_model_len
        for seq in seqs:
            # Tested first, inline: does the table (or the reservation on its way) cover the
            # next writes? Most sequences short of their target are not short of these.
            soon = min(seq.num_computed_tokens + 1 + ahead, max_len)
            if len(seq.block_table) * bs >= soon or seq.lookahead_sent >= soon:
                continue
            if self._wants_lookahead(seq) is not None:
                return True
        return False

    def _lookahead_entries(self, seqs: list[Sequence]) -> list[tuple[Sequence, ExtendEntry]]:
        """An Extend entry for every sequence of `seqs` short of its look-ahead target."""
        entries = []
        for seq in seqs:
            wants = self._wants_lookahead(seq)
            if wants is not None:
                end = seq.num_computed_tokens
                entries.append((seq, ExtendEntry(seq.seq_id, end, wants[1])))
        return entries

    @property
    def has_unsettled(self) -> bool:
        """Something for `settle` to do: calls in flight (their results to apply), or commits
        and releases waiting while kvmanager can take them (during an outage or with a stale
        epoch they wait for `reconnect` or `reregister`)."""
        if self._calls:
            return True
        return bool(self._commits or self._releases) and not (self.riding or self.stale)

    def defer(self, commits: list[CommitEntry], releases: list[str]) -> None:
        """Commits and releases for the next Step call (a sequence's commits before its
        release: they go in one call, commits first, or in calls sent in order)."""
        self._commits.extend(commits)
        self._releases.extend(releases)

    def land(self) -> None:
        """Applies the results of the calls that are done, oldest first (never past one that
        is not: results apply in the order sent)."""
        self._check_connection()
        while self._calls and self._calls[0][0].done():
            task, seqs = self._calls.popleft()
            self._land(task.result(), seqs)

    async def settle(self) -> None:
        """Sends what waits and applies every call's result: before anything that must see
        them (an admission may hit the blocks just committed, or need the blocks just released;
        a synchronous Extend must start from the tables kvmanager has; a child copies its
        parent's committed hashes)."""
        self._send([])
        await self._await_calls()

    async def _await_calls(self) -> None:
        """Applies every call in flight, oldest first, sending nothing."""
        with self._awaiting_kvmanager():
            while self._calls:
                task, seqs = self._calls.popleft()
                self._land(await task, seqs)

    def _begin_call(self) -> tuple[list[CommitEntry], list[str]]:
        """A Step call goes out: it takes the commits and releases waiting."""
        commits, self._commits = self._commits, []
        releases, self._releases = self._releases, []
        self._steps_since_call = 0
        self.num_step_calls += 1
        self._last_call = time.monotonic()
        return commits, releases

    def _send(self, entries: list[tuple[Sequence, ExtendEntry]]) -> None:
        if not (self._commits or self._releases or entries):
            return
        if self.down_since is not None or self.stale:
            return  # nothing goes out before `reconnect` or `reregister` (module docstring)
        commits, releases = self._begin_call()
        for seq, e in entries:
            seq.lookahead_sent = e.num_tokens
        prev = self._calls[-1][0] if self._calls else None
        call = self._call(prev, commits, releases, [e for _, e in entries])
        self._calls.append((asyncio.create_task(call), [seq for seq, _ in entries]))

    async def _call(
        self,
        prev: asyncio.Task | None,
        commits: list[CommitEntry],
        releases: list[str],
        extends: list[ExtendEntry],
    ) -> StepResult | None:
        if prev is not None:
            await asyncio.wait([prev])  # in order, whatever became of it
        try:
            result = await self.allocator.step(commits, releases, extends, load=self._load())
        except AllocatorUnavailable as exc:
            self._unavailable(exc)
            self._requeue(commits, releases)
            return None  # extends: asked again once kvmanager is back
        except StaleEpoch as exc:
            self._stale(exc)
            return None
        except AllocatorError:
            log.exception("Step call failed")
            self._defer_releases(releases)
            return None
        await self._check_parts(result, releases)
        if self.stale:
            return None  # (its tables are the old epoch's)
        if result.extend_error is not None and not isinstance(result.extend_error, OutOfBlocks):
            log.error("look-ahead Extend failed: %s", result.extend_error)
        return result  # OutOfBlocks: the next schedule() extends synchronously, or preempts

    def _land(self, result: StepResult | None, seqs: list[Sequence]) -> None:
        for seq in seqs:
            seq.lookahead_sent = 0  # covered now, or to be asked again
        if result is not None and (result.extend is not None or result.spills_ahead):
            self._apply(result)

    def _requeue(self, commits: list[CommitEntry], releases: list[str]) -> None:
        """A call kvmanager was unreachable for: its commits and releases wait for the next
        (sent once `reconnect` has reconciled, releases then dropped as kvmanager's own)."""
        self._commits[:0] = commits
        self._releases[:0] = releases

    async def _check_parts(self, result: StepResult, releases: list[str]) -> None:
        parts = (
            result.commit_error,
            result.release_error,
            result.extend_error,
            result.allocate_error,
            result.load_error,
        )
        stale = next((e for e in parts if isinstance(e, StaleEpoch)), None)
        if stale is not None:
            self._stale(stale)
            return
        if result.commit_error is not None:  # those blocks stay unshared
            log.error("commit failed: %s", result.commit_error)
        err = result.release_error
        if isinstance(err, AllocatorUnavailable):
            self._unavailable(err)
            self._requeue([], releases)
        elif isinstance(err, UnknownSequence):
            # One unknown id fails the whole part: settle the rest one by one.
            for sid in releases:
                await self._release([sid])
        elif err is not None:
            log.error("release failed: %s", err)

    def _defer_releases(self, releases: list[str]) -> None:
        """A release kvmanager could not take is retried until it does: dropping it would leak
        the sequence's blocks for good once kvmanager restores its tables from Redis."""
        if not releases:
            return
        self._releases[:0] = releases
        log.warning("kvmanager unreachable: %d releases deferred", len(self._releases))
        if self._retry is None:
            self._retry = asyncio.get_running_loop().call_later(0.5, self._retry_releases)

    def _retry_releases(self) -> None:
        self._retry = None
        self._send([])

    async def _release(self, seq_ids: list[str]) -> None:
        try:
            await self.allocator.release(seq_ids)
        except AllocatorUnavailable as exc:
            self._unavailable(exc)
            self._requeue([], seq_ids)
        except StaleEpoch as exc:
            self._stale(exc)
        except UnknownSequence:
            if len(seq_ids) == 1:
                return  # kvmanager lost it (crash before its write-behind flush): nothing held
            for sid in seq_ids:
                await self._release([sid])
        except AllocatorError:
            log.exception("release failed")

    @contextlib.contextmanager
    def _awaiting_kvmanager(self) -> Iterator[None]:
        """Adds the block's time to kv_wait."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.kv_wait += time.perf_counter() - start

    # -- the calls a step waits for ------------------------------------------------------------

    async def admit(self, batch: list[Sequence], budget: int) -> StepResult:
        """An admission round, one call: the commits and releases waiting, then the admissions;
        every call in flight lands first (its releases may be what makes room; its tables must
        be current). During an outage or with a stale epoch, nothing is admitted (an empty
        result: the sequences wait)."""
        if self.down_since is not None or self.stale:
            return StepResult()
        commits, releases = self._begin_call()
        await self.settle()  # (nothing left for it to send)
        if self.down_since is not None or self.stale:  # a call in flight found it so
            self._requeue(commits, releases)
            return StepResult()
        admits = [
            AdmitEntry(
                seq.seq_id,
                seq.packed_prompt or seq.token_ids,  # packed: what kvmanager hashes
                seq.request.cache_salt,
                self.lookahead_target(seq, seq.num_tokens + 1) - seq.num_tokens,
            )
            for seq in batch
        ]
        try:
            with self._awaiting_kvmanager():
                result = await self.allocator.step(
                    commits, releases, [], admits, budget, load=self._load()
                )
        except AllocatorUnavailable as exc:
            self._unavailable(exc)
            self._requeue(commits, releases)
            return StepResult()
        except StaleEpoch as exc:
            self._stale(exc)
            return StepResult()
        except AllocatorError:
            self._defer_releases(releases)
            raise
        await self._check_parts(result, releases)
        if self.stale:
            return StepResult()  # nothing was allocated under a stale epoch
        return result

    async def extend(self, entries: list[ExtendEntry]) -> ExtendResult:
        """A synchronous Extend (tables that fall short of this step's writes); raises
        OutOfBlocks when the pool cannot take it (nothing changed), AllocatorUnavailable or
        StaleEpoch (the outage or the stale epoch noted: the sequences wait)."""
        try:
            with self._awaiting_kvmanager():
                return await self.allocator.extend(entries)
        except AllocatorUnavailable as exc:
            self._unavailable(exc)
            raise
        except StaleEpoch as exc:
            self._stale(exc)
            raise

    async def release_now(self, seq_ids: list[str]) -> None:
        """A release the caller waits for (a preemption, after `settle`: nothing of the
        sequence is still on its way). An unreachable kvmanager gets it with the reconcile."""
        await self._release(seq_ids)

    async def fork(
        self,
        forks: list[tuple[Fork, list[CommitEntry]]],
        commits: list[CommitEntry],
        releases: list[str],
    ) -> list[dict[str, list[int]]]:
        """Forks, each with the parent's commits that must land before it (a child copies the
        parent's committed hashes at fork time); returns each fork's child tables. `commits`
        (the step's) go first, after every call in flight has landed; then `releases` (dropped
        beams: released before the forks, so no moment holds both the dropped tables and the
        new ones) and the forks, all in flight at once (they touch different sequences, and a
        fork takes no fresh block). Raises AllocatorUnavailable or StaleEpoch (noted) when
        kvmanager cannot fork: the engine ends the requests."""
        if self.down_since is not None or self.stale:
            # Not before `reconnect`: the parent's table may not be kvmanager's.
            raise AllocatorUnavailable("kvmanager unreachable: cannot fork")
        await self.settle()
        try:
            if commits:
                await self.allocator.commit(commits)
            release = [self.allocator.release(releases)] if releases else []
            results = await asyncio.gather(*release, *(self._fork(f, e) for f, e in forks))
        except AllocatorUnavailable as exc:
            self._unavailable(exc)
            raise
        except StaleEpoch as exc:
            self._stale(exc)
            raise
        # gather types its results by their join (object): these are the forks' tables.
        return cast(list[dict[str, list[int]]], results[len(release) :])

    async def _fork(self, f: Fork, commits: list[CommitEntry]) -> dict[str, list[int]]:
        if commits:
            await self.allocator.commit(commits)
        return await self.allocator.fork(
            f.parent.seq_id, [c.seq_id for c in f.children], f.num_tokens
        )
