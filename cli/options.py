"""Click decorators that build the library's options objects, so each option is declared once.

`runtime_options` adds one click option per `RuntimeOptions` field and hands the command a built
`options` argument; `export_options` does the same for `ExportOptions`. The choices come from the
library's own tables.
"""

from __future__ import annotations

import functools

import click

from edgediff.runtime.options import COMPUTE_UNITS, DECODERS, FIELD_NAMES, RuntimeOptions


def _provider_names() -> str:
    from edgediff.runtime.providers import REGISTRY

    return ", ".join(["auto", *REGISTRY])


def _sampler_names() -> str:
    from edgediff.runtime.schedulers import SAMPLERS

    return ", ".join(SAMPLERS)


# RuntimeOptions field -> its click option (help texts for users; the dataclass says why each exists)
_RUNTIME_CLICK = {
    "provider": lambda multiple: click.option(
        "--provider",
        "provider",
        multiple=multiple,
        default=() if multiple else "auto",
        show_default=not multiple,
        help=f"Execution provider: {_provider_names()}" + (" (repeatable; default auto)." if multiple else "."),
    ),
    "fallback": lambda _: click.option(
        "--fallback",
        is_flag=True,
        help="Fall back to the best available provider, and run a graph the provider cannot take on the CPU, "
        "instead of failing.",
    ),
    "provider_options": lambda _: click.option(
        "--provider-option",
        "provider_options",
        multiple=True,
        metavar="KEY=VALUE",
        help="onnxruntime provider option over edgediff's (repeatable), e.g. cudnn_conv_algo_search=EXHAUSTIVE.",
    ),
    "threads": lambda _: click.option(
        "--threads", type=click.IntRange(min=1), default=None, help="Intra-op threads (default: physical cores)."
    ),
    "cpu_layout": lambda _: click.option(
        "--cpu-layout/--no-cpu-layout",
        default=True,
        show_default=True,
        help="onnxruntime's CPU layout rewrite of float graphs: slightly faster calls, a much slower first open.",
    ),
    "low_memory": lambda _: click.option(
        "--low-memory", is_flag=True, help="Keep one graph in memory at a time (slower, smallest peak)."
    ),
    "decoder": lambda _: click.option(
        "--decoder",
        type=click.Choice(list(DECODERS)),
        default="full",
        show_default=True,
        help="tiny: the bundle's AutoencoderTiny decoder (fast, slightly softer).",
    ),
    "decode_tile": lambda _: click.option(
        "--decode-tile", type=int, default=None, help="Decode in tiles of this many latent cells (bounded memory)."
    ),
    "cache": lambda _: click.option(
        "--cache/--no-cache",
        default=True,
        show_default=True,
        help="Keep onnxruntime's optimized graphs in the per-user cache (faster second start).",
    ),
    "io_binding": lambda _: click.option(
        "--io-binding/--no-io-binding",
        default=None,
        help="GPUs: inputs and outputs in device buffers (default: wherever the provider supports it).",
    ),
    "cuda_graph": lambda _: click.option(
        "--cuda-graph",
        is_flag=True,
        help="CUDA/TensorRT: capture each graph's kernel launches once per image size and replay them.",
    ),
    "compute_units": lambda _: click.option(
        "--compute-units",
        type=click.Choice(list(COMPUTE_UNITS)),
        default="all",
        show_default=True,
        help="Core ML bundles: where Core ML may run them.",
    ),
    "sampler": lambda _: click.option(
        "--sampler", default=None, help=f"Sampler: {_sampler_names()} (default: the bundle's)."
    ),
}
if set(_RUNTIME_CLICK) != set(FIELD_NAMES):
    raise RuntimeError("every RuntimeOptions field needs its click option")


def runtime_options(multiple_providers: bool = False):
    """Adds the runtime options to a command and passes it `options` (a RuntimeOptions). With
    `multiple_providers` (the bench), --provider repeats and the command also gets `providers` (a list)."""

    def decorate(command):
        @functools.wraps(command)
        def wrapper(*args, **kwargs):
            from edgediff.runtime.providers import parse_options

            values = {name: kwargs.pop(name) for name in FIELD_NAMES}
            values["provider_options"] = parse_options(values["provider_options"])
            if multiple_providers:
                kwargs["providers"] = list(values.pop("provider")) or ["auto"]
            kwargs["options"] = RuntimeOptions(**values)
            return command(*args, **kwargs)

        for name in reversed(FIELD_NAMES):
            wrapper = _RUNTIME_CLICK[name](multiple_providers and name == "provider")(wrapper)
        return wrapper

    return decorate


