"""Quantised graphs from the checked fp32 ones, with onnxruntime's quantisers, and a sensitivity pass.

Schemes (per component, chosen in QUANT_POLICY by bundle precision):
- int8: dynamic int8, per-channel weights, on MatMul/Gemm (onnxruntime's quantize_dynamic). Conv is
  left alone: its dynamic form (ConvInteger) ran slower than fp32 on CPUs.
- int8-static: static int8 in QDQ form on Conv/MatMul/Gemm of the UNet (and tiny decoder), activation
  ranges calibrated on recorded inputs (MinMax), so convolutions run as int8 kernels; the text encoder
  takes dynamic int8.
- int4: 4-bit weight-only MatMul (MatMulNBits, symmetric, blocks of 32), activations stay fp32.
The VAE decoder stays fp32: it is convolutions only and overflow-prone, and its quality loss shows
directly in the pixels. The tiny decoder takes static int8 in int8-static bundles, where it is the fast
option anyway; its floor is checked on the shipped model (tests/export/test_quantize.py).

Sensitivity (`keep="auto"`): each block of the graph (e.g. `down_blocks.1/attentions.0`) is quantised
alone and its output error measured on calibration inputs recorded from real prompts run through
the fp32 bundle; then the worst blocks are kept in fp32, one at a time, until the whole graph's
error is within SENSITIVITY_BUDGET. The manifest records every block's error and what was kept.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("edgediff.export")

# Relative RMS error of a component's output (vs its fp32 graph, on calibration inputs) allowed by
# `keep="auto"`; 0.02 keeps the shipped model's int8 and int4 images above 30 dB PSNR against fp32.
SENSITIVITY_BUDGET = 0.02
INT4_BLOCK_SIZE = 32  # weights per scale: smaller blocks keep more precision, 32 is llama.cpp's q4_0
MAX_CALIBRATION_FEEDS = 16  # per component; enough to rank blocks, cheap to run per block
LARGE_GRAPH_BYTES = 1_800_000_000  # beyond this, quantiser inputs/outputs use external data (protobuf's 2 GB)


@dataclass(frozen=True)
class Scheme:
    name: str  # recorded in the manifest
    precision: str  # the component's precision label
    op_types: tuple[str, ...]


SCHEMES = {
    "int8-dynamic": Scheme("int8-dynamic", "int8", ("MatMul", "Gemm")),
    # static QDQ with calibrated activation ranges: convolutions become QLinearConv-style int8 kernels
    "int8-static": Scheme("int8-static", "int8-static", ("Conv", "MatMul", "Gemm")),
    "int4-weight-only": Scheme("int4-weight-only", "int4", ("MatMul",)),
}
# bundle precision -> component -> scheme (None: the component stays fp32)
_FP32 = {"vae_decoder": None, "vae_decoder_tiny": None, "vae_encoder": None}
QUANT_POLICY = {
    # the VAE decoder in static int8 lost too much accuracy on the shipped model and ran slower: fp32;
    # the tiny decoder's plain 3x3 convolutions run faster as QLinearConv
    "int8-static": {
        "text_encoder": "int8-dynamic",
        "text_encoder_2": "int8-dynamic",
        "unet": "int8-static",
        **_FP32,
        "vae_decoder_tiny": "int8-static",
    },
    "int8": {"text_encoder": "int8-dynamic", "text_encoder_2": "int8-dynamic", "unet": "int8-dynamic", **_FP32},
    "int4": {
        "text_encoder": "int4-weight-only",
        "text_encoder_2": "int4-weight-only",
        "unet": "int4-weight-only",
        **_FP32,
    },
}


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
    """Nodes of the scheme's op types whose second input is a weight (an initializer)."""
    weights = {t.name for t in model.graph.initializer}
    return [
        n.name for n in model.graph.node if n.op_type in scheme.op_types and len(n.input) > 1 and n.input[1] in weights
    ]


