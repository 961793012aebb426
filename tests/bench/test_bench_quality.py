"""`edgediff bench --quality REFERENCE`: every row's images against the reference bundle's, from the same latents
and prompt, beside its time; rows below the 30 dB floor are marked. Tiny bundles."""

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import tiny_bundle, tiny_source

from edgediff.benchmarks.harness import BenchConfig, _mark_faster_below_floor, _peer_noise, run_bench
from edgediff.benchmarks.quality import PSNR_FLOOR_DB, score_images
from edgediff.benchmarks.report import quality_cell, to_markdown, write_outputs
from edgediff.cli.main import cli
from edgediff.runtime import RuntimeOptions

jsonschema = pytest.importorskip("jsonschema")


def _schema():
    from importlib import resources

    return json.loads(resources.files("edgediff.benchmarks").joinpath("results.schema.json").read_text())


def _no_infinity(text: str):
    def refuse(name):
        raise ValueError(f"{name} in results.json: not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def against_fp32(models_root, tmp_path_factory):
    """fp32 and int8 tiny bundles beside diffusers, all scored against the fp32 bundle."""
    fp32, int8 = tiny_bundle("tiny-sd1", models_root), tiny_bundle("tiny-sd1", models_root, "int8")
    out = tmp_path_factory.mktemp("quality")
    cfg = BenchConfig(
        bundles=[str(fp32), str(int8)],
        steps=[1],
        repeat=2,
        warmup=1,
        rounds=1,
        compare=["diffusers"],
        source=str(tiny_source("tiny-sd1", models_root)),
        runtime=RuntimeOptions(threads=2),
        out=str(out),
        quality=str(fp32),
    )
    return run_bench(cfg, progress=False), out


def test_a_bundle_against_itself_is_identical_and_int8_is_not(against_fp32):
    data, out = against_fp32
    jsonschema.validate(data, _schema())
    (fp32_row, int8_row) = data["results"]
    same = fp32_row["systems"][0]["quality"]
    assert same["psnr"] == math.inf and same["psnr_min"] == math.inf and same["ssim"] == pytest.approx(1.0)
    assert same["n"] == 2 and not same["below_floor"]
    int8 = int8_row["systems"][0]["quality"]
    assert math.isfinite(int8["psnr"]) and int8["psnr_min"] <= int8["psnr"] and 0 < int8["ssim"] < 1
    # diffusers' images are scored too (its own VAE, in torch): close to the fp32 bundle's, never the same file
    peer = fp32_row["systems"][1]["quality"]
    assert peer["psnr"] > PSNR_FLOOR_DB and peer["images"] != same["images"]
    # each system's warm images are kept as uint8 in the run's folder, the reference's too
    images = {p.name for p in (out / "images").glob("*.npy")}
    assert same["images"] in images and int8["images"] in images and any(n.startswith("reference-") for n in images)
    assert np.load(out / "images" / same["images"]).dtype == np.uint8
    assert data["quality_reference"]["floor_db"] == PSNR_FLOOR_DB
    assert data["quality_reference"]["shipped_model"] is False  # no checker adherence for a random model
    assert "adherence" not in same


def test_quality_is_written_beside_time_and_charted(against_fp32, tmp_path):
    data, _ = against_fp32
    paths = {p.name for p in write_outputs(data, tmp_path)}
    assert {"results.json", "results.md", "chart.png", "speed_quality.png"} <= paths
    written = _no_infinity((tmp_path / "results.json").read_text())  # strict JSON: identical images read "inf"
    jsonschema.validate(written, _schema())
    assert written["results"][0]["systems"][0]["quality"]["psnr"] == "inf"
    md = (tmp_path / "results.md").read_text()
    assert "PSNR / SSIM vs reference" in md and "Speed against quality" in md
    assert "| identical / 1.000 |" in md
    # a merged file (read back from JSON) renders the same quality cells
    assert to_markdown(written) == to_markdown(data)


def test_a_row_below_the_floor_is_marked(models_root, tmp_path):
    """Against another tiny model (same latent shape, other weights) the images are far apart: below 30 dB."""
    cfg = BenchConfig(
        bundles=[str(tiny_bundle("tiny-sd1", models_root))],
        steps=[1],
        sizes=[64],
        repeat=1,
        warmup=0,
        rounds=1,
        runtime=RuntimeOptions(threads=2),
        out=str(tmp_path),
        quality=str(tiny_bundle("tiny-sd-turbo", models_root)),
    )
    data = run_bench(cfg, progress=False)
    jsonschema.validate(data, _schema())
    q = data["results"][0]["systems"][0]["quality"]
    assert q["psnr"] < PSNR_FLOOR_DB and q["below_floor"]
    assert not q["faster_below_floor"]  # nothing at the floor to be faster than
    md = to_markdown(data)
    assert "below the 30 dB floor**" in md and "| below the 30 dB floor |" in md


def test_faster_but_below_the_floor_is_marked_so():
    def row(seconds, psnr):
        return {
            "stages": {"total": {"median": seconds}},
            "quality": {"psnr": psnr, "ssim": 0.9, "below_floor": psnr < PSNR_FLOOR_DB},
        }

    kept, fast_bad, slow_bad = row(1.0, 40.0), row(0.5, 20.0), row(2.0, 20.0)
    results = [{"size": 64, "steps": 1, "provider": "cpu", "systems": [kept, fast_bad, slow_bad]}]
    _mark_faster_below_floor(results)
    assert [r["quality"]["faster_below_floor"] for r in (kept, fast_bad, slow_bad)] == [False, True, False]
    assert quality_cell(fast_bad, PSNR_FLOOR_DB).endswith("faster, but below the 30 dB floor**")
    assert quality_cell(slow_bad, PSNR_FLOOR_DB).endswith(", below the 30 dB floor**")
    assert "floor" not in quality_cell(kept, PSNR_FLOOR_DB)


def test_peers_are_not_scored_where_their_sampler_draws_its_own_noise(models_root):
    """SCM, LCM and re-noising flow Euler add noise between steps, which a peer draws from its own generator: past
    one step its images are not the reference's work, and its row says why instead of reading below the floor."""
    from edgediff.runtime import Bundle

    lcm = Bundle.open(tiny_bundle("tiny-lcm", models_root)).manifest
    euler = Bundle.open(tiny_bundle("tiny-sd1", models_root)).manifest
    assert _peer_noise(lcm, 1) is None  # the last step ends at sigma 0: no noise drawn
    assert "re-noises between steps" in _peer_noise(lcm, 2)
    assert _peer_noise(euler, 2) is None, euler.scheduler["name"]
    row = {"quality": {"why": _peer_noise(lcm, 4)}}
    assert quality_cell(row, PSNR_FLOOR_DB).startswith("not scored: the lcm sampler re-noises")


def test_scores_of_known_images():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    assert score_images(a, a)["psnr"] == math.inf
    b = a.copy()
    b[1, 0, 0, 0] ^= 1  # one value off by one in the second image
    s = score_images(b, a)
    assert math.isfinite(s["psnr"]) and s["psnr_min"] < s["psnr"] and s["n"] == 2
    with pytest.raises(ValueError, match="differ in shape"):
        score_images(a[:, :8], a)


def test_the_cli_takes_a_quality_reference(models_root, tmp_path):
    bundle = str(tiny_bundle("tiny-sd1", models_root))
    args = ["bench", "--model", bundle, "--steps", "1", "--repeat", "1", "--warmup", "0", "--rounds", "1"]
    result = CliRunner().invoke(cli, [*args, "--threads", "2", "--quality", bundle, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "speed_quality.png" in result.output
    assert _no_infinity((tmp_path / "results.json").read_text())["quality_reference"]["bundle"] == bundle
