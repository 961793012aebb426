"""Quantised graphs from the checked fp32 ones, with onnxruntime's quantisers, and a sensitivity pass.

Schemes (per component, chosen in QUANT_POLICY by bundle precision):
- int8: dynamic int8, per-channel weights, on MatMul/Gemm (onnxruntime's quantize_dynamic). Conv is
  left alone: its dynamic form (ConvInteger) ran slower than fp32 on CPUs.
- int8-static: static int8 in QDQ form on Conv/MatMul/Gemm of the UNet (and tiny decoder), activation
  ranges calibrated on recorded inputs (MinMax), so convolutions run as int8 kernels; the text encoder
  takes dynamic int8.
- int4: 4-bit weights, activations stay fp32: MatMuls as MatMulNBits (symmetric, blocks of 32), convolutions
  with int4 weights in blocks of 32 input channels dequantised in front of the fp32 Conv (int4_conv.py).
The VAE decoder stays fp32: it is convolutions only and overflow-prone, and its quality loss shows
directly in the pixels. The exception is a family whose decoder is most of an image's time (SANA's DC-AE,
Family.static_int8_decoder): int8-static bundles give it static int8, its blocks kept in fp32 by `keep="auto"`
as any graph's. The tiny decoder takes static int8 in int8-static bundles, where it is the fast
option anyway; its floor is checked on the shipped model (tests/export/test_quantize.py).

Sensitivity (`keep="auto"`): activation ranges are calibrated once per graph, and every trial only places
QDQ nodes on them. The fp32 graph runs once over a few recorded feeds keeping the tensors at every block's
boundary (blocks.py); the graph is quantised whole once and run cut at those boundaries, so that each block
(e.g. `down_blocks.1/attentions.0`) runs quantised on the fp32 tensors at its inputs: its error at its own outputs
is recorded, and its difference from fp32 is kept. The graph is
checked quantised whole; past SENSITIVITY_BUDGET, those differences are added to the fp32 graph, a group of
blocks at a time, halving the groups where the output error is, so that a few runs of the fp32 graph (no graph
quantised; of its tail alone where a group's errors reach only that: blocks.TAIL_MAX_WEIGHT_SHARE) find the blocks
that cost the output most. They are kept in fp32 until the predicted error is
within budget, the graph is checked once, and more blocks are kept only if that check fails. A block's own
error alone ranks blocks poorly: where a block sits decides how much of its error reaches the output. The
manifest records every block's error, the output error of the blocks measured alone, what was kept and
why, and each whole-graph check.
"""

from __future__ import annotations

import gc
import inspect
import logging
import math
import os
import tempfile
import traceback
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .ranges import calibrate  # noqa: F401  (quantize_component's, and tests')

log = logging.getLogger("edgediff.export")

# Relative RMS error of a component's output (vs its fp32 graph, on calibration inputs) allowed by
# `keep="auto"`; 0.02 keeps the shipped model's int8 and int4 images above 30 dB PSNR against fp32.
SENSITIVITY_BUDGET = 0.02
INT4_BLOCK_SIZE = 32  # weights per scale: smaller blocks keep more precision, 32 is llama.cpp's q4_0
MAX_CALIBRATION_FEEDS = 16  # per component: the feeds that calibrate ranges and check the whole graph
# The ranking's cost, per component: the feeds whose block-boundary tensors rank the blocks, and the whole-graph
# runs (over those feeds) that measure groups of blocks' output error. Each is a full fp32 run of the graph
# (about 5 s for the full-size UNet at 512 on 2 AVX2 cores); the final check, over every calibration feed, still holds
# the budget. One feed ranks the shipped model's blocks as two did (the same blocks kept, 46.3 dB mean PSNR
# against fp32). Fewer runs cost size and speed: with 6, the full-size UNet kept 20 blocks in fp32, not 15.
SENSITIVITY_FEEDS = 1
# ...and those feeds are cropped to their centre, each image side divided by this (kept a multiple of
# REDUCED_CELL_MULTIPLE latent cells), where the graph takes one image-shaped input (a UNet's latent, a decoder's):
# the ranking's runs, most of its cost, then cost about a quarter (full-size SD-Turbo at 512: 112 to 36 s, the
# same blocks kept). Ranking only: the whole-graph checks, which decide, run whole feeds.
RANKING_SIDE_FRACTION = 2
REDUCED_CELL_MULTIPLE = 8  # the UNet's three downsamplings (a reduced size, calibration.recording_call's too)
# No crop (nor calibration.recording_call's reduced size) leaves a latent side under this many cells: a small crop is
# mostly border. The shipped model's 16 cells cropped to 8 gave a first-order error 3x the whole feed's, and its
# int8-static UNet kept 16 blocks instead of 3.
MIN_REDUCED_CELLS = 32
MAX_OUTPUT_RUNS = 12
# int8 weights in 7 bits ([-64, 64], per channel). On CPUs without VNNI (AVX2 alone), onnxruntime's int8 kernels
# multiply with vpmaddubsw, which adds two u8 x s8 products into an int16 and saturates past 32767: with full-range
# weights one fused MatMul was 1.15% off (relative RMS) its exact result, with 7-bit weights exact. VNNI and ARM
# accumulate in int32 and lose only the bit. A bundle is made once and run on any CPU, so every bundle takes 7.
WEIGHT_REDUCE_RANGE = True
LARGE_GRAPH_BYTES = 1_800_000_000  # beyond this, quantiser inputs/outputs use external data (protobuf's 2 GB)
# A graph whose output per feed is at most this large runs its final check's feeds side by side (_outputs): its
# activations are small too (a denoiser's or text encoder's, a tiny decoder's at the recorded size), where a decoder's
# at full size (SANA's DC-AE at 1024: 12 MB of image, activations of hundreds of MB) would be held twice.
SIDE_BY_SIDE_OUTPUT_BYTES = 1 << 20


