"""int8 and 4-bit bundles: exported from the checked fp32 graphs, recorded in the manifest, judged by
image metrics against fp32 on the shipped model."""

from pathlib import Path

import numpy as np
import pytest
from tiny_models import tiny_bundle, tiny_source

from edgediff.benchmarks.metrics import psnr
from edgediff.runtime import Bundle, Pipeline

pytest.importorskip("torch")

# Shipped model, each precision's images vs fp32's from the same seeds: mean PSNR over EVAL_IMAGES
# eval prompts: the floor every quantised bundle must hold (measured figures: docs/benchmarks.md).
PSNR_FLOOR_DB = 30.0
EVAL_IMAGES = 16


@pytest.fixture(scope="module")
def shipped_quantised(tmp_path_factory):
    from edgediff.export import export_bundle
    from training.evaluate import eval_prompts
    from training.ship import DEFAULT_STEPS, STUDENT_DIR, TINY_DECODER_DIR
    from training.shipped_config import ShippedConfig

    root = tmp_path_factory.mktemp("quantised")
    prompts = [s.caption for s in eval_prompts(8, seed=123)]  # calibration: domain captions, not the eval ones
    # name -> (precision, attention); fused attention with int8-static is the fastest CPU configuration
    configs = {p: (p, "original") for p in ("int8", "int8-static", "int4")}
    configs["int8-static-fused"] = ("int8-static", "fused")
    return {
        name: export_bundle(
            str(STUDENT_DIR),
            root / name,
            precision=precision,
            attention=attention,
            progress=False,
            default_steps=DEFAULT_STEPS,
            default_guidance=ShippedConfig().default_guidance,
            tiny_decoder=str(TINY_DECODER_DIR),
            keep="auto",
            calibration_prompts=prompts,
        )
        for name, (precision, attention) in configs.items()
    }


@pytest.mark.parametrize("precision", ["int8", "int8-static", "int4"])
def test_quantised_bundle_exports_loads_and_generates(models_root, precision):
    from edgediff.export.quantize import QUANT_POLICY, SCHEMES

    path = tiny_bundle("tiny-sd1", models_root, precision=precision)
    manifest = Bundle.open(path, verify="full").manifest
    # every file checksummed, the quantised graphs' and the fp32 ones kept as exported alike (their checksums are
    # taken once the bundle's files are final: checksums.BackgroundChecksums)
    assert all("sha256" in f for spec in manifest.components.values() for f in spec.files.values())
    for name in ("text_encoder", "unet"):
        spec = manifest.components[name]
        record = spec.attributes["quantization"]
        assert record["scheme"] == QUANT_POLICY[precision][name] and record["quantised_nodes"] > 0
        assert spec.precision == SCHEMES[record["scheme"]].precision
        # 4-bit weights beside the graph, memory-mapped at run time; int8 ones (dynamic and static) where their
        # quantiser writes them, a weight at a time, however small the graph
        assert f"{name}.onnx.data" in spec.files, spec.files
    assert manifest.components["vae_decoder"].precision == "fp32"
    assert manifest.components["vae_decoder"].attributes["quantization"]["scheme"] is None
    fp32 = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))(
        "a cat", seed=0, num_inference_steps=2, output_type="np"
    )
    out = Pipeline.from_bundle(path)("a cat", seed=0, num_inference_steps=2, output_type="np")
    assert np.isfinite(out.images).all() and out.images.shape == fp32.images.shape
    assert not np.array_equal(out.images, fp32.images)  # really a different graph


