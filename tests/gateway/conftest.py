"""Fixtures for the gateway's unit tests: the real SmolLM2 tokenizer (no stand-in)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pagemesh.services.gateway.chat import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(smollm2_path: Path) -> Tokenizer:
    return Tokenizer.load(smollm2_path)
