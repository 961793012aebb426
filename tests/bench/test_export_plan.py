"""The export plan counts an architecture's weights from its shapes as the export counts a saved source's."""

import pytest

pytest.importorskip("torch")

from tiny_models import tiny_source

from edgediff.benchmarks import export_plan
from edgediff.export.memory_plan import component_weights
from edgediff.models import random_init


@pytest.mark.parametrize(
    "arch",
    ["tiny-sd-turbo", "tiny-sdxl-turbo", "tiny-flux-schnell", "tiny-sd3", "tiny-sana-sprint", "tiny-pixart-sigma"],
)
def test_shapes_alone_give_the_saved_sources_weights(arch, models_root):
    source = tiny_source(arch, models_root)
    planned = export_plan.arch_weights(arch)
    assert planned and set(planned) == {p.name for p in source.iterdir() if (p / "config.json").is_file()}
    for name, weights in planned.items():
        assert weights == component_weights(source / name), name


def test_a_half_precision_source_is_planned_as_stored(monkeypatch, tmp_path):
    """An entry stored in bf16 (as FLUX.1's files are) loads at half its fp32 bytes, as the saved folder's
    headers say."""
    monkeypatch.setitem(
        random_init.ARCHS, "tiny-flux-bf16", {**random_init.ARCHS["tiny-flux-schnell"], "stored": "bfloat16"}
    )
    source = random_init.build_random_pipeline("tiny-flux-bf16", tmp_path / "src")
    planned = export_plan.arch_weights("tiny-flux-bf16")
    for name, weights in planned.items():
        assert weights == component_weights(source / name), name
    assert planned["transformer"].stored * 2 == planned["transformer"].fp32


def test_plan_rows_name_the_stage_that_sets_the_peak():
    fits = export_plan.plan("tiny-sd3", "int4", 2**40)
    assert fits["fits"] and fits["peak_bytes"] == max(s["bytes"] for s in fits["stages"])
    assert any(s["stage"] == "transformer: quantize" for s in fits["stages"])
    without_t5 = export_plan.plan("tiny-sd3", "fp32", 2**40, t5=False)
    assert "text_encoder_3" not in without_t5["weights_fp32_bytes"] and without_t5["t5"] is False
    assert export_plan.plan("tiny-flux-schnell", "fp32", 2**40)["t5"] is None  # FLUX needs its T5
    assert not export_plan.plan("tiny-sd3", "fp32", 2**20)["fits"]