def test_int8_static_attention_softmax_stays_float(models_root, tmp_path):
    """The graph onnxruntime runs for an int8-static UNet: integer convolutions and MatMuls, but every attention
    softmax in float (its fused QLinearSoftmax was the slowest kernel of the full-size UNet on CPU)."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimised.onnx")
    ort.InferenceSession(
        str(tiny_bundle("tiny-sd1", models_root, precision="int8-static") / "unet.onnx"),
        options,
        providers=["CPUExecutionProvider"],
    )
    ops = [n.op_type for n in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.node]
    assert "Softmax" in ops and "QLinearSoftmax" not in ops
    assert "QLinearConv" in ops and "MatMulIntegerToFloat" in ops


def test_int8_static_tiny_decoder_is_quantised_layer_by_layer(models_root, tmp_path):
    """int8-static bundles quantise the tiny decoder too (its 3x3 convolutions run as QLinearConv), calibrated
    on the latents it decodes, with the sensitivity pass ranking each of its layers, not the whole decoder."""
    from tiny_models import tiny_autoencoder_tiny, tiny_bundle_with_tiny_decoder

    from edgediff.export import export_bundle

    path = export_bundle(
        str(tiny_source("tiny-sd1", models_root)),
        tmp_path / "int8s",
        precision="int8-static",
        tiny_decoder=str(tiny_autoencoder_tiny(models_root)),
        keep="auto",
        progress=False,
    )
    spec = Bundle.open(path).manifest.components["vae_decoder_tiny"]
    record = spec.attributes["quantization"]
    assert spec.precision == "int8-static" and record["scheme"] == "int8-static" and record["quantised_nodes"] > 0
    blocks = list(record["block_errors"])
    assert len(blocks) > 1 and all(b.startswith("decoder/layers.") for b in blocks), blocks
    fp32 = Pipeline.from_bundle(tiny_bundle_with_tiny_decoder(models_root))(
        "a cat", seed=0, num_inference_steps=2, output_type="np", decoder="tiny"
    )
    out = Pipeline.from_bundle(path)("a cat", seed=0, num_inference_steps=2, output_type="np", decoder="tiny")
    assert np.isfinite(out.images).all() and not np.array_equal(out.images, fp32.images)


def test_sensitivity_keeps_blocks_until_the_budget_holds(models_root, tmp_path):
    from edgediff.export.calibration import record_feeds
    from edgediff.export.quantize import SCHEMES, quantize_component

    bundle = tiny_bundle("tiny-sd1", models_root)
    feeds = record_feeds(bundle, prompts=["a cat", "a dog"])["unet"]
    src = bundle / "unet.onnx"
    everything = quantize_component(src, tmp_path / "all.onnx", SCHEMES["int4-weight-only"], feeds, keep="none")
    assert everything["kept_fp32"] == {} and everything["error"] > 0
    strict = quantize_component(
        src, tmp_path / "strict.onnx", SCHEMES["int4-weight-only"], feeds, keep="auto", budget=0.0
    )
    assert set(strict["kept_fp32"]) == set(strict["block_errors"]) and strict["error"] == 0.0
    loose = quantize_component(
        src, tmp_path / "loose.onnx", SCHEMES["int4-weight-only"], feeds, keep="auto", budget=1.0
    )
    assert loose["kept_fp32"] == {} and loose["error"] == pytest.approx(everything["error"])
    assert list(strict["block_errors"].values()) == sorted(strict["block_errors"].values(), reverse=True)
    middle = quantize_component(
        src, tmp_path / "mid.onnx", SCHEMES["int4-weight-only"], feeds, keep="auto", budget=everything["error"] * 0.999
    )
    # the block whose quantisation costs the output most (measured alone) goes first
    costs = middle["sensitivity"]["output_errors"]
    assert next(iter(middle["kept_fp32"])) == max(costs, key=costs.get)
    assert middle["error"] <= everything["error"] * 0.999 and middle["kept_fp32"]
    with pytest.raises(ValueError, match="no quantisable block named"):
        quantize_component(src, tmp_path / "x.onnx", SCHEMES["int8-dynamic"], feeds, keep=["no_such_block"])


def test_ranking_crops_the_one_image_input_to_its_centre():
    from onnx import TensorProto, helper

    from edgediff.export.quantize import ranking_feed

    def graph(*inputs):
        values = [helper.make_tensor_value_info(name, TensorProto.FLOAT, shape) for name, shape in inputs]
        return helper.make_model(helper.make_graph([], "g", values, []))

    unet = graph(("sample", ["batch", 4, "height", "width"]), ("states", ["batch", "tokens", 8]))
    sample = np.arange(2 * 4 * 64 * 84, dtype=np.float32).reshape(2, 4, 64, 84)
    states = np.ones((2, 7, 8), np.float32)
    ranked = ranking_feed(unet, {"sample": sample, "states": states})
    np.testing.assert_array_equal(ranked["sample"], sample[:, :, 16:48, 22:62])  # 32 x 40 latent cells, centred
    assert ranked["states"] is states
    # a crop would leave a side under MIN_REDUCED_CELLS (mostly border): whole
    small = {"sample": sample[:, :, :16, :], "states": states}
    assert ranking_feed(unet, small)["sample"] is small["sample"]
    # two image inputs (a ControlNet's residuals, say) or none: whole feeds
    two = graph(("sample", ["batch", 4, "height", "width"]), ("residual", ["batch", 4, "h", "w"]))
    feed = {"sample": sample, "residual": sample}
    assert ranking_feed(two, feed) == feed
    fixed = graph(("sample", [2, 4, 64, 48]))
    assert ranking_feed(fixed, {"sample": sample})["sample"] is sample


# int8-static through the tiny decoder (both in static int8) is judged against fp32's own tiny decoder
@pytest.mark.parametrize(
    "precision,decoder",
    [
        ("int8", "full"),
        ("int8-static", "full"),
        ("int8-static", "tiny"),
        ("int8-static-fused", "tiny"),
        ("int4", "full"),
    ],
)
def test_shipped_model_quantised_images_stay_above_the_psnr_floor(shipped_quantised, precision, decoder):
    from edgediff.models.shipped import default_bundle
    from training.evaluate import eval_prompts

    manifest = Bundle.open(shipped_quantised[precision]).manifest
    assert "block_errors" in manifest.components["unet"].attributes["quantization"]  # keep=auto ran
    ref, quant = Pipeline.from_bundle(default_bundle()), Pipeline.from_bundle(shipped_quantised[precision])
    scores = [
        psnr(
            ref(s.caption, seed=i, output_type="np", decoder=decoder).images,
            quant(s.caption, seed=i, output_type="np", decoder=decoder).images,
        )
        for i, s in enumerate(eval_prompts(EVAL_IMAGES))
    ]
    assert np.mean(scores) >= PSNR_FLOOR_DB, f"mean PSNR {np.mean(scores):.1f} dB (min {np.min(scores):.1f})"


# int4 and int8-static are the small bundles: --keep auto must leave most of the UNet quantised (4 and 8 bits
# against 32), so its files take at most this share of the fp32 UNet's
SMALL_UNET_SHARE = 0.5


@pytest.mark.parametrize("precision", ["int8-static", "int4"])
def test_shipped_model_small_precisions_keep_most_of_the_unet_quantised(shipped_quantised, precision):
    from edgediff.models.shipped import default_bundle

    def unet(folder: Path):
        return Bundle.open(folder).manifest.components["unet"]

    def unet_bytes(folder: Path) -> int:
        return sum((Path(folder) / f).stat().st_size for f in unet(folder).files)

    share = unet_bytes(shipped_quantised[precision]) / unet_bytes(default_bundle())
    kept = unet(shipped_quantised[precision]).attributes["quantization"]["kept_fp32"]
    assert share <= SMALL_UNET_SHARE, f"{precision} UNet {share:.0%} of fp32's, {len(kept)} blocks kept: {list(kept)}"


def test_unknown_precision_is_refused(models_root, tmp_path):
    from edgediff.export import export_bundle

    with pytest.raises(ValueError, match="precision must be one of"):
        export_bundle(str(tiny_source("tiny-sd1", models_root)), tmp_path / "x", precision="int3", progress=False)


def test_recording_one_graph_at_a_time_records_the_same_feeds(models_root):
    """Low-memory recording (graphs opened and closed in turn) sees what recording with every graph open does."""
    from edgediff.export.calibration import record_feeds

    atol = 1e-4  # low-memory sessions skip onnxruntime's layout rewrites: fp32 sums in another order

    bundle = tiny_bundle("tiny-sd1", models_root)
    together = record_feeds(bundle, prompts=["a cat", "a dog"], components=["text_encoder", "unet"])
    alone = record_feeds(bundle, prompts=["a cat", "a dog"], components=["text_encoder", "unet"], one_at_a_time=True)
    for name in ("text_encoder", "unet"):
        assert len(alone[name]) == len(together[name]) > 0
        for a, b in zip(alone[name], together[name]):
            assert a.keys() == b.keys()
            for k in a:
                np.testing.assert_allclose(a[k], b[k], rtol=0, atol=atol)
        for a, b in zip(alone[name].outputs, together[name].outputs):
            np.testing.assert_allclose(a, b, rtol=0, atol=atol)


def test_graphs_quantised_side_by_side_are_those_quantised_one_at_a_time(models_root, tmp_path, monkeypatch):
    """Where memory allows, the denoiser is quantised beside the other graphs, on two threads
    (bundle_quantize.quantize_bundle): every graph and manifest record is what quantising one at a time makes. Two
    static int8 graphs (the UNet and the tiny decoder) are quantised at once, each reading its own weights through
    the exporter's swapped onnxruntime functions (module_patches.py)."""
    import threading
    import time

    import onnx
    from tiny_models import tiny_autoencoder_tiny

    from edgediff.export import export_bundle, memory_plan, quantize, text_ahead

    spans, real = {}, quantize.quantize_component
    monkeypatch.setattr(text_ahead, "quantise_ahead", lambda *args: False)  # every graph quantised in this process

    def timed(src, *args, **kwargs):
        start = time.perf_counter()
        try:
            return real(src, *args, **kwargs)
        finally:
            spans[src.stem] = (threading.current_thread().name, start, time.perf_counter())

    monkeypatch.setattr(quantize, "quantize_component", timed)
    bundles = {}
    for side_by_side in (False, True):
        monkeypatch.setattr(memory_plan, "quantise_side_by_side", lambda graphs, free, on=side_by_side: on)
        spans.clear()
        bundles[side_by_side] = export_bundle(
            str(tiny_source("tiny-sd1", models_root)),
            tmp_path / f"side-by-side-{side_by_side}",
            precision="int8-static",
            tiny_decoder=str(tiny_autoencoder_tiny(models_root)),
            keep="auto",
            progress=False,
        )
        threads = {name for name, _, _ in spans.values()}
        assert set(spans) == {"text_encoder", "unet", "vae_decoder_tiny"} and len(threads) == (2 if side_by_side else 1)
    # beside it: the UNet's quantisation overlapped the others'
    _, unet_start, unet_end = spans["unet"]
    assert any(start < unet_end and end > unet_start for name, (_, start, end) in spans.items() if name != "unet")

    def graph(path):
        model = onnx.load(str(path))
        nodes = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
        return nodes, {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}

    one, two = (Bundle.open(bundles[k]).manifest for k in (False, True))
    for name in spans:
        assert two.components[name].attributes["quantization"] == one.components[name].attributes["quantization"]
        assert graph(bundles[True] / f"{name}.onnx") == graph(bundles[False] / f"{name}.onnx"), name


