"""SANA's Gemma-2 after its cached instruction prefix (export/gemma_prefix.py): the bundle's text conditioning
against SanaSprintPipeline.encode_prompt on the same prompts, with the stored prefix, without it (a prompt whose
tokens do not begin with the stored ids), and the prefix file checked like a graph."""

import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from references import PROMPTS  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.runtime import Bundle, BundleError, ChecksumError, Pipeline  # noqa: E402

SPRINT = "tiny-sana-sprint"
# Gemma-2's hidden states, ours after the stored prefix against PyTorch's over the whole sequence
HIDDEN_ATOL = 1e-4
LENGTHS = (300, 24)  # SanaPipeline's max_sequence_length, and a short one


def _diffusers_conditioning(models_root, prompts, length):
    import inspect

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(tiny_source(SPRINT, models_root)))
    # the instruction SanaSprintPipeline.__call__ passes (encode_prompt's own default is none)
    instruction = inspect.signature(type(pipe).__call__).parameters["complex_human_instruction"].default
    with torch.no_grad():
        embeds, mask = pipe.encode_prompt(prompts, max_sequence_length=length, complex_human_instruction=instruction)
    return embeds.numpy(), mask.numpy()


def _ours(models_root, prompts, length, timings=None):
    pipe = Pipeline.from_bundle(tiny_bundle(SPRINT, models_root), provider="cpu")
    return pipe.text, pipe.text.encode(prompts, length, True, {} if timings is None else timings)


@pytest.mark.parametrize("length", LENGTHS)
def test_prompt_states_after_the_stored_prefix_match_the_whole_sequence(models_root, length):
    prompts = [*PROMPTS, "a much longer prompt, with commas, numbers 1 2 3 and a few more words to see"]
    theirs, their_mask = _diffusers_conditioning(models_root, prompts, length)
    timings = {}
    text, (ours, mask) = _ours(models_root, prompts, length, timings)
    total = text._instruction_tokens + length - 2
    ids, _ = text._tokenizers(total).encode([text.instruction + p.lower().strip() for p in prompts])
    assert text._cached_prefix(ids) is not None  # the stored prefix was used
    np.testing.assert_array_equal(mask, their_mask)
    assert ours.shape == theirs.shape
    kept = mask.astype(bool)  # the transformer masks the rest
    np.testing.assert_allclose(ours[kept], theirs[kept], atol=HIDDEN_ATOL, rtol=0)
    assert not ours[:, ~kept.any(axis=0)].any()  # past the longest prompt: never computed, zeros
    assert timings["text_encoder"] > 0 and timings["tokenize"] > 0


def test_prompts_not_starting_with_the_stored_ids_run_from_the_first_token(models_root):
    text, _ = _ours(models_root, PROMPTS[:1], 300)
    text._prefix["ids"] = text._prefix["ids"].copy()
    text._prefix["ids"][-1] += 1  # as when a prompt's first characters merge with the instruction's last token
    assert text._cached_prefix(np.zeros((1, 400), np.int64)) is None
    ours, mask = text.encode(PROMPTS, 300, True, {})
    theirs, their_mask = _diffusers_conditioning(models_root, PROMPTS, 300)
    np.testing.assert_array_equal(mask, their_mask)
    kept = mask.astype(bool)
    np.testing.assert_allclose(ours[kept], theirs[kept], atol=HIDDEN_ATOL, rtol=0)


def test_the_prefix_file_is_checked_like_a_graph(models_root, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle(SPRINT, models_root), copy)
    entry = Bundle.open(copy).manifest.conditioning["prefix"]
    path = copy / entry["file"]
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ChecksumError):
        Bundle.open(copy)
    path.unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.open(copy)
