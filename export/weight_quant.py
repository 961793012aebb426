"""Per-channel int8 weight quantisation over whole arrays, inside onnxruntime's quantisers.

onnxruntime's quantisers find per-channel scales and quantise weights one channel at a time in Python: the
SD UNet has 318,000 output channels, and those loops took 30 s of each of its quantisations (the sensitivity
pass quantises every block once more). This is the same arithmetic (quant_utils.compute_scale_zp, symmetric,
and quantize_nparray) over whole arrays. Hand-written for speed only: `vectorised()` swaps it in while one of
our quantisations runs, and leaves every other case (overrides, blocks, other types) to onnxruntime's own
code. tests/export/test_weight_quant.py checks that the graphs are byte for byte those onnxruntime writes.
"""

from __future__ import annotations

import contextvars
import importlib
import math
import os
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import qdq_quantizer
from onnxruntime.quantization.base_quantizer import QuantizationParams
from onnxruntime.quantization.onnx_model import ONNXModel
from onnxruntime.quantization.onnx_quantizer import ONNXQuantizer
from onnxruntime.quantization.qdq_quantizer import QDQQuantizer, QDQQuantTensorType
from onnxruntime.quantization.quant_utils import (
    ONNX_TYPE_TO_NP_TYPE,
    TENSOR_NAME_QUANT_SUFFIX,
    get_qmin_qmax_for_qType,
    normalize_axis,
    tensor_proto_to_array,
)

from .module_patches import patched

# integer types whose per-channel arithmetic is reproduced here (int4 weights go through MatMulNBits)
_TYPES = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
_FLOATS = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)  # the weights onnxruntime's quantisers read
# threads that read and quantise weights side by side (FastQDQQuantizer): each holds one fp32 weight and its copy
MAX_WEIGHT_WORKERS = 4
QUANTIZE_CHUNK_BYTES = 1 << 20  # fp32 bytes quantised per step (quantize_channels): within a core's L2 cache

# What the calling thread's quantisation wants of the swapped functions (module_patches.py): the folder its weights
# are read from (weights_read_from) and its weights quantised already (vectorised).
_FOLDER: contextvars.ContextVar[Path | None] = contextvars.ContextVar("edgediff_weights_folder", default=None)
_PREPARED: contextvars.ContextVar[dict | None] = contextvars.ContextVar("edgediff_prepared_weights", default=None)
_INDEXED: contextvars.ContextVar[ONNXModel | None] = contextvars.ContextVar("edgediff_indexed_model", default=None)


