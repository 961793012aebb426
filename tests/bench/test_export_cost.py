"""The export-cost benchmark: each configuration in a process of its own, its time, peak and bundle recorded."""

import json

import pytest

pytest.importorskip("torch")

from tiny_models import tiny_source

from edgediff.benchmarks import export_cost
from edgediff.export.memory_plan import check_source


def test_export_cost_records_time_peak_and_what_was_made(models_root, tmp_path):
    source = str(tiny_source("tiny-sd1", models_root))
    out = tmp_path / "cost.json"
    export_cost.main(
        [
            source,
            "--config",
            "fp32=",
            "--config",
            "int8=--precision int8",
            "--config",
            "bad=--precision int8 --keep no_such_block",
            "--out",
            str(out),
            "--work",
            str(tmp_path),
        ]
    )
    data = json.loads(out.read_text())
    assert data["kind"] == export_cost.RESULTS_KIND and data["machine"]["isa"] is not None
    rows = {r["config"]: r for r in data["results"]}
    for name in ("fp32", "int8"):
        assert rows[name]["seconds"] > 0 and rows[name]["peak_rss_bytes"] > 50 * 2**20, rows[name]
    assert rows["fp32"]["components"]["unet"]["precision"] == "fp32"
    assert rows["int8"]["components"]["unet"]["quantization"]["scheme"] == "int8-dynamic"
    assert rows["int8"]["bundle_bytes"] > 0  # (tiny graphs grow when quantized: scales outweigh their weights)
    stages = [s["stage"] for s in rows["int8"]["stages"]]  # each stage of the export, in order, with its cost
    assert stages[0] == "loading the source" and "unet: quantize" in stages
    # smallest graphs first: the UNet is traced with the others' weights freed
    assert stages.index("vae_decoder: export") < stages.index("text_encoder: export") < stages.index("unet: export")
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 for s in rows["int8"]["stages"])
    peaks = [s["peak_rss_bytes"] for s in rows["int8"]["stages"]]
    assert peaks == sorted(peaks) and peaks[-1] <= rows["int8"]["peak_rss_bytes"]  # high-water marks
    # the memory plan's estimate, made before loading, is recorded beside the measured stages
    estimate = {e["stage"]: e["bytes"] for e in rows["int8"]["estimate"]}
    assert {"loading the source", "unet: export", "unet: quantize"} <= set(estimate)
    assert estimate == {s.name: s.bytes for s in check_source(source, quantised="int8")}
    assert "error" in rows["bad"] and "seconds" not in rows["bad"]  # a failed export is recorded, not raised
    assert not any(p.name in rows for p in tmp_path.iterdir() if p.is_dir())  # bundles removed after measuring


def test_a_failed_export_records_the_clis_error_not_the_progress_bar():
    from edgediff.benchmarks.export_cost import _error_lines

    stderr = (
        "export:  31%|###  | 01:35<03:14, text_encoder_2: check\rexport:  31%|###  | 01:46<03:14, transformer: export"
        "error: [Errno 28] No space left on device\nexport:  31%|###  | 04:29<10:13, transformer: export\n"
    )
    assert _error_lines(stderr) == ["error: [Errno 28] No space left on device"]
    assert _error_lines("Traceback\nKilled\n") == ["Killed"]
