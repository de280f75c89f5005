"""Prompts → token ids with the model's own tokenizer and chat template.

The gateway tokenizes (not the executor) so that the executor's CPU goes to the model, and so
that a prompt that does not fit is refused here before any executor work.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

# Prompts longer than this are tokenized on a worker thread so that one huge body does not
# stall every other stream on the event loop.
INLINE_TOKENIZE_CHARS = 16_384


class PromptError(ValueError):
    """The messages cannot be rendered by this model's chat template."""


class Tokenizer:
    """The model's tokenizer plus the bits of it the gateway needs."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        cleanup = getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if backend is not None and not cleanup else None
        if not getattr(hf_tokenizer, "chat_template", None):
            # A base model without a template: plain role-prefixed turns still work.
            hf_tokenizer.chat_template = (
                "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}assistant: {% endif %}"
            )

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        # The detokenizer decodes twice per token and choice: the Rust backend directly is
        # about 3x cheaper than the Python wrapper, and identical unless the tokenizer asks for
        # the wrapper's space clean-up.
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.hf.decode([token_id], skip_special_tokens=False)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        try:
            return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as exc:  # jinja raises its own errors (e.g. alternation checks)
            raise PromptError(f"The chat template rejected these messages: {exc}") from None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # Chat: the template already holds any BOS the model wants, adding it again would
        # double it. Plain completions: the tokenizer's own BOS rule applies.
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.render_chat(messages))

    async def encode_chat_async(self, messages: list[dict[str, str]]) -> list[int]:
        if sum(len(m["content"]) for m in messages) < INLINE_TOKENIZE_CHARS:
            return self.encode_chat(messages)
        return await asyncio.to_thread(self.encode_chat, messages)

    async def encode_async(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) < INLINE_TOKENIZE_CHARS:
            return self.encode(text, add_special_tokens)
        return await asyncio.to_thread(self.encode, text, add_special_tokens)
