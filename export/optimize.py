"""onnxruntime's transformer optimiser (attention, LayerNorm, GELU fusions) for the bundle's graphs.

Off by default: adopted per provider only where measured faster (benchmarks/README.md). The fused
graph is checked against PyTorch like any exported graph. On the CPU provider the GPU-only fusions
(NHWC convolutions, GroupNorm, BiasSplitGelu, packed QKV, BiasAdd) are switched off: they produce
contrib ops onnxruntime runs only on CUDA.
"""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("edgediff.export")

# bundle component -> the optimiser's model type for Stable Diffusion parts
MODEL_TYPES = {"text_encoder": "clip", "unet": "unet", "vae_decoder": "vae"}
GPU_ONLY_FUSIONS = ("enable_nhwc_conv", "enable_group_norm", "enable_skip_group_norm", "enable_bias_splitgelu",
                    "enable_packed_qkv", "enable_packed_kv", "enable_bias_add")


def optimise_graph(src: Path, dst: Path, component: str, gpu: bool = False, external_data: bool = False) -> dict:
    """Writes the fused graph to `dst` and returns the fused-operator counts for the manifest; when the
    optimiser cannot handle the graph, writes nothing and returns the reason (the plain graph stays)."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = MODEL_TYPES[component]
    options = FusionOptions(model_type)
    if not gpu:
        for name in GPU_ONLY_FUSIONS:
            setattr(options, name, False)
    try:
        # opt_level 0: only the Python fusions; onnxruntime's own optimiser still runs at load time
        model = optimize_model(str(src), model_type=model_type, optimization_options=options, opt_level=0, use_gpu=gpu)
    except (TypeError, ValueError, KeyError, IndexError, AssertionError) as exc:
        # its pattern matchers assume particular exporter output (e.g. onnxruntime 1.32's UNet attention
        # fusion fails on optimum-onnx 0.1.0's graphs): keep the plain graph and say why
        log.warning("%s: onnxruntime's %s optimiser failed (%s: %s); keeping the plain graph",
                    component, model_type, type(exc).__name__, exc)
        return {"tool": "onnxruntime.transformers.optimizer", "model_type": model_type, "gpu": gpu,
                "skipped": f"{type(exc).__name__}: {exc}"}
    model.save_model_to_file(str(dst), use_external_data_format=external_data, all_tensors_to_one_file=True)
    counts = {}
    for node in model.model.graph.node:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return {"tool": "onnxruntime.transformers.optimizer", "model_type": model_type, "gpu": gpu, "fused_ops": counts}
