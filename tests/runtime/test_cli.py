"""The CLI is thin: it calls the library and turns errors into one line and a non-zero exit."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from tiny_models import tiny_bundle, tiny_source

from edgediff.cli.main import cli
from edgediff.runtime.errors import BundleError


def test_generate_writes_the_image_and_is_reproducible(models_root, tmp_path):
    bundle = tiny_bundle("tiny-sd1", models_root)
    runner = CliRunner()
    for name in ("a.png", "b.png"):
        result = runner.invoke(
            cli,
            [
                "generate",
                "a red circle",
                "--model",
                str(bundle),
                "--steps",
                "2",
                "--seed",
                "7",
                "-o",
                str(tmp_path / name),
            ],
        )
        assert result.exit_code == 0, result.output
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_generate_batch_names_and_seeds(models_root, tmp_path):
    bundle = tiny_bundle("tiny-sd1", models_root)
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "a star",
            "--model",
            str(bundle),
            "--steps",
            "1",
            "--seed",
            "3",
            "--num-images",
            "2",
            "-o",
            str(tmp_path / "x.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "x_0.png (seed 3)" in result.output and "x_1.png (seed 4)" in result.output
    # image 1 of seed 3 is image 0 of seed 4
    single = CliRunner().invoke(
        cli,
        ["generate", "a star", "--model", str(bundle), "--steps", "1", "--seed", "4", "-o", str(tmp_path / "y.png")],
    )
    assert single.exit_code == 0
    assert Image.open(tmp_path / "x_1.png").tobytes() == Image.open(tmp_path / "y.png").tobytes()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--width", "30"], "error: width must be a positive multiple of 8, got 30"),
        (["--steps", "0"], "error: num_inference_steps must be >= 1, got 0"),
        (["--provider", "warp"], "error: unknown provider 'warp'"),
        (
            ["-o", "/nonexistent-dir/x.png"],
            "error: cannot write /nonexistent-dir/x.png: folder /nonexistent-dir does not exist",
        ),
    ],
)
def test_errors_are_one_line(models_root, args, message):
    bundle = tiny_bundle("tiny-sd1", models_root)
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(bundle), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_missing_bundle(tmp_path):
    result = CliRunner().invoke(
        cli, ["generate", "x", "--model", str(tmp_path / "none"), "-o", str(tmp_path / "x.png")]
    )
    assert result.exit_code == 1 and "error: no bundle at" in result.output


def test_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEDIFF_DEBUG", "1")
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "none")])
    # the error itself propagates (click's runner keeps it), not the SystemExit of the one-line path
    assert isinstance(result.exception, BundleError), repr(result.exception)


def test_info_and_providers(models_root):
    bundle = tiny_bundle("tiny-lcm", models_root)
    result = CliRunner().invoke(cli, ["info", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "lcm-sd1" in result.output and "checksums ok" in result.output and "timestep_cond" in result.output
    shipped = CliRunner().invoke(cli, ["info", "shipped"])  # a UNet halving 4-pixel cells twice
    assert shipped.exit_code == 0 and "multiples of 16 pixels a side" in shipped.output, shipped.output
    result = CliRunner().invoke(cli, ["providers"])
    assert result.exit_code == 0 and "onnxruntime" in result.output and "<- auto" in result.output


def test_families_and_sdxl_info(models_root):
    from edgediff.export.families import FAMILIES

    result = CliRunner().invoke(cli, ["families"])
    assert result.exit_code == 0
    listed = [line.split()[0] for line in result.output.splitlines()[1:]]
    assert listed == [f.name for f in FAMILIES]  # detection order, most specific first
    result = CliRunner().invoke(cli, ["info", str(tiny_bundle("tiny-sdxl", models_root))])
    assert result.exit_code == 0, result.output
    assert "text_encoder_2 (hidden_states.2, pooled text_embeds); size/crop conditions" in result.output


def test_export_command(models_root, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tiny_source("tiny-sd1", models_root)), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "manifest.json").is_file()
    again = CliRunner().invoke(cli, ["export", str(tiny_source("tiny-sd1", models_root)), str(tmp_path / "b")])
    assert again.exit_code == 1 and "already exists" in again.output


def test_coreml_only_export_options_are_refused_for_onnx(tmp_path):
    for option in (["--palettize", "6"], ["--attention", "split_einsum"]):
        result = CliRunner().invoke(cli, ["export", "some/model", str(tmp_path / "b"), *option])
        assert result.exit_code == 2 and "apply to --target coreml" in result.output, result.output
    assert not (tmp_path / "b").exists()


def test_list_finds_bundles_in_the_models_folder_and_generate_takes_their_name(models_root, tmp_path, monkeypatch):
    import shutil

    folder = tmp_path / "user-models"
    shutil.copytree(tiny_bundle("tiny-sd1", models_root), folder / "my-sd1")
    (folder / "broken").mkdir()
    (folder / "broken" / "manifest.json").write_text("{not json")
    (folder / "not-a-bundle").mkdir()
    monkeypatch.setenv("EDGEDIFF_MODELS_DIR", str(folder))
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert any(line.startswith("shipped") and "lcm-sd1" in line and "full+tiny" in line for line in lines)
    assert any(line.startswith("my-sd1") and "sd1" in line for line in lines)
    assert any(line.startswith("broken") and "unreadable" in line for line in lines)
    assert not any(line.startswith("not-a-bundle") for line in lines)

    out = tmp_path / "named.png"
    result = CliRunner().invoke(
        cli, ["generate", "a cat", "--model", "my-sd1", "--seed", "1", "--steps", "2", "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    from edgediff.runtime import Pipeline

    direct = Pipeline.from_bundle(folder / "my-sd1")("a cat", seed=1, num_inference_steps=2).images[0]
    with Image.open(out) as image:
        assert np.array_equal(np.asarray(image), np.asarray(direct))  # the named bundle, not the shipped one
    result = CliRunner().invoke(cli, ["generate", "a cat", "--model", "nobody", "-o", str(out)])
    assert result.exit_code == 1
    assert "no bundle named 'nobody'" in result.output and str(folder) in result.output


def test_generate_with_tiny_decoder_low_memory_and_tiles(tmp_path):
    out = tmp_path / "fast.png"
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "a small white square on a black background",
            "--seed",
            "2",
            "--decoder",
            "tiny",
            "--low-memory",
            "--decode-tile",
            "8",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.size == (64, 64)


def test_generate_image_to_image(tmp_path):
    from training import checker

    start = tmp_path / "start.png"
    Image.new("RGB", (64, 64), (30, 60, 220)).save(start)  # plain blue
    out = tmp_path / "edited.png"
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "a large red circle on a blue background",
            "--image",
            str(start),
            "--strength",
            "0.75",
            "--seed",
            "0",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert checker.read(image).background == "blue"


def test_generate_inpaint_and_outpaint(tmp_path):
    start, mask = tmp_path / "start.png", tmp_path / "mask.png"
    Image.new("RGB", (64, 64), (30, 60, 220)).save(start)
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    out = tmp_path / "inpainted.png"
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "a large red square on a blue background",
            "--image",
            str(start),
            "--mask",
            str(mask),
            "--seed",
            "0",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.getpixel((2, 2)) == (30, 60, 220)  # outside the mask: the original pixel
    wide = tmp_path / "wide.png"
    result = CliRunner().invoke(
        cli,
        [
            "generate",
            "a blue background",
            "--image",
            str(start),
            "--outpaint",
            "8,0,8,0",
            "--seed",
            "0",
            "-o",
            str(wide),
        ],
    )
    assert result.exit_code == 0, result.output
    with Image.open(wide) as image:
        assert image.size == (80, 64) and image.getpixel((40, 32)) == (30, 60, 220)
    result = CliRunner().invoke(cli, ["generate", "x", "--outpaint", "8,8", "--image", str(start), "-o", str(wide)])
    assert result.exit_code != 0 and "four integers" in result.output
