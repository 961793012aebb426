"""Export a diffusers model into a bundle: graphs via optimum, checked against PyTorch, written atomically.

    export_bundle("path/or/hub-id", "out/bundle", precision="fp32")
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path

import numpy as np

from edgediff.models.registry import detect_family, get_family
from edgediff.runtime.bundle import sha256_file
from edgediff.runtime.errors import ExportError, ExportValidationError
from edgediff.runtime.manifest import MANIFEST_NAME, TOKENIZER_2_NAME, TOKENIZER_NAME, ComponentSpec, Manifest, TensorSpec
from edgediff.runtime.schedulers import DIFFUSERS_CLASS_TO_SAMPLER, ScheduleConfig

from .attention import ATTENTION_MODES, use_attention
from .capture import float_argmax
from .lora import fuse_loras
from .optimize import MODEL_TYPES as FUSABLE, optimise_graph
from .precision import PRECISIONS, QUANTISED, to_fp16
from .source import load_pipeline, load_vae, source_facts
from .specs import COMPONENTS, TINY_DECODER, TOLERANCES, ExportContext
from .tiny_decoder import load_tiny_decoder, tiny_attributes, tiny_decoder_for_export
from .tokenizer import write_tokenizer_json

log = logging.getLogger("edgediff.export")

EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # protobuf's 2 GB limit: larger graphs keep weights beside them
SAMPLER_TO_DIFFUSERS_CLASS = {v: k for k, v in DIFFUSERS_CLASS_TO_SAMPLER.items()}
_ONNX_TO_NUMPY = {1: "float32", 10: "float16", 11: "float64", 7: "int64", 6: "int32"}


def _versions() -> dict:
    out = {}
    for dist in ("edgediff", "torch", "diffusers", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _tensor_specs(values) -> list[TensorSpec]:
    specs = []
    for v in values:
        dims = [d.dim_param if d.dim_param else d.dim_value for d in v.type.tensor_type.shape.dim]
        specs.append(TensorSpec(v.name, _ONNX_TO_NUMPY.get(v.type.tensor_type.elem_type, "unknown"), dims))
    return specs


def _resolve_scheduler(pipe, family) -> dict:
    """Our sampler and its fully resolved diffusers config (defaults filled in by diffusers itself)."""
    import diffusers

    ours = DIFFUSERS_CLASS_TO_SAMPLER.get(type(pipe.scheduler).__name__)
    sampler = family.sampler if family.guidance_embedding or ours is None else ours
    resolved = getattr(diffusers, SAMPLER_TO_DIFFUSERS_CLASS[sampler]).from_config(pipe.scheduler.config)
    config = {**dict(resolved.config), **dict(family.scheduler_overrides)}
    return {"name": sampler, "config": ScheduleConfig.from_dict(config).to_dict()}


def _save_graph(model, out_dir: Path, name: str) -> dict[str, dict]:
    """Saves one graph (with external data inside the bundle past 2 GB); returns its manifest `files`."""
    import onnx

    graph_file = f"{name}.onnx"
    # Weight bytes decide (the serialised size can't even be asked for past 2 GB).
    big = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    data_file = f"{name}.onnx.data"
    onnx.save_model(model, str(out_dir / graph_file), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=data_file, size_threshold=1024)
    names = [graph_file] + ([data_file] if big else [])
    return {n: {"size": (out_dir / n).stat().st_size, "sha256": sha256_file(out_dir / n)} for n in names}


def _torch_reference(component, modules, ctx: ExportContext) -> tuple[dict, list[np.ndarray]]:
    """The check's random inputs and the PyTorch module's outputs on them, taken before export so that the
    module can be released before its graph is loaded (export/validation peak: the larger of the two)."""
    import torch

    inputs = component.random_inputs(ctx, np.random.default_rng(0))
    with torch.no_grad():
        outputs = component.torch_call(modules, {k: torch.from_numpy(v) for k, v in inputs.items()})
    return inputs, [o.float().numpy() for o in outputs]


# export_bundle(optimize=...) -> which fusions (None: the plain graphs)
OPTIMIZE_TARGETS = {False: None, None: None, True: "cpu", "cpu": "cpu", "gpu": "gpu"}


def _check_providers(optimize_for: str | None) -> list[str]:
    """Where exported graphs are checked: the CPU, or CUDA for graphs with GPU-only fused operators."""
    import onnxruntime as ort

    if optimize_for != "gpu":
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise ExportError("export_needs_cuda", install='pip install "edgediff[cuda]"')
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _validate(component, reference: tuple[dict, list[np.ndarray]], graph_path: Path, tolerance: float,
              providers: list[str]) -> dict[str, float]:
    """Runs the graph in onnxruntime on the reference's inputs and compares with PyTorch's outputs."""
    import onnxruntime as ort

    inputs, torch_out = reference
    session = ort.InferenceSession(str(graph_path), providers=providers)
    declared = {i.name: i.type for i in session.get_inputs()}
    feeds = {k: (v.astype(np.int32) if declared.get(k) == "tensor(int32)" else v) for k, v in inputs.items() if k in declared}
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


def _write_checked(component, raw_graph: Path, staging: Path, precision: str, reference, providers: list[str]):
    """Writes the component's graph in `precision` (fp32 / fp16) into the bundle and checks it against
    PyTorch; returns its manifest files, input and output specs, and the check's differences."""
    import onnx

    model = to_fp16(raw_graph) if precision == "fp16" else onnx.load(str(raw_graph))
    float_argmax(model)  # after the fp16 conversion: see capture.py
    files = _save_graph(model, staging, component.name)
    inputs, outputs = _tensor_specs(model.graph.input), _tensor_specs(model.graph.output)
    del model
    return files, inputs, outputs, _validate(component, reference, staging / f"{component.name}.onnx",
                                             TOLERANCES[precision], providers)