@pytest.mark.parametrize("limit", [None, 0])  # the outputs' limit as it stands, or none small enough
def test_the_final_check_runs_small_graphs_feeds_side_by_side_with_the_same_values(
    models_root, tmp_path, monkeypatch, limit
):
    """The final check runs a graph whose outputs are small one feed per core at once, each run on one thread
    (quantize._outputs): the error it measures is the one measured with the feeds in turn on every core; a graph
    with larger outputs (SIDE_BY_SIDE_OUTPUT_BYTES) runs them in turn."""
    import shutil
    import threading

    import onnxruntime as ort

    from edgediff.export import quantize
    from edgediff.export.calibration import record_feeds
    from edgediff.runtime import session_config

    if limit is not None:
        monkeypatch.setattr(quantize, "SIDE_BY_SIDE_OUTPUT_BYTES", limit)
    monkeypatch.setattr(session_config, "physical_cores", lambda: 2)
    bundle = tiny_bundle("tiny-sd1", models_root)
    scheme = quantize.SCHEMES["int8-static"]
    recorded = record_feeds(bundle, ["a cat", "a dog", "a red bird"], ["unet"], ranges_for={"unet": scheme})["unet"]
    threads, runs, real = [], [], ort.InferenceSession

    class Watched(real):
        def __init__(self, path, options, **kwargs):
            threads.append(options.intra_op_num_threads)
            super().__init__(path, options, **kwargs)

        def run(self, *args, **kwargs):
            runs.append(threading.current_thread().name)
            return super().run(*args, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", Watched)
    for name in ("unet.onnx", "unet.onnx.data"):
        if (bundle / name).exists():
            shutil.copy(bundle / name, tmp_path / name)
    checks = []
    real_outputs = quantize._outputs

    def spied(path, feeds, side_by_side=False):
        checks.append(side_by_side)
        return real_outputs(path, feeds, side_by_side)

    monkeypatch.setattr(quantize, "_outputs", spied)
    (tmp_path / "out").mkdir()
    record = quantize.quantize_component(
        tmp_path / "unet.onnx",
        tmp_path / "out" / "unet.onnx",
        scheme,
        list(recorded),
        references=recorded.outputs,
        ranges=recorded.ranges,
    )
    side_by_side = limit is None
    assert checks == [side_by_side]
    assert threads[-1] == (1 if side_by_side else 2)  # the check's session
    assert len(runs) == len(recorded) and all(r.startswith("edgediff-check") for r in runs)  # every feed, once
    # the same values either way: the same error
    in_turn = real_outputs(tmp_path / "out" / "unet.onnx", list(recorded))
    at_once = real_outputs(tmp_path / "out" / "unet.onnx", list(recorded), side_by_side=True)
    for a, b in zip(in_turn, at_once):
        np.testing.assert_array_equal(a, b)
    assert record["error"] == pytest.approx(quantize._rel_rms(in_turn, list(recorded.outputs)), abs=1e-6)
