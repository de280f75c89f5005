"""Structured output on the executor: guides compiled into token grammars (xgrammar), one
matcher per constrained sequence, and each step's token bitmask.

Why xgrammar: measured against llguidance on this workload (benchmarks/grammar_engines.py,
SmolLM2's 49,152-token vocabulary, 30 schemas; benchmarks/RESULTS.md), compile times are alike
(sub-millisecond to a few ms) but xgrammar fills a sequence's mask ~10x faster (p50 1.4 us
against 15 us, p99 35 us against 540 us), and the mask fill is the per-token cost.

The pieces and their owners:
- `GrammarCompiler` (one per engine): guide -> CompiledGrammar, cached by the guide's hash
  (sha256 of kind and spec), compiled in worker threads so the step loop never waits on one;
  the tokenizer's vocabulary is indexed once, on the first guide (an engine that never sees one
  never loads it). The engine bounds each compile in time (LLMEngine._admit_guided).
- `Sequence.matcher`: the sequence's position in its grammar. It advances only when a sampled
  token lands (GrammarBatch.accept, as the step lands), so it always matches the sequence's
  landed tokens: a preempted sequence keeps its tokens and its matcher, and its recompute
  samples nothing until it reaches its end. An n > 1 child forks its parent's matcher with the
  sequence. Once the grammar is complete and its stop token taken (ignore_eos going on), it is
  dropped.
- `GrammarBatch` (one per engine; host, per step, for the step's constrained rows only):
  `accept` advances the matchers with a landed step's tokens, `fill` writes the next step's
  bitmask in one xgrammar call, after the previous step landed, while the device runs this
  step's forward (engine.py); `StepMasks.apply` (device): one kernel (kernels/token_mask.py)
  sets the disallowed logits of those rows to -inf before the sampler. A step without a
  constrained row does none of it.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from pagemesh.services.executor.engine_api import Guide, GuideKind

from pagemesh import kernels

if TYPE_CHECKING:
    from pagemesh.services.executor.sequence import Sequence

log = logging.getLogger(__name__)

# Distinct compiled grammars kept (LRU); a JSON-schema grammar is tens of KB.
CACHE_SIZE = 512


def guide_key(guide: Guide) -> str:
    return hashlib.sha256(f"{int(guide.kind)}:{guide.spec}".encode()).hexdigest()


def _ebnf_literal(text: str) -> str:
    """`text` as an EBNF string literal (xgrammar reads JSON-style escapes)."""
    return json.dumps(text, ensure_ascii=False)


@dataclass(slots=True)
class CompileStats:
    hits: int = 0
    misses: int = 0
    compile_s: float = 0.0  # summed over the misses


class GrammarCompiler:
    """Compiles guides for one tokenizer; `lookup` answers cache hits at once, `submit` starts
    a compile in a worker thread (concurrent submits of one guide share it)."""

    def __init__(self, tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> None:
        self.tokenizer_path = tokenizer_path
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        # One thread: xgrammar's errors come through tvm-ffi, which builds their tracebacks
        # with ast.parse + compile; CPython 3.11 keeps the AST recursion depth per interpreter,
        # and two threads doing that at once left it off for good (every later ast.parse in the
        # process raised SystemError). A compile stuck behind a slow one still gets its answer
        # within the engine's bound. (xgrammar itself compiles with several threads.)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self._lock = threading.Lock()  # the xgrammar compiler is built once, by the first guide
        self._compiler: Any = None
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._pending: dict[str, concurrent.futures.Future[Any]] = {}
        self.stats = CompileStats()

    @property
    def ready(self) -> bool:
        """The tokenizer's vocabulary is indexed (the first guide's one-off set-up, a second
        or more, is done): compile time bounds count from then on."""
        return self._compiler is not None

    def lookup(self, guide: Guide) -> Any | None:
        key = guide_key(guide)
        compiled = self._cache.get(key)
        if compiled is not None:
            self._cache.move_to_end(key)
            self.stats.hits += 1
        return compiled

    def submit(self, guide: Guide) -> concurrent.futures.Future[Any]:
        """The compile of `guide` (a cache miss): its result lands in the cache on the event
        loop's side when the caller takes it (`store`)."""
        key = guide_key(guide)
        future = self._pending.get(key)
        if future is None:
            self.stats.misses += 1
            future = self._pool.submit(self._compile, guide)
            self._pending[key] = future
        return future

    def store(self, guide: Guide, compiled: Any) -> None:
        key = guide_key(guide)
        self._pending.pop(key, None)
        self._cache[key] = compiled
        self._cache.move_to_end(key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def forget(self, guide: Guide) -> None:
        """A compile that failed: the next request with this guide tries again."""
        self._pending.pop(guide_key(guide), None)

    def compile_now(self, guide: Guide) -> Any:
        """Compiles in the caller's thread, cache first (benchmarks, tests)."""
        compiled = self.lookup(guide)
        if compiled is None:
            self.stats.misses += 1
            compiled = self._compile(guide)
            self.store(guide, compiled)
        return compiled

    def _xgr_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
                info = xgr.TokenizerInfo.from_huggingface(
                    tokenizer, vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids
                )
                # Our own cache (by guide hash) is the one that counts; xgrammar's would hold
                # a second copy of every grammar.
                self._compiler = xgr.GrammarCompiler(info, max_threads=4, cache_enabled=False)
            return self._compiler

    def _compile(self, guide: Guide) -> Any:
        """Raises ValueError with a message fit for the client."""
        compiler = self._xgr_compiler()
        start = time.perf_counter()
        try:
            compiled = _compile_guide(compiler, guide)
        except ValueError:
            raise
        except Exception as exc:  # xgrammar raises RuntimeError and its own errors
            raise ValueError(_first_line(str(exc)) or type(exc).__name__) from None
        self.stats.compile_s += time.perf_counter() - start
        return compiled

    def matcher(self, compiled: Any) -> Any:
        import xgrammar as xgr

        return xgr.GrammarMatcher(compiled)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# xgrammar's messages start with "[time] /path/file.cc:line: ", nothing for a client to see.
_LOCATION = re.compile(r"^\[[0-9:. ]+\]\s*\S+:\d+:\s*")


def _first_line(text: str) -> str:
    lines = text.strip().splitlines()
    return _LOCATION.sub("", lines[0])[:300] if lines else ""


def _compile_guide(compiler: Any, guide: Guide) -> Any:
    kind, spec = guide.kind, guide.spec
    if kind == GuideKind.JSON_SCHEMA:
        try:
            schema = json.loads(spec)
        except json.JSONDecodeError as exc:
            raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be an object")
        # Compact JSON: free whitespace lets a small model pad forever before max_tokens.
        return compiler.compile_json_schema(spec, any_whitespace=False, strict_mode=True)
    if kind == GuideKind.JSON_OBJECT:
        return compiler.compile_json_schema(
            '{"type": "object"}', any_whitespace=False, strict_mode=False
        )
    if kind == GuideKind.REGEX:
        return compiler.compile_regex(spec)
    if kind == GuideKind.CHOICE:
        try:
            choices = json.loads(spec)
        except json.JSONDecodeError:
            choices = None
        if not (
            isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)
        ):
            raise ValueError("the choices must be a non-empty list of non-empty strings")
        return compiler.compile_grammar("root ::= " + " | ".join(map(_ebnf_literal, choices)))
    if kind == GuideKind.GRAMMAR:
        return compiler.compile_grammar(spec)
    raise ValueError(f"unsupported guide kind {kind!r}")


