"""The export-cost benchmark: each configuration in a process of its own, its time, peak and bundle recorded."""

import json
import os
import sys
import textwrap

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
        # the work on every core: no more than the cores could do in that time (and the export does some)
        assert 0 < rows[name]["cpu_seconds"] <= 1.05 * rows[name]["seconds"] * os.cpu_count(), rows[name]
        assert 0 < rows[name]["system_seconds"] < rows[name]["cpu_seconds"] and rows[name]["page_faults"] > 0
    assert rows["fp32"]["components"]["unet"]["precision"] == "fp32"
    assert rows["int8"]["components"]["unet"]["quantization"]["scheme"] == "int8-dynamic"
    assert rows["int8"]["bundle_bytes"] > 0  # (tiny graphs grow when quantized: scales outweigh their weights)
    stages = [s["stage"] for s in rows["int8"]["stages"]]  # each stage of the export, in order, with its cost
    assert stages[0] == "loading the source" and "unet: quantize" in stages
    # smallest graphs first: the UNet is traced with the others' weights freed
    assert stages.index("vae_decoder: export") < stages.index("text_encoder: export") < stages.index("unet: export")
    # the export's own stages, and those of the process quantising its text encoder (export/text_ahead.py)
    own = [s for s in rows["int8"]["stages"] if not s.get("side_process")]
    side = [s["stage"] for s in rows["int8"]["stages"] if s.get("side_process")]
    assert "text_encoder: quantize" in side and "text_encoder: quantize" not in [s["stage"] for s in own]
    assert all(s["seconds"] >= 0 and s["peak_rss_bytes"] > 0 for s in own)
    peaks = [s["peak_rss_bytes"] for s in own]
    assert peaks == sorted(peaks) and peaks[-1] <= rows["int8"]["peak_rss_bytes"]  # high-water marks
    if sys.platform.startswith("linux"):  # what each stage held, sampled from outside: within the high-water mark
        held = {s["stage"]: s["held_rss_bytes"] for s in rows["int8"]["stages"]}
        assert held["unet: export"] is not None and held["unet: export"] > 50 * 2**20
        assert all(h is None or h <= 1.01 * rows["int8"]["peak_rss_bytes"] for h in held.values())
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


_STAGES = textwrap.dedent(
    """
    import time
    import numpy as np
    from edgediff.export.progress import Stages
    stages = Stages(enabled=False)
    with stages.stage("large"):
        block = np.ones(256 * 2**20, np.uint8)  # touched: resident
        time.sleep(0.5)
        del block
    with stages.stage("small"):
        time.sleep(0.5)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for resident memory")
def test_each_stage_gets_the_most_memory_held_while_it_ran(tmp_path):
    """The high-water mark cannot show a later stage holding less than an earlier one; the memory plan estimates
    each stage's own peak, sampled from outside the export."""
    from edgediff.export.progress import STAGES_LOG_ENV

    log = tmp_path / "stages.jsonl"
    code, stderr, samples = export_cost.run_sampled(
        [sys.executable, "-c", _STAGES], env={**os.environ, STAGES_LOG_ENV: str(log)}
    )
    assert code == 0, stderr
    stages = {r["stage"]: r for r in map(json.loads, log.read_text().splitlines())}
    large, small = (export_cost.held_during(stages[n], samples) for n in ("large", "small"))
    assert large - small > 0.8 * 256 * 2**20
    assert stages["small"]["peak_rss_bytes"] - small > 0.8 * 256 * 2**20  # the high-water mark: the large one
    assert export_cost.held_during({"stage": "old log", "seconds": 1.0}, samples) is None  # no time: not made up


_PARENT_AND_CHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    import numpy as np
    block = np.ones(128 * 2**20, np.uint8)  # touched: resident
    child = "import numpy as np, time; b = np.ones(192 * 2**20, np.uint8); time.sleep(1.0)"
    subprocess.run([sys.executable, "-c", child], check=True)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for resident memory")
def test_memory_held_counts_the_exports_own_child_processes():
    """The export quantises text encoders in a process of its own (export/text_ahead.py): what both hold at once."""
    code, stderr, samples = export_cost.run_sampled([sys.executable, "-c", _PARENT_AND_CHILD])
    assert code == 0, stderr
    assert max(rss for _, rss in samples) > 0.9 * (128 + 192) * 2**20
