"""Per-channel weights quantised over whole arrays (export/weight_quant.py) give exactly onnxruntime's own
scales, zero points and quantised weights: the parameters channel by channel, and whole graphs byte for byte.
Activation ranges (quantize.calibrate) are exactly onnxruntime's MinMax calibrator's, and those taken while
recording calibration inputs are calibrate's own."""

import numpy as np
import pytest
from tiny_models import tiny_bundle

pytest.importorskip("torch")


def _weights(shape, axis, seed=0):
    rng = np.random.default_rng(seed)
    spread = rng.uniform(1e-3, 3, shape[axis]).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    w = (rng.standard_normal(shape) * spread).astype(np.float32)
    index = [slice(None)] * len(shape)
    index[axis] = 0
    w[tuple(index)] = 0.0  # an all-zero channel: onnxruntime's degenerate scale of 1
    index[axis] = 1
    w[tuple(index)] = -np.abs(w[tuple(index)])  # negative only
    index[axis] = 2
    w[tuple(index)] = 1e-40  # subnormal: below float32's smallest normal range
    return w


@pytest.mark.parametrize("chunk_bytes", [None, 200])  # whole arrays in one step, or a few rows at a time
@pytest.mark.parametrize("reduce_range", [False, True])
@pytest.mark.parametrize(("shape", "axis"), [((64, 48), 1), ((48, 64), 0), ((32, 16, 3, 3), 0), ((16, 24, 3), 1)])
def test_channel_parameters_and_values_equal_onnxruntimes(shape, axis, reduce_range, chunk_bytes, monkeypatch):
    from onnx import TensorProto
    from onnxruntime.quantization.quant_utils import compute_data_quant_params, quantize_nparray

    from edgediff.export import weight_quant
    from edgediff.export.weight_quant import channel_params, quantize_channels

    if chunk_bytes:
        monkeypatch.setattr(weight_quant, "QUANTIZE_CHUNK_BYTES", chunk_bytes)
    w = _weights(shape, axis)
    zero_points, scales = channel_params(w, axis, TensorProto.INT8, reduce_range)
    quantised = quantize_channels(w, axis, TensorProto.INT8, zero_points, scales)
    assert np.abs(quantised).max() == (64 if reduce_range else 127)
    for i in range(w.shape[axis]):
        channel = w.take(i, axis).ravel()
        zp, scale = compute_data_quant_params(channel, TensorProto.INT8, symmetric=True, reduce_range=reduce_range)
        assert zero_points[i] == zp and zero_points.dtype == zp.dtype
        assert scales[i].tobytes() == scale.tobytes() and scales.dtype == scale.dtype == np.float32
        expected = quantize_nparray(TensorProto.INT8, channel, scale, zp)
        np.testing.assert_array_equal(quantised.take(i, axis).ravel(), expected)
    assert scales[0] == 1.0 and scales[2] == 1.0  # the degenerate channels, as onnxruntime sets them


@pytest.fixture(scope="module")
def feeds(models_root):
    from edgediff.export.calibration import record_feeds

    bundle = tiny_bundle("tiny-sd1", models_root)
    return bundle, record_feeds(bundle, prompts=["a cat", "a dog"], components=["text_encoder", "unet"])