class _Reader:
    """onnxruntime's CalibrationDataReader over recorded feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def quantize(src: Path, dst: Path, scheme: Scheme, exclude: list[str], feeds: list[dict] | None = None) -> None:
    """Writes the quantised graph of `src` to `dst`, leaving the `exclude` nodes in fp32 (`feeds`:
    calibration inputs, for static schemes). Graphs past protobuf's 2 GB (and the calibrator's
    augmented copy) keep their weights in external data beside them."""
    import onnx

    large = sum(f.stat().st_size for f in src.parent.glob(f"{src.name}*")) > LARGE_GRAPH_BYTES
    # onnx's type inference knows no com.microsoft operators (graphs from `--optimize`); every tensor the
    # quantiser cannot type is fp32 in our graphs
    default_type = {"DefaultTensorType": onnx.TensorProto.FLOAT}

    if scheme.name == "int8-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            str(src),
            str(dst),
            op_types_to_quantize=list(scheme.op_types),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            use_external_data_format=large,
            extra_options=default_type,
        )
    elif scheme.name == "int8-static":
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        if not feeds:
            raise ValueError("static int8 needs calibration inputs")
        quantize_static(
            str(src),
            str(dst),
            _Reader(feeds),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(scheme.op_types),
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=exclude,
            calibrate_method=CalibrationMethod.MinMax,
            use_external_data_format=large,
            extra_options={
                "ActivationSymmetric": False,
                "WeightSymmetric": True,
                **default_type,
                # MatMul outputs stay float: otherwise onnxruntime fuses each attention
                # softmax between Q/DQ pairs into QLinearSoftmax, whose CPU kernel is far
                # slower than the float Softmax; the MatMuls then run as
                # MatMulIntegerToFloat
                "OpTypesToExcludeOutputQuantization": ["MatMul"],
            },
        )
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
            op_types_to_quantize=scheme.op_types,
        )
        quantizer.process()
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


def _outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def quantize_component(
    src: Path,
    dst: Path,
    scheme: Scheme,
    feeds: list[dict],
    keep: str | list[str] = "none",
    budget: float = SENSITIVITY_BUDGET,
) -> dict:
    """Quantises one graph; returns the manifest record (scheme, blocks kept in fp32 and why, errors).

    keep: "none" (quantise every eligible node), "auto" (sensitivity pass), or a list of block names.
    """
    import onnx

    model = onnx.load(str(src))
    nodes = quantizable_nodes(model, scheme)
    del model
    blocks: dict[str, list[str]] = {}
    for name in nodes:
        blocks.setdefault(block_of(name), []).append(name)
    ref = _outputs(src, feeds)
    record: dict = {
        "scheme": scheme.name,
        "op_types": list(scheme.op_types),
        "quantised_nodes": len(nodes),
        "budget": budget,
        "kept_fp32": {},
    }
    with tempfile.TemporaryDirectory(prefix="edgediff-quant-", dir=dst.parent) as tmp:
        trial = Path(tmp) / "trial.onnx"

        def error_without(kept: set[str]) -> float:
            quantize(src, trial, scheme, [n for b in kept for n in blocks[b]], feeds)
            return _rel_rms(_outputs(trial, feeds), ref)

        kept: set[str] = set()
        if keep == "auto":
            # each block quantised alone: its own contribution to the output error
            alone = {b: error_without(set(blocks) - {b}) for b in blocks}
            record["block_errors"] = {b: round(e, 6) for b, e in sorted(alone.items(), key=lambda kv: -kv[1])}
            error = error_without(kept)
            for block in sorted(alone, key=alone.get, reverse=True):
                if error <= budget:
                    break
                kept.add(block)
                record["kept_fp32"][block] = f"alone {alone[block]:.4f}; whole graph {error:.4f} > budget {budget}"
                error = error_without(kept)
        elif keep != "none":
            unknown = set(keep) - set(blocks)
            if unknown:
                raise ValueError(f"no quantisable block named {sorted(unknown)}; blocks: {sorted(blocks)}")
            kept = set(keep)
            record["kept_fp32"] = {b: "asked" for b in kept}
        quantize(src, dst, scheme, [n for b in kept for n in blocks[b]], feeds)
    record["error"] = round(_rel_rms(_outputs(dst, feeds), ref), 6)
    log.info("%s: %s, %d blocks kept fp32, output error %.4f", src.stem, scheme.name, len(kept), record["error"])
    return record
