"""The export's progress bar: stages re-weighed by what recording measured, so that its time left holds for
graphs whose cost their parameter count does not say (full-size convolutional decoders)."""

from types import SimpleNamespace

import numpy as np
import pytest


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_replan_turns_seconds_into_the_bars_own_rate(monkeypatch):
    from edgediff.export import progress

    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    stages = progress.Stages(enabled=True)
    for name, weight in (("export", 100.0), ("check", 50.0), ("decoder: final check", 1.0)):
        stages.plan(name, weight)
    with stages.stage("export"):
        clock.now = 10.0  # 100 units in 10 s: 10 units a second
    stages.replan("decoder: final check", 30.0)
    assert stages._planned["decoder: final check"] == pytest.approx(300.0)
    assert stages._bar.total == pytest.approx(100.0 + 50.0 + 300.0)
    stages.replan("check", 1.0, add=True)  # on top of the plan
    assert stages._planned["check"] == pytest.approx(60.0)
    stages.replan("not planned", 5.0)  # a stage the plan lacks is left alone
    assert "not planned" not in stages._planned
    stages.close()


def test_each_logged_stage_says_how_long_it_took_and_when_it_ended(monkeypatch, tmp_path):
    """Stages of graphs quantised side by side overlap: each record says when it ended, from the export's start."""
    import json

    from edgediff.export import progress

    clock = _Clock()
    monkeypatch.setattr(progress.time, "perf_counter", clock)
    monkeypatch.setenv(progress.STAGES_LOG_ENV, str(tmp_path / "stages.jsonl"))
    stages = progress.Stages(enabled=False)
    clock.now = 5.0
    with stages.stage("unet: export"):
        clock.now = 12.0
    records = [json.loads(line) for line in (tmp_path / "stages.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["seconds"], r["ended"]) for r in records] == [("unet: export", 7.0, 12.0)]


def test_stages_run_in_another_process_count_as_done_without_being_logged(monkeypatch, tmp_path):
    from edgediff.export import progress

    monkeypatch.setenv(progress.STAGES_LOG_ENV, str(tmp_path / "stages.jsonl"))
    stages = progress.Stages(enabled=True)
    for name, weight in (("text_encoder: quantize", 3.0), ("text_encoder: final check", 1.0), ("unet: quantize", 5.0)):
        stages.plan(name, weight)
    stages.run_elsewhere("text_encoder: ")
    assert stages._bar.n == pytest.approx(4.0) and list(stages._planned) == ["unet: quantize"]
    assert not (tmp_path / "stages.jsonl").exists()  # the other process logs its own
    stages.close()


class _Replans:
    def __init__(self):
        self.calls = {}

    def replan(self, name, seconds, add=False):
        self.calls[name] = (seconds, add)


def test_recorded_run_times_weigh_the_final_check_and_the_rankings_runs():
    from edgediff.export.bundle_quantize import replan_from_recording
    from edgediff.export.calibration import RecordedFeeds
    from edgediff.export.quantize import MAX_OUTPUT_RUNS, SENSITIVITY_FEEDS
    from edgediff.runtime.manifest import TensorSpec

    feed = {"sample": np.zeros((1, 4, 128, 128), np.float32), "states": np.zeros((1, 77, 64), np.float32)}
    recorded = RecordedFeeds([feed, feed], [None, None], None, seconds=[2.0, 4.0, 3.0])
    inputs = [
        TensorSpec("sample", "float32", ["batch", 4, "height", "width"]),
        TensorSpec("states", "float32", ["batch", 77, 64]),
    ]
    manifest = SimpleNamespace(components={"unet": SimpleNamespace(inputs=inputs)})
    stages = _Replans()
    replan_from_recording(stages, manifest, {"unet": recorded}, "auto")
    assert stages.calls["unet: final check"] == (3.0 * 2, False)  # the median run, over every feed
    # the ranking runs on the latent's centre quarter (each side halved), the text states whole
    fraction = (4 * 64 * 64 + 77 * 64) / (4 * 128 * 128 + 77 * 64)
    seconds, add = stages.calls["unet: sensitivity"]
    assert add and seconds == pytest.approx(3.0 * fraction * SENSITIVITY_FEEDS * (1 + MAX_OUTPUT_RUNS))
    stages = _Replans()
    replan_from_recording(stages, manifest, {"unet": recorded}, "none")
    assert set(stages.calls) == {"unet: final check"}


def test_recording_times_every_run(models_root):
    from tiny_models import tiny_bundle

    from edgediff.export.calibration import record_feeds

    feeds = record_feeds(tiny_bundle("tiny-sd-turbo", models_root), prompts=["a cat", "a dog"])
    for name, recorded in feeds.items():
        assert len(recorded.seconds) >= len(recorded) > 0, name
        assert all(s > 0 for s in recorded.seconds) and recorded.seconds_per_run() > 0
