"""Garbage-collector set-up shared by the services."""

from __future__ import annotations

import gc


def freeze_startup_heap() -> None:
    """Moves every object alive now (modules, a loaded model, a tokenizer, a restored index)
    to the collector's permanent generation. They live as long as the process, and each full
    collection would walk them again while the service is serving: a pause on the event loop
    that also launches the GPU steps or streams the tokens. Call once, when start-up is done."""
    gc.collect()
    gc.freeze()
