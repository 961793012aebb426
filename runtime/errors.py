"""Every error edgediff raises, and the one table of their messages (as huggingface_hub keeps them).

The CLI prints `str(error)` as one line; library users catch the typed classes.
"""

from __future__ import annotations

MESSAGES = {
    # bundle
    "bundle_not_found": "no bundle at {path}: expected a folder with manifest.json (make one with `edgediff export`)",
    "manifest_unreadable": "{path}: manifest.json is not valid JSON ({detail})",
    "manifest_invalid": "{path}: manifest.json is invalid: {detail}",
    "schema_too_new": "{path}: bundle schema version {found} is newer than this edgediff understands ({supported}); upgrade edgediff",
    "file_missing": "bundle {path} is incomplete: {file} is missing (re-export the bundle)",
    "file_outside": "bundle {path} names a file outside its folder ({file}); refusing to read it",
    "file_size": "bundle {path}: {file} is {found} bytes, the manifest says {expected} (truncated or replaced; re-export)",
    "checksum": "bundle {path}: {file} fails its checksum (sha256 {found}, manifest {expected}); the file is corrupt or was changed",
    "graph_unloadable": "bundle {path}: onnxruntime cannot load {file}: {detail}",
    "graph_uncompilable": "bundle {path}: OpenVINO cannot read or compile {file}: {detail}; --fallback runs such a graph on onnxruntime's CPU provider",
    "graph_uncompilable_for_call": "bundle {path}: OpenVINO cannot compile {file} for this call's shapes ({dims}), nor with its dimensions dynamic: {detail}; --fallback runs such a graph on onnxruntime's CPU provider",
    "graph_unreadable": "bundle {path}: {file} is not a readable ONNX graph ({detail}); re-export the bundle",
    "graph_mismatch": "bundle {path}: {component} graph does not match its manifest: {detail}",
    # providers
    "provider_unknown": "unknown provider {name!r}; known: {known}",
    "provider_unavailable": "provider {name!r} is not available in this onnxruntime build (available: {available}); to get it: {install}; or pass --fallback",
    "runtime_unavailable": "provider {name!r} runs graphs through the {runtime} package, which is not installed; to get it: {install}; or pass --fallback",
    "provider_option": "provider options are KEY=VALUE, got {value!r}",
    "provider_option_value": "provider option {option} must be one of {allowed}, got {value!r}",
    "openvino_libraries": 'onnxruntime-openvino on Windows needs OpenVINO\'s own libraries, which `pip install "edgediff[openvino]"` installs ({detail})',
    "plugin_unloadable": "provider {name!r} from {module}: onnxruntime cannot load its library ({detail})",
    "plugin_no_device": "provider {name!r} is installed but found no device to run on; choose another with --provider",
    "builds_clash": "provider {name!r} is not available: {count} onnxruntime builds are installed ({builds}) and they overwrite each other's files; keep one: {fix}",
    "graph_capture_unsupported": "provider {name!r} cannot capture graphs (CUDA graphs need the cuda or tensorrt provider)",
    "cache_limit": "{env} must be a size in GiB (a number >= 0), got {value!r}",
    # generation inputs
    "size_multiple": "{what} must be a positive multiple of {multiple}, got {value}",
    "size_patch": "{what} must be a multiple of {multiple} for this bundle (its transformer's patch of {patch} latent cells x the VAE's factor {vae}), got {value}; nearest valid: {nearest}",
    "size_unet": "{what} must be a multiple of {multiple} for this bundle (its UNet halves the latent grid {halvings} times, and a latent cell is {vae} pixels), got {value}; nearest valid: {nearest}",
    "size_vae": "{what} must be a multiple of {multiple} for this bundle (its VAE's factor: {multiple} pixels per latent cell), got {value}; nearest valid: {nearest}",
    "max_sequence_length": "max_sequence_length must be between 1 and {limit} (T5 / Gemma tokens), got {value}",
    "family_task": "{task} is not available for {family} bundles yet: they do {tasks} only",
    "true_cfg_family": "true_cfg_scale is not available for {family} bundles: it is FluxPipeline's true CFG, for FLUX.1 bundles (other families take guidance_scale)",
    "true_cfg_scale": "true_cfg_scale must be a finite number >= 1 (1: off; above 1 it runs with a negative_prompt), got {value!r}",
    "negative_prompt_embedded": "negative_prompt is not available for {family} bundles: the transformer embeds the guidance scale (no unconditional batch to take a negative prompt)",
    "steps": "num_inference_steps must be >= 1, got {value}",
    "sampler_unknown": "unknown sampler {name!r}; available: {available}",
    "sampler_mismatch": "{detail}",
    "sampler_steps": "sampler {sampler!r} cannot take these steps: {detail}",
    "batch": "{what} must be >= 1, got {value}",
    "latents_shape": "latents must have shape {expected}, got {found}",
    "graph_input": "{component}: input {name!r} {detail}",
    "nan_output": "the {component} produced NaN or infinite values{hint}; nothing was saved",
    "output_path": "cannot write {path}: {detail}",
    "output_format": "cannot write {path}: unknown image format {suffix!r} (use .png, .jpg or .webp)",
    "static_size": "this Core ML bundle was exported for {width}x{height} (static shapes); export another for other sizes",
    "strength": "strength must be in (0, 1], got {value}",
    "mask_without_image": "mask_image needs image= (the picture to inpaint)",
    "inpaint_unet": "this bundle's UNet is an inpainting UNet ({channels} input channels): pass image= and mask_image=",
    "strength_steps": "strength {strength} with {steps} steps runs no step; raise the strength or the steps",
    "encoder_missing": "bundle {path} has no vae_encoder (image-to-image needs it); re-export the bundle",
    "decoder_unknown": "decoder must be one of {available}, got {name!r}",
    "capture_low_memory": "cuda_graph and low_memory do not combine: low-memory mode closes each graph after use, so nothing would stay captured",
    "decoder_missing": "bundle {path} has no {name} decoder (export it with --tiny-decoder)",
    "tile_size": "decode tile size must be at least {minimum} latent cells, got {value}",
    "outpaint_image": "outpaint needs image= (the picture to grow) and makes its own mask (no mask_image=)",
    "outpaint_margins": "outpaint takes four pixel counts >= 0 (left, top, right, bottom), got {value!r}",
    "controlnet_missing": "bundle {path} has no ControlNet, so control_image cannot be used (export one with --controlnet SOURCE[:NAME])",
    "controlnet_unknown": "unknown ControlNet {name!r}; this bundle has: {known}",
    "controlnet_which": "this bundle has {count} ControlNets ({known}): pass control_image as a list (one image each, in this order) or a dict {{name: image}}",
    "controlnet_count": "{what} has {found} entries for {count} ControlNets ({known})",
    "controlnet_guidance": "control_guidance_start must be >= 0 and below control_guidance_end, which must be <= 1; got {start} and {end}",
    "controlnet_image": "control image for {name!r} cannot be read: {detail}",
    "control_option": "--control takes NAME=IMAGE[:SCALE], got {value!r}",
    # IP-Adapter (runtime/ip_adapter.py)
    "ip_adapter_missing": "bundle {path} has no IP-Adapter, so ip_adapter_image cannot be used (export one with --ip-adapter SOURCE)",
    "ip_adapter_image": "ip_adapter_image cannot be read: {detail}",
    "ip_adapter_scale": "ip_adapter_scale must be a finite number, got {value!r}",
    # run-time LoRAs (runtime/lora_adapters.py, export/lora_convert.py)
    "lora_argument": "loras must be a dict of LoRA names to weights, e.g. {{'style': 0.7}}, got {value!r}",
    "lora_weight": "LoRA {name!r}: the weight must be a finite number, got {value!r}",
    "lora_no_slots": "bundle {path} takes no run-time LoRAs: export it with --lora-slots (or fuse a LoRA at export with --lora)",
    "lora_unknown": "no LoRA named {name!r} for bundle {path}; known: {known} (add one with `edgediff lora convert FILE --model BUNDLE`)",
    "lora_unreadable": "{path} is not a LoRA adapter edgediff wrote ({detail}); convert the LoRA again",
    "lora_mismatch": "LoRA {name!r} does not fit bundle {path} (a LoRA for another architecture, or layers exported without slots): {count} layers do not match: {layers}",
    # embedding
    "cancelled": "generation cancelled at step {step} of {total}",
    "closed": "this pipeline was closed; open the bundle again",
    "model_not_found": "no bundle named {name!r} in {folder} and no folder at that path (see `edgediff list`)",
    # export
    "export_needs_cuda": "--optimize gpu writes operators only onnxruntime's CUDA provider runs, and each graph is checked where it will run: export on a machine with an NVIDIA GPU and onnxruntime-gpu ({install}), or use --optimize cpu",
    "bundle_needs_gpu": "bundle {path}: its {component} graph was optimised for GPUs (--optimize gpu) and needs the CUDA provider, not {provider}",
    "export_exists": "{path} already exists; choose a new output folder or pass --overwrite",
    "export_source": "cannot load a diffusers model from {source!r}: {detail}",
    "controlnet_value": "ControlNet {name!r}: scale, guidance start and end must be numbers, got {scale!r}, {start!r}, {end!r}",
    "lora_provider": "run-time LoRAs are onnxruntime's adapters: the {provider} provider cannot apply them to the {component}; run on another provider (--provider cpu), or fuse the LoRA at export with --lora",
    "lora_capture": "run-time LoRAs do not run in captured CUDA graphs: open the pipeline without cuda_graph",
    "prompt_encoder": "{argument} is for {component}, which this bundle does not have (its text encoders: {have})",
    "prompt_count": "{argument}: {count} prompts for {batch} prompts (give one per prompt, or one string for all)",
    "export_memory": (
        "this export needs about {need} GiB at its peak ({stage}) and {free} GiB of memory is free: {advice} "
        "(the estimate is export/memory_plan.py's; {env}=1 exports anyway)"
    ),
    "export_validation": "{component}: exported graph differs from PyTorch beyond tolerance: {detail}",
    "export_choice": "{option} must be one of {available}, got {value!r}",
    "export_attention": "unknown attention {value!r} for --target {target} (available: {available})",
    "bench_failed": "{count} of {total} measurements failed ({which}); the others are in {out}, each failure's whole log under {out}/failures",
    "export_family_option": "{option} is not available for {family} models",
    "export_default_steps": "default steps must be >= 1, got {value}",
    "export_keep": 'keep is "none", "auto" or comma-separated block names, got {value!r}',
    "export_quantize_only": "--quantize-only names the components to quantise, so it needs --precision int8, int8-static or int4, got {precision}",
    "export_quantize_only_component": "--quantize-only: {precision} bundles do not quantise {names}; they quantise {known}",
    "export_quantize_only_missing": "--quantize-only: {names}: not quantised in this model's bundles (it has none, or its family keeps it fp32; its quantisable components: {known})",
    "export_onnx_only": "--target coreml writes fp16 packages (or palettized ones, --palettize); {options} apply to --target onnx",
    "export_coreml_only": "{options} apply to --target coreml",
    "export_lora_slots": "--lora-slots does not combine with {option}: {why}",
    "export_standard_ops": "--standard-ops keeps to ONNX's standard operators, and {why}",
    "export_segments": "cannot cut the denoiser into segments (--segments): {detail}",
    "export_segments_value": "--segments must be at least 1, got {value!r}",
    "export_segments_slots": "--segments does not combine with --lora-slots: run-time LoRAs are bound to the whole denoiser graph",
    "lora_convert": "cannot convert {file} for {path}: {detail}",
    "export_controlnet_name": "--controlnet takes SOURCE[:NAME] with a NAME of letters, digits, '-' and '_', got {value!r}",
    "export_controlnet_duplicate": "--controlnet names must differ, got {names} (name them with SOURCE:NAME)",
    "export_controlnet_static": "--controlnet does not combine with --precision int8-static: the UNet's activation ranges would be calibrated without control; use fp32, fp16, int8 or int4",
    "export_ip_adapter_static": "--ip-adapter does not combine with --precision int8-static: the UNet's activation ranges would be calibrated without a reference image; use fp32, fp16, int8 or int4",
    "export_ip_adapter_attention": "--ip-adapter does not combine with --attention {value}: the IP-Adapter's attention processors replace the UNet's",
}


