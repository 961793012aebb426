"""Core ML target: each component converted by coremltools into an ML program package (fp16, static
shapes at the bundle's size), optionally palettised, with the same manifest and tokenizer as an ONNX
bundle. The runtime's Core ML backend (runtime/coreml_session.py, macOS) runs the packages with
edgediff's own samplers, so few-step models (LCM, Turbo) run on the Neural Engine.

Conversion runs anywhere coremltools installs (Linux included); checking a package's outputs against
PyTorch needs the Core ML runtime, so on other systems the export checks each package's declared
inputs and outputs against its spec and the manifest says the numeric check was skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from edgediff.runtime.bundle import sha256_file
from edgediff.runtime.errors import ExportError, ExportOptionsError, ExportValidationError
from edgediff.runtime.manifest import MANIFEST_NAME, ComponentSpec, TensorSpec

from .attention import use_attention
from .manifest_builder import build_manifest, recorded_path, write_text_conditioning
from .options import ExportOptions
from .source import prepare_source
from .staging import staged
from .tracing import quiet_tracing

COREML_TOLERANCE = 5e-2  # fp16 ML program vs PyTorch fp32, relative to the output range (checked on macOS)
DEPLOYMENT_TARGET = "macOS14"  # ML programs with k-means palettisation


def _modules(pipe, ctx, unet_batch: int):
    """(name, module, example inputs, output names) per component, traced at static shapes."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids):
            out = self.m(input_ids=input_ids)
            return out.last_hidden_state, out.pooler_output

    class Unet(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, sample, timestep, encoder_hidden_states, timestep_cond=None):
            return self.m(sample, timestep, encoder_hidden_states, timestep_cond=timestep_cond, return_dict=False)[0]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, latent_sample):
            return self.m.decode(latent_sample, return_dict=False)[0]

    h, w = ctx.height // ctx.vae_scale_factor, ctx.width // ctx.vae_scale_factor
    unet_inputs = {
        "sample": torch.randn(unet_batch, ctx.unet_in_channels, h, w),
        "timestep": torch.tensor([500.0]),
        "encoder_hidden_states": torch.randn(unet_batch, ctx.max_length, ctx.cross_attention_dim),
    }
    if ctx.time_cond_proj_dim is not None:
        unet_inputs["timestep_cond"] = torch.randn(unet_batch, ctx.time_cond_proj_dim)
    return [
        (
            "text_encoder",
            TextEncoder(pipe.text_encoder),
            {"input_ids": torch.zeros(1, ctx.max_length, dtype=torch.int32)},
            ["last_hidden_state", "pooler_output"],
        ),
        ("unet", Unet(pipe.unet), unet_inputs, ["out_sample"]),
        ("vae_decoder", VaeDecoder(pipe.vae), {"latent_sample": torch.randn(1, ctx.latent_channels, h, w)}, ["sample"]),
    ]


def _convert(module, inputs: dict, outputs: list[str]):
    import coremltools as ct
    import torch

    module.eval()
    with torch.no_grad():
        # torch.export, not TorchScript tracing: coremltools' TorchScript path fails on torch 2.13's shape ops
        program = torch.export.export(module, tuple(inputs.values())).run_decompositions()
    # aten.alias (a no-op view, e.g. in CLIP's causal mask) is not in coremltools' op table: bypass it
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and str(node.target).startswith("aten.alias"):
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()
    return ct.convert(
        program,
        convert_to="mlprogram",
        compute_precision=ct.precision.FLOAT16,
        minimum_deployment_target=getattr(ct.target, DEPLOYMENT_TARGET),
        outputs=[ct.TensorType(name=n) for n in outputs],
    )


def _palettize(mlmodel, bits: int):
    from coremltools.optimize.coreml import OpPalettizerConfig, OptimizationConfig, palettize_weights

    # constants with -inf (CLIP's causal mask) cannot be clustered: their consumers are left alone
    skip = {}
    for op in mlmodel._mil_program.functions["main"].operations:
        if (
            op.op_type == "const"
            and op.val.val is not None
            and np.issubdtype(np.asarray(op.val.val).dtype, np.floating)
            and not np.isfinite(op.val.val).all()
        ):
            skip.update({child.name: None for child in op.outputs[0].child_ops})
    config = OptimizationConfig(global_config=OpPalettizerConfig(mode="kmeans", nbits=bits), op_name_configs=skip)
    return palettize_weights(mlmodel, config)


_ARRAY_DTYPES = {65568: "float32", 65552: "float16", 131104: "int32"}