@dataclass(frozen=True)
class Scheme:
    name: str  # recorded in the manifest
    precision: str  # the component's precision label
    op_types: tuple[str, ...]

    @property
    def calibrated(self) -> bool:
        """Whether activations take static ranges, calibrated on recorded inputs."""
        return self.name == "int8-static"


SCHEMES = {
    "int8-dynamic": Scheme("int8-dynamic", "int8", ("MatMul", "Gemm")),
    # static QDQ with calibrated activation ranges: convolutions become QLinearConv-style int8 kernels
    "int8-static": Scheme("int8-static", "int8-static", ("Conv", "MatMul", "Gemm")),
    "int4-weight-only": Scheme("int4-weight-only", "int4", ("MatMul", "Conv")),
}
# bundle precision -> component -> scheme (None: the component stays fp32)
_FP32 = {"vae_decoder": None, "vae_decoder_tiny": None, "vae_encoder": None}
# every text encoder (CLIP, OpenCLIP, T5) takes the same scheme
_TEXT = ("text_encoder", "text_encoder_2", "text_encoder_3")
QUANT_POLICY = {
    # the VAE decoder in static int8 lost too much accuracy on the shipped model and ran slower: fp32;
    # the tiny decoder's plain 3x3 convolutions run faster as QLinearConv. A transformer denoiser (SD3, FLUX) is
    # MatMuls: dynamic int8, as for int8 bundles (static ranges around its adaptive norms are not measured yet)
    "int8-static": {
        **dict.fromkeys(_TEXT, "int8-dynamic"),
        "unet": "int8-static",
        "transformer": "int8-dynamic",
        **_FP32,
        "vae_decoder_tiny": "int8-static",
    },
    "int8": {**dict.fromkeys(_TEXT, "int8-dynamic"), "unet": "int8-dynamic", "transformer": "int8-dynamic", **_FP32},
    "int4": {
        **dict.fromkeys(_TEXT, "int4-weight-only"),
        "unet": "int4-weight-only",
        "transformer": "int4-weight-only",
        **_FP32,
    },
}


def quantisable(precision: str, family=None) -> list[str]:
    """The components a bundle of this precision quantises, in the table's order: QUANT_POLICY's row with the
    family's own choices (component_policy); with no family, those of any family in the registry (what
    --quantize-only may name before the source is read)."""
    if family is None:
        from .families import FAMILIES

        named = {n for f in FAMILIES for n, scheme in component_policy(precision, family=f).items() if scheme}
        return [name for name in QUANT_POLICY[precision] if name in named]
    return [name for name, scheme in component_policy(precision, family=family).items() if scheme]


def component_policy(precision: str, only: tuple[str, ...] = (), family=None) -> dict[str, str | None]:
    """QUANT_POLICY's row for `precision`, with the VAE decoder in static int8 where the family (a
    families.Family) asks for it; with `only` (ExportOptions.quantize_only), every other component fp32."""
    policy = dict(QUANT_POLICY[precision])
    if family is not None and family.static_int8_decoder and precision == "int8-static":
        policy["vae_decoder"] = "int8-static"
    return {k: v if not only or k in only else None for k, v in policy.items()}


