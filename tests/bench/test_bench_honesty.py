"""What a bench result claims: every row says what its system ran, a ratio between different work says so,
and "of peak" is held to a reference that is sampled over the run and to the ISA's theoretical ceiling.

Tiny bundles; no timed assertions (the reference's timings are injected where a test needs them to move).
"""

import json

import pytest
from tiny_models import tiny_bundle, tiny_bundle_with_tiny_decoder, tiny_source

from edgediff.benchmarks import machine, peak
from edgediff.benchmarks.harness import BenchConfig, run_bench
from edgediff.benchmarks.report import chart_labels, ratio_cell, system_label, to_markdown, write_outputs
from edgediff.runtime import RuntimeOptions

jsonschema = pytest.importorskip("jsonschema")


def _schema():
    from importlib import resources

    return json.loads(resources.files("edgediff.benchmarks").joinpath("results.schema.json").read_text())


def _quick(bundles, out, **kw) -> BenchConfig:
    return BenchConfig(
        bundles=[str(b) for b in bundles],
        steps=[1],
        repeat=1,
        warmup=0,
        rounds=1,
        out=str(out),
        **{"runtime": RuntimeOptions(threads=2), **kw},
    )


@pytest.fixture(scope="module")
def tiny_decoder_vs_diffusers(models_root, tmp_path_factory):
    """The user's run in small: a bundle through its tiny decoder beside diffusers on the source."""
    cfg = _quick(
        [tiny_bundle_with_tiny_decoder(models_root)],
        tmp_path_factory.mktemp("labels"),
        compare=["diffusers"],
        source=str(tiny_source("tiny-sd1", models_root)),
        runtime=RuntimeOptions(threads=2, decoder="tiny"),
    )
    return run_bench(cfg, progress=False)


def test_peer_rows_are_labelled_by_what_the_peer_ran(tiny_decoder_vs_diffusers, tmp_path):
    data = tiny_decoder_vs_diffusers
    jsonschema.validate(data, _schema())
    row = data["results"][0]
    ours, peer = row["systems"]
    assert ours["ran"] == {
        "model": "bundle-sd1-tiny-decoder",
        "precision": "fp32",
        "decoder": "tiny",
        "decoder_precision": "fp32",
    }
    assert peer["ran"] == {"model": "src-tiny-sd1", "precision": "fp32", "decoder": "full", "decoder_precision": "fp32"}
    assert system_label(row, ours) == "edgediff bundle-sd1-tiny-decoder, fp32, tiny decoder"
    assert system_label(row, peer) == "diffusers fp32, full VAE (source src-tiny-sd1)"
    md = to_markdown(data)
    peer_line = next(line for line in md.splitlines() if "| diffusers |" in line)
    # the peer's row never carries the bundle's name nor its decoder
    assert "diffusers fp32, full VAE (source src-tiny-sd1)" in peer_line
    assert "bundle-sd1-tiny-decoder" not in peer_line and "tiny decoder)" not in peer_line
    # the ratio compares different work, and says so; no edgediff row here did the peer's work
    assert "different work: tiny decoder vs full VAE" in peer_line
    assert "no same-work edgediff row in this run" in peer_line
    # the chart's x-axis names what each bar ran, the same way
    first, second = chart_labels(data)
    assert first.startswith("edgediff bundle-sd1-tiny-decoder,\nfp32,\ntiny decoder")
    assert second.startswith("diffusers fp32,\nfull VAE (source src-tiny-sd1)")
    assert "chart.png" in {p.name for p in write_outputs(data, tmp_path)}


def test_a_same_work_ratio_is_given_where_one_was_measured(models_root, tmp_path):
    """An int8 bundle's ratio to diffusers is different work; the fp32 bundle of the same run did the peer's
    work, and the int8 row's ratio cell names that same-work figure too."""
    fp32, int8 = tiny_bundle("tiny-sd1", models_root), tiny_bundle("tiny-sd1", models_root, "int8")
    data = run_bench(
        _quick([fp32, int8], tmp_path, compare=["diffusers"], source=str(tiny_source("tiny-sd1", models_root))),
        progress=False,
    )
    jsonschema.validate(data, _schema())
    first, second = data["results"]
    assert ratio_cell(data, first, first["systems"][1]).endswith("x time (same work)")
    cell = ratio_cell(data, second, second["systems"][1])
    assert "different work: int8 vs fp32" in cell
    assert "same work: " in cell and cell.endswith("against edgediff bundle-tiny-sd1-fp32, fp32, full VAE")
    # the int8 bundle's stages are held to the int8 MatMul reference, measured beside fp32's
    assert {"auto/float32", "auto/int8"} <= set(data["peaks"])
    assert second["systems"][0]["achieved"]["unet"]["reference"] == "auto/int8"
    assert first["systems"][0]["achieved"]["unet"]["reference"] == "auto/float32"


