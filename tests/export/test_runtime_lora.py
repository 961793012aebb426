"""Run-time LoRAs (--lora-slots, `edgediff lora convert`, `loras=`) against the fused export and diffusers."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from click.testing import CliRunner  # noqa: E402
from references import PIXEL_ATOL, reference_pipeline  # noqa: E402
from tiny_models import tiny_bundle, tiny_source  # noqa: E402

from edgediff.cli.main import cli  # noqa: E402
from edgediff.export import ExportOptions, export, export_bundle  # noqa: E402
from edgediff.export.lora_convert import convert_lora  # noqa: E402
from edgediff.runtime import Pipeline  # noqa: E402
from edgediff.runtime.errors import ExportOptionsError, InputError  # noqa: E402
from edgediff.runtime.lora_adapters import ADAPTER_SUFFIX, KEY_SEPARATOR, LORA_FOLDER, MAX_MIXES  # noqa: E402

ARCH = "tiny-sd1"
WEIGHT = 0.7
SECOND_WEIGHT = -0.5
KOHYA_ALPHA = 4.0  # on rank 2: a scale of 2 where the diffusers-layout file says 0.5
PROMPT = "a red circle"
STEPS = 2
# (LoRA name, UNet modules, text encoder modules, rank, alpha): alpha != rank, so the scale is folded in. out_proj
# is among the CLIP layers because diffusers converts kohya's CLIP attention keys only when it is there
LORAS = {
    "attn": (["to_q", "to_k", "to_v", "to_out.0"], [], 4, 8),
    "ff-te": (["proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"], ["q_proj", "v_proj", "out_proj", "fc1"], 2, 1),
}


def _save_random_lora(root, name: str):
    """A LoRA with random A and B saved as diffusers saves one, alpha recorded in its metadata."""
    from peft import LoraConfig, get_peft_model_state_dict

    from edgediff.export.source import load_pipeline

    unet_modules, te_modules, rank, alpha = LORAS[name]
    pipe = load_pipeline(str(tiny_source(ARCH, root)))
    torch.manual_seed(len(name))
    layers, metadata = {}, {}
    for part, modules in (("unet", unet_modules), ("text_encoder", te_modules)):
        if not modules:
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=False, target_modules=modules)
        model = getattr(pipe, part)
        model.add_adapter(config)
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(model)
        metadata[f"{part}_lora_adapter_metadata"] = config.to_dict()
    out = root / f"runtime-lora-{name}"
    type(pipe).save_lora_weights(out, **layers, **metadata)
    return out / "pytorch_lora_weights.safetensors"


def _kohya_copy(file, alpha: float):
    """The same LoRA in kohya's layout, its alphas (which kohya files carry per layer) set to `alpha`."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    kohya = convert_state_dict_to_kohya(load_file(file))
    kohya = {k: torch.tensor(alpha) if k.endswith(".alpha") else v for k, v in kohya.items()}
    out = file.with_name("kohya.safetensors")
    save_file(kohya, out)
    return out


@pytest.fixture(scope="module")
def setup(models_root, tmp_path_factory):
    """The slotted bundle with both LoRAs converted, and the LoRA files."""
    files = {name: _save_random_lora(models_root, name) for name in LORAS}
    bundle = export(
        str(tiny_source(ARCH, models_root)),
        tmp_path_factory.mktemp("slots") / "bundle",
        ExportOptions(lora_slots="transformer"),
        progress=False,
    )
    for name, file in files.items():
        convert_lora(file, bundle, name)
    return bundle, files


def _latents(manifest):
    side = manifest.defaults["height"] // manifest.vae_scale_factor
    return np.random.default_rng(0).standard_normal((1, manifest.latent_channels, side, side)).astype(np.float32)


def _ours(pipe, loras=None):
    latents = _latents(pipe.manifest)
    return pipe(PROMPT, latents=latents, num_inference_steps=STEPS, output_type="np", loras=loras).images


def _diffusers(source, manifest, monkeypatch, files, weights):
    ref = reference_pipeline("text2img", source, manifest, manifest.scheduler["name"], [], monkeypatch)
    for name, file in files.items():
        ref.load_lora_weights(str(file), adapter_name=name)
    ref.set_adapters(list(files), adapter_weights=list(weights))
    latents = torch.from_numpy(_latents(manifest))
    guidance = manifest.defaults["guidance"]
    return ref(PROMPT, latents=latents, num_inference_steps=STEPS, guidance_scale=guidance, output_type="np").images


