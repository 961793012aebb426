"""The coloured-shapes domain: deterministic rendering, and a checker that reads ground truth right."""

import numpy as np

from training import checker, shapes

CHECKER_FLOOR = 0.97  # on the generator's own images; the model's figures are measured with the same reader


def test_rendering_is_deterministic_by_seed():
    a, sa = shapes.sample(11, 8)
    b, sb = shapes.sample(11, 8)
    c, _ = shapes.sample(12, 8)
    assert a.shape == (8, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and sa == sb and not np.array_equal(a, c)


def test_captions_follow_the_grammar():
    _, scenes = shapes.sample(3, 200)
    for s in scenes:
        assert s.colour != s.background
        words = s.caption.split()
        assert words[0] == "a" and words[-3:] == ["a", s.background, "background"]
        assert (s.size in words) == s.say_size and (f"at the {s.position}" in s.caption) == s.say_position
    assert any(not s.say_size for s in scenes) and any(s.say_size for s in scenes)


def test_checker_reads_the_generator_back():
    images, scenes = shapes.sample(99, 400)
    readings = [checker.read(im) for im in images]
    for attr in ("background", "colour", "shape", "size", "position"):
        acc = np.mean([getattr(r, attr) == getattr(s, attr) for r, s in zip(readings, scenes)])
        assert acc >= CHECKER_FLOOR, (attr, acc)


def test_checker_on_a_blank_image_finds_no_shape():
    blank = np.full((64, 64, 3), shapes.COLOURS["blue"], np.uint8)
    r = checker.read(blank)
    assert r.background == "blue" and r.shape is None and r.colour is None


def test_every_domain_word_is_one_token(tmp_path):
    transformers = __import__("pytest").importorskip("transformers")
    from edgediff.models.tokenizer_build import build_clip_tokenizer
    from training.shipped_config import VOCABULARY

    tok = transformers.CLIPTokenizer.from_pretrained(build_clip_tokenizer(tmp_path, VOCABULARY, max_length=16))
    for word in VOCABULARY:
        assert tok.tokenize(word) == [f"{word}</w>"], word
    longest = "a large yellow triangle at the bottom on a purple background"
    assert len(tok(longest).input_ids) == 13