def block_of(node_name: str) -> str:
    """The block a node belongs to, from the exporter's scoped names: '/down_blocks.1/attentions.0/...'
    -> 'down_blocks.1/attentions.0'; '/text_model/encoder/layers.3/...' -> 'encoder/layers.3';
    '/decoder/layers/layers.2/conv/...' -> 'decoder/layers.2'."""
    parts = [p for p in node_name.split("/") if p]
    if parts and parts[0] == "text_model":
        parts = parts[1:]
    # a container scope named after its children ('/decoder/layers/layers.2/...', nn.Sequential's) says
    # nothing: without this every layer of the tiny decoder would be one block
    parts = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    return "/".join(parts[:2]) if len(parts) > 2 else (parts[0] if parts else node_name)


def quantizable_nodes(model, scheme: Scheme) -> list[str]:
    """Nodes of the scheme's op types whose second input is a weight (an initializer), that the scheme changes."""
    from .int4_conv import takes

    weights = {t.name: t for t in model.graph.initializer}

    def changed(node) -> bool:
        # int4 convolutions: only those with a whole block of input channels (int4_conv.py)
        return not (scheme.name == "int4-weight-only" and node.op_type == "Conv") or takes(
            weights[node.input[1]], INT4_BLOCK_SIZE
        )

    return [
        n.name
        for n in model.graph.node
        if n.op_type in scheme.op_types and len(n.input) > 1 and n.input[1] in weights and changed(n)
    ]


def quantizable_blocks(model, scheme: Scheme) -> dict[str, list[str]]:
    """Block -> the nodes a block kept in fp32 leaves alone: every node of the scheme's op types in it, the
    activation-by-activation MatMuls of attention (which static int8 quantises too) included. Blocks are
    those holding at least one quantizable weight."""
    weighted = {block_of(name) for name in quantizable_nodes(model, scheme)}
    blocks: dict[str, list[str]] = {}
    for node in model.graph.node:
        if node.op_type in scheme.op_types and block_of(node.name) in weighted:
            blocks.setdefault(block_of(node.name), []).append(node.name)
    return blocks


# quantize_static's options for our static scheme, kept when the quantiser runs on precomputed ranges
STATIC_OPTIONS = {
    "ActivationSymmetric": False,
    "WeightSymmetric": True,
    # MatMul outputs stay float: otherwise onnxruntime fuses each attention softmax between Q/DQ pairs
    # into QLinearSoftmax, whose CPU kernel is far slower than the float Softmax; the MatMuls then run
    # as MatMulIntegerToFloat
    "OpTypesToExcludeOutputQuantization": ["MatMul"],
}


def release_memory() -> None:
    """Collects garbage and, with glibc, hands freed heap memory back to the system: each stage's graphs and
    sessions are gone before the next is loaded, but glibc keeps their pages, and the next stage's buffers,
    sized differently, do not all fit in them (resident memory then grows stage after stage)."""
    import ctypes
    import sys

    gc.collect()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl, ...)
            pass


