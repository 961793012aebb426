"""onnxruntime's transformer optimiser (attention, LayerNorm, GELU fusions) for the bundle's graphs.

Off by default: adopted per provider only where measured faster (docs/benchmarks.md). The fused
graph is checked against PyTorch like any exported graph. For any provider (`--optimize`, `cpu`) the
GPU-only fusions (NHWC convolutions, GroupNorm, BiasSplitGelu, packed QKV, BiasAdd) are switched off:
they produce contrib ops onnxruntime runs only on CUDA. `--optimize gpu` keeps them (its graphs are
checked on CUDA, and such a bundle refuses other providers).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

log = logging.getLogger("edgediff.export")

# bundle component -> the optimiser's model type for Stable Diffusion parts
MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae"}
GPU_ONLY_FUSIONS = (
    "enable_nhwc_conv",
    "enable_group_norm",
    "enable_skip_group_norm",
    "enable_bias_splitgelu",
    "enable_packed_qkv",
    "enable_packed_kv",
    "enable_bias_add",
)
# Off on GPUs too: the optimiser writes BiasSplitGelu for any width, but its CUDA kernel takes only a few
# (2560, 5120, 6144, 10240, 12288) and fails at run time on others (seen on an H200, onnxruntime 1.31.1)
UNCHECKED_FUSIONS = ("enable_bias_splitgelu",)


def _num_heads(fusion, reshape_q, is_torch2: bool = False) -> int:
    """The number of heads from the Q reshape's target shape [0, 0, heads, head_size] (0: not found).

    Replaces onnxruntime's FusionAttentionUnet.get_num_heads, which calls int() on a one-element array:
    numpy >= 2.4 raises TypeError there, and the whole UNet attention fusion is lost.
    """
    import numpy as np

    if is_torch2:
        parent = fusion.model.get_parent(reshape_q, 1)
        if parent is None or parent.op_type != "Concat" or len(parent.input) != 4:
            return 0
        value = fusion.model.get_constant_value(parent.input[2])
    else:
        shape = fusion.model.get_constant_value(reshape_q.input[1])
        value = shape[2] if isinstance(shape, np.ndarray) and shape.shape == (4,) else None
    if not isinstance(value, (np.ndarray, np.generic)) or np.size(value) != 1:
        return 0
    heads = int(np.asarray(value).reshape(-1)[0])
    return heads if heads > 0 else 0


def optimize_graph(src: Path, dst: Path, component: str, gpu: bool = False, external_data: bool = False) -> dict:
    """Writes the fused graph to `dst` and returns the fused-operator counts for the manifest; when the
    optimiser cannot handle the graph, writes nothing and returns the reason (the plain graph stays)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    # the optimiser's modules import each other as top-level names (onnxruntime puts their folder on sys.path)
    sys.modules["fusion_attention_unet"].FusionAttentionUnet.get_num_heads = _num_heads  # see _num_heads
    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    for name in GPU_ONLY_FUSIONS if not gpu else UNCHECKED_FUSIONS:
        setattr(options, name, False)
    try:
        # opt_level 0: only the Python fusions; onnxruntime's own optimiser still runs at load time
        model = optimize_model(str(src), model_type=model_type, optimization_options=options, opt_level=0, use_gpu=gpu)
    except (TypeError, ValueError, KeyError, IndexError, AssertionError) as exc:
        # its pattern matchers assume particular exporter output (e.g. onnxruntime 1.32's UNet attention
        # fusion fails on optimum-onnx 0.1.0's graphs): keep the plain graph and say why
        log.warning(
            "%s: onnxruntime's %s optimiser failed (%s: %s); keeping the plain graph",
            component,
            model_type,
            type(exc).__name__,
            exc,
        )
        return {
            "tool": "onnxruntime.transformers.optimizer",
            "model_type": model_type,
            "gpu": gpu,
            "skipped": f"{type(exc).__name__}: {exc}",
        }
    model.save_model_to_file(str(dst), use_external_data_format=external_data, all_tensors_to_one_file=True)
    counts = {}
    for node in model.model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"tool": "onnxruntime.transformers.optimizer", "model_type": model_type, "gpu": gpu, "fused_ops": counts}


def fuse_fast_gelu(model) -> int:
    """Fuses each tanh-approximated GELU (the feed-forwards of the DiT / MMDiT transformers, T5 and Gemma-2: seven
    element-wise passes over the widest activations) into onnxruntime's FastGelu, one pass, with its transformer
    optimiser's own FusionFastGelu; returns how many. In place, on a graph whose weights may lie outside it (the
    pattern's constants are scalars, held in the graph). UNets' GELUs are exact (erf) and stay as they are."""
    from onnxruntime.transformers.fusion_fastgelu import FusionFastGelu
    from onnxruntime.transformers.onnx_model import OnnxModel

    wrapped = OnnxModel(model)
    before = sum(node.op_type == "FastGelu" for node in model.graph.node)
    FusionFastGelu(wrapped).apply()
    wrapped.prune_graph()  # the replaced nodes' constants
    count = sum(node.op_type == "FastGelu" for node in model.graph.node) - before
    if count:  # the fusion appends its nodes after the graph's last: back in topological order, as ONNX wants it
        wrapped.topological_sort()
        declare_microsoft_domain(model)
    return count


MICROSOFT_DOMAIN = "com.microsoft"  # onnxruntime's own operators (FastGelu, MatMulNBits, MultiHeadAttention)


def declare_microsoft_domain(model) -> None:
    """Declares onnxruntime's operator domain in a graph that now uses its operators, where it is not declared yet:
    onnxruntime runs such a graph without, other tools (onnx's and onnxruntime's shape inference, the benchmarks' MAC
    counter, other runtimes) refuse it."""
    from onnx import helper

    if all(o.domain != MICROSOFT_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MICROSOFT_DOMAIN, 1))
