"""The pipeline's CLIP tokenizer as one tokenizer.json for the runtime's `tokenizers` library."""

from __future__ import annotations

import tempfile
from pathlib import Path


def write_tokenizer_json(tokenizer, out_file: Path) -> dict:
    """Converts (slow or fast) CLIP tokenizers; returns the manifest's tokenizer entry."""
    from transformers import CLIPTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        fast = CLIPTokenizerFast.from_pretrained(tmp)
    fast.backend_tokenizer.save(str(out_file))
    return {"file": out_file.name, "max_length": int(tokenizer.model_max_length), "pad_id": int(tokenizer.pad_token_id)}