def package_io(package: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs as the package's spec declares them (names, shapes, dtypes)."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))

    def specs(items):
        return [
            TensorSpec(
                i.name,
                _ARRAY_DTYPES.get(i.type.multiArrayType.dataType, "unknown"),
                [int(d) for d in i.type.multiArrayType.shape],
            )
            for i in items
        ]

    return specs(spec.description.input), specs(spec.description.output)


def palette_sizes(package: Path) -> list[int]:
    """Entries of each palettised weight's lookup table (2**bits), from the package's program."""
    import coremltools as ct

    spec = ct.utils.load_spec(str(package))
    fn = spec.mlProgram.functions["main"]
    sizes = []
    for op in fn.block_specializations[fn.opset].operations:
        if op.type == "constexpr_lut_to_dense":
            dims = [d.constant.size for d in op.attributes["lut"].type.tensorType.dimensions]
            sizes.append(int(np.prod(dims)))
    return sizes


def _check(name: str, package: Path, mlmodel, module, inputs: dict, outputs: list[str]) -> dict:
    """Declared I/O against what we traced; on macOS also the outputs against PyTorch."""
    import torch

    declared_in, declared_out = package_io(package)
    if [t.name for t in declared_in] != list(inputs) or [t.name for t in declared_out] != outputs:
        raise ExportValidationError(name, {"io": (float("inf"), 0.0)})
    for t in declared_in:
        if tuple(t.shape) != tuple(inputs[t.name].shape):
            raise ExportValidationError(name, {t.name: (float("inf"), 0.0)})
    if sys.platform != "darwin":
        return {"numeric": "skipped: Core ML predictions need macOS"}
    feeds = {k: v.numpy().astype(np.int32 if v.dtype == torch.int32 else np.float32) for k, v in inputs.items()}
    got = mlmodel.predict(feeds)
    with torch.no_grad():
        ref = module(*inputs.values())
    ref = ref if isinstance(ref, tuple) else (ref,)
    diffs = {}
    for out_name, r in zip(outputs, ref):
        r = r.float().numpy()
        diffs[out_name] = (float(np.abs(got[out_name] - r).max() / max(1.0, float(np.abs(r).max()))), COREML_TOLERANCE)
    if any(d > tol for d, tol in diffs.values()):
        raise ExportValidationError(name, diffs)
    return {k: d for k, (d, _) in diffs.items()}


def write_coreml_bundle(source: str, out: str | Path, options: ExportOptions, progress: bool = True) -> Path:
    """Exports `source` into a Core ML bundle at `out` (atomic, like the ONNX target); returns `out`."""
    from tqdm.auto import tqdm

    if options.target != "coreml":  # edgediff.export.export picks the writer for the target
        raise ExportOptionsError("export_choice", option="target", value=options.target, available="coreml")
    try:
        import coremltools  # noqa: F401
    except ImportError:
        raise ImportError('Core ML export needs coremltools: pip install "edgediff[coreml]"') from None
    palettize, attention, default_guidance = options.palettize, options.attention, options.default_guidance
    out = Path(out)
    quiet_tracing()
    with staged(out, options.overwrite) as staging:
        pipe, fam, ctx = prepare_source(source, options.height, options.width, options.family)
        if ctx.pooled_dim is not None or getattr(pipe, "transformer", None) is not None:
            raise ExportError(
                "export_source",
                source=source,
                detail=(
                    "the Core ML target converts SD 1.x / 2.x families; SDXL, SD3, FLUX, SANA and PixArt are ONNX-only"
                    " for now"
                ),
            )
        text = write_text_conditioning(pipe, staging)
        attention_layers = use_attention(pipe.unet, attention) if attention != "original" else 0
        # static shapes: classifier-free guidance runs the UNet on (uncond, cond) at once
        cfg_batch = (
            1
            if (
                fam.guidance_embedding
                or (default_guidance if default_guidance is not None else fam.default_guidance) <= 1.0
            )
            else 2
        )
        components, checks = {}, {}
        for name, module, inputs, outputs in tqdm(
            _modules(pipe, ctx, cfg_batch), desc="export", unit="component", disable=not progress
        ):
            mlmodel = _convert(module, inputs, outputs)
            attributes = {"compute_precision": "fp16", "deployment_target": DEPLOYMENT_TARGET, "attention": attention}
            if name == "unet":
                attributes["attention_layers"] = attention_layers  # layers given the processor (attention.py)
            if palettize:
                mlmodel = _palettize(mlmodel, palettize)
                attributes["palettized_bits"] = palettize
            package = staging / f"{name}.mlpackage"
            mlmodel.save(str(package))
            checks[name] = _check(name, package, mlmodel, module, inputs, outputs)
            files = sorted(p for p in package.rglob("*") if p.is_file())
            files.sort(key=lambda p: p.name != "Manifest.json")  # the package's own manifest names it
            declared_in, declared_out = package_io(package)
            components[name] = ComponentSpec(
                files={
                    str(p.relative_to(staging)): {"size": p.stat().st_size, "sha256": sha256_file(p)} for p in files
                },
                precision=f"palette{palettize}" if palettize else "fp16",
                inputs=declared_in,
                outputs=declared_out,
                attributes=attributes,
            )
        manifest = build_manifest(
            pipe,
            fam,
            ctx,
            text,
            components,
            options,
            {
                "source": recorded_path(source, out),
                "precision": f"palette{palettize}" if palettize else "fp16",
                "export_check": {"tolerance": COREML_TOLERANCE, "max_rel_diff": checks},
            },
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    return out


def export_coreml(
    source: str,
    out: str | Path,
    height: int | None = None,
    width: int | None = None,
    palettize: int | None = None,
    attention: str = "original",
    family: str | None = None,
    overwrite: bool = False,
    default_steps: int | None = None,
    default_guidance: float | None = None,
) -> Path:
    """write_coreml_bundle with the options as keywords (ExportOptions says what each is for)."""
    options = ExportOptions(
        target="coreml",
        height=height,
        width=width,
        palettize=palettize,
        attention=attention,
        family=family,
        overwrite=overwrite,
        default_steps=default_steps,
        default_guidance=default_guidance,
    )
    return write_coreml_bundle(source, out, options, progress=False)
