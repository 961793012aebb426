"""Prompt tokenisation with the bundle's tokenizer.json (Hugging Face `tokenizers`, no transformers)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and was cut, as diffusers does."""


class PromptTokenizer:
    def __init__(self, path: Path, max_length: int, pad_id: int):
        self.max_length = max_length
        self._full = Tokenizer.from_file(str(path))
        self._full.no_truncation()
        self._full.no_padding()
        self._fixed = Tokenizer.from_file(str(path))
        self._fixed.enable_truncation(max_length)
        self._fixed.enable_padding(length=max_length, pad_id=pad_id)

    def __call__(self, prompts: list[str]) -> np.ndarray:
        """Token ids of shape (len(prompts), max_length), padded and truncated as the CLIP pipeline does."""
        return self.encode(prompts)[0]

    def encode(self, prompts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, attention mask), each (len(prompts), max_length): 1 for a prompt's tokens, 0 for padding."""
        encoded = self._fixed.encode_batch(prompts)
        for prompt, enc in zip(prompts, encoded):
            if sum(enc.attention_mask) < self.max_length:  # padded, so nothing was cut: skip the second encode
                continue
            full = self._full.encode(prompt)
            if len(full.ids) > self.max_length:
                kept = self._full.decode(enc.ids[1:-1])
                removed = self._full.decode(full.ids[len(enc.ids) - 1 : -1])
                warnings.warn(
                    f"prompt is {len(full.ids)} tokens, the text encoder takes {self.max_length}; "
                    f"truncated to {kept!r}, dropping {removed!r}",
                    PromptTruncatedWarning,
                    stacklevel=3,
                )
        ids = np.array([e.ids for e in encoded], dtype=np.int64)
        return ids, np.array([e.attention_mask for e in encoded], dtype=np.int64)

    def count(self, text: str) -> int:
        """The tokens `text` takes, special tokens included, unpadded (as transformers' len(tokenizer.encode))."""
        return len(self._full.encode(text).ids)