def _release(module) -> None:
    """Frees a torch module's weights once its graph is exported (configs stay readable): at full size
    the UNet's weights and its exported graph need not be in memory together twice."""
    module.to("meta")


def prepare_source(source: str, height: int | None, width: int | None, family: str | None, vae: str | None = None):
    """The diffusers pipeline (with `vae` replacing its VAE when given), its family row and the export
    context (sizes checked)."""
    pipe = load_pipeline(source)
    if vae:
        pipe.register_modules(vae=load_vae(vae, int(pipe.vae.config.latent_channels)))
    fam = get_family(family) if family else detect_family(source_facts(pipe, source))
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    native = fam.default_size or int(pipe.unet.config.sample_size) * vae_scale
    default_h, default_w = height or native, width or native
    for what, value in (("height", default_h), ("width", default_w)):
        if value % 8:
            raise ExportError("export_source", source=source, detail=f"{what} {value} is not a multiple of 8")
    ctx = ExportContext(
        height=default_h, width=default_w, latent_channels=int(pipe.vae.config.latent_channels),
        unet_in_channels=int(pipe.unet.config.in_channels),
        vae_scale_factor=vae_scale, vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        max_length=int(pipe.tokenizer.model_max_length),
        vocab_size=int(pipe.text_encoder.config.vocab_size),
        cross_attention_dim=int(pipe.unet.config.cross_attention_dim),
        time_cond_proj_dim=pipe.unet.config.time_cond_proj_dim,
    )
    text_encoder_2 = getattr(pipe, "text_encoder_2", None)
    if text_encoder_2 is not None:  # SDXL
        ctx = dataclasses.replace(
            ctx, vocab_size_2=int(text_encoder_2.config.vocab_size), pooled_dim=int(text_encoder_2.config.projection_dim),
            time_ids_dim=5 if getattr(pipe.config, "requires_aesthetics_score", False) else 6)
    return pipe, fam, ctx


def write_text_conditioning(pipe, staging: Path) -> tuple[dict, dict]:
    """Writes each text encoder's tokenizer; returns the manifest's `tokenizer` entry and its `conditioning`:
    which encoders run, which output each gives the UNet, and SDXL's pooled text and micro-conditioning."""
    tokenizer_entry = write_tokenizer_json(pipe.tokenizer, staging / TOKENIZER_NAME)
    if getattr(pipe, "text_encoder_2", None) is None:
        return tokenizer_entry, {"encoders": [{"component": "text_encoder", "tokenizer": tokenizer_entry,
                                               "output": "last_hidden_state"}]}
    tokenizer_2_entry = write_tokenizer_json(pipe.tokenizer_2, staging / TOKENIZER_2_NAME)
    # as StableDiffusionXLPipeline (clip_skip None): each encoder's penultimate layer, concatenated, and the
    # second encoder's projected pooled output
    penultimate = [f"hidden_states.{int(enc.config.num_hidden_layers) - 1}" for enc in (pipe.text_encoder, pipe.text_encoder_2)]
    return tokenizer_entry, {
        "encoders": [{"component": "text_encoder", "tokenizer": tokenizer_entry, "output": penultimate[0]},
                     {"component": "text_encoder_2", "tokenizer": tokenizer_2_entry, "output": penultimate[1],
                      "pooled": "text_embeds"}],
        "zero_negative": bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        "time_ids": "size-crop-target",
    }


