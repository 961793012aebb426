"""docs/benchmarks.md is what its generator makes from the committed result files, and every result file
follows the bench results schema."""

import json
import re
import shutil
from pathlib import Path

import pytest

from edgediff.benchmarks import docs_tables

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / docs_tables.RESULTS
FILES = sorted(RESULTS.rglob("*.json"))

jsonschema = pytest.importorskip("jsonschema")


def _schema() -> dict:
    return json.loads((ROOT / "benchmarks" / "results.schema.json").read_text(encoding="utf-8"))


def test_the_committed_doc_is_what_the_results_make():
    doc = (ROOT / docs_tables.DOC).read_text(encoding="utf-8")
    assert docs_tables.render(doc, docs_tables.load_results(ROOT)) == doc, (
        "docs/benchmarks.md is stale: run python -m edgediff.benchmarks.docs_tables"
    )
    assert docs_tables.main(["--check", "--root", str(ROOT)]) == 0


def test_check_fails_on_a_stale_doc(tmp_path):
    (tmp_path / "docs").mkdir()
    shutil.copytree(RESULTS, tmp_path / docs_tables.RESULTS)
    doc = (ROOT / docs_tables.DOC).read_text(encoding="utf-8")
    stale = re.sub(r"(<!-- table:cpu-fp32 -->\n).*?(<!-- /table:cpu-fp32 -->)", r"\1| old |\n\2", doc, flags=re.DOTALL)
    assert stale != doc
    (tmp_path / docs_tables.DOC).write_text(stale, encoding="utf-8")
    assert docs_tables.main(["--check", "--root", str(tmp_path)]) == 1
    assert docs_tables.main(["--root", str(tmp_path)]) == 0  # regenerates the block, keeps the prose
    assert (tmp_path / docs_tables.DOC).read_text(encoding="utf-8") == doc


