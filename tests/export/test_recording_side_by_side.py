"""Calibration inputs recorded side by side (calibration.record_feeds: small images, a prompt per core, each graph on
one thread) are those recorded one prompt after another: the same feeds in the same order, their outputs and the
activation ranges taken while recording, whichever prompt's runs end first."""

import threading
import time

import numpy as np
import pytest
from tiny_models import tiny_bundle

pytest.importorskip("torch")

# one thread against two: the same operators, sums split differently
SIDE_BY_SIDE_RTOL = 1e-5
SIDE_BY_SIDE_ATOL = 1e-6
PROMPTS = ["a cat", "a dog", "a red house", "a boat at sea"]


def _record(bundle):
    from edgediff.export.calibration import record_feeds
    from edgediff.export.quantize import SCHEMES

    return record_feeds(
        bundle, prompts=PROMPTS, components=["text_encoder", "unet"], ranges_for={"unet": SCHEMES["int8-static"]}
    )


def test_prompts_recorded_side_by_side_keep_the_order_values_and_ranges_of_those_recorded_in_turn(
    models_root, monkeypatch
):
    import edgediff.export.calibration as calibration
    import edgediff.runtime.session_config as session_config
    from edgediff.export.ranges import RUN_ORDER, RangeGraph, RangeSession

    bundle = tiny_bundle("tiny-sd1", models_root)
    monkeypatch.setattr(calibration, "SIDE_BY_SIDE_PIXELS", 0)  # every image over it: in turn
    in_turn = _record(bundle)

    monkeypatch.setattr(calibration, "SIDE_BY_SIDE_PIXELS", 256 * 256)
    monkeypatch.setattr(session_config, "physical_cores", lambda: 2)  # two at once, on any machine
    opened, threads_of, started = [], {}, []
    real_open, real_run = RangeGraph.open, RangeSession.run

    def open_spy(self, name="", low_memory=False, threads=None):
        opened.append(threads)
        return real_open(self, name, low_memory, threads)

    def run_spy(self, run_options=None, **feeds):
        prompt = RUN_ORDER.get()
        started.append(prompt)
        threads_of.setdefault(prompt, set()).add(threading.current_thread().name)
        if prompt == 0:
            time.sleep(0.2)  # the first prompt's runs end last: the order must not come from when runs end
        return real_run(self, run_options, **feeds)

    monkeypatch.setattr(RangeGraph, "open", open_spy)
    monkeypatch.setattr(RangeSession, "run", run_spy)
    side_by_side = _record(bundle)

    assert opened == [1]  # the UNet's calibration graph on one thread
    assert all(len(names) == 1 for names in threads_of.values())  # a prompt's runs on one thread
    assert len(set().union(*threads_of.values())) == 2  # two of them
    assert started != sorted(started)  # runs of two prompts interleaved
    for name in ("text_encoder", "unet"):
        got, want = side_by_side[name], in_turn[name]
        assert len(got) == len(want) == len(got.outputs) > len(PROMPTS) - 1
        for a, b in zip(got, want):
            assert a.keys() == b.keys()
            for key in a:
                np.testing.assert_allclose(a[key], b[key], rtol=SIDE_BY_SIDE_RTOL, atol=SIDE_BY_SIDE_ATOL)
        for a, b in zip(got.outputs, want.outputs):
            np.testing.assert_allclose(a, b, rtol=SIDE_BY_SIDE_RTOL, atol=SIDE_BY_SIDE_ATOL)
    got, want = side_by_side["unet"].ranges, in_turn["unet"].ranges
    assert sorted(got.keys()) == sorted(want.keys())
    for key in want.keys():
        for a, b in zip(got[key].range_value, want[key].range_value):
            np.testing.assert_allclose(a, b, rtol=SIDE_BY_SIDE_RTOL, atol=SIDE_BY_SIDE_ATOL)


def test_large_images_generate_one_prompt_at_a_time(monkeypatch):
    import edgediff.runtime.session_config as session_config
    from edgediff.export.calibration import SIDE_BY_SIDE_PIXELS, side_by_side

    monkeypatch.setattr(session_config, "physical_cores", lambda: 4)
    small = {"height": 256, "width": 256}
    assert 256 * 256 <= SIDE_BY_SIDE_PIXELS
    assert side_by_side(small, {}, prompts=8) == 4
    assert side_by_side(small, {}, prompts=2) == 2  # no more workers than prompts
    assert side_by_side({}, {"height": 512, "width": 512}, prompts=8) == 1  # the bundle's default size, too large
    assert side_by_side({}, {}, prompts=8) == 1  # no size known