class EdgediffError(Exception):
    """Base of every error edgediff raises on purpose."""

    def __init__(self, key: str, **fields):
        self.key = key
        self.fields = fields
        super().__init__(MESSAGES[key].format(**fields))


class BundleError(EdgediffError):
    """A bundle is missing, incomplete, corrupt, or not one we can read."""


class ChecksumError(BundleError):
    """A bundle file's sha256 differs from the manifest's."""


class SchemaVersionError(BundleError):
    """The bundle was written by a newer edgediff."""


class ProviderError(EdgediffError):
    """An execution provider is unknown or not available."""


class InputError(EdgediffError, ValueError):
    """A generation argument is out of range."""


class NaNOutputError(EdgediffError):
    """A graph produced NaN or inf (fp16 overflow is the usual cause)."""


class OutputPathError(EdgediffError):
    """The output file cannot be written."""


class Cancelled(EdgediffError):
    """A generation was cancelled through its CancelToken; the pipeline stays usable."""


class PipelineClosed(EdgediffError):
    """The pipeline was used after close()."""


class BenchError(EdgediffError):
    """A bench run finished with some measurements failed (their rows say why; the rest were written)."""


class ExportError(EdgediffError):
    """An export failed; nothing was left at its output folder."""


class ExportOptionsError(ExportError, ValueError):
    """Export options with an unknown value, or that do not combine (export/options.py); raised before any work."""


class ExportValidationError(ExportError):
    """An exported graph's outputs differ from the PyTorch module's."""

    def __init__(self, component: str, diffs: dict[str, tuple[float, float]]):
        self.component = component
        self.diffs = diffs  # output name -> (max abs difference, tolerance)
        detail = ", ".join(
            f"{k}: max |diff| {d:.3g} > {tol:g}" if d > tol else f"{k}: {d:.3g} ok" for k, (d, tol) in diffs.items()
        )
        super().__init__("export_validation", component=component, detail=detail)