def test_the_theoretical_peak_is_read_from_the_isa_and_clock():
    clock = (2.0, "test")
    fp32 = machine.theoretical_peak("float32", 2, {"avx2", "fma", "avx512f"}, clock, "x86_64")
    assert fp32["macs_per_second"] == 2 * 16 * 2 * 2.0e9 and fp32["isa"] == "avx512f"
    vnni = machine.theoretical_peak("int8", 2, {"avx2", "avx512f", "avx512_vnni"}, clock, "x86_64")
    assert vnni["macs_per_second"] == 2 * 16 * 4 * 2 * 2.0e9 and "ceiling" in vnni["basis"]
    assert machine.theoretical_peak("float32", 1, {"avx2", "fma"}, clock, "x86_64")["lanes"] == 8
    assert machine.theoretical_peak("int8", 1, {"avx_vnni", "avx2"}, clock, "x86_64")["isa"] == "avx_vnni"
    assert machine.theoretical_peak("float32", 1, {"asimd"}, clock, "aarch64")["macs_per_second"] == 4 * 4 * 2.0e9
    # what cannot be read is not guessed: no flags, another dtype, an unknown architecture
    assert machine.theoretical_peak("float32", 2, set(), clock, "x86_64") is None
    assert machine.theoretical_peak("float32", 2, {"avx2"}, clock, "riscv64") is None
    assert machine.theoretical_peak("float16", 2, {"avx512f"}, clock, "x86_64") is None


def test_a_reference_that_moves_more_than_a_fifth_is_noisy():
    ref = peak.PeakReference()
    ref.record("before", 0.100)
    ref.record("after", 0.105)
    steady = ref.summary()
    assert not steady["noisy"] and steady["spread"] == pytest.approx(1 - 0.100 / 0.105)
    ref.record("between", 0.140)
    moved = ref.summary()
    assert moved["noisy"] and moved["seconds"] == 0.100  # the best sample is the reference
    assert moved["macs_per_second"] == peak.PEAK_SIZE**3 / 0.100


@pytest.fixture(scope="module")
def moved_reference(models_root, tmp_path_factory):
    """A run whose MatMul reference is timed at 0.10 s, then 0.15 s (injected), under a theoretical ceiling
    far below what the stages reach: the run is noisy, and every stage is above the ceiling."""
    timings = iter([0.10, 0.15])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(peak.MatMulProbe, "best_seconds", lambda self, repeat=3: next(timings, 0.15))
        real = machine.theoretical_peak
        mp.setattr(
            machine,
            "theoretical_peak",
            lambda dtype, cores, *a, **k: {
                **(real(dtype, cores, *a, **k) or {}),
                "dtype": dtype,
                "macs_per_second": 1.0,
                "basis": "injected",
            },
        )
        data = run_bench(
            _quick([tiny_bundle("tiny-sd1", models_root)], tmp_path_factory.mktemp("moved")), progress=False
        )
    return data


def test_a_run_whose_reference_moves_is_marked_noisy(moved_reference, tmp_path):
    data = moved_reference
    jsonschema.validate(data, _schema())
    ref = data["peaks"]["auto/float32"]
    assert [s["at"] for s in ref["samples"]] == ["before", "after"]
    assert ref["spread"] == pytest.approx(1 / 3) and ref["noisy"] and data["noisy"]
    assert ref["macs_per_second"] == peak.PEAK_SIZE**3 / 0.10
    write_outputs(data, tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert md.splitlines()[2].startswith("**Noisy run:**") and "auto/float32 by 33%" in md
    assert "the best of 2 samples (before, after the systems); they moved by 33%" in md


def test_above_the_theoretical_peak_carries_a_warning(moved_reference):
    achieved = moved_reference["results"][0]["systems"][0]["achieved"]
    assert all(a["above_theoretical"] and a["fraction_of_theoretical"] > 1 for a in achieved.values())
    md = to_markdown(moved_reference)
    rows = [line for line in md.splitlines() if line.startswith("| edgediff bundle-tiny-sd1-fp32")]
    # the achieved-compute table names the denoiser's stage by its component ("UNet call")
    shown = ("text_encoder", "UNet call", "vae_decoder")
    stage_rows = [line for line in rows if any(f"| {s} |" in line for s in shown)]
    assert len(stage_rows) == 3
    assert all("above the theoretical peak, the measurement is off" in line for line in stage_rows)


def test_of_theoretical_peak_stays_at_or_below_100_percent_or_is_flagged(models_root, tmp_path):
    """On this machine's real ceiling: every stage is at or under it, or flagged (never a silent 300%)."""
    data = run_bench(_quick([tiny_bundle("tiny-sd1", models_root)], tmp_path), progress=False)
    achieved = data["results"][0]["systems"][0]["achieved"]
    if data["peaks"]["auto/float32"]["theoretical"] is None:
        pytest.skip("this machine's ISA flags or clock cannot be read")
    md = to_markdown(data)
    for stage, a in achieved.items():
        assert a["fraction_of_theoretical"] is not None
        shown = "UNet call" if stage == "unet" else stage  # the table names the denoiser's stage by its component
        line = next(x for x in md.splitlines() if f"| {shown} |" in x)
        if a["fraction_of_theoretical"] > 1:
            assert a["above_theoretical"] and "the measurement is off" in line
        else:
            assert not a["above_theoretical"] and "the measurement is off" not in line
    assert "ISA theoretical peak, float32" in md and "a ceiling" in md


def test_a_noisy_run_stays_marked_once_merged(moved_reference, tmp_path):
    from edgediff.benchmarks.harness import merge

    write_outputs(moved_reference, tmp_path)
    merged = merge([str(tmp_path / "results.json")])
    jsonschema.validate(merged, _schema())
    assert merged["merged_from"][0]["noisy"] == {"auto/float32": pytest.approx(1 / 3)}
    assert "**Noisy run:**" in to_markdown(merged)
