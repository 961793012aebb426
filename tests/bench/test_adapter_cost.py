"""The adapter-cost benchmark (benchmarks/adapter_cost.py) on a tiny ControlNet bundle: it times both modes and
counts one ControlNet call per step."""

import pytest
from tiny_models import tiny_controlnet_bundle

pytest.importorskip("torch")


def test_controlnet_cost_times_both_modes(models_root):
    from edgediff.benchmarks.adapter_cost import controlnet_cost

    row = controlnet_cost(str(tiny_controlnet_bundle("tiny-sd1", models_root, count=1)), steps=2, repeat=2)
    assert row["config"] == "controlnet" and row["steps"] == 2
    assert row["image_seconds"]["plain"] > 0 and row["image_seconds"]["controlnet"] > 0
    assert row["controlnet_call_seconds"] > 0
    per_step = (row["image_seconds"]["controlnet"] - row["image_seconds"]["plain"]) / 2
    assert row["extra_seconds_per_step"] == pytest.approx(per_step, abs=1e-3)
