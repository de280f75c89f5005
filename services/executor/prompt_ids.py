"""Prompt token ids as the engine keeps them: a list of ints, the packed u32 bytes (what
kvmanager hashes, proto/packed_ids) and their range, made in C. A prompt that comes packed (the
wire's bytes, engine_api.PackedIds) keeps those very bytes: only the list is made from them.

A prompt is ~1k ids and a burst brings hundreds of prompts to the executor's one event loop,
which also launches the steps: a Python loop over each id cost ~0.2 ms a prompt, and a fresh
list of 1k ints (~36 bytes each) another ~17 us plus its allocation. Prompts that share a
system prompt or a conversation's history usually arrive one after another, so the list of a
prompt that begins like the previous one reuses that list's int objects for the common part:
only the new tail is converted, and the shared part costs a pointer an id.
"""

from __future__ import annotations

from array import array

import numpy as np
from pagemesh.proto import packed_ids
from pagemesh.services.executor.engine_api import PackedIds, PromptTokens

# Below this many common ids a plain conversion is as cheap as comparing and slicing.
MIN_SHARED_IDS = 64


class PromptIds:
    """Converts prompts, remembering the last one (see the module docstring).

    The remembered list is the sequence's own token list: only its prompt part is ever read
    here, and a sequence never rewrites its prompt (sequence.py: token_ids = prompt + outputs,
    outputs only appended), so the sharing is safe however the sequence grows."""

    def __init__(self) -> None:
        self._last_data = b""
        self._last_ids: list[int] = []

    def convert(self, token_ids: PromptTokens) -> tuple[list[int], bytes, int, int]:
        """(ids, packed u32, min, max). PackedIds (the wire's form) is used as it is; array('q')
        takes anything else with __index__ (numpy and torch integers) and refuses the rest; an
        integer array is taken as it is. The packed form is only meaningful once the caller has
        checked the range (ids in [0, 2**32))."""
        if isinstance(token_ids, PackedIds):
            return self._from_packed(token_ids.data)
        if not (isinstance(token_ids, array) and token_ids.typecode in "bBhHiIlLqQ"):
            try:
                token_ids = array("q", token_ids)
            except (TypeError, OverflowError) as e:
                raise ValueError("prompt token ids must be integers") from e
        if not token_ids:
            return [], b"", 0, 0
        view = np.frombuffer(token_ids, dtype=np.dtype(token_ids.typecode))
        lo, hi = int(view.min()), int(view.max())
        if lo < 0 or hi >= 1 << 32:
            # Not representable packed: the caller refuses the prompt, nothing to remember.
            return token_ids.tolist(), b"", lo, hi
        data = view.astype("<u4", copy=False).tobytes()
        shared = packed_ids.common_prefix(data, self._last_data, 4)
        if shared >= MIN_SHARED_IDS:
            ids = self._last_ids[:shared]
            ids += token_ids[shared:].tolist()
        else:
            ids = token_ids.tolist()
        self._last_data, self._last_ids = data, ids
        return ids, data, lo, hi

    def _from_packed(self, data: bytes) -> tuple[list[int], bytes, int, int]:
        """A prompt already packed: `data` is kept as the packed form (no copy, no re-packing);
        every id of it is in range by construction."""
        if not data:
            return [], b"", 0, 0
        view = np.frombuffer(data, "<u4")
        lo, hi = int(view.min()), int(view.max())
        shared = packed_ids.common_prefix(data, self._last_data, 4)
        if shared >= MIN_SHARED_IDS:
            ids = self._last_ids[:shared]
            ids += view[shared:].tolist()
        else:
            ids = view.tolist()
        self._last_data, self._last_ids = data, ids
        return ids, data, lo, hi