def test_every_table_has_its_block_and_every_source_exists():
    doc = (ROOT / docs_tables.DOC).read_text(encoding="utf-8")
    for name, table in docs_tables.TABLES.items():
        assert f"<!-- table:{name} -->" in doc and f"<!-- /table:{name} -->" in doc, name
        for source in table.sources:
            assert (RESULTS / source.path).is_file(), source.path
    assert "<!-- table:sources -->" in doc


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(RESULTS).as_posix() for p in FILES])
def test_result_files_follow_the_schema(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("kind") in ("export-cost", "adapter-cost"):  # export_cost.py's and adapter_cost.py's records
        assert {"machine", "date", "results"} <= set(data) and all("config" in r for r in data["results"])
    elif data.get("kind") == "op-profile":  # op_profile.py's per-operator times
        assert {"machine", "date", "command", "results"} <= set(data) and all("ops" in r for r in data["results"])
    elif data.get("kind") == "openvino-call":  # openvino_call.py's calls in OpenVINO beside onnxruntime's
        assert {"machine", "date", "command", "openvino", "onnxruntime", "results"} <= set(data)
        assert all("onnxruntime_seconds" in r and r["openvino"] for r in data["results"])
    elif data.get("kind") == "cpu-tier-images":  # cpu_tier.py --compare: one run's images against another's
        assert {"machine", "date", "command", "baseline", "results"} <= set(data)
        assert all({"tier", "image", "psnr_db", "ssim"} <= set(r) for r in data["results"])
    elif data.get("kind") == "export-plan":  # export_plan.py's estimates: no machine measured them
        assert {"date", "results", "command"} <= set(data) and all("peak_stage" in r for r in data["results"])
    else:
        jsonschema.validate(data, _schema())
    # benchmarks/results/<machine>/<date>-<what>.json, the date the file's own
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-[a-z0-9-]+\.json", path.name), path.name
    assert path.parent.parent == RESULTS
    assert str(data.get("date", "")).startswith(path.name[:10])


def test_there_are_result_files():
    assert FILES, f"no result files under {RESULTS}"


def test_export_cost_tables_show_the_ratio_to_fp32_and_the_stage_that_set_the_peak(monkeypatch):
    data = {
        "machine": {"cpu": "CPU", "physical_cores": 2, "isa": ["avx2"]},
        "date": "2026-01-01",
        "results": [
            {"config": "fp32", "args": [], "seconds": 100.0, "peak_rss_bytes": 4 * 2**30, "stages": []},
            {
                "config": docs_tables.EXPORT_STAGES_OF,
                "args": ["--precision", "int8"],
                "seconds": 150.0,
                "peak_rss_bytes": 6 * 2**30,
                "stages": [
                    {"stage": "unet: export", "seconds": 50.0, "peak_rss_bytes": 6 * 2**30},
                    {"stage": "unet: sensitivity", "seconds": 10.0, "peak_rss_bytes": 6 * 2**30},
                    {"stage": "unet: sensitivity", "seconds": 5.0, "peak_rss_bytes": 6 * 2**30},
                    {"stage": "recording calibration inputs", "seconds": 7.0, "peak_rss_bytes": 6 * 2**30},
                    {"stage": "unet: final check", "seconds": 3.0, "peak_rss_bytes": 6 * 2**30},
                ],
            },
        ],
    }
    monkeypatch.setitem(docs_tables.EXPORT_TABLES, "export-cost-one", docs_tables.ExportTable("m/cost.json"))
    cost = docs_tables.render_export_cost("export-cost-one", {"m/cost.json": data})
    # the quantisation's stages (recording, sensitivity, final check) summed; none in the fp32 export
    assert "| 1.50x | 25 s | 6.00 GiB | unet: export |" in cost and "| 1 min 40 s | 1.00x | - |" in cost
    stages_file = docs_tables.EXPORT_TABLES["export-stages"].file
    stages = docs_tables.render_export_cost("export-stages", {stages_file: data})
    assert "| unet: sensitivity | 15.0 | 2 | 6.00 GiB |" in stages and "| whole export | 150.0 |" in stages
    # sampled from outside (export_cost): what each stage held, the most of its runs, beside the high-water mark
    for k, stage in enumerate(data["results"][1]["stages"]):
        stage["held_rss_bytes"] = (k + 1) * 2**30
    stages = docs_tables.render_export_cost("export-stages", {stages_file: data})
    assert "| unet: sensitivity | 15.0 | 2 | 3.00 GiB | 6.00 GiB |" in stages
    assert "| whole export | 150.0 | | 5.00 GiB | 6.00 GiB |" in stages  # the most any stage held


def test_an_export_cost_table_over_several_runs_gives_each_ratio_within_its_own_run(monkeypatch):
    def run(fp32: float, fastest: float) -> dict:
        rows = [("fp32", [], fp32), ("fastest", ["--precision", "int8"], fastest)]
        return {
            "machine": {"cpu": "CPU", "physical_cores": 2, "isa": ["avx2"]},
            "date": "2026-01-01",
            "results": [{"config": c, "args": a, "seconds": t, "peak_rss_bytes": 2**30} for c, a, t in rows],
        }

    first, second = "machine/2026-01-01-export-cost-1.json", "machine/2026-01-01-export-cost-2.json"
    monkeypatch.setitem(docs_tables.EXPORT_TABLES, "export-cost-runs", docs_tables.ExportTable(first, runs=(second,)))
    table = docs_tables.render_export_cost("export-cost-runs", {first: run(100.0, 200.0), second: run(80.0, 240.0)})
    assert "| fastest, run 1 | `--precision int8` | 3 min 20 s | 2.00x |" in table
    assert "| fastest, run 2 | `--precision int8` | 4 min 0 s | 3.00x |" in table
    assert "| fp32, run 2 | - | 1 min 20 s | 1.00x |" in table
    assert table.count("Data: ") == 2 and second in table.split("Data: ")[2]
    assert "CPU time" not in table  # files without it: no column of dashes


def test_an_export_cost_table_shows_the_cpu_time_and_the_cores_it_kept_busy_where_recorded(monkeypatch):
    rows = [("fp32", [], 100.0, 116.0), ("fastest", ["--precision", "int8"], 150.0, 240.0)]
    data = {
        "machine": {"cpu": "CPU", "physical_cores": 2, "isa": ["avx2"]},
        "date": "2026-01-01",
        "results": [
            {"config": c, "args": a, "seconds": t, "cpu_seconds": cpu, "peak_rss_bytes": 2**30} for c, a, t, cpu in rows
        ],
    }
    monkeypatch.setitem(docs_tables.EXPORT_TABLES, "export-cost-cpu", docs_tables.ExportTable("m/cost.json"))
    table = docs_tables.render_export_cost("export-cost-cpu", {"m/cost.json": data})
    assert "| CPU time (cores busy) |" in table
    assert "| 1 min 40 s | 1.00x | - | 1 min 56 s (1.16) | 1.00 GiB |" in table
    assert "| 2 min 30 s | 1.50x | - | 4 min 0 s (1.60) | 1.00 GiB |" in table


def _stage(name, seconds, ended, **extra):
    """A logged stage of an export (progress.Stages' record), its high-water mark 1 GiB."""
    return {"stage": name, "seconds": seconds, "ended": ended, "peak_rss_bytes": 2**30, **extra}


HELD = {"held_rss_bytes": 2**30}  # sampled: what a stage held


def test_quantisation_stages_that_overlap_count_once():
    """Graphs quantised side by side (two threads) log stages that overlap: the column is their span, from the
    recording's start to the last stage's end (each record's `ended`), not their sum; older files without `ended`
    ran one stage at a time and are summed."""
    stages = [
        _stage("unet: export", 30.0, 40.0),
        _stage("recording calibration inputs", 10.0, 50.0),
        _stage("unet: sensitivity", 20.0, 70.0),
        _stage("text_encoder: sensitivity", 8.0, 60.0),  # beside the UNet's
        _stage("text_encoder: final check", 4.0, 64.0),
        _stage("unet: final check", 5.0, 75.0),
    ]
    assert docs_tables._quantisation_seconds({"stages": stages}) == pytest.approx(35.0)
    sequential = [{k: v for k, v in s.items() if k != "ended"} for s in stages]
    assert docs_tables._quantisation_seconds({"stages": sequential}) == pytest.approx(47.0)


def test_memory_table_sets_each_estimate_beside_the_peak_when_its_stages_ended():
    gib = 2**30
    row = {
        "config": "fp32",
        "peak_rss_bytes": 5 * gib,
        "stages": [
            {"stage": "loading the source", "peak_rss_bytes": 1 * gib},
            {"stage": "vae_decoder: export", "peak_rss_bytes": 2 * gib},
            {"stage": "vae_encoder: check", "peak_rss_bytes": 3 * gib},
            {"stage": "unet: export", "peak_rss_bytes": 4 * gib},
            {"stage": "unet: sensitivity", "peak_rss_bytes": 5 * gib},
        ],
        "estimate": [
            {"stage": "loading the source", "bytes": 1 * gib},
            {"stage": "vae: export", "bytes": 2 * gib},
            {"stage": "unet: export", "bytes": 6 * gib},
            {"stage": "recording calibration inputs, one graph at a time", "bytes": 3 * gib},
            {"stage": "unet: quantize", "bytes": 4 * gib},
        ],
    }
    cells = {line.split(" | ")[1]: line.split(" | ")[2:] for line in docs_tables._memory_lines([row])[2:]}
    assert cells["vae: export"] == ["2.00 GiB", "3.00 GiB |"]  # both VAE graphs are the VAE's stage
    assert cells["unet: quantize"] == ["4.00 GiB", "5.00 GiB |"]  # its calibration and sensitivity runs too
    assert cells["recording calibration inputs, one graph at a time"][1] == "- |"  # not measured: not made up
    assert cells["**whole export**"] == ["**6.00 GiB**", "**5.00 GiB** |"]


def test_op_profile_table_gives_the_costly_operators_a_row_each_and_sums_the_rest(monkeypatch):
    rel = "machine/2026-01-01-op-profile.json"
    monkeypatch.setitem(docs_tables.PROFILE_TABLES, "op-profile-test", rel)
    data = {
        "kind": "op-profile",
        "machine": {"cpu": "CPU", "physical_cores": 2, "isa": ["avx2"]},
        "date": "2026-01-01",
        "results": [
            {
                "bundle": "a",
                "precision": "fp32",
                "attention": "original",
                "call_seconds": 10.0,
                "ops": {"Conv": {"seconds": 6.0, "nodes": 60}, "Add": {"seconds": 0.1, "nodes": 9}},
            },
            {
                "bundle": "b",
                "precision": "int8-static",
                "attention": "fused",
                "call_seconds": 5.0,
                "ops": {
                    "QLinearConv": {"seconds": 3.0, "nodes": 60},
                    "MultiHeadAttention": {"seconds": 1.0, "nodes": 2},
                    "Add": {"seconds": 0.05, "nodes": 9},
                },
            },
        ],
    }
    table = docs_tables.render_op_profile("op-profile-test", {rel: data})
    assert "| operator (nodes) | fp32 | int8-static, fused attention |" in table
    assert "| Conv | 6 s (60) | - |" in table and "| QLinearConv | - | 3 s (60) |" in table
    assert "| MultiHeadAttention | - | 1 s (2) |" in table
    assert "| Add |" not in table and "| everything else | 0.1 s | 0.05 s |" in table


def test_openvino_call_table_gives_each_precision_beside_onnxruntimes_call(monkeypatch):
    rel = "machine/2026-01-01-openvino-call.json"
    monkeypatch.setitem(docs_tables.OPENVINO_TABLES, "openvino-call-test", rel)
    data = {
        "kind": "openvino-call",
        "machine": {"cpu": "CPU", "physical_cores": 2, "isa": ["avx512_bf16"]},
        "date": "2026-01-01",
        "openvino": "2026.4.1-22982-e213a147257-releases/2026/4",
        "onnxruntime": "1.32.0",
        "reference": "fp32-bundle",
        "results": [
            {
                "bundle": "b",
                "precision": "int8-static",
                "attention": "fused",
                "onnxruntime_seconds": 0.9,
                "onnxruntime_relative_rms_to_reference": 0.06,
                "openvino": [
                    {
                        "inference_precision": "bf16",
                        "compile_seconds": 3.5,
                        "call_seconds": 0.6,
                        "relative_rms": 0.07,
                        "relative_rms_to_reference": 0.0642,
                    },
                    {
                        "inference_precision": "f32",
                        "shapes": "dynamic",
                        "compile_seconds": 2.0,
                        "call_seconds": 0.45,
                        "relative_rms": 0.01,
                    },
                ],
            }
        ],
    }
    table = docs_tables.render_openvino_call("openvino-call-test", {rel: data})
    assert "| int8-static, fused attention | onnxruntime 1.32.0 CPU | 0.9 s | 1.00x | 0.0600 | - |" in table
    assert "| int8-static, fused attention | OpenVINO 2026.4.1 CPU, bf16 | 0.6 s | 1.50x | 0.0642 | 3.5 s |" in table
    assert "| OpenVINO 2026.4.1 CPU, f32, dynamic shapes | 0.45 s | 2.00x | - | 2.0 s |" in table


def test_memory_table_sets_each_estimate_beside_what_its_stages_held_where_sampled():
    """A stage after the peak holds less than the high-water mark: the table shows what it held."""
    gib = 2**30
    row = {
        "config": "fastest",
        "peak_rss_bytes": 6 * gib,
        "stages": [
            {"stage": "unet: export", "peak_rss_bytes": 6 * gib, "held_rss_bytes": 6 * gib},
            {"stage": "recording calibration inputs", "peak_rss_bytes": 6 * gib, "held_rss_bytes": 4 * gib},
            {"stage": "unet: sensitivity", "peak_rss_bytes": 6 * gib, "held_rss_bytes": 3 * gib},
            {"stage": "unet: final check", "peak_rss_bytes": 6 * gib, "held_rss_bytes": 2 * gib},
        ],
        "estimate": [
            {"stage": "unet: export", "bytes": 7 * gib},
            {"stage": "recording calibration inputs", "bytes": 8 * gib},
            {"stage": "unet: quantize", "bytes": 8 * gib},
        ],
    }
    lines = docs_tables._memory_lines([row])
    assert lines[0].endswith("| held during the stage |")
    cells = {line.split(" | ")[1]: line.split(" | ")[2:] for line in lines[2:]}
    assert cells["recording calibration inputs"] == ["8.00 GiB", "4.00 GiB |"]
    assert cells["unet: quantize"] == ["8.00 GiB", "3.00 GiB |"]  # the most of its stages


def test_text_encoders_quantised_while_the_unet_is_exported_add_no_quantisation_time(monkeypatch):
    """Their stages (export/text_ahead.py) end before the UNet's export does: the column counts from the last
    export or check on; the peak sampled with their process beside the export names the stage it was held in."""
    stages = [
        _stage("text_encoder: check", 5.0, 35.0, **HELD),
        _stage("text_encoder: calibration inputs", 7.0, 42.0, **HELD),
        _stage("text_encoder: final check", 3.0, 59.0, held_rss_bytes=3 * 2**30),  # during the UNet's export: both held
        _stage("unet: export", 29.0, 64.0, held_rss_bytes=3 * 2**30),
        _stage("unet: check", 3.0, 67.0, **HELD),
        _stage("recording calibration inputs", 12.0, 79.0, **HELD),
        _stage("unet: final check", 6.0, 110.0, **HELD),
    ]
    row = {"config": "fastest", "args": [], "seconds": 115.0, "peak_rss_bytes": 3 * 2**30, "stages": stages}
    assert docs_tables._quantisation_seconds(row) == pytest.approx(110.0 - 67.0)
    data = {"machine": {"cpu": "CPU", "physical_cores": 2, "isa": ["avx2"]}, "date": "2026-01-01", "results": [row]}
    monkeypatch.setitem(docs_tables.EXPORT_TABLES, "export-cost-one", docs_tables.ExportTable("m/cost.json"))
    cost = docs_tables.render_export_cost("export-cost-one", {"m/cost.json": data})
    assert "| 43 s | 3.00 GiB | unet: export |" in cost


def test_a_data_line_names_the_cpu_clock_where_it_was_recorded():
    """One CPU model name covers hosts of different clocks: the docs' data lines say which, where the file has it."""
    machine = {"physical_cores": 2, "cpu": "Intel(R) Xeon(R) Processor", "isa": ["avx2"], "memory_gib": 23.5}
    assert docs_tables.machine_line({**machine, "clock_ghz": 2.0999}).startswith(
        "2-core Intel(R) Xeon(R) Processor at 2.1 GHz, avx2"
    )
    for unknown in ({}, {"clock_ghz": None}):
        assert docs_tables.machine_line({**machine, **unknown}).startswith("2-core Intel(R) Xeon(R) Processor, avx2")


def test_an_emulated_tier_is_labelled_as_such_with_the_cpu_it_ran_on():
    """Kernels of a lesser tier (a CPUID mask) on an AMX CPU: the label names both, the data line what was hidden."""
    host = {"physical_cores": 2, "cpu": "Intel(R) Xeon(R) Processor", "isa": ["avx2", "avx512_vnni", "amx_int8"]}
    masked = {**host, "isa": ["avx2"], "cpuid_hidden": ["avx512_vnni", "amx_int8"]}
    assert docs_tables.machine_label(host) == "2-core Intel(R) Xeon(R) Processor, AMX, AVX-512 VNNI"
    assert docs_tables.machine_label(masked) == (
        "AVX2 only kernels, emulated on a 2-core Intel(R) Xeon(R) Processor, AMX, AVX-512 VNNI"
    )
    assert "CPUID mask hiding avx512_vnni amx_int8" in docs_tables.machine_line(masked)
    assert "CPUID mask" not in docs_tables.machine_line(host)


def test_tier_table_gives_each_kernel_tier_a_row_of_calls_against_its_first_bundle(monkeypatch):
    """op_profile files of the same bundles with each tier's kernels: a row per file, each call with the first
    bundle's call over it; a file that profiled other bundles is an error, not a shifted row."""
    rels = ("m/2026-01-01-op-profile-tier-avx2-1.json", "m/2026-01-01-op-profile-tier-native-1.json")
    monkeypatch.setitem(docs_tables.TIER_TABLES, "tier-test", rels)
    host = {"cpu": "CPU", "physical_cores": 2, "isa": ["avx2", "avx512f", "avx512_vnni", "amx_int8"]}

    def profile(machine, fp32, int8, second="b"):
        rows = [("a", "fp32", fp32), (second, "int8-static", int8)]
        results = [
            {"bundle": b, "precision": p, "attention": "fused", "call_seconds": c, "ops": {}} for b, p, c in rows
        ]
        return {"kind": "op-profile", "machine": machine, "date": "2026-01-01", "results": results}

    masked = {**host, "isa": ["avx2"], "cpuid_hidden": ["avx512f", "avx512_vnni", "amx_int8"]}
    results = {rels[0]: profile(masked, 6.0, 4.0), rels[1]: profile(host, 4.0, 1.0)}
    table = docs_tables.render_tier_calls("tier-test", results)
    assert "| kernels | fp32, fused attention | int8-static, fused attention | data |" in table
    assert "| AVX2 only (emulated) | 6 s (1.00x) | 4 s (1.50x) | 1 |" in table
    assert "| AMX, AVX-512 VNNI | 4 s (1.00x) | 1 s (4.00x) | 2 |" in table
    assert "CPUID mask hiding avx512f avx512_vnni amx_int8" in table
    results[rels[1]] = profile(host, 4.0, 1.0, second="c")
    with pytest.raises(ValueError, match="profiles other bundles"):
        docs_tables.render_tier_calls("tier-test", results)
