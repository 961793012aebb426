"""Builds a CLIP BPE tokenizer offline, from a word list (no downloads).

Real CLIP vocabularies can't be fetched on our machines; models built here (tiny random models in
tests, the shipped model) get a byte-level CLIP tokenizer whose merges make each listed word one token.
It is a genuine `CLIPTokenizer` (vocab.json + merges.txt) that diffusers and transformers load.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """Byte-pair encoding of one word as CLIP's tokenizer applies it: lowest-ranked pair first."""
    symbols = list(word[:-1]) + [word[-1] + "</w>"]
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b), len(ranks) + 1), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        rank, i = min(pairs)
        if rank > len(ranks):
            break
        symbols = symbols[:i] + [symbols[i] + symbols[i + 1]] + symbols[i + 2 :]
    return symbols


def _merges_for(words: list[str]) -> list[tuple[str, str]]:
    """Merges that make every word one token.

    Each word's missing merges join what BPE already produces for it, left to right, and are
    appended after all earlier merges: a word finished earlier never meets them mid-way (its own
    lower-ranked merges always apply first), so no word breaks another ("red" used to split "green").
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        symbols = _bpe(word, ranks)
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            symbols = [symbols[0] + symbols[1]] + symbols[2:]
    return merges


def build_clip_tokenizer(out_dir: str | Path, words: list[str], max_length: int = 77, pad_token: str = EOS) -> Path:
    """Writes a CLIPTokenizer (vocab.json, merges.txt, configs) to `out_dir` and returns it.

    `pad_token`: CLIP-L pads with its end token; SDXL's OpenCLIP tokenizer (tokenizer_2) pads with "!".
    """
    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = _merges_for([w.lower() for w in words])
    vocab_list += ["".join(m) for m in merges if "".join(m) not in vocab_list]
    vocab_list += [BOS, EOS]
    (out / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab_list)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(
        str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length, pad_token=pad_token
    )
    tok.save_pretrained(out)
    return out


T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
_SPACE = "\u2581"  # SentencePiece's word-start marker


def build_t5_tokenizer(out_dir: str | Path, words: list[str], max_length: int = 512) -> Path:
    """Writes a T5TokenizerFast (tokenizer.json + configs) to `out_dir` and returns it.

    A SentencePiece-style Unigram model built with `tokenizers` (no sentencepiece file, no download): each listed
    word is one piece, anything else falls back to single characters; ids 0, 1, 2 are pad, end and unknown as in
    T5's own vocabulary, and an end token closes every sequence.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"))
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), (_SPACE, -2.0)]
    pieces += [(_SPACE + w.lower(), -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in chars]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=f"$A {T5_EOS}", pair=f"$A {T5_EOS} $B {T5_EOS}", special_tokens=[(T5_EOS, 1)]
    )
    tok = T5TokenizerFast(
        tokenizer_object=backend,
        eos_token=T5_EOS,
        unk_token=T5_UNK,
        pad_token=T5_PAD,
        extra_ids=0,
        model_max_length=max_length,
    )
    tok.save_pretrained(out)
    return out


GEMMA_PAD, GEMMA_EOS, GEMMA_BOS, GEMMA_UNK = "<pad>", "<eos>", "<bos>", "<unk>"


def build_gemma_tokenizer(out_dir: str | Path, words: list[str], max_length: int = 8192) -> Path:
    """Writes a GemmaTokenizerFast (tokenizer.json + configs) to `out_dir` and returns it.

    Built as build_t5_tokenizer builds T5's (a Unigram model, each listed word one piece, other text falling back
    to single characters or the unknown token), with Gemma's special ids (pad 0, end 1, start 2, unknown 3) and
    Gemma's template: a start token opens every sequence, none closes it. Upper-case letters and the punctuation
    of SANA's instruction prefix are pieces too, so that the prefix tokenizes to more than unknown tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GemmaTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    chars = sorted(set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()>\n"))
    pieces = [(GEMMA_PAD, 0.0), (GEMMA_EOS, 0.0), (GEMMA_BOS, 0.0), (GEMMA_UNK, 0.0), (_SPACE, -2.0)]
    pieces += [(_SPACE + w.lower(), -1.0) for w in dict.fromkeys(words)]
    pieces += [(c, -5.0) for c in chars]
    backend = Tokenizer(models.Unigram(pieces, unk_id=3))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme="first")
    backend.decoder = decoders.Metaspace(replacement=_SPACE, prepend_scheme="first")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{GEMMA_BOS} $A", pair=f"{GEMMA_BOS} $A $B", special_tokens=[(GEMMA_BOS, 2)]
    )
    tok = GemmaTokenizerFast(
        tokenizer_object=backend,
        bos_token=GEMMA_BOS,
        eos_token=GEMMA_EOS,
        unk_token=GEMMA_UNK,
        pad_token=GEMMA_PAD,
        add_bos_token=True,
        add_eos_token=False,
        model_max_length=max_length,
    )
    tok.save_pretrained(out)
    return out
