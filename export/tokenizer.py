"""The pipeline's tokenizers as tokenizer.json files for the runtime's `tokenizers` library."""

from __future__ import annotations

import tempfile
from pathlib import Path


def write_tokenizer_json(tokenizer, out_file: Path, max_length: int | None = None) -> dict:
    """Converts a (slow or fast) CLIP tokenizer, or writes a fast one's own backend (SD3's T5TokenizerFast);
    returns the manifest's tokenizer entry. `max_length`: the length prompts are padded to, when it is not the
    tokenizer's model_max_length (T5 takes the pipeline's max_sequence_length)."""
    from transformers import CLIPTokenizerFast

    if getattr(tokenizer, "is_fast", False) and not isinstance(tokenizer, CLIPTokenizerFast):
        tokenizer.backend_tokenizer.save(str(out_file))
    else:
        with tempfile.TemporaryDirectory() as tmp:
            tokenizer.save_pretrained(tmp)
            fast = CLIPTokenizerFast.from_pretrained(tmp)
        fast.backend_tokenizer.save(str(out_file))
    length = int(tokenizer.model_max_length if max_length is None else max_length)
    return {"file": out_file.name, "max_length": length, "pad_id": int(tokenizer.pad_token_id)}