def test_slots_record_their_layers_and_check(setup):
    bundle, _ = setup
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    for component in ("unet", "text_encoder"):
        record = pipe.manifest.components[component].attributes["lora_slots"]
        assert record["layers"] == "transformer"
        assert record["check"]["identical_without_lora"]
        assert record["slots"]
    assert pipe.loras.known() == sorted(LORAS)


def test_one_lora_matches_fused_export_and_diffusers(setup, models_root, tmp_path, monkeypatch):
    bundle, files = setup
    source = str(tiny_source(ARCH, models_root))
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    for name in LORAS:  # a UNet-only LoRA, and one on the UNet and the text encoder
        ours = _ours(pipe, {name: WEIGHT})
        theirs = _diffusers(source, pipe.manifest, monkeypatch, {name: files[name]}, [WEIGHT])
        assert np.abs(ours - theirs).max() <= PIXEL_ATOL
        assert np.abs(ours - _ours(pipe)).max() > PIXEL_ATOL  # the LoRA really changes the image
    # the same LoRA fused at export (one export: the LoRA on both graphs)
    fused_bundle = export_bundle(source, tmp_path / "fused", loras=[(str(files["ff-te"]), WEIGHT)], progress=False)
    fused = _ours(Pipeline.from_bundle(fused_bundle, provider="cpu"))
    assert np.abs(ours - fused).max() <= PIXEL_ATOL


def test_kohya_layout_matches_diffusers(setup, models_root, monkeypatch):
    bundle, files = setup
    source = str(tiny_source(ARCH, models_root))
    kohya = _kohya_copy(files["ff-te"], alpha=KOHYA_ALPHA)
    convert_lora(kohya, bundle, "kohya")
    try:
        pipe = Pipeline.from_bundle(bundle, provider="cpu")
        ours = _ours(pipe, {"kohya": WEIGHT})
        theirs = _diffusers(source, pipe.manifest, monkeypatch, {"kohya": kohya}, [WEIGHT])
        assert np.abs(ours - theirs).max() <= PIXEL_ATOL
        assert np.abs(ours - _ours(pipe, {"ff-te": WEIGHT})).max() > PIXEL_ATOL  # its alphas differ from the metadata's
    finally:
        (bundle / LORA_FOLDER / f"kohya{ADAPTER_SUFFIX}").unlink()


def test_two_loras_at_once_match_diffusers(setup, models_root, monkeypatch):
    bundle, files = setup
    source = str(tiny_source(ARCH, models_root))
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    ours = _ours(pipe, {"attn": WEIGHT, "ff-te": SECOND_WEIGHT})
    theirs = _diffusers(source, pipe.manifest, monkeypatch, files, [WEIGHT, SECOND_WEIGHT])
    assert np.abs(ours - theirs).max() <= PIXEL_ATOL
    assert np.abs(ours - _ours(pipe, {"attn": WEIGHT})).max() > PIXEL_ATOL


def test_switching_back_to_none_is_the_plain_bundle_exactly(setup, models_root):
    bundle, _ = setup
    plain = _ours(Pipeline.from_bundle(tiny_bundle(ARCH, models_root), provider="cpu"))
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    first = _ours(pipe)
    with_lora = _ours(pipe, {"attn": WEIGHT})
    assert np.array_equal(first, plain)
    assert np.array_equal(_ours(pipe, {"attn": WEIGHT, "ff-te": 0.0}), with_lora)  # weight 0 is no LoRA
    assert np.array_equal(_ours(pipe, {}), plain)
    assert np.array_equal(_ours(pipe, {"attn": 0.0}), plain)
    assert np.array_equal(_ours(pipe, {"attn": WEIGHT}), with_lora)  # the same mix again: the kept adapters
    for weight in (0.1, 0.2, 0.3, 0.4, 0.5):  # more mixes than are kept: the oldest go, their files too
        pipe.loras.adapters({"attn": weight})
    assert len(list(pipe.loras._workdir.iterdir())) == MAX_MIXES
    assert np.array_equal(_ours(pipe, {"attn": WEIGHT}), with_lora)  # built again