def _export_click():
    """ExportOptions field -> its click option; choices from export/options.py's tables."""
    from edgediff.export import options as eo

    return {
        "target": click.option(
            "--target",
            type=click.Choice(eo.TARGETS),
            default="onnx",
            show_default=True,
            help="coreml: ML program packages (fp16, static shapes) for Macs and the Neural Engine.",
        ),
        "precision": click.option(
            "--precision",
            type=click.Choice([eo.AUTO, *eo.PRECISIONS]),
            default="fp32",
            show_default=True,
            help="int8: dynamic int8 MatMul/Gemm; int8-static: calibrated QDQ int8 UNet (convolutions too; "
            "SANA's DC-AE decoder too); int4: 4-bit weight-only MatMul. The KL VAEs stay fp32.",
        ),
        "keep": click.option(
            "--keep",
            default="none",
            show_default=True,
            help="int8/int4: blocks left in fp32: none, auto (sensitivity pass), or comma-separated block names.",
        ),
        "quantize_only": click.option(
            "--quantize-only",
            default="",
            help="int8/int8-static/int4: quantise only these components (comma-separated, e.g. text_encoder_3: "
            "SD3's T5 in 4 bits, the transformer fp32; vae_decoder with int8-static: SANA's DC-AE decoder alone); "
            "default: every component the precision quantises.",
        ),
        "calibration_prompts": click.option(
            "--calibration-prompts",
            type=click.Path(exists=True, dir_okay=False),
            default=None,
            help="int8/int4: a text file of prompts (one per line) to calibrate on.",
        ),
        "height": click.option(
            "--height", type=int, default=None, help="Default height recorded in the bundle (and checked at)."
        ),
        "width": click.option("--width", type=int, default=None),
        "family": click.option("--family", default=None, help="Override family detection (see `edgediff families`)."),
        "default_steps": click.option(
            "--default-steps", type=int, default=None, help="Steps the bundle defaults to (default: the family's)."
        ),
        "default_guidance": click.option(
            "--default-guidance",
            type=float,
            default=None,
            help="Guidance the bundle defaults to (default: the family's).",
        ),
        "tiny_decoder": click.option(
            "--tiny-decoder",
            default=None,
            help="AutoencoderTiny folder or hub id to add as the fast decoder (e.g. madebyollin/taesd).",
        ),
        "vae": click.option(
            "--vae",
            default=None,
            help="AutoencoderKL folder or hub id replacing the model's VAE (e.g. madebyollin/sdxl-vae-fp16-fix "
            "for fp16 SDXL bundles).",
        ),
        "optimize": click.option(
            "--optimize",
            type=click.Choice(eo.OPTIMIZE_TARGETS),
            is_flag=False,
            flag_value="cpu",
            default=None,
            help="Apply onnxruntime's transformer fusions (checked against PyTorch); `--optimize gpu` adds the "
            "CUDA-only ones (checked on CUDA; the bundle then needs the CUDA provider).",
        ),
        "loras": click.option(
            "--lora",
            "loras",
            multiple=True,
            metavar="FILE[:SCALE]",
            help="LoRA safetensors fused into the weights before export (repeatable; scale defaults to 1).",
        ),
        "lora_slots": click.option(
            "--lora-slots",
            type=click.Choice(list(eo.LAYER_SETS)),
            default=None,
            help="Layers that take LoRAs at run time (`edgediff lora convert`, then generate --lora NAME): "
            "attention, transformer (+ projections and feed-forward; most LoRAs) or all (+ convolutions).",
        ),
        "controlnets": click.option(
            "--controlnet",
            "controlnets",
            multiple=True,
            metavar="SOURCE[:NAME]",
            help="ControlNetModel folder or hub id added as a graph of its own (repeatable; NAME defaults to the "
            "conditioning type its name says, e.g. canny); generate with --control NAME=IMAGE.",
        ),
        "ip_adapter": click.option(
            "--ip-adapter",
            default=None,
            metavar="SOURCE",
            help="IP-Adapter weights (.safetensors or .bin, or a folder holding one) whose reference image the UNet "
            "attends to; its CLIP vision encoder is the image_encoder folder beside them.",
        ),
        "ip_adapter_image_encoder": click.option(
            "--ip-adapter-image-encoder",
            default=None,
            metavar="FOLDER",
            help="The IP-Adapter's CLIPVisionModelWithProjection folder, when not image_encoder beside the weights.",
        ),
        "t5": click.option(
            "--t5/--no-t5",
            default=True,
            show_default=True,
            help="SD3: export the T5 text encoder; --no-t5 leaves it out (zeros in its place, as diffusers "
            "without text_encoder_3): a much smaller bundle.",
        ),
        "palettize": click.option(
            "--palettize",
            type=click.Choice([str(b) for b in eo.PALETTE_BITS]),
            default=None,
            help="coreml: k-means palettized weights with this many bits.",
        ),
        "attention": click.option(
            "--attention",
            type=click.Choice(sorted({m for modes in eo.ATTENTION_MODES.values() for m in modes})),
            default="original",
            show_default=True,
            help="fused: onnxruntime's MultiHeadAttention operator, flash attention on CPU (every family; the "
            "scores are never whole); sliced: UNets, one head at a time; split_einsum (coreml): per head in the "
            "Neural Engine's layout. Same result from each.",
        ),
        "segments": click.option(
            "--segments",
            type=int,
            default=1,
            show_default=True,
            metavar="N",
            help="Write the denoiser as N graphs run in turn, checked against the whole one: with --low-memory "
            "only one segment's weights are held at a time.",
        ),
        "standard_ops": click.option(
            "--standard-ops",
            is_flag=True,
            help="Only ONNX's standard operators, no onnxruntime fusions: for OpenVINO (--provider openvino), which "
            "runs a graph with onnxruntime's own operators in pieces.",
        ),
        "overwrite": click.option("--overwrite", is_flag=True, help="Replace OUT once the new bundle is complete."),
    }


def export_options(command):
    """Adds the export options to a command and passes it `options` (an ExportOptions); a refused
    combination is a usage error (exit 2) before any work."""
    from edgediff.export.options import FIELD_NAMES as EXPORT_FIELDS
    from edgediff.export.options import ExportOptions
    from edgediff.runtime.errors import ExportOptionsError

    table = _export_click()
    if set(table) != set(EXPORT_FIELDS):
        raise RuntimeError("every ExportOptions field needs its click option")

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        values = {name: kwargs.pop(name) for name in EXPORT_FIELDS}
        try:
            kwargs["options"] = ExportOptions.from_cli(**values)
        except ExportOptionsError as exc:
            raise click.UsageError(str(exc)) from None
        return command(*args, **kwargs)

    for name in reversed(EXPORT_FIELDS):
        wrapper = table[name](wrapper)
    return wrapper
