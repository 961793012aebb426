"""I/O binding, shape-fixed sessions for captured graphs (CUDA graphs), and provider options.

CI has no GPU, so the binding code runs here against host memory: a CPU provider that says its device is
"cpu" takes the same path as CUDA (OrtValues, IOBinding, fixed buffers, one session per input shape with
its dimensions fixed). onnxruntime's CPU provider ignores the capture option, so what is checked here is
ours: buffers follow new inputs, shapes rebind, refusals fall back. Capture itself is checked on CUDA
(tests/runtime/test_cuda.py), where a GPU is lent.
"""

import dataclasses
import json
import logging

import numpy as np
import onnxruntime as ort
import pytest
from tiny_models import tiny_bundle

from edgediff.runtime import Bundle, InputError, Pipeline, ProviderError, graph_loader, session_config
from edgediff.runtime import providers as prov
from edgediff.runtime.session import GraphSession
from edgediff.runtime.session_states import BindingState, CacheStatus, CaptureState, ShapeState

# bound and plain runs use the same CPU kernels on the same numbers
BOUND_ATOL = 1e-6
CAPTURE_OPTION = prov.REGISTRY["cuda"].graph_capture_option
HOST_BOUND = dataclasses.replace(prov.REGISTRY["cpu"], device_type="cpu", graph_capture_option=CAPTURE_OPTION)


def _unet(models_root, **kwargs) -> GraphSession:
    bundle = Bundle.open(tiny_bundle("tiny-sd-turbo", models_root), verify="size")
    resolution = prov.Resolution(HOST_BOUND, "cpu", False)
    return GraphSession(
        "unet", bundle.component_path("unet"), bundle.manifest.components["unet"], resolution, bundle.path, **kwargs
    )


def _feeds(session: GraphSession, seed: int, side: int = 8, batch: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    hidden = session.inputs["encoder_hidden_states"].shape
    return {
        "sample": rng.standard_normal((batch, 4, side, side), dtype=np.float32),
        "timestep": np.array(500.0 + seed, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal(
            (batch, hidden[1] if isinstance(hidden[1], int) else 77, hidden[2]), dtype=np.float32
        ),
    }


def _plain(session: GraphSession, feeds: dict) -> np.ndarray:
    plain = ort.InferenceSession(str(session.path), providers=["CPUExecutionProvider"])
    return plain.run(None, feeds)[0]


def test_bound_runs_follow_new_inputs_in_fixed_buffers(models_root):
    unet = _unet(models_root)
    assert unet.io_binding and not unet.capture  # a device provider binds by default
    first, second = _feeds(unet, 0), _feeds(unet, 1)
    kept = {name: value.copy() for name, value in first.items()}
    out = [unet.run(**first)[0], unet.run(**second)[0], unet.run(**first)[0]]
    assert all(np.array_equal(first[name], kept[name]) for name in kept)  # the caller's arrays are never written
    for got, feeds in zip(out, (first, second, first)):
        assert np.abs(got - _plain(unet, feeds)).max() <= BOUND_ATOL
    assert np.abs(out[0] - out[1]).max() > 1e-3  # the second run saw its own inputs, not the first's buffers
    assert unet.runner.replays == 2  # bound once, then the same buffers twice
    other = _feeds(unet, 2, side=16)  # a new shape binds new buffers
    assert np.abs(unet.run(**other)[0] - _plain(unet, other)).max() <= BOUND_ATOL


def test_a_device_this_onnxruntime_cannot_bind_to_runs_unbound_and_says_so(models_root, monkeypatch, caplog):
    """DirectML binds to "dml" buffers, which only onnxruntime-directml 1.17+ can make: here the CPU build is
    such a build, so the first bind fails, and the graph runs unbound with the same result and a warning."""
    assert prov.REGISTRY["directml"].device_type == "dml"
    dml_like = dataclasses.replace(prov.REGISTRY["cpu"], device_type=prov.REGISTRY["directml"].device_type)
    monkeypatch.setitem(prov.REGISTRY, "cpu", dml_like)
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), provider="cpu")
    assert {g["io_binding"] for g in pipe.provider_report()["graphs"].values()} == {"on"}
    with caplog.at_level(logging.WARNING, logger="edgediff.session"):
        image = pipe("a cat", seed=4, num_inference_steps=2, output_type="np").images
    states = {g["io_binding"] for g in pipe.provider_report()["graphs"].values()}
    assert len(states) == 1 and states.pop().startswith("refused: ") and "runs unbound" in caplog.text
    monkeypatch.undo()
    plain = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), provider="cpu", io_binding=False)
    np.testing.assert_allclose(
        image, plain("a cat", seed=4, num_inference_steps=2, output_type="np").images, atol=BOUND_ATOL
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="edgediff.session"):
        pipe("a cat", seed=4, num_inference_steps=2, output_type="np")
    assert "runs unbound" not in caplog.text  # said once per graph, not at every call