def channel_params(
    weights: np.ndarray, axis: int, quant_type: int, reduce_range: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-channel (zero points, scales) along `axis`, as onnxruntime's compute_data_quant_params
    gives them channel by channel (no minimum range; `reduce_range`: 7-bit values)."""
    others = tuple(i for i in range(weights.ndim) if i != axis)
    zero = np.zeros((), weights.dtype)
    rmin = np.minimum(weights.min(axis=others), zero)  # the range holds zero
    rmax = np.maximum(weights.max(axis=others), zero)
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=reduce_range, symmetric=True)
    scale = (absmax.astype(np.float64) - (-absmax).astype(np.float64)) / (np.float64(qmax) - np.float64(qmin))
    finfo = np.finfo(weights.dtype)
    tiny = finfo.smallest_subnormal if weights.dtype == np.float16 else finfo.tiny
    stored = scale.astype(weights.dtype)
    degenerate = (stored if weights.dtype == np.float16 else scale) < tiny  # an all-zero channel
    stored[degenerate] = 1.0
    middle = np.round((qmin + qmax) / np.float64(2.0))
    zero_points = np.where(degenerate, 0, middle).astype(qmin.dtype)
    return zero_points, stored


def quantize_channels(weights: np.ndarray, axis: int, quant_type: int, zero_points, scales) -> np.ndarray:
    """The weights quantised with one (zero point, scale) per channel along `axis` (quantize_nparray's
    rounding and clipping), QUANTIZE_CHUNK_BYTES of them at a time: each step's pass over a chunk finds it in the
    cache, where whole arrays went through memory once per step (a 1280-channel 3x3 kernel: 36 against 18 ms; the
    full-size UNet quantised whole in 4.1-4.3 s before, 3.6-3.8 s after, the same bytes)."""
    axis %= weights.ndim
    shape = [1] * weights.ndim
    shape[axis] = -1
    scale = np.asarray(scales).reshape(shape)
    zero = np.asarray(zero_points).reshape(shape)
    shifted = bool(np.any(zero))  # symmetric int8's zero points are all 0: no pass to add them
    qmin, qmax = get_qmin_qmax_for_qType(quant_type, reduce_range=False, symmetric=False)
    out = np.empty(weights.shape, ONNX_TYPE_TO_NP_TYPE[quant_type])
    rows = max(1, QUANTIZE_CHUNK_BYTES // max(1, 4 * weights[0].size))  # along the first axis
    for start in range(0, len(out), rows):
        part = slice(start, start + rows)
        q = np.divide(weights[part].astype(np.float32, copy=False), scale[part] if axis == 0 else scale)
        np.round(q, out=q)
        if shifted:
            q += zero[part] if axis == 0 else zero
        np.clip(q, qmin, qmax, out=q)
        out[part] = q
    return out


class _IndexedModel(ONNXModel):
    """onnxruntime's model wrapper, renaming a tensor where its readers are, found in an index of them: its own loop
    visits every input of every node for each of the ~700 tensors the UNet's quantisation renames (8 s; 1.8 s with
    a scan of each node's inputs). The index follows the nodes the quantiser adds and the inputs it renames; a
    change to the node list it did not see (a count that differs) rebuilds it. Initializers are found by name in an
    index too, kept the same way: its own add_initializer and get_initializer scan the list (1,728 and 813 scans of
    ~2,000 initializers, 1.3 s of the full-size UNet's quantisation on one core)."""

    def _named(self) -> dict:
        initializers = self.model.graph.initializer
        if getattr(self, "_named_count", None) != len(initializers):
            self._names: dict = {}
            for tensor in initializers:
                self._names.setdefault(tensor.name, tensor)  # the first of a name, as a scan finds it
            self._named_count = len(initializers)
        return self._names

    def get_initializer(self, name):
        return self._named().get(name)

    def add_initializer(self, tensor):
        named = self._named()
        if tensor.name not in named:
            self._check_init(tensor)
            self.model.graph.initializer.extend([tensor])
            named[tensor.name] = self.model.graph.initializer[-1]  # the graph's own copy
            self._named_count += 1

    def initializer_extend(self, inits):
        # its own also runs _check_init over every initializer already there: a check of float8 ones' bytes,
        # which a graph quantised to int8 has none of
        if len(inits) == 0:
            raise ValueError("Can add an empty list.")
        named = self._named()
        for tensor in inits:
            self._check_init(tensor)
            self.model.graph.initializer.append(tensor)
            named.setdefault(tensor.name, self.model.graph.initializer[-1])
            self._named_count += 1

    def remove_initializer(self, tensor):
        super().remove_initializer(tensor)
        self._named_count = None  # rebuilt when next wanted

    def _readers(self) -> dict[str, list]:
        nodes = self.model.graph.node
        if getattr(self, "_indexed", None) != len(nodes):
            self._index: dict[str, list] = defaultdict(list)
            for node in nodes:
                for name in node.input:
                    self._index[name].append(node)
            self._indexed = len(nodes)
        return self._index

    def add_node(self, node):
        readers = self._readers()  # as the graph stands before the node
        super().add_node(node)
        added = self.model.graph.node[-1]  # the graph's own copy, which later renames change
        for name in added.input:
            readers[name].append(added)
        self._indexed += 1

    def replace_node_input(self, node, old_input_name, new_input_name):
        ONNXModel.replace_node_input(node, old_input_name, new_input_name)
        self._readers()[new_input_name].append(node)  # still listed under the old name: renames check first

    def replace_input_of_all_nodes(self, old_input_name, new_input_name):
        readers = self._readers()
        for node in readers.pop(old_input_name, []):
            if old_input_name in node.input:  # not renamed since
                ONNXModel.replace_node_input(node, old_input_name, new_input_name)
                readers[new_input_name].append(node)

    def replace_input_of_nodes(self, old_input_name, new_input_name, node_names_set):
        readers = self._readers()
        for node in list(readers.get(old_input_name, [])):
            if node.name in node_names_set and old_input_name in node.input:
                ONNXModel.replace_node_input(node, old_input_name, new_input_name)
                readers[new_input_name].append(node)


def _workers() -> int:
    from edgediff.runtime.session_config import physical_cores  # the cores this process may run on

    return max(1, min(physical_cores(), MAX_WEIGHT_WORKERS))


class FastQDQQuantizer(QDQQuantizer):
    """onnxruntime's QDQ quantizer with per-channel weight scales computed over whole arrays, and each weight read,
    scaled and quantised once, on several threads, as the scales are found (`prepared`: the quantised weights,
    name -> (scale, array), which vectorised(prepared) hands to onnxruntime's quantizer when it asks for each)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model.__class__ = _IndexedModel  # the same wrapper and state; one method faster
        self.prepared: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _calc_initializer_quant_params(self) -> dict[str, QuantizationParams]:
        initializers = {t.name: t for t in self.model.initializer()}
        fast = {
            name: info
            for name, info in self.tensors_to_quantize.items()
            if name in initializers
            and info.tensor_type is QDQQuantTensorType.WEIGHT
            and info.axis is not None
            and self.weight_qType in _TYPES
            and self.block_size <= 0
            and self.min_real_range is None
            and not self.tensor_quant_overrides.get(name)
        }
        everything = self.tensors_to_quantize
        self.tensors_to_quantize = {k: v for k, v in everything.items() if k not in fast}
        try:
            params = super()._calc_initializer_quant_params()
        finally:
            self.tensors_to_quantize = everything

        def prepare(name: str):
            # numpy's reductions and arithmetic release the GIL (and the page faults of mapped weights happen
            # inside them): the threads run side by side
            data = tensor_proto_to_array(initializers[name])
            _, axis = normalize_axis(fast[name].axis, data.ndim)
            zero_points, scales = channel_params(data, axis, self.weight_qType, self.reduce_range)
            return axis, zero_points, scales, quantize_channels(data, axis, self.weight_qType, zero_points, scales)

        # the weights are read and quantised here, once: onnxruntime's own order reads each twice (scales, then
        # values), one at a time; 8 of the full-size SD-Turbo UNet's 11 s quantisation on 2 cores
        with ThreadPoolExecutor(_workers()) as pool:  # each task in this thread's context: its weights' folder
            tasks = [pool.submit(contextvars.copy_context().run, prepare, name) for name in fast]
            for name, (axis, zero_points, scales, quantised) in zip(fast, (t.result() for t in tasks)):
                params[name] = QuantizationParams(
                    zero_point=zero_points, scale=scales, quant_type=self.weight_qType, axis=axis
                )
                self.prepared[name] = (scales, quantised)
        return params


def _fast_initializer(original):
    def quantize_onnx_initializer(
        weight, quant_type, zero_point, scale, axis=None, quant_weight_name=None, block_size=0
    ):
        if axis is None or block_size > 0 or quant_type not in _TYPES:
            return original(weight, quant_type, zero_point, scale, axis, quant_weight_name, block_size)
        scales, q = (_PREPARED.get() or {}).pop(weight.name, (None, None))
        if scales is not scale:  # not prepared with these scales (FastQDQQuantizer's): quantised here
            q = quantize_channels(tensor_proto_to_array(weight), axis, quant_type, zero_point, scale)
        name = quant_weight_name or f"{weight.name}{TENSOR_NAME_QUANT_SUFFIX}"
        return onnx.numpy_helper.from_array(np.asarray(q).reshape(weight.dims), name)

    return quantize_onnx_initializer


class FastONNXQuantizer(ONNXQuantizer):
    """onnxruntime's operator-form quantizer (quantize_dynamic's) with per-channel weights quantised over whole
    arrays."""

    def quantize_weight_per_channel_impl(
        self,
        weight_name,
        weight_qType,
        channel_axis,
        reduce_range=True,
        keep_float_weight=False,  # noqa: N803
    ):
        initializer = next((t for t in self.model.initializer() if t.name == weight_name), None)
        plain = (
            initializer is not None
            and weight_qType in _TYPES
            and self.min_real_range is None
            and self.is_weight_symmetric(weight_qType)
            and not self.tensor_quant_overrides.get(weight_name)
            and not keep_float_weight
        )
        if not plain:
            return super().quantize_weight_per_channel_impl(
                weight_name, weight_qType, channel_axis, reduce_range, keep_float_weight
            )
        weights = self._weight_array(initializer)
        valid, axis = normalize_axis(channel_axis, weights.ndim)
        if not valid:
            raise ValueError(f"Weight {weight_name} has no axis {channel_axis}")
        zero_points, scales = channel_params(weights, axis, weight_qType, self.reduce_range and reduce_range)
        quantized = quantize_channels(weights, axis, weight_qType, zero_points, scales)
        q_name, zp_name, scale_name = (
            weight_name + TENSOR_NAME_QUANT_SUFFIX,
            weight_name + "_zero_point",
            weight_name + "_scale",
        )
        dims = [initializer.dims[axis]]
        self.model.initializer_extend(
            [
                onnx.helper.make_tensor(scale_name, initializer.data_type, dims, scales.tolist()),
                onnx.helper.make_tensor(zp_name, weight_qType, dims, zero_points.tolist()),
                onnx.numpy_helper.from_array(quantized.reshape(initializer.dims), q_name),
            ]
        )
        return q_name, zp_name, scale_name

    def _weight_array(self, initializer) -> np.ndarray:
        return tensor_proto_to_array(initializer)


class StreamingONNXQuantizer(FastONNXQuantizer):
    """FastONNXQuantizer on a graph loaded without its weights (stream_quant.py): each weight is read from the
    external data under `folder` just before it is quantised, into an array dropped right after; the graph's entry
    stays a reference (dropped by clean_initializers once no node reads it, copied at write if one still does)."""

    def __init__(self, folder, *args, **kwargs):
        self.folder = folder
        self.streamed = 0
        super().__init__(*args, **kwargs)

    def quantize_weight_per_channel_impl(self, weight_name, *args, **kwargs):
        self.streamed += 1
        return super().quantize_weight_per_channel_impl(weight_name, *args, **kwargs)

    def _weight_array(self, initializer) -> np.ndarray:
        from onnx.external_data_helper import uses_external_data

        if not uses_external_data(initializer):
            return tensor_proto_to_array(initializer)
        return external_array(initializer, self.folder)


def external_array(initializer: onnx.TensorProto, folder: Path) -> np.ndarray:
    """A weight kept in external data, an array of its own over its file in `folder`: never read into the graph's
    message, whose protobuf arena would keep every weight's bytes until the whole graph is freed (clearing the field
    does not return them). Memory-mapped, read-only as an array over read bytes is, where a mapped file may be
    removed (the export removes each fp32 graph once quantised): a read faults in every page of a fresh buffer, and
    the full-size UNet's 3.3 GB of weights took 2.0-3.7 s to read and reduce so, 0.9-1.0 s mapped. Read where a
    mapping would hold the file (Windows) or where the recorded length is not the array's."""
    from onnx.external_data_helper import ExternalDataInfo

    from .tracing import external_bytes

    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(initializer.data_type))
    shape = tuple(initializer.dims)
    info = ExternalDataInfo(initializer)
    size = math.prod(shape) * dtype.itemsize
    if size == 0:  # no bytes to read (a read of length 0 reads to the end of the file)
        empty = np.empty(shape, dtype)
        empty.flags.writeable = False
        return empty
    if os.name == "posix" and info.length == size:
        mapped = np.memmap(Path(folder) / info.location, dtype=dtype, mode="r", offset=info.offset or 0, shape=shape)
        return mapped.view(np.ndarray)  # a plain array (what numpy makes of it stays one), the mapping its base
    return np.frombuffer(external_bytes(initializer, folder), dtype=dtype).reshape(shape)