@dataclass(slots=True)
class GuidedTimes:
    """Host seconds of the guided path, summed over steps (benchmarks read them): advancing the
    matchers with a landed step's tokens, filling a step's masks, and applying them (on CUDA:
    the upload and the kernel's launch)."""

    accept_s: float = 0.0
    fill_s: float = 0.0
    apply_s: float = 0.0
    upload_s: float = 0.0  # of apply_s, the mask's (and rows') upload before the kernel
    steps: int = 0  # steps with constrained rows (their masks filled)
    rows: int = 0  # constrained rows over those steps


@dataclass(slots=True)
class StepMasks:
    """A step's grammar masks: `bitmask` [C, ceil(V / 32)] int32 of the constrained rows (a
    view of a reused host buffer: pinned on CUDA), `rows` their indices in the step's sampled
    rows."""

    bitmask: torch.Tensor
    rows: list[int]
    times: GuidedTimes

    def apply(self, logits: torch.Tensor, vocab_size: int, upload: Any) -> None:
        """Device: the disallowed logits of the constrained rows (and the logits' padding past
        `vocab_size`) to -inf, in place, in one kernel. `upload`: the runner's host-to-device
        copy of a small array (pinned staging, never waiting for the device)."""
        start = time.perf_counter()
        if logits.is_cuda:
            # The buffer is pinned: the copy is queued on the stream, the host goes on.
            bitmask = self.bitmask.to(logits.device, non_blocking=True)
            rows = None
            if len(self.rows) != logits.shape[0]:
                rows = upload(np.asarray(self.rows, np.int64))
            self.times.upload_s += time.perf_counter() - start
            kernels.apply_token_bitmask(logits, bitmask, rows, vocab_size)
        else:
            _apply_cpu(logits, self.bitmask, self.rows, vocab_size)
        self.times.apply_s += time.perf_counter() - start


def _apply_cpu(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], vocab: int) -> None:
    """xgrammar's C++ loop, in place on the constrained rows (a few times faster than the
    PyTorch reference of kernels.apply_token_bitmask on CPU). It reads mask row r for logits
    row r: the compact rows spread out first; it wants contiguous float32 logits."""
    import xgrammar as xgr

    work = logits
    if work.dtype != torch.float32 or not work.is_contiguous():
        work = logits.float().contiguous()
    indices = None
    if len(rows) != logits.shape[0]:
        full = np.full((logits.shape[0], bitmask.shape[1]), -1, np.int32)
        full[rows] = bitmask.numpy()
        bitmask = torch.from_numpy(full)
        indices = rows
    if work.shape[1] > vocab:
        work[rows, vocab:] = float("-inf")
    xgr.apply_token_bitmask_inplace(work, bitmask, vocab_size=vocab, indices=indices, backend="cpu")
    if work is not logits:
        logits.copy_(work)


