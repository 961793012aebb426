"""The CLI is thin: it calls the library and turns errors into one line and a non-zero exit."""

import pytest
from click.testing import CliRunner
from PIL import Image

from tiny_models import tiny_bundle, tiny_source

from edgediff.cli.main import cli


def test_generate_writes_the_image_and_is_reproducible(models_root, tmp_path):
    bundle = tiny_bundle("tiny-sd1", models_root)
    runner = CliRunner()
    for name in ("a.png", "b.png"):
        result = runner.invoke(cli, ["generate", "a red circle", "--model", str(bundle), "--steps", "2", "--seed", "7",
                                     "-o", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    a, b = Image.open(tmp_path / "a.png"), Image.open(tmp_path / "b.png")
    assert a.size == (64, 64) and a.tobytes() == b.tobytes()


def test_generate_batch_names_and_seeds(models_root, tmp_path):
    bundle = tiny_bundle("tiny-sd1", models_root)
    result = CliRunner().invoke(cli, ["generate", "a star", "--model", str(bundle), "--steps", "1", "--seed", "3",
                                      "--num-images", "2", "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 0, result.output
    assert "x_0.png (seed 3)" in result.output and "x_1.png (seed 4)" in result.output
    # image 1 of seed 3 is image 0 of seed 4
    single = CliRunner().invoke(cli, ["generate", "a star", "--model", str(bundle), "--steps", "1", "--seed", "4",
                                      "-o", str(tmp_path / "y.png")])
    assert single.exit_code == 0
    assert Image.open(tmp_path / "x_1.png").tobytes() == Image.open(tmp_path / "y.png").tobytes()


@pytest.mark.parametrize("args,message", [
    (["--width", "30"], "error: width must be a positive multiple of 8, got 30"),
    (["--steps", "0"], "error: num_inference_steps must be >= 1, got 0"),
    (["--provider", "warp"], "error: unknown provider 'warp'"),
    (["-o", "/nonexistent-dir/x.png"], "error: cannot write /nonexistent-dir/x.png: folder /nonexistent-dir does not exist"),
])
def test_errors_are_one_line(models_root, args, message):
    bundle = tiny_bundle("tiny-sd1", models_root)
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(bundle), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_missing_bundle(tmp_path):
    result = CliRunner().invoke(cli, ["generate", "x", "--model", str(tmp_path / "none"), "-o", str(tmp_path / "x.png")])
    assert result.exit_code == 1 and "error: no bundle at" in result.output


def test_traceback_on_request(monkeypatch, tmp_path):
    monkeypatch.setenv("EDGEDIFF_DEBUG", "1")
    result = CliRunner().invoke(cli, ["info", str(tmp_path / "none")])
    assert result.exit_code == 1 and result.exception is not None


def test_info_and_providers(models_root):
    bundle = tiny_bundle("tiny-lcm", models_root)
    result = CliRunner().invoke(cli, ["info", str(bundle)])
    assert result.exit_code == 0, result.output
    assert "lcm-sd1" in result.output and "checksums ok" in result.output and "timestep_cond" in result.output
    result = CliRunner().invoke(cli, ["providers"])
    assert result.exit_code == 0 and "CPUExecutionProvider" in result.output and "<- auto" in result.output


def test_export_command(models_root, tmp_path):
    result = CliRunner().invoke(cli, ["export", str(tiny_source("tiny-sd1", models_root)), str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "b" / "manifest.json").is_file()
    again = CliRunner().invoke(cli, ["export", str(tiny_source("tiny-sd1", models_root)), str(tmp_path / "b")])
    assert again.exit_code == 1 and "already exists" in again.output