@contextmanager
def weights_read_from(folder: Path):
    """While the block runs, onnxruntime's quantisers (and ours) read a weight kept in external data from its file in
    `folder`, into an array of their own, each time they ask for it: the graph's entry stays a reference, so that a
    graph loaded without its weights is quantised holding one fp32 weight at a time (external_array). onnx's own reader
    would load the bytes into the graph's message and look for the file relative to the working directory. For the
    calling thread (and tasks run in its context) only: other threads' quantisations read from their own folders."""
    from onnx.external_data_helper import uses_external_data

    modules = [importlib.import_module(f"onnxruntime.quantization.{m}") for m in ("quant_utils", "base_quantizer")]
    modules += [qdq_quantizer, sys.modules[__name__]]

    def replacements(originals: list) -> list:
        original = originals[0]  # the same function, imported by each module

        def read(initializer: onnx.TensorProto) -> np.ndarray:
            folder = _FOLDER.get()
            if folder is None or not uses_external_data(initializer) or initializer.data_type not in _FLOATS:
                return original(initializer)  # its own error for a type it does not quantise
            return external_array(initializer, folder)

        return [read] * len(originals)

    token = _FOLDER.set(Path(folder))
    try:
        with patched("weights_read_from", [(m, "tensor_proto_to_array") for m in modules], replacements):
            yield
    finally:
        _FOLDER.reset(token)