def guided_rows(sample_seqs: list[Sequence]) -> list[int]:
    return [i for i, s in enumerate(sample_seqs) if s.matcher is not None]


def default_fill_threads() -> int:
    """One: xgrammar 0.2.9 starts its fill threads on every call (no pool is kept: the
    process's thread count does not grow), ~40 us a call for a second thread on the 2-core
    dev VM against ~0.5-9 us a row of fill (guided_host_bench.py, `fill_threads_us`). More
    threads pay only for a big batch in costly grammar states on an idle host:
    --grammar-fill-threads."""
    return 1


class GrammarBatch:
    """The per-step host work of structured output:
    - `accept`: a landed step's tokens advance their sequences' matchers;
    - `fill`: the next step's masks, all rows in one xgrammar call, into one of two reused
      host buffers, by `threads` C++ threads (xgrammar's, outside the GIL);
    - `StepMasks.apply`: onto the logits, one upload and one kernel.
    Two buffers for alternate steps: a step's buffer is filled again two steps later, when the
    step that used it has landed (its upload and kernel long done), as in staging.py."""

    def __init__(
        self,
        vocab_size: int,
        stop_token_ids: set[int],
        pin: bool,
        threads: int,
        max_rows: int = 0,
    ) -> None:
        self.words = -(-vocab_size // 32)
        self.stop_token_ids = stop_token_ids
        self.threads = threads
        self._pin = pin
        # Sized for the largest step up front (`max_rows`: 256 rows of a 49k vocabulary are
        # 1.5 MB): pinning memory on the step path would wait for the device (staging.py).
        self._buffers = [self._alloc(max_rows), self._alloc(max_rows)]
        self._next = 0
        self._batch: Any = None  # xgrammar's BatchGrammarMatcher, made on the first fill
        self.times = GuidedTimes()

    def _alloc(self, rows: int) -> torch.Tensor:
        # All ones: a row that is not filled (its sequence finished) allows every token.
        buf = torch.full((rows, self.words), -1, dtype=torch.int32)
        return buf.pin_memory() if self._pin and rows else buf

    def accept(self, seqs: list[Sequence], token_ids: list[int], rows: list[int]) -> set[int]:
        """Advances each constrained (`rows`: the step's constrained rows, guided_rows),
        unfinished sequence's matcher with its landed token;
        returns the indices whose token the grammar refused (the mask allowed only what the
        matcher accepts: a bug, and the caller ends that choice). A matcher that took a stop
        token is done: dropped, its sequence is unconstrained from here on (ignore_eos goes on
        with every token allowed), so no per-row is_terminated() call is needed.

        A call per row: xgrammar's batch_accept_token is the same serial loop in C++ behind a
        slower conversion of its arguments and result (guided_host_bench.py measured both)."""
        start = time.perf_counter()
        refused: set[int] = set()
        stops = self.stop_token_ids
        for i in rows:
            seq = seqs[i]
            token = token_ids[i]
            matcher = seq.matcher
            if matcher is None or seq.is_finished or seq.request.beam is not None:
                continue
            if not matcher.accept_token(token):
                refused.add(i)
            elif token in stops and matcher.is_terminated():
                seq.matcher = None
        self.times.accept_s += time.perf_counter() - start
        return refused

    def fill(self, sample_seqs: list[Sequence], rows: list[int]) -> StepMasks:
        """Host: each constrained row's allowed next tokens, from its matcher (all of a step's
        previous tokens have landed and been accepted). A row whose sequence has finished (its
        last token ended it while this step was launched) or whose grammar is done allows every
        token: its token is dropped, or it is unconstrained now."""
        start = time.perf_counter()
        c = len(rows)
        buf = self._buffers[self._next]
        if buf.shape[0] < c:
            buf = self._buffers[self._next] = self._alloc(max(c, 2 * buf.shape[0]))
        self._next ^= 1
        matchers = []
        filled: list[int] | None = None
        for i, r in enumerate(rows):
            seq = sample_seqs[r]
            matcher = seq.matcher
            if matcher is not None and not seq.is_finished:
                matchers.append(matcher)
                if filled is not None:
                    filled.append(i)
            else:
                if filled is None:  # the first row left out: the rest go by index
                    filled = list(range(i))
                buf[i] = -1
        if matchers:
            if self._batch is None:
                import xgrammar as xgr

                self._batch = xgr.BatchGrammarMatcher(self.threads)
            self._batch.batch_fill_next_token_bitmask(matchers, buf, filled)
        self.times.fill_s += time.perf_counter() - start
        self.times.steps += 1
        self.times.rows += c
        return StepMasks(buf[:c], rows, self.times)