def test_bad_lora_arguments(setup, models_root):
    bundle, _ = setup
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    with pytest.raises(InputError, match=r"no LoRA named 'nope'.*known: attn, ff-te"):
        _ours(pipe, {"nope": 1.0})
    with pytest.raises(InputError, match="weight must be a finite number"):
        _ours(pipe, {"attn": "strong"})
    with pytest.raises(InputError, match="must be a dict"):
        _ours(pipe, ["attn"])
    plain = Pipeline.from_bundle(tiny_bundle(ARCH, models_root), provider="cpu")
    with pytest.raises(InputError, match="takes no run-time LoRAs: export it with --lora-slots"):
        _ours(plain, {"attn": 1.0})


def test_a_file_mixing_peft_and_diffusers_key_names_converts_as_the_peft_one(setup, tmp_path):
    """diffusers' training scripts save UNet keys in both PEFT's names and the older `lora.down` ones."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from edgediff.runtime.lora_adapters import ADAPTER_SUFFIX, LORA_FOLDER, read_adapter

    bundle, files = setup
    name = next(iter(files))
    weights = load_file(files[name])
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in weights if k.startswith("unet.")})
    renamed = set(modules[1::2])  # every other UNet layer in the older names; the first stays PEFT's
    mixed = {}
    for key, value in weights.items():
        old = key.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")
        mixed[old if key.rsplit(".lora_", 1)[0] in renamed else key] = value
    assert any(".lora.down." in k for k in mixed) and any(".lora_A." in k for k in mixed)
    with safe_open(files[name], "pt") as f:  # the LoRA configs (alphas) travel in the file's metadata
        metadata = f.metadata()
    save_file(mixed, tmp_path / "mixed.safetensors", metadata=metadata)
    convert_lora(tmp_path / "mixed.safetensors", bundle, "mixed")
    try:
        got = read_adapter(bundle / LORA_FOLDER / f"mixed{ADAPTER_SUFFIX}")
        want = read_adapter(bundle / LORA_FOLDER / f"{name}{ADAPTER_SUFFIX}")
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)
    finally:
        (bundle / LORA_FOLDER / f"mixed{ADAPTER_SUFFIX}").unlink()


def test_a_call_with_a_lora_runs_its_graphs_unbound(setup, monkeypatch):
    """onnxruntime's I/O-bound runs (GPUs) ignore active adapters: a graph with one runs unbound, the others
    as they would."""
    from edgediff.runtime.shape_sessions import ShapeSessions

    bound = {}
    real = ShapeSessions.run

    def run(self, feeds, run_options, bound_run=True, **kwargs):
        bound.setdefault(self.name, set()).add(kwargs.get("bound", bound_run))
        return real(self, feeds, run_options, kwargs.get("bound", bound_run))

    monkeypatch.setattr(ShapeSessions, "run", run)
    bundle, _ = setup
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    _ours(pipe, {"attn": 0.7})
    assert bound["unet"] == {False} and bound["vae_decoder"] == {True}
    bound.clear()
    _ours(pipe, None)
    assert bound["unet"] == {True}


def test_a_pipeline_never_closed_leaves_no_mix_files(setup):
    import gc

    bundle, _ = setup
    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    _ours(pipe, {"attn": 0.7})
    workdir = pipe.loras._workdir
    assert workdir is not None and any(workdir.iterdir())
    del pipe
    gc.collect()
    assert not workdir.exists()


def test_an_adapter_linked_from_outside_the_bundle_is_not_read(setup, tmp_path):
    """A bundle is data: an adapter symlinked to a file outside the bundle is refused, not read."""
    from edgediff.runtime.errors import BundleError

    bundle, _ = setup
    outside = tmp_path / f"elsewhere{ADAPTER_SUFFIX}"
    outside.write_bytes((bundle / LORA_FOLDER / f"attn{ADAPTER_SUFFIX}").read_bytes())
    link = bundle / LORA_FOLDER / f"linked{ADAPTER_SUFFIX}"
    link.symlink_to(outside)
    try:
        pipe = Pipeline.from_bundle(bundle, provider="cpu")
        with pytest.raises(BundleError, match="outside its folder"):
            _ours(pipe, {"linked": 1.0})
    finally:
        link.unlink()


def test_lora_for_another_architecture_is_refused_naming_layers(setup, tmp_path):
    from safetensors.torch import save_file

    bundle, _ = setup
    prefix = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    foreign = {  # a wider to_q, and a block this UNet does not have
        f"{prefix}.to_q.lora_A.weight": torch.zeros(4, 320),
        f"{prefix}.to_q.lora_B.weight": torch.zeros(320, 4),
        "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight": torch.zeros(4, 16),
        "unet.down_blocks.3.attentions.0.transformer_blocks.0.attn1.to_k.lora_B.weight": torch.zeros(16, 4),
    }
    save_file(foreign, tmp_path / "foreign.safetensors")
    with pytest.raises(
        InputError, match=r"2 layers do not match.*attn1\.to_q \(320x4 x 4x320.*down_blocks\.3.*no slot"
    ):
        convert_lora(tmp_path / "foreign.safetensors", bundle, "foreign")
    assert not (bundle / LORA_FOLDER / f"foreign{ADAPTER_SUFFIX}").exists()

    # an adapter file copied from another bundle is refused at run time the same way
    import onnxruntime as ort

    fmt = ort.AdapterFormat()
    key = f"unet{KEY_SEPARATOR}lora.{prefix[5:]}.to_q"
    fmt.set_parameters(
        {
            f"{key}.down": ort.OrtValue.ortvalue_from_numpy(np.zeros((320, 4), np.float32)),
            f"{key}.up": ort.OrtValue.ortvalue_from_numpy(np.zeros((4, 320), np.float32)),
        }
    )
    copied = bundle / LORA_FOLDER / f"copied{ADAPTER_SUFFIX}"
    fmt.export_adapter(str(copied))
    try:
        with pytest.raises(InputError, match=r"LoRA 'copied' does not fit .* 1 layers do not match.*to_q"):
            _ours(Pipeline.from_bundle(bundle, provider="cpu"), {"copied": 1.0})
    finally:
        copied.unlink()


def test_lora_slots_refuse_quantised_and_fused_graphs():
    for precision in ("int8", "int8-static", "int4"):
        with pytest.raises(ExportOptionsError, match=f"--lora-slots does not combine with --precision {precision}"):
            ExportOptions(lora_slots="attention", precision=precision)
    with pytest.raises(ExportOptionsError, match="--optimize"):
        ExportOptions(lora_slots="attention", optimize="cpu")
    with pytest.raises(ExportOptionsError, match="lora_slots must be one of"):
        ExportOptions(lora_slots="everything")


def test_cli_converts_and_generates_with_a_lora(setup, tmp_path):
    bundle, files = setup
    runner = CliRunner()
    result = runner.invoke(cli, ["lora", "convert", str(files["attn"]), "--model", str(bundle), "--name", "cli-attn"])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(cli, ["lora", "list", "--model", str(bundle)])
    assert "cli-attn" in listed.output.split()
    out = tmp_path / "lora.png"
    args = ["generate", PROMPT, "--model", str(bundle), "--steps", "1", "--seed", "0", "--provider", "cpu"]
    result = runner.invoke(cli, [*args, "--lora", "cli-attn:0.7", "--lora", "ff-te", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.is_file()
    result = runner.invoke(cli, [*args, "--lora", "missing", "-o", str(out)])
    assert result.exit_code == 1 and "known: attn, cli-attn, ff-te" in result.output
    (bundle / LORA_FOLDER / f"cli-attn{ADAPTER_SUFFIX}").unlink()


ISOLATED = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):  # as if the PyTorch stack and onnx were not installed
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"torch", "transformers", "diffusers", "optimum", "onnx", "peft"}:
            raise ImportError(f"blocked: {name}")

sys.meta_path.insert(0, Block())
from edgediff.runtime import Pipeline
pipe = Pipeline.from_bundle(sys.argv[1], provider="cpu")
pipe("a red circle", num_inference_steps=1, seed=1, loras={"attn": 0.7, "ff-te": 1.0})
print("ok")
"""


def test_run_time_loras_need_no_pytorch(setup):
    import subprocess
    import sys

    bundle, _ = setup
    proc = subprocess.run([sys.executable, "-c", ISOLATED, str(bundle)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "ok"
