"""The ONNX target: graphs via optimum, each checked against PyTorch, written atomically into a bundle.

export(source, "out/bundle", ExportOptions(precision="fp16"))      # edgediff.export.export
export_bundle("path/or/hub-id", "out/bundle", precision="fp32")   # the same, options as keywords
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import shutil
from collections import Counter
from contextlib import ExitStack, nullcontext
from pathlib import Path

import numpy as np

from edgediff.runtime.bundle import sha256_file
from edgediff.runtime.errors import ExportError, ExportOptionsError, ExportValidationError
from edgediff.runtime.manifest import DENOISERS, MANIFEST_NAME, ComponentSpec, TensorSpec
from edgediff.runtime.schedulers import SAMPLER_TO_DIFFUSERS_CLASS  # noqa: F401  (older callers import it from here)

from . import ip_adapter as ipa
from . import text_ahead
from .attention import fused_attention, fused_layers, use_attention
from .bundle_quantize import bounded, plan_quantization, quantize_bundle
from .calibration import CALIBRATION_PROMPTS, recorded_prompts
from .capture import float_argmax
from .checksums import BackgroundChecksums
from .controlnet import (
    controlnet_attributes,
    controlnet_component,
    controlnet_for_export,
    denoiser_for_export,
    load_controlnets,
    manifest_entries,
    residual_attributes,
    with_residuals,
)
from .counted_text import counted_transformer_for_export, takes_counted_text
from .gemma_prefix import write_prefix
from .lora import fuse_loras
from .lora_slots import SLOT_COMPONENTS, slot_graph
from .manifest_builder import build_manifest, bundle_defaults, guided, recorded_path, write_text_conditioning
from .memory_plan import Weights, check_source
from .optimize import MODEL_TYPES as FUSABLE
from .optimize import fuse_fast_gelu, optimize_graph
from .options import QUANTIZED, ExportOptions
from .precision import FP16_MAX, to_fp16
from .quantize import component_policy, libraries_frozen, release_memory
from .sana import models_for_export
from .segments import segment_graph
from .source import as_fp32, latent_multiple, prepare_source
from .specs import (
    COMPONENTS,
    TINY_DECODER,
    TOLERANCES,
    ExportContext,
    check_context,
    has_dynamic_spatial_axes,
    may_overflow_fp16,
)
from .staging import staged
from .tiny_decoder import load_tiny_decoder, tiny_attributes, tiny_decoder_for_export
from .tracing import (
    fix_dynamic_axes,
    inline_weight_bytes,
    quiet_tracing,
    released_after_export,
    trace_context,
    trace_on_inputs,
)
from .upsample_conv import subpixel_upsample_convs

log = logging.getLogger("edgediff.export")

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # protobuf's 2 GB limit: larger graphs keep weights beside them
# Graphs with more weights than this keep them beside the graph file too: onnxruntime opens the full-size SD-Turbo
# text encoder (1.4 GB) in 0.4 s that way, against 0.8-1.5 s parsing them out of the graph file, and its check in the
# fp32 export (write, checksum, open) took 10 s against 4. Smaller graphs (the tiny decoder) stay one file.
WEIGHTS_BESIDE_BYTES = 64 << 20
_ONNX_TO_NUMPY = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32"}


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        specs.append(TensorSpec(v.name, _ONNX_TO_NUMPY.get(v.type.tensor_type.elem_type, "unknown"), dims))
    return specs


def _save_graph(model, out_dir: Path, name: str, external: bool = False, checksum: bool = True) -> dict[str, dict]:
    """Saves one graph (its weights beside it past WEIGHTS_BESIDE_BYTES, or when `external`); returns its
    manifest `files` (`checksum`: see _file_records)."""
    import onnx

    graph_file = f"{name}.onnx"
    # Weight bytes decide (the serialised size can't even be asked for past 2 GB).
    big = external or inline_weight_bytes(model) > WEIGHTS_BESIDE_BYTES
    data_file = f"{name}.onnx.data"
    onnx.save_model(
        model,
        str(out_dir / graph_file),
        save_as_external_data=big,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=1024,
    )
    return _file_records(out_dir, [graph_file] + ([data_file] if big else []), checksum)


def _file_records(folder: Path, names: list[str], checksum: bool = True) -> dict[str, dict]:
    """The manifest's `files` entry for these files of the bundle being written: each one's size and checksum.
    Without `checksum`, the size alone: the checksum is read in the background (checksums.py) once the file is
    final, and taken when the manifest is (BackgroundChecksums.fill); a graph the export replaces later (an fp32
    graph before its quantisation) is never read through (full-size SD-Turbo's UNet and text encoder: 4.8 GB)."""
    return {
        n: {"size": (folder / n).stat().st_size, **({"sha256": sha256_file(folder / n)} if checksum else {})}
        for n in names
    }


def _move_weights(
    model, raw_graph: Path, staging: Path, name: str, checksum: bool = True, scattered: bool = False
) -> dict[str, dict] | None:
    """Writes a graph whose weights lie in one external-data file beside `raw_graph` (an fp32 graph past 2 GB, as
    tracing.gather_external_data left it) into the bundle by moving that file, the structure re-pointed at it;
    returns its manifest `files`, or None otherwise (its weights in memory, or read in from several files). Loading
    the weights and writing them again took 12 of the 17 s of full-size SD-Turbo's UNet check stage. `scattered`:
    weights in several files (PyTorch's, one a weight: a graph the export replaces) move as they are into a folder of
    their own, `<name>.onnx.weights`, each file then named in the manifest."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, uses_external_data

    external = [t for t in _get_all_tensors(model) if uses_external_data(t)]
    infos = [ExternalDataInfo(t) for t in external]
    readers = Counter(info.location for info in infos)  # the tensors in each file
    if not external or (len(readers) != 1 and not scattered):
        if external:  # several files: gathered into the bundle's one as they load
            onnx.load_external_data_for_model(model, str(raw_graph.parent))
        return None
    if len(readers) == 1:
        moved = {location: f"{name}.onnx.data" for location in readers}
    else:  # paths as the manifest and onnxruntime take them: relative, with forward slashes
        moved = {location: f"{name}.onnx.weights/{location}" for location in sorted(readers)}
    for location, data_file in moved.items():
        (staging / data_file).parent.mkdir(parents=True, exist_ok=True)
        (raw_graph.parent / location).replace(staging / data_file)
    for tensor, info in zip(external, infos):
        if not info.length and readers[info.location] == 1:
            # a file of its own: all its bytes (the quantisers map a weight whose recorded length is its array's,
            # weight_quant.external_array, and read any other)
            length = (staging / moved[info.location]).stat().st_size - (info.offset or 0)
            entry = tensor.external_data.add()
            entry.key, entry.value = "length", str(length)
        entry = next(e for e in tensor.external_data if e.key == "location")
        entry.value = moved[entry.value]
    graph_file = f"{name}.onnx"
    onnx.save_model(model, str(staging / graph_file))
    return _file_records(staging, [graph_file, *moved.values()], checksum)


def _torch_reference(
    component, modules, ctx: ExportContext, peaks: dict | None = None
) -> tuple[dict, list[np.ndarray]]:
    """The check's random inputs and the PyTorch module's outputs on them, taken before export so that the
    module can be released before its graph is loaded (export/validation peak: the larger of the two).
    `peaks`: given, it receives the largest magnitude entering or leaving any of the module's layers
    (peaks["activation"]), which says whether its activations fit fp16."""
    import torch

    inputs = component.random_inputs(ctx, np.random.default_rng(0))
    handles = []
    if peaks is not None:
        peaks["activation"] = 0.0
        held = getattr(modules, component.module) if component.module else modules

        def seen(_layer, args, out):
            for t in (*args, *(out if isinstance(out, (tuple, list)) else (out,))):
                if torch.is_tensor(t) and t.is_floating_point() and t.numel():
                    peaks["activation"] = max(peaks["activation"], float(t.detach().abs().max()))

        handles = [m.register_forward_hook(seen) for m in held.modules() if next(m.children(), None) is None]
    try:
        with torch.no_grad():
            outputs = component.torch_call(modules, {k: torch.from_numpy(v) for k, v in inputs.items()})
    finally:
        for h in handles:
            h.remove()
    return inputs, [o.float().numpy() for o in outputs]


def _check_providers(optimize_for: str | None) -> list[str]:
    """Where exported graphs are checked: the CPU, or CUDA for graphs with GPU-only fused operators."""
    import onnxruntime as ort

    if optimize_for != "gpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ExportError("export_needs_cuda", install='pip install "edgediff[cuda]"')
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _validate(
    component, reference: tuple[dict, list[np.ndarray]], graph_path: Path, tolerance: float, providers: list[str]
) -> dict[str, float]:
    """Runs the graph in onnxruntime on the reference's inputs and compares with PyTorch's outputs."""
    from .ort_sessions import measuring_options, measuring_session

    inputs, torch_out = reference
    # the graph as exported with onnxruntime's graph fusions, without its CPU layout rewrite (ort_sessions.py), run
    # once: no prepacked copies of its weights
    session = measuring_session(graph_path, providers, measuring_options(once=True))
    declared = {i.name: i.type for i in session.get_inputs()}
    feeds = {
        k: (v.astype(np.int32) if declared.get(k) == "tensor(int32)" else v) for k, v in inputs.items() if k in declared
    }
    onnx_out = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    del session
    diffs = {}
    for out_meta, got, ref in zip(names, onnx_out, torch_out):
        if got.shape != ref.shape:
            raise ExportValidationError(component.name, {out_meta: (float("inf"), tolerance)})
        scale = max(1.0, float(np.abs(ref).max()))
        diffs[out_meta] = (float(np.abs(got.astype(np.float32) - ref).max() / scale), tolerance)
    if len(onnx_out) != len(torch_out):
        raise ExportValidationError(component.name, {"number of outputs": (float("inf"), tolerance)})
    if any(d > tol or not np.isfinite(d) for d, tol in diffs.values()):
        raise ExportValidationError(component.name, diffs)
    return {k: d for k, (d, _) in diffs.items()}


def _write_checked(
    component,
    raw_graph: Path,
    staging: Path,
    precision: str,
    reference,
    providers: list[str],
    replaced: bool = False,
    standard_ops: bool = False,
    checksums: BackgroundChecksums | None = None,
):
    """Writes the component's graph in `precision` (fp32 / fp16) into the bundle and checks it against
    PyTorch; returns its manifest files, input and output specs, the check's differences, and the graph rewrites
    made before the check (name -> how many; empty when none). `replaced`: a graph quantisation replaces later,
    written with its weights beside it (quantisation and the sensitivity pass read them a tensor at a time: the full-
    size SD-Turbo text encoder's 1.4 GB were parsed whole at each reading, and copied out once) and no checksum
    (see _file_records). `standard_ops`: no rewrite into onnxruntime's own operators. `checksums`: the files'
    checksums start there, read while the graph is checked (else they are read before)."""
    import onnx

    model = to_fp16(raw_graph) if precision == "fp16" else onnx.load(str(raw_graph), load_external_data=False)
    float_argmax(model)  # after the fp16 conversion: see capture.py
    # before the weights move into the bundle: a graph past 2 GB gets its new kernels in its own weights file
    rewrites = {"subpixel_upsample_convs": subpixel_upsample_convs(model, raw_graph.parent)}
    if precision == "fp32" and not standard_ops:  # onnxruntime's CPU provider has FastGelu in fp32 only
        rewrites["fast_gelu"] = fuse_fast_gelu(model)
    now = not replaced and checksums is None
    files = _move_weights(model, raw_graph, staging, component.name, now, scattered=replaced) or _save_graph(
        model, staging, component.name, external=replaced, checksum=now
    )
    if checksums is not None and not replaced:
        checksums.start(files)
    inputs, outputs = _tensor_specs(model.graph.input), _tensor_specs(model.graph.output)
    del model
    return (
        files,
        inputs,
        outputs,
        _validate(component, reference, staging / f"{component.name}.onnx", TOLERANCES[precision], providers),
        {name: count for name, count in rewrites.items() if count},
    )


def _release(module) -> None:
    """Frees a torch module's weights once its graph is exported (configs stay readable): at full size
    the UNet's weights and its exported graph need not be in memory together twice."""
    module.to("meta")


def _fp32_weights(module) -> Weights:
    """A torch module's weights as the memory plan counts them, widened to fp32 for its export."""
    sizes = [p.numel() * 4 for p in module.parameters()]
    return Weights(stored=sum(sizes), fp32=sum(sizes), largest=max(sizes, default=0))


def _millions(module) -> float:
    """A torch module's parameters, in millions: the weight of its stages on the progress bar."""
    return max(sum(p.numel() for p in module.parameters()) / 1e6, 0.01)


def write_onnx_bundle(source: str, out: str | Path, options: ExportOptions, progress: bool = True) -> Path:
    """Exports `source` (diffusers folder or hub id) into an ONNX bundle folder at `out`; returns `out`.

    Each graph is exported by optimum, optionally fused (options.optimize) and converted to fp16, and
    checked against the PyTorch module on random inputs: graphs whose height and width are dynamic on a
    smaller latent grid (specs.check_context; the manifest's export_check says which size). fp16: the VAE
    parts are kept fp32 (reason in the manifest) when their fp16 graphs overflow or fail the check, which
    they then take at the bundle's size. int8 / int8-static / int4: the fp32 graphs are exported and
    checked first, then quantized one at a time (quantize.py) with calibration inputs recorded from
    options.calibration_prompts, once the PyTorch model is released. LoRAs are fused first, so the graphs
    are checked against the fused model. "gpu" fusions are checked on CUDA, so they need onnxruntime's CUDA
    provider here.

    Atomic: everything is built in a temporary folder beside `out` and renamed at the end; on any
    failure (validation included) nothing is left at `out`.
    """
    if options.target != "onnx":  # edgediff.export.export picks the writer for the target
        raise ExportOptionsError("export_choice", option="target", value=options.target, available="onnx")
    import onnx
    from optimum.exporters.onnx import export_models

    from .progress import STAGE_COST, Stages, log_estimate

    optimize_for, precision, attention = options.optimize, options.precision, options.attention
    check_providers = _check_providers(optimize_for)  # before any work: a GPU-optimized export needs CUDA here
    # before anything is loaded: a model this machine cannot hold is refused, not killed half way
    # LoRAs fuse into fp32 weights: a model they change loads in fp32, not in its stored half precision
    stored = not options.loras
    estimate = check_source(
        source,
        t5=options.t5,
        quantised=precision if precision in QUANTIZED else False,
        keep_stored=stored,
        controlnets=[c[0] for c in options.controlnets],
        lora_slots=options.lora_slots,
    )
    log_estimate(estimate)
    out = Path(out)
    quiet_tracing()
    with staged(out, options.overwrite) as staging, ExitStack() as loaded:
        checksums = loaded.enter_context(BackgroundChecksums(staging))
        stages = Stages(progress)
        with stages.stage("loading the source"):  # unweighted: the sizes that weigh stages are known after it
            pipe, fam, ctx = prepare_source(
                source, options.height, options.width, options.family, options.vae, t5=options.t5, stored_dtype=stored
            )
            unet = getattr(pipe, "unet", None)
            if unet is None and attention == "sliced":  # slicing is written for the UNet's attention (SD3: MMDiT)
                raise ExportOptionsError("export_family_option", option="--attention sliced", family=fam.name)
            if unet is None and options.lora_slots:  # slots follow diffusers' UNet and CLIP LoRA layer names
                raise ExportOptionsError("export_family_option", option="--lora-slots", family=fam.name)
            lora_records = fuse_loras(pipe, list(options.loras))
            controlnets = load_controlnets(options.controlnets, pipe, ctx)
            ctx = with_residuals(ctx, controlnets)  # the UNet then takes their residuals as inputs
            ip_adapter = ipa.load_ip_adapter(options.ip_adapter, options.ip_adapter_image_encoder, pipe, ctx)
            ctx = ipa.with_image_embeds(ctx, ip_adapter)  # the UNet then takes image embeddings and a scale
            # SD3 without T5: its zero tokens enter the transformer as one, counted; after the ControlNets are
            # known (a transformer feeding them takes the whole sequence)
            ctx = dataclasses.replace(ctx, counted_text=takes_counted_text(pipe, ctx))
            sliced_layers = use_attention(unet, "sliced") if attention == "sliced" else 0
        loaded.enter_context(libraries_frozen())  # the libraries and the source are loaded: collections skip them

        text = write_text_conditioning(pipe, staging, ctx.max_sequence_length)
        optimum_models = models_for_export(pipe)  # optimum's, or SANA's set up in sana.py
        trace_ctx = trace_context(check_context(ctx, True))
        if ip_adapter is not None:  # the UNet's inputs besides optimum's (and any ControlNet residuals)
            optimum_models["unet"] = ipa.unet_for_export(pipe.unet, ctx, trace_ctx)
        elif controlnets:  # the UNet or SD3 transformer taking their residuals
            optimum_models.update(denoiser_for_export(pipe, optimum_models, ctx, trace_ctx))
        elif ctx.counted_text:  # never with ControlNets (takes_counted_text); IP-Adapters are the UNet's
            config = optimum_models["transformer"][1]
            optimum_models["transformer"] = counted_transformer_for_export(pipe.transformer, config, ctx, trace_ctx)
        components, checks, check_sizes = {}, {}, {}
        raw_dir = staging / "_raw"
        transformer = getattr(pipe, "transformer", None)
        component_attributes = {
            "unet": {
                "attention": {"mode": attention, "sliced_layers": sliced_layers},
                # latent cells each side must hold a whole number of (its 2x upsamplings are traced fixed)
                **({"latent_multiple": latent_multiple(pipe)} if unet is not None else {}),
                **(residual_attributes(ctx) if controlnets else {}),
                **(ipa.unet_attributes(ip_adapter) if ip_adapter is not None else {}),
            },
            # SD3: latent cells per token along each side; image sides are multiples of it x the VAE's factor
            "transformer": {
                "patch_size": None if transformer is None else int(transformer.config.patch_size),
                **({"counted_text": True} if ctx.counted_text else {}),
                **(residual_attributes(ctx) if controlnets else {}),
            },
        }
        work = [
            (c, optimum_models.pop(c.name), pipe, component_attributes.get(c.name, {}))
            for c in COMPONENTS
            if c.name in optimum_models
        ]
        if options.tiny_decoder:
            tiny = load_tiny_decoder(options.tiny_decoder, ctx.latent_channels)
            work.append((TINY_DECODER, tiny_decoder_for_export(tiny), tiny, tiny_attributes(tiny)))
            del tiny
        for c in controlnets:  # torch_call takes the ControlNetModel itself
            work.append(
                (controlnet_component(c), controlnet_for_export(c, ctx, trace_ctx), c.model, controlnet_attributes(c))
            )
        if ip_adapter is not None:  # torch_call takes the CLIPVisionModelWithProjection itself
            work.append((ipa.encoder_component(ip_adapter), ipa.encoder_for_export(ip_adapter), ip_adapter.encoder, {}))
        sizes = {c.name: _millions(module) for c, (module, _), *_ in work}
        # smallest first: the denoiser, the largest graph, is traced with the others' weights (optimum's VAE
        # parts are copies of the pipeline's VAE) already freed; its export sets the fp32 export's peak
        listed = [c.name for c, *_ in work]  # the manifest keeps this order
        work.sort(key=lambda item: sizes[item[0].name])
        for name, millions in sizes.items():
            stages.plan(f"{name}: export", STAGE_COST["export"] * millions)
            stages.plan(f"{name}: check", STAGE_COST["check"] * millions)
        if options.quantized:
            plan_quantization(stages, sizes, precision, options, fam)
        # the fp32 graphs quantisation replaces (_write_checked)
        policy = component_policy(precision, options.quantize_only, fam) if options.quantized else {}
        replaced = {name for name, scheme in policy.items() if scheme}
        ahead = None  # text_ahead.TextAhead, once the text encoders are exported
        while work:  # popped as done, so that each torch module can be freed after its export
            component, (module, export_config), modules, attributes = work.pop(0)
            # dynamic-size graphs are checked on a smaller grid; fp16 graphs that may overflow at the bundle's size
            spatial = has_dynamic_spatial_axes(export_config)
            may_overflow = precision == "fp16" and may_overflow_fp16(component, modules)
            reduced = spatial and not may_overflow
            check_ctx = check_context(ctx, reduced)
            with stages.stage(f"{component.name}: export"):
                as_fp32(module)  # loaded in its stored precision (load_pipeline): widened for its own export only
                as_fp32(getattr(modules, component.module) if component.module else modules)
                if ctx.text_prefix and component.name == "text_encoder":  # from the fp32 module, before its release
                    text[1]["prefix"] = write_prefix(modules, text[1]["instruction"], staging)
                peaks = {} if may_overflow else None
                reference = _torch_reference(component, modules, check_ctx, peaks)
                if spatial:
                    trace_ctx = trace_context(check_context(ctx, True))
                    trace_on_inputs(export_config, component.random_inputs(trace_ctx, np.random.default_rng(1)))
                last_use = component.module and not any(c.module == component.module for c, *_ in work)

                def release(module=module, modules=modules, last_use=last_use):
                    _release(module)  # optimum's own module (the VAE parts are copies of the pipeline's VAE)
                    if last_use:
                        _release(getattr(modules, component.module))
                    release_memory()

                # a graph that quantisation replaces keeps PyTorch's weight files, one a weight, until it is replaced
                # (tracing.gather_external_data); one that gets LoRA slots is rewritten whole before that
                slotted = bool(options.lora_slots) and component.name in SLOT_COMPONENTS
                scattered = component.name in replaced and not slotted
                with (
                    released_after_export(release, WEIGHTS_BESIDE_BYTES, scattered),
                    fused_attention() if attention == "fused" else nullcontext(),
                ):
                    export_models(
                        {component.name: (module, export_config)},
                        output_dir=raw_dir / component.name,
                        output_names=["model.onnx"],
                        # optimum's fix opens the graph in onnxruntime: run below, once the module is gone, so that
                        # the weights are never held by PyTorch and onnxruntime at once (the export's peak)
                        disable_dynamic_axes_fix=True,
                    )
                del module, release
                modules = None
                release_memory()
                raw_graph = raw_dir / component.name / "model.onnx"
                fix_dynamic_axes(export_config, raw_graph)
                del export_config
                if optimize_for and component.name in FUSABLE:
                    fused = raw_graph.with_name("fused.onnx")
                    big = sum(f.stat().st_size for f in raw_graph.parent.iterdir()) > EXTERNAL_DATA_THRESHOLD
                    record = optimize_graph(
                        raw_graph, fused, component.name, gpu=optimize_for == "gpu", external_data=big
                    )
                    attributes = {**attributes, "optimizer": record}
                    raw_graph = fused if fused.is_file() else raw_graph
            comp_precision = "fp16" if precision == "fp16" else "fp32"
            if may_overflow and peaks["activation"] > FP16_MAX:
                # seen in PyTorch, not left to the check: onnxruntime's CPU provider runs an fp16 graph's layers
                # that lack fp16 kernels in fp32, so the check here passes graphs that overflow on a GPU
                why = f"activations reach {peaks['activation']:.3g} in PyTorch, past fp16's {FP16_MAX:g}"
                log.warning("%s: %s; keeping it in fp32", component.name, why)
                attributes = {**attributes, "fp16": f"kept fp32: {why}"}
                comp_precision = "fp32"
            write_checked = functools.partial(
                _write_checked,
                component,
                raw_graph,
                staging,
                reference=reference,
                providers=check_providers,
                replaced=component.name in replaced,
                standard_ops=options.standard_ops,
                # a graph slotted next is replaced and unlinked: not read in the background meanwhile (Windows
                # refuses to unlink a file another thread has open)
                checksums=None if options.lora_slots and component.name in SLOT_COMPONENTS else checksums,
            )
            with stages.stage(f"{component.name}: check"):
                try:
                    files, inputs, outputs, checks[component.name], rewrites = write_checked(comp_precision)
                except ExportValidationError as exc:
                    if comp_precision != "fp16" or not may_overflow:
                        raise
                    log.warning("%s: the fp16 graph fails its check (%s); keeping it in fp32", component.name, exc)
                    attributes = {**attributes, "fp16": f"kept fp32: the fp16 graph failed its check ({exc})"}
                    comp_precision = "fp32"
                    files, inputs, outputs, checks[component.name], rewrites = write_checked(comp_precision)
                if attention == "fused":  # how many layers run as MultiHeadAttention (masked ones keep their form;
                    # with --optimize, onnxruntime's own fusions count too), counted in the bundle's graph, whose
                    # weights lie beside it: the traced one holds a text encoder's inline (1.4 GB parsed again)
                    written = onnx.load(staging / f"{component.name}.onnx", load_external_data=False)
                    attributes = {**attributes, "attention": {"mode": "fused", "fused_layers": fused_layers(written)}}
                    del written
                if rewrites:  # same output, fewer operations (export/upsample_conv.py, optimize.fuse_fast_gelu)
                    attributes = {**attributes, "rewrites": rewrites}
                if options.lora_slots and component.name in SLOT_COMPONENTS:  # side paths for run-time LoRAs
                    files, slots = slot_graph(
                        component.name, staging, options.lora_slots, reference[0], comp_precision, _save_graph
                    )
                    attributes = {**attributes, "lora_slots": slots}
            check_sizes[component.name] = (
                {"height": check_ctx.height, "width": check_ctx.width, "full_size": check_ctx == ctx}
                if spatial
                else {"full_size": True}
            )
            if component.name in DENOISERS:  # the segments' check runs on the same inputs as the denoiser's
                denoiser_inputs = reference[0]
            del reference, write_checked
            shutil.rmtree(raw_dir / component.name)
            components[component.name] = ComponentSpec(
                files=files, precision=comp_precision, inputs=inputs, outputs=outputs, attributes=attributes
            )
            # the text encoders quantised while the UNet is exported, once the last of them is written
            if options.quantized and component.name in {e["component"] for e in text[1].get("encoders", [])}:
                ahead = text_ahead.start(
                    staging,
                    text[1],
                    components,
                    {c.name: _fp32_weights(module) for c, (module, _), *_ in work},
                    policy,
                    recorded_prompts(options.calibration_prompts or CALIBRATION_PROMPTS, bounded(policy, sizes)),
                    guided(bundle_defaults(fam, ctx, options), ctx.time_cond_proj_dim),
                    options.keep,
                    since=stages.started_at,
                    slotted=SLOT_COMPONENTS if options.lora_slots else (),
                )
                if ahead is not None:
                    loaded.enter_context(ahead)
        shutil.rmtree(raw_dir, ignore_errors=True)
        components = {name: components[name] for name in listed}

        manifest = build_manifest(
            pipe,
            fam,
            ctx,
            text,
            components,
            options,
            {
                "source": recorded_path(source, out),
                "vae": recorded_path(options.vae, out),
                "precision": precision,
                "tiny_decoder": recorded_path(options.tiny_decoder, out),
                "optimized": bool(optimize_for),
                "optimized_for": optimize_for,
                "loras": lora_records,
                "export_check": {"tolerances": TOLERANCES, "max_rel_diff": checks, "size": check_sizes},
            },
            controlnets=manifest_entries(controlnets, out),
            ip_adapter=ipa.manifest_entry(ip_adapter, out),
        )
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        # the PyTorch model goes before quantisation opens graphs and sessions
        del pipe, optimum_models, work
        release_memory()
        if options.quantized:
            quantize_bundle(staging, manifest, precision, options, stages, fam, checksums, ahead)
        checksums.fill(manifest)
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        if options.segments > 1:  # last: the segments are cut from the denoiser as the bundle keeps it
            spec = manifest.components[manifest.denoiser]
            with stages.stage(f"{manifest.denoiser}: segments"):
                spec.files, attribute = segment_graph(
                    staging, manifest.denoiser, spec.graph_file, options.segments, denoiser_inputs, _save_graph
                )
            spec.attributes.update(attribute)
            (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        stages.close()
    return out


def export_bundle(
    source: str,
    out: str | Path,
    precision: str = "fp32",
    height: int | None = None,
    width: int | None = None,
    family: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    default_steps: int | None = None,
    default_guidance: float | None = None,
    tiny_decoder: str | None = None,
    keep: str | list[str] = "none",
    calibration_prompts: list[str] | None = None,
    optimize: bool | str | None = False,
    loras: list[tuple[str, float]] | None = None,
    vae: str | None = None,
    attention: str = "original",
) -> Path:
    """write_onnx_bundle with the options as keywords (ExportOptions says what each is for); `optimize`
    also takes True (= "cpu") and False."""
    options = ExportOptions(
        target="onnx",
        precision=precision,
        keep=keep,
        calibration_prompts=calibration_prompts,
        height=height,
        width=width,
        family=family,
        default_steps=default_steps,
        default_guidance=default_guidance,
        tiny_decoder=tiny_decoder,
        vae=vae,
        optimize=optimize,
        loras=tuple(loras or ()),
        attention=attention,
        overwrite=overwrite,
    )
    return write_onnx_bundle(source, out, options, progress)
