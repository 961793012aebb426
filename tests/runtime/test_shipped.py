"""The models that ship with edgediff: present, whole, reproducible from their weights, and drawing what they are
asked."""

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgediff.cli.main import cli
from edgediff.models.shipped import SHIPPED_MODELS, default_bundle, shipped_bundle
from edgediff.runtime import Bundle, Pipeline
from training import checker

SHIPPED_MAX_MB = 50  # diffusers folder + bundles together: small enough to ship inside the package
FLOW_BUNDLE_MAX_MB = 30  # the flow model's bundle (its model card's promise)
REEXPORT_ATOL = 1e-5  # a fresh export runs the same weights through the same exporter


def test_shipped_bundle_is_whole_and_small():
    from training.ship import STUDENT_DIR, TINY_DECODER_DIR

    bundle = Bundle.open(default_bundle())  # sizes and checksums
    assert bundle.manifest.family == "lcm-sd1" and bundle.manifest.defaults["steps"] == 4
    total = sum(
        p.stat().st_size for d in (default_bundle(), STUDENT_DIR, TINY_DECODER_DIR) for p in d.rglob("*") if p.is_file()
    )
    assert total < SHIPPED_MAX_MB * 2**20


def test_flow_bundle_is_whole_and_small():
    from training.ship import FLOW_DEFAULT_STEPS

    bundle = Bundle.open(shipped_bundle("shapes-flow"))  # sizes and checksums
    m = bundle.manifest
    assert m.denoiser == "transformer" and m.conditioning["t5"]
    assert (m.defaults["steps"], m.defaults["guidance"]) == (FLOW_DEFAULT_STEPS, 0.0)
    assert {"vae_encoder", "vae_decoder_tiny"} <= set(m.components)
    assert bundle.size_on_disk <= FLOW_BUNDLE_MAX_MB * 10**6


def test_list_names_every_shipped_model():
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == 0, result.output
    listed = [line.split()[0] for line in result.output.splitlines()[1:]]
    assert listed[: len(SHIPPED_MODELS)] == list(SHIPPED_MODELS)  # the default first
    assert "unreadable" not in result.output


@pytest.mark.parametrize("model", [[], ["--model", "shapes-flow"]], ids=["default", "shapes-flow"])
def test_generate_draws_what_it_is_asked(tmp_path, model):
    out = tmp_path / "out.png"
    result = CliRunner().invoke(
        cli, ["generate", "a large red circle on a blue background", "--seed", "0", "-o", str(out), *model]
    )
    assert result.exit_code == 0, result.output
    reading = checker.read(Image.open(out))
    assert (reading.colour, reading.background) == ("red", "blue")


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
def test_shipped_bundle_equals_a_fresh_export_of_the_shipped_weights(tmp_path, name):
    pytest.importorskip("torch")
    from training.ship import export_shapes_flow, export_shipped

    make = {"shipped": export_shipped, "shapes-flow": export_shapes_flow}[name]
    fresh = Bundle.open(make(tmp_path / "fresh", overwrite=False))
    shipped = Bundle.open(shipped_bundle(name))
    assert set(fresh.manifest.components) == set(shipped.manifest.components) >= {"vae_decoder_tiny"}
    same_files = all(
        fresh.manifest.components[c].files == shipped.manifest.components[c].files for c in shipped.manifest.components
    )
    if not same_files:  # exporter versions may serialise differently: then the outputs must agree
        latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16)).astype(np.float32)
        for decoder in ("full", "tiny"):
            a = Pipeline(fresh)(
                "a small green star at the top on a black background",
                latents=latents,
                seed=0,
                output_type="np",
                decoder=decoder,
            )
            b = Pipeline(shipped)(
                "a small green star at the top on a black background",
                latents=latents,
                seed=0,
                output_type="np",
                decoder=decoder,
            )
            assert np.abs(a.images - b.images).max() <= REEXPORT_ATOL
    assert fresh.manifest.defaults == shipped.manifest.defaults
    assert fresh.manifest.scheduler == shipped.manifest.scheduler


@pytest.mark.parametrize("name", list(SHIPPED_MODELS))
@pytest.mark.parametrize("position", ["left", "right", "top", "bottom", "center"])
def test_shipped_model_puts_the_shape_where_it_is_asked(position, name):
    """Position, the hardest attribute for the models to learn, read back by the checker."""
    pipe = Pipeline.from_bundle(shipped_bundle(name))
    image = pipe(f"a large yellow square at the {position} on a purple background", seed=1).images[0]
    reading = checker.read(image)
    assert (reading.position, reading.colour, reading.background) == (position, "yellow", "purple")