def test_a_failing_first_bound_run_is_raised_and_binding_stays_on(models_root):
    """Only a device the build cannot bind to turns binding off: a run that fails for its own reasons (here
    inputs whose batch sizes disagree) raises onnxruntime's error, and the next good call runs bound."""
    unet = _unet(models_root)
    feeds = _feeds(unet, 7)
    bad = {**feeds, "encoder_hidden_states": np.concatenate([feeds["encoder_hidden_states"]] * 3)}
    with pytest.raises(Exception, match="(?i)shape|dimension|broadcast"):
        unet.run(**bad)
    assert unet.binding.state is BindingState.ON and unet.binding_state == "on" and unet.runner is not None
    assert np.abs(unet.run(**feeds)[0] - _plain(unet, feeds)).max() <= BOUND_ATOL


def test_capture_opens_one_shape_fixed_session_per_input_shape(models_root):
    unet = _unet(models_root, capture=True)
    dynamic = unet.session
    small, large = _feeds(unet, 0), _feeds(unet, 1, side=16)
    for feeds in (small, small, large, small):
        assert np.abs(unet.run(**feeds)[0] - _plain(unet, feeds)).max() <= BOUND_ATOL
    assert unet.session is not dynamic  # replaced: one copy of the weights at a time
    assert unet.captured is CaptureState.CAPTURED and unet.shape_state is ShapeState.FIXED
    assert unet.capture_state.startswith("captured ") and "sample 1x4x8x8" in unet.capture_state
    assert unet.runner.graph_id == 0 and unet.runner.replays == 0  # reopened for the last shape change
    unet.run(**small)
    assert unet.runner.replays == 1


def test_shape_fixed_graphs_come_from_the_graph_cache_on_the_next_start(models_root, tmp_path):
    """A captured graph's session is opened per image size; its optimized form is cached under its own key (the
    fixed dimensions and the capture option), so the next start at that size skips the optimizer."""
    from edgediff.runtime import graph_cache

    first = _unet(models_root, capture=True, cache_folder=tmp_path)
    feeds = _feeds(first, 5)
    expected = first.run(**feeds)[0]
    assert first.cache is CacheStatus.MISS and first.cache == "miss"  # the report's word
    assert len(graph_cache.entries(tmp_path)) == 2  # the dynamic graph and this size's
    second = _unet(models_root, capture=True, cache_folder=tmp_path)
    assert second.cache == "hit"  # the dynamic graph
    got = second.run(**feeds)[0]
    assert second.cache == "hit" and second.capture_state.startswith("captured")
    np.testing.assert_allclose(got, expected, atol=BOUND_ATOL)
    assert np.abs(got - _plain(second, feeds)).max() <= BOUND_ATOL
    second.run(**_feeds(second, 6, side=16))  # another size: another entry
    assert second.cache == "miss" and len(graph_cache.entries(tmp_path)) == 3


def test_a_refused_capture_runs_bound_on_the_dynamic_graph_and_says_why(models_root, monkeypatch, caplog):
    real = ort.InferenceSession

    def refusing(path, sess_options=None, providers=None, **kw):
        if providers and isinstance(providers[0], tuple) and providers[0][1].get(CAPTURE_OPTION):
            raise RuntimeError("This session cannot use the graph capture feature as requested by the user")
        return real(path, sess_options=sess_options, providers=providers, **kw)

    monkeypatch.setattr(ort, "InferenceSession", refusing)
    unet = _unet(models_root, capture=True)
    feeds = _feeds(unet, 3)
    with caplog.at_level(logging.WARNING, logger="edgediff.session"):
        got = [unet.run(**feeds)[0], unet.run(**feeds)[0]]
    assert "no captured graph for" in caplog.text and "cannot use the graph capture feature" in caplog.text
    assert unet.captured is CaptureState.REFUSED and unet.shape_state is ShapeState.REFUSED
    assert unet.capture_state.startswith("refused: This session cannot use the graph capture feature")
    assert caplog.text.count("no captured graph") == 1  # refused once per shape, not tried again each call
    monkeypatch.setattr(ort, "InferenceSession", real)
    for out in got:
        assert np.abs(out - _plain(unet, feeds)).max() <= BOUND_ATOL