def build_manifest(pipe, fam, ctx: ExportContext, text: tuple[dict, dict], components: dict, default_steps,
                   default_guidance, provenance: dict, target: str = "onnx") -> Manifest:
    tokenizer_entry, conditioning = text
    return Manifest(
        family=fam.name,
        prediction_type=pipe.scheduler.config.get("prediction_type", "epsilon"),
        scheduler=_resolve_scheduler(pipe, fam),
        defaults={"steps": default_steps or fam.default_steps,
                  "guidance": fam.default_guidance if default_guidance is None else default_guidance,
                  "height": ctx.height, "width": ctx.width},
        latent_channels=ctx.latent_channels,
        vae_scaling_factor=float(pipe.vae.config.scaling_factor),
        vae_scale_factor=ctx.vae_scale_factor,
        tokenizer=tokenizer_entry,
        conditioning=conditioning,
        guidance_embedding_dim=ctx.time_cond_proj_dim,
        components=components,
        target=target,
        provenance={**provenance, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "versions": _versions()},
    )


def export_bundle(source: str, out: str | Path, precision: str = "fp32", height: int | None = None,
                  width: int | None = None, family: str | None = None, overwrite: bool = False,
                  progress: bool = True, default_steps: int | None = None,
                  default_guidance: float | None = None, tiny_decoder: str | None = None,
                  keep: str | list[str] = "none", calibration_prompts: list[str] | None = None,
                  optimize: bool | str = False, loras: list[tuple[str, float]] | None = None, vae: str | None = None,
                  attention: str = "original") -> Path:
    """Exports `source` (diffusers folder or hub id) into a bundle folder at `out`; returns `out`.

    `tiny_decoder`: an AutoencoderTiny (folder or hub id, e.g. madebyollin/taesd for SD 1.x/2.x) added
    as the bundle's fast decoder (`--decoder tiny`, and previews).
    int8 / int8-static / int4: the fp32 graphs are exported and checked first, then quantised (export/quantize.py)
    with calibration inputs recorded from `calibration_prompts`; `keep` = "none", "auto" (sensitivity
    pass) or block names to leave in fp32. `optimize`: onnxruntime's transformer fusions (optimize.py),
    checked against PyTorch like the plain graphs: True or "cpu" for any provider; "gpu" adds the fusions
    only onnxruntime's CUDA provider runs (NHWC convolutions, GroupNorm, packed QKV), checked on CUDA.
    `loras`: (file, scale) pairs fused into the weights first (lora.py); the graphs are checked against
    the fused model. `vae`: an AutoencoderKL (folder or hub id) replacing the model's own. fp16: the VAE parts are tried in fp16 and kept fp32 (reason in the
    manifest) when their fp16 graphs overflow or fail the check. `attention`: "sliced" writes the UNet's
    attention one head at a time (attention.py: lower peak memory, same arithmetic).

    Atomic: everything is built in a temporary folder beside `out` and renamed at the end; on any
    failure (validation included) nothing is left at `out`.
    """
    from optimum.exporters.onnx import export_models
    from optimum.exporters.utils import get_diffusion_models_for_export
    from tqdm.auto import tqdm

    if default_steps is not None and default_steps < 1:
        raise ValueError(f"default steps must be >= 1, got {default_steps}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    if optimize not in OPTIMIZE_TARGETS:
        raise ValueError(f"optimize must be one of {list(OPTIMIZE_TARGETS)}, got {optimize!r}")
    optimize_for = OPTIMIZE_TARGETS[optimize]
    check_providers = _check_providers(optimize_for)  # before any work: a GPU-optimised export needs CUDA here
    out = Path(out)
    _quiet_tracing()
    with staged(out, overwrite) as staging:
        steps = tqdm(total=2 + len(COMPONENTS), desc="export", disable=not progress, unit="step")
        steps.set_postfix_str("loading source")
        pipe, fam, ctx = prepare_source(source, height, width, family, vae)
        lora_records = fuse_loras(pipe, loras or [])
        sliced_layers = use_attention(pipe.unet, "sliced") if attention == "sliced" else 0
        steps.update()

        text = write_text_conditioning(pipe, staging)
        optimum_models = get_diffusion_models_for_export(pipe, exporter="onnx")
        components, checks = {}, {}
        raw_dir = staging / "_raw"
        work = [(c, optimum_models.pop(c.name), pipe,
                 {"attention": {"mode": attention, "sliced_layers": sliced_layers}} if c.name == "unet" else {})
                for c in COMPONENTS if c.name in optimum_models]
        steps.total += len(work) - len(COMPONENTS)
        if tiny_decoder:
            tiny = load_tiny_decoder(tiny_decoder, ctx.latent_channels)
            work.append((TINY_DECODER, tiny_decoder_for_export(tiny), tiny, tiny_attributes(tiny)))
            steps.total += 1
        while work:  # popped as done, so that each torch module can be freed after its export
            component, (module, export_config), modules, attributes = work.pop(0)
            steps.set_postfix_str(component.name)
            reference = _torch_reference(component, modules, ctx)
            export_models({component.name: (module, export_config)}, output_dir=raw_dir / component.name,
                          output_names=["model.onnx"])
            _release(module)  # optimum's own module (the VAE parts are copies of the pipeline's VAE)
            del module, export_config
            if component.module and not any(c.module == component.module for c, *_ in work):
                _release(getattr(modules, component.module))
            raw_graph = raw_dir / component.name / "model.onnx"
            if optimize_for and component.name in FUSABLE:
                fused = raw_graph.with_name("fused.onnx")
                big = sum(f.stat().st_size for f in raw_graph.parent.iterdir()) > EXTERNAL_DATA_THRESHOLD
                record = optimise_graph(raw_graph, fused, component.name, gpu=optimize_for == "gpu", external_data=big)
                attributes = {**attributes, "optimizer": record}
                raw_graph = fused if fused.is_file() else raw_graph
            comp_precision = "fp16" if precision == "fp16" else "fp32"
            try:
                files, inputs, outputs, checks[component.name] = _write_checked(
                    component, raw_graph, staging, comp_precision, reference, check_providers)
            except ExportValidationError as exc:
                if comp_precision != "fp16" or not component.fp16_may_overflow:
                    raise
                log.warning("%s: the fp16 graph fails its check (%s); keeping it in fp32", component.name, exc)
                attributes = {**attributes, "fp16": f"kept fp32: the fp16 graph failed its check ({exc})"}
                comp_precision = "fp32"
                files, inputs, outputs, checks[component.name] = _write_checked(
                    component, raw_graph, staging, comp_precision, reference, check_providers)
            shutil.rmtree(raw_dir / component.name)
            components[component.name] = ComponentSpec(files=files, precision=comp_precision, inputs=inputs,
                                                       outputs=outputs, attributes=attributes)
            steps.update()
        shutil.rmtree(raw_dir, ignore_errors=True)

        manifest = build_manifest(pipe, fam, ctx, text, components, default_steps, default_guidance, {
            "source": source, "vae": vae, "precision": precision, "tiny_decoder": tiny_decoder,
            "optimized": bool(optimize_for), "optimized_for": optimize_for,
            "loras": lora_records,
            "export_check": {"tolerances": TOLERANCES, "max_rel_diff": checks}})
        (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        if precision in QUANTISED:
            steps.set_postfix_str(f"quantising ({precision})")
            _quantise_bundle(staging, manifest, precision, keep, calibration_prompts)
            (staging / MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
        steps.set_postfix_str("done")
        steps.update()
        steps.close()
    return out


def _quantise_bundle(staging: Path, manifest: Manifest, precision: str, keep, prompts) -> None:
    """Replaces the components the policy names with quantised graphs, recording how in the manifest."""
    from .calibration import CALIBRATION_PROMPTS, record_feeds
    from .quantize import QUANT_POLICY, SCHEMES, quantise_component

    import onnx

    policy = QUANT_POLICY[precision]
    feeds = record_feeds(staging, prompts or CALIBRATION_PROMPTS, [n for n in manifest.components if policy.get(n)])
    for name, spec in manifest.components.items():
        scheme_name = policy.get(name)
        if scheme_name is None:
            spec.attributes["quantization"] = {"scheme": None, "why": "kept fp32 by policy (export/quantize.py)"}
            continue
        src = staging / spec.graph_file
        dst = staging / f".{name}.quantised.onnx"
        record = quantise_component(src, dst, SCHEMES[scheme_name], feeds[name], keep)
        for old in spec.files:  # the fp32 graph and any external data it had
            (staging / old).unlink()
        # re-saved under the component's own names (weights beside it only past 2 GB, as at export)
        quantised = onnx.load(str(dst))
        for leftover in staging.glob(f"{dst.name}*"):
            leftover.unlink()
        spec.files = _save_graph(quantised, staging, name)
        del quantised
        spec.precision = SCHEMES[scheme_name].precision
        spec.attributes["quantization"] = record


@contextmanager
def staged(out: Path, overwrite: bool):
    """A temporary folder beside `out` that becomes `out` when the block finishes, and vanishes if it
    fails or is interrupted: an export is whole or absent."""
    if out.exists() and not overwrite:
        raise ExportError("export_exists", path=out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        _commit(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _quiet_tracing() -> None:
    # The tracer's notes about Python control flow in diffusers' modules say nothing to our users:
    # every graph is checked against PyTorch after export.
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)


def _commit(staging: Path, out: Path) -> None:
    """Moves the finished bundle into place; an old bundle is replaced only once the new one is whole."""
    staging.chmod(0o755)  # mkdtemp (and onnx's external-data writer) make files private; a bundle is shared data
    for f in staging.rglob("*"):  # (Core ML packages are folders)
        f.chmod(0o755 if f.is_dir() else 0o644)
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