def _indexed_find(original):
    def find_by_name(item_name, item_list):
        model = _INDEXED.get()
        if model is not None and item_list is model.model.graph.initializer:
            return model.get_initializer(item_name)
        return original(item_name, item_list)

    return find_by_name


@contextmanager
def vectorised(prepared: dict | None = None, model: ONNXModel | None = None):
    """While the block runs, onnxruntime's quantisers quantise per-channel weights over whole arrays (the
    QDQ quantizer's own class is FastQDQQuantizer, which the caller builds; `prepared`: its weights quantised
    already, FastQDQQuantizer.prepared, each taken from it as onnxruntime's quantizer asks for it in this thread).
    `model`: that quantizer's model, whose get_initializer answers the quantizer's own scans of its initializers by
    name in this thread (find_by_name; FastQDQQuantizer's model finds them in an index: 3,600 scans of the full-size
    UNet's, 0.5 s)."""
    ort_quantize = importlib.import_module("onnxruntime.quantization.quantize")  # the package re-exports a function
    base_quantizer = importlib.import_module("onnxruntime.quantization.base_quantizer")
    targets = [
        (qdq_quantizer, "quantize_onnx_initializer"),
        (ort_quantize, "ONNXQuantizer"),
        (qdq_quantizer, "find_by_name"),
        (base_quantizer, "find_by_name"),
    ]

    def replacements(originals: list) -> list:
        return [_fast_initializer(originals[0]), FastONNXQuantizer, *(_indexed_find(f) for f in originals[2:])]

    tokens = _PREPARED.set({} if prepared is None else prepared), _INDEXED.set(model)
    try:
        with patched("vectorised", targets, replacements):
            yield
    finally:
        _PREPARED.reset(tokens[0])
        _INDEXED.reset(tokens[1])