def test_pipeline_with_binding_and_shape_fixed_sessions_matches_the_plain_pipeline(models_root, monkeypatch):
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    plain = Pipeline.from_bundle(bundle, provider="cpu")
    monkeypatch.setitem(prov.REGISTRY, "cpu", HOST_BOUND)
    bound = Pipeline.from_bundle(bundle, provider="cpu", cuda_graph=True)
    m = plain.manifest
    side = m.defaults["height"] // m.vae_scale_factor
    for seed in (0, 1):
        latents = np.random.default_rng(seed).standard_normal((1, m.latent_channels, side, side)).astype(np.float32)
        images = [
            p("a red circle", num_inference_steps=2, latents=latents, output_type="np").images for p in (plain, bound)
        ]
        assert np.abs(images[0] - images[1]).max() <= BOUND_ATOL
    report = bound.provider_report()["graphs"]
    assert all(g["io_binding"] == "on" and g["cuda_graph"].startswith("captured") for g in report.values()), report


def test_cuda_graph_needs_a_provider_that_captures(models_root):
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    with pytest.raises(ProviderError, match="'cpu' cannot capture graphs"):
        Pipeline.from_bundle(bundle, provider="cpu", cuda_graph=True)
    with pytest.raises(InputError, match="cuda_graph and low_memory do not combine"):
        Pipeline.from_bundle(bundle, cuda_graph=True, low_memory=True)
    # `auto` drops it where the machine cannot capture, so one setting serves every machine
    if prov.resolve("auto").provider.name == "cpu":
        report = Pipeline.from_bundle(bundle, cuda_graph=True).provider_report()
        assert {g["cuda_graph"] for g in report["graphs"].values()} == {"off"}
        assert {g["io_binding"] for g in report["graphs"].values()} == {"off"}


def test_provider_options_override_the_providers_own_and_key_the_graph_cache():
    offered = {"CPUExecutionProvider", "CUDAExecutionProvider"}
    plain = prov.resolve("cuda", offered=offered)
    tuned = prov.resolve("cuda", offered=offered, options={"cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": 1})
    assert tuned.ort_providers[0] == (
        "CUDAExecutionProvider",
        {**prov.REGISTRY["cuda"].options, "cudnn_conv_algo_search": "EXHAUSTIVE", "prefer_nhwc": "1"},
    )
    assert plain.cache_tag == "cuda" and tuned.cache_tag.startswith("cuda-") and tuned.cache_tag != plain.cache_tag
    # options are for the provider asked for: a fallback drops them
    fallen = prov.resolve("cuda", fallback=True, offered={"CPUExecutionProvider"}, options={"prefer_nhwc": "1"})
    assert fallen.provider.name == "cpu" and fallen.options == {}
    assert prov.parse_options(["a=1", " b = x "]) == {"a": "1", "b": "x"}
    with pytest.raises(ProviderError, match="KEY=VALUE, got 'prefer_nhwc'"):
        prov.parse_options(["prefer_nhwc"])


def test_integer_argmax_is_cast_to_float_with_the_same_result():
    """CUDA's ArgMax takes floats only: an integer ArgMax (CLIP's end-of-text pick) runs on the CPU and blocks
    capture. export/capture.py casts its input to float32; the index must not change."""
    import onnx
    from onnx import TensorProto, helper

    from edgediff.export.capture import float_argmax

    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [2, 77])
    out = helper.make_tensor_value_info("pick", TensorProto.INT64, [2])
    nodes = [
        helper.make_node("Cast", ["ids"], ["as_int"], to=TensorProto.INT32),
        helper.make_node("ArgMax", ["as_int"], ["pick"], axis=-1, keepdims=0),
    ]
    model = helper.make_model(helper.make_graph(nodes, "g", [ids], [out]), opset_imports=[helper.make_opsetid("", 17)])
    rng = np.random.default_rng(0)
    feeds = {"ids": rng.integers(0, 49408, (2, 77)).astype(np.int64)}
    feeds["ids"][1, [5, 40]] = 49407  # a tie: the first one wins, as torch.argmax
    before = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert float_argmax(model) == 1 and float_argmax(model) == 0  # once only
    onnx.checker.check_model(model)
    argmax = next(n for n in model.graph.node if n.op_type == "ArgMax")
    producer = next(n for n in model.graph.node if argmax.input[0] in n.output)
    assert producer.op_type == "Cast" and producer.attribute[0].i == TensorProto.FLOAT
    after = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert np.array_equal(before, after) and after[1] == 5


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_exported_text_encoders_have_no_integer_argmax(models_root, precision):
    import onnx

    bundle = Bundle.open(tiny_bundle("tiny-sd-turbo", models_root, precision), verify="size")
    model = onnx.load(str(bundle.component_path("text_encoder")))
    casts = {n.output[0]: n.attribute[0].i for n in model.graph.node if n.op_type == "Cast"}
    argmaxes = [n for n in model.graph.node if n.op_type == "ArgMax"]
    assert argmaxes and all(casts.get(n.input[0]) == onnx.TensorProto.FLOAT for n in argmaxes)