@contextmanager
def libraries_frozen():
    """Leaves the objects alive now out of garbage collection until the block ends (gc.freeze): release_memory's
    gc.collect() otherwise walks every object torch, diffusers, transformers and optimum made at import, about
    half a million, 0.3-0.5 s a call on 2 cores, and an export calls it dozens of times. Garbage made before is
    collected first; what the block creates stays collectable."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _large(src: Path) -> bool:
    """Whether a graph and its weights pass LARGE_GRAPH_BYTES: its file and those named after it beside it (a data
    file, or a folder of weight files: bundle_writer._move_weights)."""
    src = Path(src)
    named = src.parent.glob(f"{src.name}*")
    files = [f for path in named for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file()]
    return sum(f.stat().st_size for f in files) > LARGE_GRAPH_BYTES


def _default_type() -> dict:
    import onnx

    # onnx's type inference knows no com.microsoft operators (graphs from `--optimize`); every tensor the
    # quantiser cannot type is fp32 in our graphs
    return {"DefaultTensorType": onnx.TensorProto.FLOAT}


def _qdq_quantizer(model, scheme: Scheme, exclude: list[str], ranges):
    """onnxruntime's QDQ quantizer as quantize_static builds it (QDQ format, per-channel int8 weights, uint8
    activations, STATIC_OPTIONS), on ranges calibrated beforehand; its weight scales found over whole arrays
    (weight_quant.py)."""
    from onnxruntime.quantization.calibrate import CalibrationMethod, TensorsData
    from onnxruntime.quantization.quant_utils import QuantizationMode, QuantType, update_opset_version

    from .weight_quant import FastQDQQuantizer

    model = update_opset_version(model, QuantType.QInt8)
    present = {t for node in model.graph.node for t in (*node.input, *node.output)}
    # a table of its own per graph: the quantizer adjusts entries in place
    table = TensorsData(CalibrationMethod.MinMax, {k: v for k, v in ranges.items() if k in present})
    # onnxruntime < 1.18 also took the mode and whether it is static
    older = "static" in inspect.signature(FastQDQQuantizer).parameters
    return FastQDQQuantizer(
        model,
        per_channel=True,
        reduce_range=WEIGHT_REDUCE_RANGE,
        weight_qType=QuantType.QInt8,
        activation_qType=QuantType.QUInt8,
        tensors_range=table,
        nodes_to_quantize=[],
        nodes_to_exclude=list(exclude),
        op_types_to_quantize=list(scheme.op_types),
        extra_options={**STATIC_OPTIONS, **_default_type()},
        **({"mode": QuantizationMode.QLinearOps, "static": True} if older else {}),
    )


def quantize(src: Path, dst: Path, scheme: Scheme, exclude: list[str], ranges=None) -> None:
    """Writes the quantised graph of `src` to `dst`, leaving the `exclude` nodes in fp32 (`ranges`: the
    activation ranges calibrate() computed, for static schemes). int8 graphs, and 4-bit ones past protobuf's 2 GB,
    keep their weights in external data beside them (`dst`'s name + ".data")."""
    import onnx

    large = _large(src)
    if scheme.name == "int8-dynamic":
        # a weight at a time (stream_quant.py), at any size: quantize_dynamic holds the whole graph and its fp32
        # weights, and took 26 s against 11 s for the full-size SD-Turbo text encoder (1.4 GB), the same graph
        from .stream_quant import quantize_int8_dynamic_streaming

        quantize_int8_dynamic_streaming(src, dst, list(scheme.op_types), exclude)
    elif scheme.calibrated:
        from .stream_quant import quantize_static_streaming

        if ranges is None:
            raise ValueError("static int8 needs activation ranges (calibrate)")
        # a weight at a time (stream_quant.py), at any size, its weights beside it
        quantize_static_streaming(src, dst, lambda model: _qdq_quantizer(model, scheme, exclude, ranges))
    elif scheme.name == "int4-weight-only" and large:
        # a weight at a time (stream_quant.py): onnxruntime's quantiser holds the whole graph and its fp32 weights
        from .stream_quant import quantize_int4_streaming

        quantize_int4_streaming(src, dst, exclude, INT4_BLOCK_SIZE, convs="Conv" in scheme.op_types)
    elif scheme.name == "int4-weight-only":
        root_level = logging.getLogger().level
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        # that module configures logging at import and logs every node at INFO: keep the user's settings
        logging.getLogger().setLevel(root_level)
        logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)
        quantizer = MatMulNBitsQuantizer(
            onnx.load(str(src)),
            bits=4,
            block_size=INT4_BLOCK_SIZE,
            is_symmetric=True,
            nodes_to_exclude=exclude,
            op_types_to_quantize=tuple(t for t in scheme.op_types if t != "Conv"),
        )
        quantizer.process()
        if "Conv" in scheme.op_types:
            from .int4_conv import quantize_conv_weights

            quantize_conv_weights(quantizer.model.model, set(exclude), INT4_BLOCK_SIZE)
        onnx.save_model(
            quantizer.model.model,
            str(dst),
            save_as_external_data=large,
            all_tensors_to_one_file=True,
            location=f"{dst.name}.data",
        )
    else:
        raise ValueError(f"unknown quantisation scheme {scheme.name!r}")


