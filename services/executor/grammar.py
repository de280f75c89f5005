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
  token lands (Scheduler.postprocess), so it always matches the sequence's landed tokens: a
  preempted sequence keeps its tokens and its matcher, and its recompute samples nothing
  until it reaches its end. An n > 1 child forks its parent's matcher with the sequence.
- `fill_masks` (host, per step): the bitmask of the step's constrained rows, filled after the
  previous step landed, while the device runs this step's forward (engine.py);
  `apply_masks` (device): one kernel sets the disallowed logits of those rows to -inf before
  the sampler. A step without a constrained row does none of it.
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
class StepMasks:
    """A step's grammar masks: `bitmask` [C, ceil(V / 32)] int32 of the constrained rows,
    `rows` their indices in the step's sampled rows."""

    bitmask: torch.Tensor
    rows: list[int]


def guided_rows(sample_seqs: list[Sequence]) -> list[int]:
    return [i for i, s in enumerate(sample_seqs) if s.matcher is not None]


def fill_masks(sample_seqs: list[Sequence], rows: list[int], vocab_size: int) -> StepMasks:
    """Host: each constrained row's allowed next tokens, from its matcher (all of a step's
    previous tokens have landed and been accepted). A row whose sequence has finished (its
    last token ended it while this step was launched) or whose grammar is complete past its
    stop token keeps every bit set: its token is dropped."""
    words = -(-vocab_size // 32)
    bitmask = torch.full((len(rows), words), -1, dtype=torch.int32)
    for i, r in enumerate(rows):
        seq = sample_seqs[r]
        matcher = seq.matcher
        if seq.is_finished or matcher is None or matcher.is_terminated():
            continue
        matcher.fill_next_token_bitmask(bitmask, i)
    return StepMasks(bitmask, rows)


def apply_masks(
    logits: torch.Tensor, masks: StepMasks, vocab_size: int, upload: Any
) -> torch.Tensor:
    """Device: the disallowed logits of the constrained rows to -inf, in place, in one kernel
    (xgrammar's: Triton on CUDA, its C++ loop on CPU). `upload`: the runner's host-to-device
    copy (pinned staging, never waiting for the device). Rows past the grammar's vocabulary
    (padding of the logits) are masked too."""
    import xgrammar as xgr

    c = len(masks.rows)
    s = logits.shape[0]
    if logits.shape[1] > vocab_size:
        logits[[*masks.rows], vocab_size:] = float("-inf")
    if logits.is_cuda:
        compact = upload(masks.bitmask.numpy())
        if c == s:
            bitmask = compact
        else:
            # The kernel reads mask row i for logits row i: spread the compact rows out.
            bitmask = torch.empty((s, compact.shape[1]), dtype=torch.int32, device=logits.device)
            rows = upload(np.asarray(masks.rows, np.int64))
            bitmask.index_copy_(0, rows, compact)
            xgr.apply_token_bitmask_inplace(
                logits, bitmask, vocab_size=vocab_size, indices=rows, backend="triton"
            )
            return logits
        xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=vocab_size, backend="triton")
        return logits
    bitmask = masks.bitmask
    if c != s:
        full = torch.full((s, bitmask.shape[1]), -1, dtype=torch.int32)
        full[masks.rows] = bitmask
        bitmask = full
    if logits.dtype != torch.float32 or not logits.is_contiguous():
        masked = logits.float().contiguous()
        xgr.apply_token_bitmask_inplace(
            masked, bitmask, vocab_size=vocab_size, indices=masks.rows, backend="cpu"
        )
        logits.copy_(masked)
        return logits
    xgr.apply_token_bitmask_inplace(
        logits, bitmask, vocab_size=vocab_size, indices=masks.rows, backend="cpu"
    )
    return logits