def _graph_bytes(path):
    import onnx

    model = onnx.load(str(path))
    return (
        [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node],
        {t.name: (t.data_type, list(t.dims), onnx.numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer},
    )


@pytest.mark.parametrize("weights", ["in the graph", "beside it"])
def test_static_int8_graph_is_onnxruntimes_own(feeds, tmp_path, monkeypatch, weights):
    """quantize() reads each weight as it quantises it, from the external data where the graph keeps its weights
    there (stream_quant.quantize_static_streaming), and quantises them over whole arrays; onnxruntime's quantizer, as
    quantize_static runs it, loads the whole graph with its weights and goes channel by channel: the same graph.
    Each int8 weight is read once (onnxruntime reads it for its scales, then for its values)."""
    # dynamic int8 is quantised a weight at a time too: test_stream_quant.py compares it with quantize_dynamic's
    import onnx
    from onnx.external_data_helper import uses_external_data
    from onnxruntime.quantization.qdq_quantizer import QDQQuantizer
    from onnxruntime.quantization.quant_utils import load_model_with_shape_infer

    from edgediff.export import weight_quant
    from edgediff.export.quantize import SCHEMES, _qdq_quantizer, calibrate, quantize

    bundle, recorded = feeds
    src, chosen = bundle / "unet.onnx", SCHEMES["int8-static"]
    if weights == "beside it":  # as the full-size graphs are
        (tmp_path / "src").mkdir()
        onnx.save(onnx.load(str(src)), str(tmp_path / "src" / src.name), save_as_external_data=True, size_threshold=0)
        src = tmp_path / "src" / src.name
        assert all(uses_external_data(t) for t in onnx.load(str(src), load_external_data=False).graph.initializer)
    ranges = calibrate(src, chosen, recorded["unet"])
    used, real = [], weight_quant.channel_params
    monkeypatch.setattr(weight_quant, "channel_params", lambda *a: used.append(1) or real(*a))
    reads, read = [], weight_quant.external_array
    monkeypatch.setattr(weight_quant, "external_array", lambda t, folder: reads.append(t.name) or read(t, folder))
    (tmp_path / "fast").mkdir()
    quantize(src, tmp_path / "fast" / "unet.onnx", chosen, [], ranges)
    assert used  # the whole-array path ran
    if weights == "beside it":  # each int8 weight read once, for its scales and values together
        written = onnx.load(str(tmp_path / "fast" / "unet.onnx"), load_external_data=False).graph.initializer
        int8 = [
            t.name.removesuffix("_quantized")
            for t in written
            if t.name.endswith("_quantized") and t.data_type == onnx.TensorProto.INT8  # not the int32 biases
        ]
        assert int8 and {name: reads.count(name) for name in int8} == dict.fromkeys(int8, 1)
    assert sorted(p.name for p in (tmp_path / "fast").iterdir()) == ["unet.onnx", "unet.onnx.data"]
    monkeypatch.setattr(weight_quant, "FastQDQQuantizer", QDQQuantizer)
    own = _qdq_quantizer(load_model_with_shape_infer(src), chosen, [], ranges)
    own.quantize_model()
    own.model.save_model_to_file(str(tmp_path / "own.onnx"), False)
    fast_nodes, fast_weights = _graph_bytes(tmp_path / "fast" / "unet.onnx")
    own_nodes, own_weights = _graph_bytes(tmp_path / "own.onnx")
    assert fast_nodes == own_nodes
    assert fast_weights.keys() == own_weights.keys() and any(t[0] == 3 for t in own_weights.values())  # int8 there
    assert fast_weights == own_weights


def test_calibrated_ranges_are_onnxruntimes_own(feeds, tmp_path):
    from onnxruntime.quantization.calibrate import MinMaxCalibrater

    from edgediff.export.quantize import SCHEMES, calibrate

    bundle, recorded = feeds
    src, scheme = bundle / "unet.onnx", SCHEMES["int8-static"]
    ours = calibrate(src, scheme, recorded["unet"])
    theirs = MinMaxCalibrater(
        src, op_types_to_calibrate=list(scheme.op_types), augmented_model_path=str(tmp_path / "augmented.onnx")
    )
    theirs.augment_graph()
    theirs.create_inference_session()
    for feed in recorded["unet"]:  # one at a time, merged, as calibrate does
        theirs.collect_data(_One(feed))
    expected = theirs.compute_data()
    assert len(recorded["unet"]) > 1 and len(list(expected.keys())) > 50
    assert sorted(ours.keys()) == sorted(expected.keys())
    for name in expected.keys():
        for got, want in zip(ours[name].range_value, expected[name].range_value):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_array_equal(got, want)
    assert not list(bundle.glob(".*calibration*"))  # the augmented graph is gone


@pytest.mark.parametrize("one_at_a_time", [False, True])
def test_ranges_taken_while_recording_are_calibrates(feeds, one_at_a_time):
    """The UNet's calibration graph runs in the pipeline's place while prompts are recorded: the same feeds, the
    graph's outputs as its own session gives them (within RECORDED_RTOL: the calibration graph runs unoptimised),
    and exactly the ranges calibrate() finds over those feeds; the augmented graph is gone from the bundle
    afterwards."""
    from edgediff.export.calibration import record_feeds
    from edgediff.export.quantize import SCHEMES, calibrate

    bundle, plain = feeds
    scheme = SCHEMES["int8-static"]
    taken = record_feeds(
        bundle,
        prompts=["a cat", "a dog"],
        components=["text_encoder", "unet"],
        one_at_a_time=one_at_a_time,
        ranges_for={"unet": scheme},
    )
    assert taken["text_encoder"].ranges is None and plain["unet"].ranges is None
    unet = taken["unet"]
    assert len(unet) == len(plain["unet"]) > 1
    # the unoptimised graph against the pipeline's optimised one; later steps' inputs follow from earlier outputs
    for got, want in zip(unet, plain["unet"]):
        assert got.keys() == want.keys()
        for name in got:
            np.testing.assert_allclose(got[name], want[name], rtol=RECORDED_RTOL, atol=RECORDED_ATOL)
    for got, want in zip(unet.outputs, plain["unet"].outputs):
        np.testing.assert_allclose(got, want, rtol=RECORDED_RTOL, atol=RECORDED_ATOL)
    expected = calibrate(bundle / "unet.onnx", scheme, unet)  # over the very feeds recorded
    assert sorted(unet.ranges.keys()) == sorted(expected.keys()) and len(list(expected.keys())) > 50
    for name in expected.keys():
        for got, want in zip(unet.ranges[name].range_value, expected[name].range_value):
            np.testing.assert_array_equal(got, want)
    assert not list(bundle.glob(".*calibration*"))


# fp32 rounding: the calibration graph runs unoptimised, the pipeline's session fuses operators
RECORDED_RTOL = 1e-4
RECORDED_ATOL = 1e-4


class _One:
    """A calibration data reader over one feed."""

    def __init__(self, feed):
        self.feeds = [feed]

    def get_next(self):
        return self.feeds.pop() if self.feeds else None


def test_ranges_for_a_component_not_recorded_is_refused(feeds):
    """Ranges are taken only over feeds that are recorded: asking them of another component is an error before
    anything runs, and no calibration graph is left in the bundle."""
    from edgediff.export.calibration import record_feeds
    from edgediff.export.quantize import SCHEMES

    bundle, _ = feeds
    with pytest.raises(ValueError, match="not recorded: unet"):
        record_feeds(
            bundle, prompts=["a cat"], components=["text_encoder"], ranges_for={"unet": SCHEMES["int8-static"]}
        )
    assert not list(bundle.glob(".*calibration*"))


def test_threads_quantising_side_by_side_read_their_own_weights(tmp_path):
    """Graphs are quantised on two threads at once (bundle_quantize.quantize_bundle): while one thread is inside
    weights_read_from(its folder), onnxruntime's swapped reader reads its weights from that folder, not the other
    thread's, and the swap stays until the last thread leaves (module_patches.py)."""
    import threading

    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import quant_utils

    from edgediff.export.weight_quant import weights_read_from

    original = quant_utils.tensor_proto_to_array
    tensors = {}
    for name, value in (("a", 1.0), ("b", 2.0)):
        (tmp_path / name).mkdir()
        weight = numpy_helper.from_array(np.full((4, 4), value, np.float32), "w")
        graph = helper.make_graph([helper.make_node("Identity", ["w"], ["y"])], "g", [], [], [weight])
        onnx.save(
            helper.make_model(graph), str(tmp_path / name / "g.onnx"), save_as_external_data=True, size_threshold=0
        )
        tensors[name] = onnx.load(str(tmp_path / name / "g.onnx"), load_external_data=False).graph.initializer[0]
    a_inside, b_inside, a_out = threading.Event(), threading.Event(), threading.Event()
    read: dict[str, list] = {"a": [], "b": []}

    def quantise(name: str, inside: threading.Event, wait_for: threading.Event, after=None):
        with weights_read_from(tmp_path / name):
            inside.set()
            assert wait_for.wait(10)
            read[name].append(float(quant_utils.tensor_proto_to_array(tensors[name]).mean()))
            if after is not None:  # outlives the other thread's block
                assert after.wait(10)
                read[name].append(float(quant_utils.tensor_proto_to_array(tensors[name]).mean()))
        if name == "a":
            a_out.set()

    threads = [
        threading.Thread(target=quantise, args=("a", a_inside, b_inside)),
        threading.Thread(target=quantise, args=("b", b_inside, a_inside, a_out)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert read == {"a": [1.0], "b": [2.0, 2.0]}
    assert quant_utils.tensor_proto_to_array is original  # restored once both left


def test_initializers_found_by_name_are_those_a_scan_finds():
    """The quantizer's model finds initializers in an index (weight_quant._IndexedModel), and find_by_name on its
    initializers answers from it inside vectorised(): what onnxruntime's scan of the list finds, the first of a name,
    after the wrapper's own additions and removals and after changes made to the list behind its back."""
    import onnx
    from onnx import helper, numpy_helper
    from onnxruntime.quantization import base_quantizer, qdq_quantizer
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import find_by_name

    from edgediff.export.weight_quant import _IndexedModel, vectorised

    def tensor(name: str, value: float) -> onnx.TensorProto:
        return numpy_helper.from_array(np.full((2,), value, np.float32), name)

    graph = helper.make_graph([], "g", [], [], [tensor("a", 1), tensor("b", 2), tensor("a", 3)])
    model = ONNXModel(helper.make_model(graph))
    model.__class__ = _IndexedModel
    initializers = model.model.graph.initializer

    def agrees(names) -> bool:
        with vectorised(model=model):  # the swapped find_by_name, in both modules that call it
            assert qdq_quantizer.find_by_name is not find_by_name
            found = [
                (qdq_quantizer.find_by_name(n, initializers), base_quantizer.find_by_name(n, initializers))
                for n in names
            ]
        return all(a == b == find_by_name(n, initializers) for (a, b), n in zip(found, names))

    assert model.get_initializer("a") == tensor("a", 1) and agrees(["a", "b", "c"])
    model.add_initializer(tensor("c", 4))
    model.add_initializer(tensor("b", 5))  # a name already there: not added
    model.initializer_extend([tensor("d", 6)])
    assert [t.name for t in initializers] == ["a", "b", "a", "c", "d"] and agrees(["a", "b", "c", "d"])
    model.remove_initializer(model.get_initializer("a"))
    assert model.get_initializer("a") == tensor("a", 3) and agrees(["a", "b"])
    del initializers[0]  # behind the wrapper's back: "b" gone, the count differs
    initializers.add().CopyFrom(tensor("e", 7))
    initializers.add().CopyFrom(tensor("b", 8))
    assert model.get_initializer("b") == tensor("b", 8) and model.get_initializer("e") == tensor("e", 7)
    assert agrees(["a", "b", "c", "d", "e"])
    assert qdq_quantizer.find_by_name is find_by_name  # the swap left with the block


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_external_weights_read_whole_and_only_their_own_bytes(tmp_path, dtype):
    """external_array gives each weight's own values, mapped or read, at any offset in a shared data file (not
    page-aligned) and as a plain read-only array; a weight whose recorded length is not its array's is refused, not
    filled from the bytes of the next weight in the file."""
    from onnx import TensorProto, helper

    from edgediff.export.tracing import place_external
    from edgediff.export.weight_quant import external_array

    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal(shape).astype(dtype) for shape in [(3,), (5, 7), (0, 4), (4, 2, 3)]]
    tensors, offset = [], 0
    with open(tmp_path / "w.data", "wb") as f:
        for i, a in enumerate(arrays):
            t = TensorProto(name=f"w{i}", dims=a.shape, data_type=helper.np_dtype_to_tensor_dtype(a.dtype))
            place_external(t, "w.data", offset, a.nbytes)
            f.write(a.tobytes())
            offset += a.nbytes
            tensors.append(t)
    for t, a in zip(tensors, arrays):
        got = external_array(t, tmp_path)
        assert type(got) is np.ndarray and got.dtype == a.dtype and not got.flags.writeable
        np.testing.assert_array_equal(got, a)
    short = TensorProto()
    short.CopyFrom(tensors[1])
    place_external(short, "w.data", 3 * np.dtype(dtype).itemsize, 34 * np.dtype(dtype).itemsize)  # 35 values
    with pytest.raises(ValueError):
        external_array(short, tmp_path)