def test_bound_pipeline_is_safe_from_several_threads(models_root, monkeypatch):
    """Bound graphs share their device buffers: concurrent calls take turns per graph call and each still
    gets its own image."""
    from concurrent.futures import ThreadPoolExecutor

    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    plain = Pipeline.from_bundle(bundle, provider="cpu")
    monkeypatch.setitem(prov.REGISTRY, "cpu", HOST_BOUND)
    bound = Pipeline.from_bundle(bundle, provider="cpu")
    assert {g["io_binding"] for g in bound.provider_report()["graphs"].values()} == {"on"}

    def make(pipe, seed):
        return pipe(f"a red circle {seed}", num_inference_steps=2, seed=seed, output_type="np").images

    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda seed: make(bound, seed), range(8)))
    for seed, image in enumerate(together):
        assert np.abs(image - make(plain, seed)).max() <= BOUND_ATOL


def test_states_read_as_the_reports_words():
    """The states are enums whose values are provider_report()'s words, so its JSON, the CLI's table and the
    benchmarks' files read as before."""
    report = {"cache": CacheStatus.HIT, "io_binding": BindingState.ON}
    assert json.dumps(report) == '{"cache": "hit", "io_binding": "on"}'
    assert str(ShapeState.DYNAMIC) == "dynamic" and f"{CacheStatus.MISS:<6}|" == "miss  |"
    assert {CacheStatus.MISS, CaptureState.OFF} == {"miss", "off"}
    assert BindingState.REFUSED.with_detail("no dml") == "refused: no dml" and BindingState.ON.with_detail("") == "on"
    assert ShapeState.FIXED.with_detail("sample 1x4x8x8") == "fixed sample 1x4x8x8"


def test_onnxruntime_errors_keep_their_cause_in_one_line():
    trace = RuntimeError(
        "[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: core.cpp:114:\n"
        "Exception from plugin.cpp:53:\n[AUTO] compile model failed\n"
        "Supported precisions set is not available for Constant operation.\n; "
    )
    assert graph_loader.summarize(trace) == (
        "[ONNXRuntimeError] : 1 : FAIL : Exception during initialization: core.cpp:114: ... "
        "Supported precisions set is not available for Constant operation."
    )
    assert graph_loader.summarize(RuntimeError("one line")) == "one line"


def test_a_static_shape_provider_gets_one_shape_fixed_session_per_input_shape_unbound(models_root, monkeypatch):
    """NPU compilers (Provider.static_shapes: QNN) take fixed shapes only: each new input shape reopens the graph
    with its dimensions fixed, as for captured graphs, but without capture and, with no device buffers, unbound."""
    static = dataclasses.replace(prov.REGISTRY["cpu"], name="npu", static_shapes=True)
    bundle = Bundle.open(tiny_bundle("tiny-sd-turbo", models_root), verify="size")
    opened = []
    real = session_config.session_options
    monkeypatch.setattr(
        session_config,
        "session_options",
        lambda threads, resolution, low_memory, dims: (
            opened.append(dims) or real(threads, resolution, low_memory, dims)
        ),
    )
    unet = GraphSession(
        "unet",
        bundle.component_path("unet"),
        bundle.manifest.components["unet"],
        prov.Resolution(static, "npu", False),
        bundle.path,
    )
    assert unet.shape_state is ShapeState.DYNAMIC and unet.shapes == "dynamic"
    assert not unet.capture and unet.runner is None
    small, large = _feeds(unet, 0), _feeds(unet, 1, side=16)
    for feeds in (small, small, large, small):
        assert np.abs(unet.run(**feeds)[0] - _plain(unet, feeds)).max() <= BOUND_ATOL
        assert "sample 1x4x" + ("16x16" if feeds is large else "8x8") in unet.shapes
    assert unet.shape_state is ShapeState.FIXED and unet.shapes.startswith("fixed ")
    assert unet.captured is CaptureState.OFF and unet.capture_state == "off" and unet.runner is None
    fixed = [dims for dims in opened if dims]
    assert len(fixed) == 3 and fixed[0]["height"] == 8 and fixed[1]["height"] == 16  # one open per shape change