def _rel_rms(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    num = sum(float(np.sum((g.astype(np.float64) - r) ** 2)) for g, r in zip(got, ref))
    den = sum(float(np.sum(r.astype(np.float64) ** 2)) for r in ref)
    return float(np.sqrt(num / max(den, 1e-30)))


def _outputs(path: Path, feeds: list[dict], side_by_side: bool = False) -> list[np.ndarray]:
    """The graph's first output for each feed, as the runtime opens the graph. `side_by_side`: the feeds run one per
    core at once (ort_sessions.share_cores; runs of one onnxruntime session may overlap). At the recorded sizes a graph's
    operators are too small to keep two threads busy: the full-size SD-Turbo UNet's int8 graph ran its eight 32x32
    feeds in 4.7-5.0 s so, against 5.6-7.8 s one after another on both cores, with the same values. Each run holds
    activations of its own: for graphs with small outputs only (SIDE_BY_SIDE_OUTPUT_BYTES)."""
    import onnxruntime as ort

    from .ort_sessions import runtime_options, share_cores

    workers, threads = share_cores(len(feeds)) if side_by_side else (1, None)
    options = runtime_options()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    with ThreadPoolExecutor(workers, thread_name_prefix="edgediff-check") as pool:
        return list(pool.map(lambda feed: session.run(None, feed)[0], feeds))


def _graph_files(graph: Path) -> list[Path]:
    """A graph's file and its external data's (f"{name}.data"), those that exist."""
    return [f for f in (graph, graph.with_name(f"{graph.name}.data")) if f.exists()]


def _remove(graph: Path) -> None:
    for f in _graph_files(graph):
        f.unlink(missing_ok=True)


def _move(graph: Path, to: Path) -> None:
    """Moves a graph and its external data, if any, to `to` (the data file renamed with it, as the graph names it:
    f"{name}.data", which holds where the two names are the same)."""
    for f in _graph_files(graph):
        os.replace(f, to.with_name(f.name.replace(graph.name, to.name, 1)))


def spread(feeds: list, count: int) -> list:
    """`count` of `feeds`, evenly spread (recorded feeds run prompt by prompt, step by step)."""
    if len(feeds) <= count:
        return list(feeds)
    return [feeds[i] for i in sorted(set(np.linspace(0, len(feeds) - 1, count).round().astype(int).tolist()))]


def ranking_feed(model, feed: dict) -> dict:
    """`feed` as the sensitivity pass ranks blocks on it: its one image-shaped input (a graph input of rank 4 whose
    height and width are dynamic) cropped to its centre, each side divided by RANKING_SIDE_FRACTION; whole where the
    graph has no such input, or several (a crop of each would not keep their sizes in step), or where a side would
    fall under MIN_REDUCED_CELLS."""
    shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
    return cropped_for_ranking(shapes, feed)


def cropped_for_ranking(input_shapes: dict[str, list], feed: dict) -> dict:
    """ranking_feed for a graph whose inputs' declared shapes (name -> dims, strings where dynamic) are known."""
    images = [
        name for name, dims in input_shapes.items() if len(dims) == 4 and all(isinstance(d, str) for d in dims[2:])
    ]
    if len(images) != 1 or images[0] not in feed:
        return feed
    value = np.asarray(feed[images[0]])
    cuts = [side // RANKING_SIDE_FRACTION // REDUCED_CELL_MULTIPLE * REDUCED_CELL_MULTIPLE for side in value.shape[2:]]
    if min(cuts) < MIN_REDUCED_CELLS:
        return feed
    crop = [slice((side - cut) // 2, (side - cut) // 2 + cut) for side, cut in zip(value.shape[2:], cuts)]
    return {**feed, images[0]: np.ascontiguousarray(value[(slice(None), slice(None), *crop)])}


def weights_beside(src: Path, structure, workdir: Path) -> Path:
    """`src` where its weights lie outside the graph file already, else a copy of it in `workdir` with its weights
    in a data file beside it, written once: the structure the sensitivity pass edits and saves (record, injection)
    then holds none of them (onnx moves them out of `structure`'s message as it saves), and the final graph reads
    only the weights of the blocks it keeps in fp32 (kept_fp32.py) instead of parsing the whole graph. An export's
    graphs come with theirs beside them already (bundle_writer._write_checked)."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    if any(uses_external_data(t) for t in structure.graph.initializer):
        return src
    copy = workdir / "fp32" / src.name
    if not copy.exists():
        copy.parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(
            structure, str(copy), save_as_external_data=True, all_tensors_to_one_file=True, location=f"{src.name}.data"
        )
    return copy


def block_errors(
    src: Path,
    structure,
    blocks: dict[str, list[str]],
    scheme: Scheme,
    ranges,
    feeds: list[dict],
    workdir: Path,
    quantised: Path,
):
    """Each block's own quantisation error: the relative RMS error of its outputs when it alone is quantised
    and run on the fp32 graph's tensors at its inputs (recorded once, for `feeds`), against the fp32 graph's
    tensors at its outputs (blocks.BlockProbe.errors: the whole graph quantised once, run cut at the blocks'
    boundaries). Returns the errors and the probe (blocks.BlockProbe) holding the recordings. `quantised`: where
    that whole quantised graph is written, and left."""
    from .blocks import BlockProbe, split_blocks

    src = weights_beside(src, structure, workdir)
    probe = BlockProbe(src, structure, split_blocks(structure.graph, blocks, block_of), workdir / "boundaries")
    quantised.parent.mkdir(parents=True, exist_ok=True)
    # the fp32 graph records on a thread while the whole graph is quantised here, and the cut graph opens once it is:
    # opening a session is mostly one core's work, and so is much of quantising (its Python, its writing). The
    # full-size SD-Turbo UNet's recording, quantisation and cut graph took 16.5 s one after another on 2 AVX2 cores,
    # 14 s so. The recording's session stays open for the ranking (output_power), beside the quantiser's weights.
    with (
        ThreadPoolExecutor(1, thread_name_prefix="edgediff-record") as recorder,
        ThreadPoolExecutor(1, thread_name_prefix="edgediff-cut") as opener,
    ):
        recording, ahead = recorder.submit(probe.record, feeds), None
        try:
            quantize(src, quantised, scheme, [], ranges)
            ahead = probe.open_ahead(quantised, opener, feeds[0] if feeds else {})
            recording.result()
        except BaseException:
            if ahead is not None:
                ahead.drop()  # not kept by the traceback
            failed = recording.exception()  # once it has ended
            if failed is not None:  # its frames would hold the session it opened
                traceback.clear_frames(failed.__traceback__)
            probe.close()
            raise
        return probe.errors(quantised, ahead), probe


def _prior_shares(group, prior) -> list[float]:
    """Each block's share of its group's power, in proportion to its own error squared (`prior`); equal shares where
    no block has one."""
    weights = [(prior or {}).get(b, 0.0) ** 2 for b in group]
    whole = sum(weights)
    return [w / whole if whole > 0 else 1 / len(group) for w in weights]


def keep_until_within(
    blocks: list[str],
    power,
    check,
    budget: float,
    release=None,
    prior: dict[str, float] | None = None,
    max_runs: int = MAX_OUTPUT_RUNS,
):
    """Keeps blocks in fp32, those whose quantisation costs the output most first, until `check(kept)`, the
    whole quantised graph's error, is within `budget`. Returns the kept blocks, their error, every check,
    why each block was kept and the output error of each block measured alone.

    `power(group)`: the output's relative error power when that group's blocks alone are quantised (to first
    order: BlockProbe.output_power), taken to add up over blocks. Every block's power is measured first: within
    the budget, the whole quantised graph is checked with none kept (and kept as it is if the check passes);
    past it, that graph is neither built nor checked (a quantisation and a run over every feed saved: 35 s for
    the full-size UNet, where the first order was within 3% of the check), and the first order stands for its
    error. Then groups of blocks (in graph order) are halved where the power is: one half is measured and the
    other taken to cost the group's power less that half's, except where the measured half costs more than the
    whole group (their errors cancel), where the other half is measured too; so the blocks that cost most are
    found in a few runs, and kept until the error predicted from the powers of the groups left (scaled to the last
    check) is within budget; then the graph is checked once, and more blocks are kept only if that check fails. After
    `max_runs` calls of `power`, a group's power (and, where errors cancel, an unmeasured half's share of its
    group's) is shared among its blocks in proportion to `prior` (their block-local errors, squared).
    `release()` runs before each check (BlockProbe.close: the whole graph is not held twice)."""
    import heapq

    release = release or (lambda: None)
    kept: list[str] = []
    why: dict[str, str] = {}
    alone: dict[str, float] = {}
    total = power(list(blocks)) if blocks else 0.0
    runs = 1
    error = math.sqrt(max(total, 0.0))
    checks = [{"kept": 0, "first_order": round(error, 6)}]
    scale = 1.0
    if error <= budget:
        release()
        error = check([])
        checks[0]["error"] = round(error, 6)
        if error <= budget or not blocks:
            return kept, error, checks, why, alone
        scale = error**2 / total if total > 0 else 1.0
    # groups by power, largest first (ties: graph order); whether that power was measured or shared out
    heap = [(-total, 0, tuple(blocks), True)]

    def left() -> float:
        # the power of what is still quantised: its groups' powers, which add up to more than the whole graph's
        # where a group's halves cancel (the whole graph's less the blocks kept would then fall to 0, and no failed
        # check could scale it: a whole-graph check for each block kept after)
        return sum(-power for power, *_ in heap)

    def predicted() -> float:
        return math.sqrt(max(scale * left(), 0.0))

    while True:
        before = len(kept)
        while heap and (predicted() > budget or len(kept) == before):
            neg, first, group, measured = heapq.heappop(heap)
            if len(group) > 1 and runs < max_runs:
                half, rest = group[: len(group) // 2], group[len(group) // 2 :]
                part = power(list(half))
                runs += 1
                heapq.heappush(heap, (-part, first, half, True))
                # the measured half costs more than the whole group: their errors cancel, and the group's power
                # less the half's says nothing of the rest's (taken as 0, a costly block would stay quantised).
                # Measured where runs are left, else the group's share by the blocks' own errors, and no less than
                # the rest's least power for errors that add as vectors: (sqrt(half) - sqrt(group))^2
                if part > -neg and runs < max_runs:
                    rest_power, rest_measured = power(list(rest)), True
                    runs += 1
                elif part > -neg:
                    share = sum(_prior_shares(group, prior)[len(half) :])
                    rest_power, rest_measured = max(-neg * share, (math.sqrt(part) - math.sqrt(-neg)) ** 2), False
                else:
                    rest_power, rest_measured = -neg - part, measured
                heapq.heappush(heap, (-rest_power, first + len(half), rest, rest_measured))
                continue
            if len(group) > 1:  # out of runs: shared out by the blocks' own errors
                for i, (b, share) in enumerate(zip(group, _prior_shares(group, prior))):
                    heapq.heappush(heap, (neg * share, first + i, (b,), False))
                continue
            (b,) = group
            kept.append(b)
            cost = math.sqrt(max(scale * -neg, 0.0))
            if measured:
                alone[b] = round(cost, 6)
            what = f"alone {cost:.4f} at the output" if measured else f"about {cost:.4f} at the output (estimated)"
            measured_or_not = "" if "error" in checks[-1] else " to first order"
            why[b] = (
                f"{what}; whole graph {error:.4f}{measured_or_not} > budget {budget} with {before} kept, "
                f"predicted {predicted():.4f} with {len(kept)}"
            )
        release()
        expected = predicted()
        error = check(kept)
        checks.append({"kept": len(kept), "error": round(error, 6), "predicted": round(expected, 6)})
        if error <= budget or not heap:
            return kept, error, checks, why, alone
        # the check failed: what is still quantised costs more than predicted
        power_left = left()
        if power_left > 0:
            scale = error**2 / power_left


def quantize_component(
    src: Path,
    dst: Path,
    scheme: Scheme,
    feeds: list[dict],
    keep: str | list[str] = "none",
    budget: float = SENSITIVITY_BUDGET,
    stages=None,
    references: list[np.ndarray] | None = None,
    ranges=None,
    checksums=None,
) -> dict:
    """Quantises one graph; returns the manifest record (scheme, blocks kept in fp32 and why, errors).

    keep: "none" (quantise every eligible node), "auto" (sensitivity pass), or a list of block names.
    references: the fp32 graph's first output for each feed, when recorded with them (calibration.py); the
    fp32 graph is run over the feeds otherwise.
    ranges: static schemes' activation ranges over `feeds`, when taken while they were recorded
    (calibration.record_feeds); calibrated here otherwise.
    Ranges are calibrated once; one graph is in memory at a time (the fp32 graph's structure aside).
    stages: progress.Stages to report to (its stages are named after `src`'s stem).
    checksums: a checksums.BackgroundChecksums of the folder the graph ends up in under `dst`'s names: the files of
    each graph given its final check start there as the check begins (on the core its session's opening leaves idle;
    0.9 s for full-size SD-Turbo's int8 UNet), and stand if that graph is the one moved there.
    """
    import onnx

    from .checksums import NoChecksums
    from .kept_fp32 import restore_fp32
    from .progress import NoStages

    src, dst = Path(src), Path(dst)
    stages, label = stages or NoStages(), src.stem
    checksums = NoChecksums() if checksums is None else checksums
    structure = onnx.load(str(src), load_external_data=False)  # weights stay on disk (large graphs)
    nodes = quantizable_nodes(structure, scheme)
    blocks = quantizable_blocks(structure, scheme)
    typed = {n.name for n in structure.graph.node if n.op_type in scheme.op_types}  # what a QDQ quantiser changes
    if keep not in ("none", "auto"):
        unknown = set(keep) - set(blocks)
        if unknown:
            raise ValueError(f"no quantisable block named {sorted(unknown)}; blocks: {sorted(blocks)}")
    record: dict = {
        "scheme": scheme.name,
        "op_types": list(scheme.op_types),
        # int8 weights' values: 7 bits where WEIGHT_REDUCE_RANGE keeps AVX2's int8 kernels from saturating
        "weight_bits": 4 if scheme.name == "int4-weight-only" else 7 if WEIGHT_REDUCE_RANGE else 8,
        "quantised_nodes": len(nodes),
        "budget": budget,
        # the inputs the whole-graph checks run (recorded at a reduced size where the images allow it: calibration.py)
        "checked_on": {k: list(np.shape(v)) for k, v in feeds[0].items()} if feeds else {},
        "kept_fp32": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgediff-quant-", dir=dst.parent) as tmp:
        tmp = Path(tmp)
        # the whole graph quantised with no block kept, made by the sensitivity pass: the check with none kept
        # places it rather than quantising again
        everything = tmp / "all-quantised" / dst.name
        if scheme.calibrated:
            taken = ranges is not None
            if not taken:
                with stages.stage(f"{label}: calibrate"):
                    ranges = calibrate(src, scheme, feeds)
            record["calibration"] = {
                "method": "MinMax",
                "feeds": len(feeds),
                "tensors": len(list(ranges.keys())),
                "taken": "while recording" if taken else "after recording",
            }
        else:
            ranges = None
        if keep == "auto":
            ranked = [ranking_feed(structure, feed) for feed in spread(feeds, SENSITIVITY_FEEDS)]
            with stages.stage(f"{label}: sensitivity"):
                src = weights_beside(src, structure, tmp)  # what follows reads it, the final graph's fp32 blocks too
                errors, probe = block_errors(src, structure, blocks, scheme, ranges, ranked, tmp, everything)
                release_memory()
            record["block_errors"] = {b: round(e, 6) for b, e in sorted(errors.items(), key=lambda kv: -kv[1])}
        del structure
        if references is not None and len(references) != len(feeds):
            raise ValueError(f"{len(references)} reference outputs for {len(feeds)} feeds")
        ref = list(references) if references is not None else _outputs(src, feeds)
        small = all(r.nbytes <= SIDE_BY_SIDE_OUTPUT_BYTES for r in ref)
        release_memory()
        candidate = tmp / dst.name

        def files(graph: Path) -> list[str]:
            return [f.name for f in _graph_files(graph)]

        def check(kept: list[str]) -> float:
            # a candidate that failed its check: read to the end before it goes (Windows refuses to unlink a file
            # another thread has open)
            checksums.wait(files(candidate))
            _remove(candidate)
            excluded = [n for b in kept for n in blocks[b]]
            with stages.stage(f"{label}: quantize"):
                if everything.exists() and not kept:  # the sensitivity pass's, under the same names
                    _move(everything, candidate)
                    record["final_graph"] = "the whole quantised graph"
                elif everything.exists():  # that graph with the kept blocks put back in fp32
                    restore_fp32(everything, src, candidate, set(excluded), typed)
                    record["final_graph"] = "the whole quantised graph, kept blocks put back in fp32"
                else:
                    _remove(everything)  # no longer wanted: not two quantised graphs on disk at once
                    quantize(src, candidate, scheme, excluded, ranges)
                    record["final_graph"] = "quantised with the kept blocks left out"
                release_memory()
            checksums.start(files(candidate), where=candidate.parent)
            with stages.stage(f"{label}: final check"):
                error = _rel_rms(_outputs(candidate, feeds, small), ref)
            release_memory()
            return error

        if keep == "auto":
            runs: list[float] = []  # the power of each group measured; the first is every block's

            def power(group: list[str]) -> float:
                with stages.stage(f"{label}: sensitivity"):
                    runs.append(probe.output_power(group))
                return runs[-1]

            kept, error, record["checks"], record["kept_fp32"], alone = keep_until_within(
                list(blocks), power, check, budget, probe.close, prior=errors
            )
            probe.close()
            record["sensitivity"] = {
                "method": "block errors on recorded boundaries; output errors of block groups, halved where large",
                "feeds": len(ranked),
                "ranked_on": {k: list(np.shape(v)) for k, v in ranked[0].items()} if ranked else {},
                "output_runs": len(runs),
                # every block's difference added at once: the whole graph's error to first order, beside its check
                "first_order_error": round(math.sqrt(runs[0]), 6) if runs else None,
                "output_errors": dict(sorted(alone.items(), key=lambda kv: -kv[1])),
            }
        else:
            kept = [] if keep == "none" else list(keep)
            record["kept_fp32"] = {b: "asked" for b in kept}
            error = check(kept)
        checksums.wait(files(candidate))  # moved once read (Windows: no file renamed while open)
        _move(candidate, dst)
    record["error"] = round(error, 6)
    log.info("%s: %s, %d blocks kept fp32, output error %.4f", label, scheme.name, len(kept), record["error"])
    return record
