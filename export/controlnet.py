"""ControlNets as graphs of their own, and the denoiser graph that takes their residuals as inputs.

`--controlnet SOURCE[:NAME]` loads a diffusers ControlNetModel (folder or hub id). Its graph takes what the UNet
takes (sample, timestep, text, SDXL's pooled text and size conditions) plus `controlnet_cond`, the control image in
[0, 1] at the image's size, and gives one residual per UNet down-path output and one for the mid-block, unscaled:
the runtime multiplies them by `controlnet_conditioning_scale` and sums several ControlNets, as diffusers'
ControlNetModel and MultiControlNetModel do. The UNet of a bundle with ControlNets takes those residuals as inputs
(zeros when a call has no control), so one UNet graph serves calls with and without control.

SD3 / SD3.5 (`SD3ControlNetModel`, as StableDiffusion3ControlNetPipeline): the graph takes the transformer's inputs
plus `controlnet_cond`, the control image's VAE latents (shifted and scaled by the runtime), and gives one block
sample per ControlNet block, (batch, image tokens, width), unscaled; the transformer takes them as
`block_controlnet_hidden_states` (zeros without control) and adds each to the blocks diffusers maps it to. ControlNets
that force zeros for the pooled text (InstantX's) get them inside their graph; SD3.5's, which have no patch embedding
of their own, get the transformer's, as the pipeline gives them.

FLUX.1 (`FluxControlNetModel`, as FluxControlNetPipeline): the graph takes the transformer's inputs (packed latents,
text, pooled text, t / 1000, position ids, dev's guidance) plus `controlnet_cond`, the control image's VAE latents
shifted, scaled and packed by the runtime, and gives one sample per double-stream block, then one per single-stream
block, unscaled; the transformer takes them as `controlnet_block_samples` / `controlnet_single_block_samples` (zeros
without control), each stream's blocks sharing its samples as diffusers' `interval_control` does.

Both graphs go through optimum's exporter on wrapper modules whose arguments are flat tensors (optimum names graph
inputs after the forward signature; diffusers takes the residuals as a tuple).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import ExportError, ExportOptionsError

from .specs import PACKED_AXIS, VALIDATION_BATCH, ComponentExport, ExportContext, _transformer_inputs, _unet_inputs

COMPONENT_PREFIX = "controlnet_"  # bundle component "controlnet_<name>"
# graph names of the residuals: the ControlNet's outputs and the UNet's inputs, index by index
DOWN_OUTPUT, MID_OUTPUT = "down_block_res_sample_{}", "mid_block_res_sample"
DOWN_INPUT, MID_INPUT = "down_block_additional_residual_{}", "mid_block_additional_residual"
# SD3: the ControlNet's block samples and the transformer's inputs for them
BLOCK_OUTPUT, BLOCK_INPUT = "controlnet_block_sample_{}", "block_controlnet_hidden_states_{}"
# FLUX: the double-stream blocks' samples (outputs BLOCK_OUTPUT), then the single-stream blocks'
SINGLE_OUTPUT = "controlnet_single_block_sample_{}"
FLUX_BLOCK_INPUT, FLUX_SINGLE_INPUT = "controlnet_block_samples_{}", "controlnet_single_block_samples_{}"
# diffusers' transformer keyword argument (a list) for each kind of block-sample input
BLOCK_KWARGS = {
    "block_controlnet_hidden_states": BLOCK_INPUT,
    "controlnet_block_samples": FLUX_BLOCK_INPUT,
    "controlnet_single_block_samples": FLUX_SINGLE_INPUT,
}
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")  # a ControlNet's name becomes part of file names
# conditioning types recognised in a source's name (lllyasviel/sd-controlnet-canny, diffusers/controlnet-depth-sdxl-1.0,
# thibaud/controlnet-openpose-sdxl-1.0, ...); others are recorded as unknown
CONDITIONING_TYPES = (
    "canny",
    "depth",
    "openpose",
    "pose",
    "scribble",
    "seg",
    "normal",
    "lineart",
    "mlsd",
    "softedge",
    "hed",
    "tile",
    "inpaint",
    "shuffle",
    "qrcode",
)
_CONDITIONING_ALIASES = {"openpose": "pose"}


@dataclass(frozen=True)
class ControlNetSource:
    source: str
    name: str
    model: object  # the ControlNetModel
    levels: tuple[int, ...]  # per residual (the down ones, then the mid one): downsamplings below the latent grid
    channels: tuple[int, ...]
    conditioning_type: str | None
    # SD3, FLUX: the control image enters as VAE latents, (sample - this shift) * the VAE's scaling factor; None: as
    # an image
    latent_shift: float | None = None
    flux: bool = False  # FLUX: its last `single` outputs are the single-stream blocks' samples
    single: int = 0

    @property
    def tokens(self) -> bool:
        """Whether its outputs are a transformer's block samples (SD3, FLUX), not UNet residuals."""
        return self.latent_shift is not None

    @property
    def outputs(self) -> list[str]:
        """Its graph's output names (block samples)."""
        double = len(self.levels) - self.single
        return [BLOCK_OUTPUT.format(i) for i in range(double)] + [SINGLE_OUTPUT.format(i) for i in range(self.single)]

    @property
    def blocks(self) -> str:
        double = len(self.levels) - self.single
        return f"{double} blocks and {self.single} single blocks" if self.flux else f"{double} blocks"

    @property
    def component(self) -> str:
        return COMPONENT_PREFIX + self.name


def parse_controlnet(spec: str) -> tuple[str, str]:
    """ "SOURCE[:NAME]" -> (source, name); the name defaults to the conditioning type the source's name says, else
    to its last path part (a Windows drive's colon is not a name separator)."""
    source, sep, name = spec.rpartition(":")
    if not sep or not name or "/" in name or "\\" in name or (len(source) == 1 and source.isalpha()):
        source, name = spec, ""
    name = name or conditioning_type(source) or re.split(r"[/\\]", source.rstrip("/\\"))[-1]
    name = re.sub(r"[^A-Za-z0-9_-]", "-", name).strip("-_")
    if not NAME_PATTERN.match(name):
        raise ExportOptionsError("export_controlnet_name", value=spec)
    return source, name


def conditioning_type(source: str) -> str | None:
    """The conditioning a ControlNet was trained on, when its source's name says it."""
    words = re.split(r"[^a-z0-9]+", Path(source.rstrip("/\\")).as_posix().lower())
    for kind in CONDITIONING_TYPES:
        if kind in words:
            return _CONDITIONING_ALIASES.get(kind, kind)
    return None


def residual_layout(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(levels, channels) of the residuals a UNet's down path (or its ControlNet) gives: conv_in's output, each
    resnet's and each downsampler's, then the mid-block's; levels count the stride-2 downsamplings above them."""
    widths = list(config.block_out_channels)
    per_block = config.layers_per_block
    per_block = list(per_block) if isinstance(per_block, (list, tuple)) else [per_block] * len(widths)
    levels, channels = [0], [widths[0]]
    for b, width in enumerate(widths):
        levels += [b] * per_block[b]
        channels += [width] * per_block[b]
        if b < len(widths) - 1:
            levels.append(b + 1)
            channels.append(width)
    return (*levels, len(widths) - 1), (*channels, widths[-1])


def residual_side(cells: int, level: int) -> int:
    """A residual's side in cells: each stride-2 downsampling (3x3, padding 1) rounds up."""
    for _ in range(level):
        cells = (cells + 1) // 2
    return cells


def load_controlnets(specs, pipe, ctx: ExportContext) -> list[ControlNetSource]:
    """The ControlNets `specs` ((source, name) pairs) name, each checked to fit the pipeline's UNet, SD3 or FLUX
    transformer."""
    if not specs:
        return []
    unet = getattr(pipe, "unet", None)
    fit = {"SD3Transformer2DModel": _fit_sd3, "FluxTransformer2DModel": _fit_flux}.get(
        type(getattr(pipe, "transformer", None)).__name__
    )
    if unet is None and fit is None:
        raise ExportOptionsError("export_family_option", option="--controlnet", family="SANA or PixArt")
    names = [name for _, name in specs]
    if len(set(names)) != len(names):
        raise ExportOptionsError("export_controlnet_duplicate", names=", ".join(names))
    if unet is None:
        out = [fit(source, name, pipe, ctx) for source, name in specs]
        first = out[0]
        for c in out[1:]:  # all of them feed the same transformer inputs
            if (len(c.channels), c.single) != (len(first.channels), first.single):
                raise ExportError(
                    "export_source",
                    source=c.source,
                    detail=f"ControlNet does not fit: {c.blocks}, the first ControlNet's {first.blocks} (the "
                    "ControlNets of one bundle feed the same transformer inputs)",
                )
        return out
    layout = residual_layout(unet.config)
    out = []
    for source, name in specs:
        model = _load(source)
        config = model.config
        levels, channels = residual_layout(config)
        problems = []
        if getattr(config, "global_pool_conditions", False):  # diffusers then runs it in guess mode
            problems.append("it pools its conditions (a shuffle-style ControlNet), which needs guess mode, not run yet")
        if getattr(unet, "mid_block", None) is None:
            problems.append("the UNet has no mid-block")
        if (levels, channels) != layout:
            problems.append(f"residual channels {list(channels)}, the UNet's {list(layout[1])}")
        if int(config.cross_attention_dim) != ctx.cross_attention_dim:
            problems.append(f"text width {config.cross_attention_dim}, the UNet's {ctx.cross_attention_dim}")
        if ctx.unet_in_channels != ctx.latent_channels:
            problems.append(f"the UNet is an inpainting UNet ({ctx.unet_in_channels} input channels)")
        if int(config.in_channels) != ctx.latent_channels:
            problems.append(f"{config.in_channels} latent channels, the model's {ctx.latent_channels}")
        if (config.addition_embed_type == "text_time") != (ctx.pooled_dim is not None):
            problems.append("SDXL size conditions on one side only (an SD 1.x/2.x ControlNet with SDXL, or back)")
        embedding = config.conditioning_embedding_out_channels
        if 2 ** (len(embedding) - 1) != ctx.vae_scale_factor:
            problems.append(
                f"control images downsampled {2 ** (len(embedding) - 1)}x, the VAE's {ctx.vae_scale_factor}x"
            )
        if problems:
            raise ExportError("export_source", source=source, detail=f"ControlNet does not fit: {'; '.join(problems)}")
        out.append(ControlNetSource(source, name, model, levels, channels, conditioning_type(source)))
    return out


def _fit_sd3(source: str, name: str, pipe, ctx: ExportContext) -> ControlNetSource:
    """An SD3ControlNetModel checked against the pipeline's SD3 transformer, with the transformer's patch embedding
    when it has none of its own (SD3.5's), as StableDiffusion3ControlNetPipeline gives it."""
    from diffusers import SD3ControlNetModel

    transformer = pipe.transformer
    t, model = transformer.config, _load(source, SD3ControlNetModel, "SD3ControlNetModel")
    config = model.config
    width, blocks = int(config.num_attention_heads) * int(config.attention_head_dim), int(config.num_layers)
    problems = []
    if width != transformer.inner_dim:
        problems.append(f"width {width}, the transformer's {transformer.inner_dim}")
    if blocks > len(transformer.transformer_blocks):
        problems.append(f"{blocks} blocks, more than the transformer's {len(transformer.transformer_blocks)}")
    for key, what in (("in_channels", "latent channels"), ("patch_size", "patch size")):
        if int(config[key]) != int(t[key]):
            problems.append(f"{what} {config[key]}, the transformer's {t[key]}")
    if config.extra_conditioning_channels:
        problems.append(
            f"{config.extra_conditioning_channels} extra conditioning channels (an inpainting ControlNet), which "
            "StableDiffusion3ControlNetPipeline does not feed"
        )
    if config.joint_attention_dim is not None and int(config.joint_attention_dim) != int(t.joint_attention_dim):
        problems.append(f"text width {config.joint_attention_dim}, the transformer's {t.joint_attention_dim}")
    if int(config.pooled_projection_dim) != int(t.pooled_projection_dim):
        problems.append(
            f"pooled text width {config.pooled_projection_dim}, the transformer's {t.pooled_projection_dim}"
        )
    patch = int(t.patch_size)
    needed = max(ctx.height, ctx.width) // ctx.vae_scale_factor // patch
    if config.use_pos_embed and config.pos_embed_max_size is not None and int(config.pos_embed_max_size) < needed:
        problems.append(f"positions up to {config.pos_embed_max_size} patches a side, the bundle's size needs {needed}")
    if patch & (patch - 1):
        problems.append(f"patch size {patch}, not a power of 2")
    if problems:
        raise ExportError("export_source", source=source, detail=f"ControlNet does not fit: {'; '.join(problems)}")
    if not config.use_pos_embed:
        model.pos_embed = model._get_pos_embed_from_transformer(transformer)
    # InstantX's ControlNets (zeros for the pooled text) take latents without the VAE's shift, as the pipeline
    shift = (
        0.0 if config.force_zeros_for_pooled_projection else float(getattr(pipe.vae.config, "shift_factor", 0.0) or 0.0)
    )
    level = patch.bit_length() - 1  # a token per patch: the sides shrink as after this many 2x downsamplings
    return ControlNetSource(
        source, name, model, (level,) * blocks, (width,) * blocks, conditioning_type(source), latent_shift=shift
    )


def _fit_flux(source: str, name: str, pipe, ctx: ExportContext) -> ControlNetSource:
    """A FluxControlNetModel checked against the pipeline's FLUX transformer (InstantX-style: the control image's
    packed VAE latents through its own x embedder, as FluxControlNetPipeline feeds them)."""
    from diffusers import FluxControlNetModel

    transformer = pipe.transformer
    t, model = transformer.config, _load(source, FluxControlNetModel, "FluxControlNetModel")
    config = model.config
    width = int(config.num_attention_heads) * int(config.attention_head_dim)
    problems = []
    if width != transformer.inner_dim:
        problems.append(f"width {width}, the transformer's {transformer.inner_dim}")
    for key, what in (
        ("in_channels", "packed latent channels"),
        ("joint_attention_dim", "text width"),
        ("pooled_projection_dim", "pooled text width"),
    ):
        if int(config[key]) != int(t[key]):
            problems.append(f"{what} {config[key]}, the transformer's {t[key]}")
    if bool(config.guidance_embeds) != bool(t.guidance_embeds):  # the runtime feeds guidance as the transformer takes
        problems.append(
            f"guidance embedding {'on' if config.guidance_embeds else 'off'}, the transformer's "
            f"{'on' if t.guidance_embeds else 'off'} (a ControlNet for FLUX.1-dev with schnell, or back)"
        )
    if config.num_mode is not None:
        problems.append(f"a union ControlNet ({config.num_mode} control modes, controlnet_mode), not supported")
    if config.conditioning_embedding_channels is not None:
        problems.append(
            "an XLabs-style ControlNet (the control image in pixels through its own hint block, its samples repeated "
            "over the transformer's blocks), not supported"
        )
    if problems:
        raise ExportError("export_source", source=source, detail=f"ControlNet does not fit: {'; '.join(problems)}")
    shift = float(getattr(pipe.vae.config, "shift_factor", 0.0) or 0.0)  # the VAE's own, as the pipeline
    count, single = int(config.num_layers) + int(config.num_single_layers), int(config.num_single_layers)
    level = ctx.packing.bit_length() - 1  # a token per packing x packing latent cells
    return ControlNetSource(
        source,
        name,
        model,
        (level,) * count,
        (width,) * count,
        conditioning_type(source),
        latent_shift=shift,
        flux=True,
        single=single,
    )


def _load(source: str, cls=None, class_name: str = "ControlNetModel"):
    """The model at `source`, refused when its config names another ControlNet class (an SD3 one for a UNet, or
    back), which from_pretrained would otherwise fill with random weights."""
    from diffusers import ControlNetModel

    from .source import load_part

    cls = cls or ControlNetModel
    try:
        declared = cls.load_config(source).get("_class_name")
    except (OSError, ValueError, EnvironmentError):
        declared = None  # load_part says what is wrong with the source
    if declared and declared != class_name and declared.endswith("ControlNetModel"):
        raise ExportError("export_source", source=source, detail=f"a {declared}, not the {class_name} this model takes")
    return load_part(cls, source, "ControlNet").eval()


def with_residuals(ctx: ExportContext, controlnets: list[ControlNetSource]) -> ExportContext:
    """The context whose denoiser inputs include the residuals (all ControlNets share the denoiser's layout)."""
    if not controlnets:
        return ctx
    first = controlnets[0]
    return dataclasses.replace(
        ctx,
        controlnet_residuals=tuple(zip(first.levels, first.channels)),
        controlnet_tokens=first.tokens,
        controlnet_single_blocks=first.single,
    )


def token_inputs(ctx: ExportContext) -> list[str]:
    """The transformer's block-sample input names, in the ControlNets' output order (SD3's; FLUX's double-stream
    blocks', then its single-stream blocks')."""
    count = len(ctx.controlnet_residuals)
    if ctx.packing == 1:
        return [BLOCK_INPUT.format(i) for i in range(count)]
    single = ctx.controlnet_single_blocks
    return [FLUX_BLOCK_INPUT.format(i) for i in range(count - single)] + [
        FLUX_SINGLE_INPUT.format(i) for i in range(single)
    ]


def residual_attributes(ctx: ExportContext) -> dict:
    """The denoiser's manifest attributes for its residual inputs: name, channels and level each (SD3, FLUX:
    "tokens", (batch, tokens, channels) with a token per 2**level latent cells a side), so that the runtime can feed
    zeros of the right shapes when a call has no control."""
    if ctx.controlnet_tokens:
        return {
            "controlnet_residuals": [
                {"name": name, "level": lv, "channels": ch, "tokens": True}
                for name, (lv, ch) in zip(token_inputs(ctx), ctx.controlnet_residuals)
            ]
        }
    *down, mid = ctx.controlnet_residuals
    entries = [{"name": DOWN_INPUT.format(i), "level": lv, "channels": ch} for i, (lv, ch) in enumerate(down)]
    return {"controlnet_residuals": [*entries, {"name": MID_INPUT, "level": mid[0], "channels": mid[1]}]}


def manifest_entries(controlnets: list[ControlNetSource], out: Path) -> list[dict]:
    from .manifest_builder import recorded_path

    entries = []
    for c in controlnets:
        entry = {
            "name": c.name,
            "component": c.component,
            "conditioning_channels": 3 if c.tokens else int(c.model.config.conditioning_channels),
            "conditioning_type": c.conditioning_type,
            "source": recorded_path(c.source, out),
        }
        if c.tokens:  # the runtime encodes the control image with the bundle's VAE encoder
            entry["control_latents"] = {"shift_factor": c.latent_shift}
        if c.flux:  # with a negative batch (true CFG) it runs on the prompt's half alone, as FluxControlNetPipeline
            entry["prompt_only"] = True
        entries.append(entry)
    return entries


# --- the check's inputs and PyTorch calls -------------------------------------------------------------------------


def residual_inputs(ctx: ExportContext, rng) -> dict[str, np.ndarray]:
    """Random residuals at the denoiser's sample size, at the magnitudes trained ControlNets give (about unit)."""
    h, w = ctx.height // ctx.vae_scale_factor, ctx.width // ctx.vae_scale_factor
    if ctx.controlnet_tokens:
        return {
            name: rng.standard_normal(
                (VALIDATION_BATCH, residual_side(h, level) * residual_side(w, level), channels)
            ).astype(np.float32)
            for name, (level, channels) in zip(token_inputs(ctx), ctx.controlnet_residuals)
        }
    *down, mid = ctx.controlnet_residuals
    names = [DOWN_INPUT.format(i) for i in range(len(down))] + [MID_INPUT]
    return {
        name: rng.standard_normal(
            (VALIDATION_BATCH, channels, residual_side(h, level), residual_side(w, level))
        ).astype(np.float32)
        for name, (level, channels) in zip(names, ctx.controlnet_residuals)
    }


def unet_residual_kwargs(x: dict) -> dict:
    """diffusers' UNet keyword arguments for the residuals among a check's inputs (empty without them)."""
    if MID_INPUT not in x:
        return {}
    count = sum(1 for name in x if name.startswith(DOWN_INPUT.format("")))
    return {
        "down_block_additional_residuals": tuple(x[DOWN_INPUT.format(i)] for i in range(count)),
        "mid_block_additional_residual": x[MID_INPUT],
    }


def is_block_input(name: str) -> bool:
    return any(name.startswith(pattern.format("")) for pattern in BLOCK_KWARGS.values())


def transformer_block_kwargs(x: dict) -> dict:
    """diffusers' transformer keyword arguments for the block samples among a check's inputs (empty without): SD3's
    block_controlnet_hidden_states, FLUX's controlnet_block_samples and controlnet_single_block_samples."""
    kwargs = {}
    for kwarg, pattern in BLOCK_KWARGS.items():
        count = sum(1 for name in x if name.startswith(pattern.format("")))
        if count:
            kwargs[kwarg] = [x[pattern.format(i)] for i in range(count)]
    return kwargs


def _sd3_controlnet_component(c: ControlNetSource) -> ComponentExport:
    config = c.model.config

    def inputs(ctx: ExportContext, rng):
        base = _transformer_inputs(dataclasses.replace(ctx, controlnet_residuals=()), rng)
        x = {"hidden_states": base["hidden_states"], "timestep": base["timestep"]}
        if config.joint_attention_dim is not None:  # SD3.5's ControlNets read no text
            x["encoder_hidden_states"] = base["encoder_hidden_states"]
        if not config.force_zeros_for_pooled_projection:  # InstantX's: zeros, inside the graph
            x["pooled_projections"] = base["pooled_projections"]
        # the control image's latents, scaled as the pipeline scales them (about unit variance)
        x["controlnet_cond"] = rng.standard_normal(base["hidden_states"].shape).astype(np.float32)
        return x

    def call(model, x):
        hidden = x["hidden_states"]
        pooled = x.get("pooled_projections")
        if pooled is None:
            pooled = hidden.new_zeros((hidden.shape[0], int(config.pooled_projection_dim)))
        (samples,) = model(
            hidden_states=hidden,
            controlnet_cond=x["controlnet_cond"],
            encoder_hidden_states=x.get("encoder_hidden_states"),
            pooled_projections=pooled,
            timestep=x["timestep"],
            return_dict=False,
        )
        return list(samples)

    return ComponentExport(c.component, call, inputs)


def _flux_controlnet_component(c: ControlNetSource) -> ComponentExport:
    def inputs(ctx: ExportContext, rng):
        base = _transformer_inputs(dataclasses.replace(ctx, controlnet_residuals=()), rng)
        x = dict(base)  # the transformer's own inputs, guidance where it embeds it (matched at load)
        # the control image's packed latents, scaled as the pipeline scales them (about unit variance)
        x["controlnet_cond"] = rng.standard_normal(base["hidden_states"].shape).astype(np.float32)
        return x

    def call(model, x):
        double, single = model(**x, return_dict=False)
        return [*(double or ()), *(single or ())]

    return ComponentExport(c.component, call, inputs)


def controlnet_component(c: ControlNetSource) -> ComponentExport:
    if c.flux:
        return _flux_controlnet_component(c)
    if c.tokens:
        return _sd3_controlnet_component(c)

    def inputs(ctx: ExportContext, rng):
        x = {k: v for k, v in _unet_inputs(ctx, rng).items() if k != "timestep_cond"}  # ControlNets take no LCM w
        x["controlnet_cond"] = rng.uniform(
            0, 1, (VALIDATION_BATCH, int(c.model.config.conditioning_channels), ctx.height, ctx.width)
        ).astype(np.float32)
        return x

    def call(model, x):
        added = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]} if "text_embeds" in x else None
        down, mid = model(
            x["sample"],
            x["timestep"],
            encoder_hidden_states=x["encoder_hidden_states"],
            controlnet_cond=x["controlnet_cond"],
            added_cond_kwargs=added,
            return_dict=False,
        )
        return [*down, mid]

    return ComponentExport(c.component, call, inputs)


# --- optimum export configs on flat wrapper modules ---------------------------------------------------------------


def flat_module(model, names: list[str], call):
    """`model` behind a module whose forward takes `names` as separate tensors (optimum and the tracer read the
    signature) and returns call(model, inputs) as a tuple."""
    import torch

    class Flat(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model
            self.config = model.config  # optimum sets return_dict on it

    module = Flat()

    def forward(*args):
        return tuple(call(model, dict(zip(names, args))))

    forward.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in names]
    )
    module.forward = forward  # an instance attribute over the class's method, as tiny_decoder.py does
    return module


def spatial_axes(level: int) -> dict[int, str]:
    if level == 0:
        return {0: "batch_size", 2: "height", 3: "width"}
    return {0: "batch_size", 2: f"height_down{level}", 3: f"width_down{level}"}


def export_config(model_config, inputs: dict, outputs: dict, dummies, patcher=None):
    """An optimum config (on its UNet one) with these inputs and outputs, tracing on `dummies()` (name -> array),
    under `patcher` (optimum's model patcher; FLUX's makes the rotary embedding follow the token count)."""
    from optimum.exporters.onnx.model_configs import UNetOnnxConfig

    class FlatConfig(UNetOnnxConfig):
        _MODEL_PATCHER = patcher or UNetOnnxConfig._MODEL_PATCHER

        @property
        def inputs(self):
            return dict(inputs)

        @property
        def outputs(self):
            return dict(outputs)

        @property
        def torch_to_onnx_output_map(self):
            return {}

        def generate_dummy_inputs(self, framework: str = "pt", **shapes):
            import torch

            values = dummies()
            return {k: torch.from_numpy(v) for k, v in values.items()} if framework == "pt" else values

        def ordered_inputs(self, model):
            return {name: inputs[name] for name in inspect.signature(model.forward).parameters}

    return FlatConfig(model_config, task="semantic-segmentation")


def input_axes(x: dict[str, np.ndarray], residual_levels: dict[str, int]) -> dict[str, dict[int, str]]:
    axes = {}
    for name, value in x.items():
        if name in residual_levels:
            axes[name] = spatial_axes(residual_levels[name])
        elif name == "timestep":
            axes[name] = {}
        elif name == "sample":
            axes[name] = spatial_axes(0)
        elif name == "controlnet_cond":
            axes[name] = {0: "batch_size", 2: "image_height", 3: "image_width"}
        elif name == "encoder_hidden_states":
            axes[name] = {0: "batch_size", 1: "sequence_length"}
        else:
            axes[name] = {0: "batch_size"}
    return axes


def unet_for_export(unet, ctx: ExportContext, trace_ctx: ExportContext):
    """(module, optimum config) of the UNet taking the residuals as inputs."""
    from types import SimpleNamespace

    from .specs import _unet_call

    example = _unet_inputs(ctx, np.random.default_rng(1))
    names = list(example)
    levels = {e["name"]: e["level"] for e in residual_attributes(ctx)["controlnet_residuals"]}
    module = flat_module(unet, names, lambda model, x: _unet_call(SimpleNamespace(unet=model), x))
    config = export_config(
        unet.config,
        input_axes(example, levels),
        {"out_sample": spatial_axes(0)},
        lambda: _unet_inputs(trace_ctx, np.random.default_rng(1)),
    )
    return module, config


TOKEN_AXES = {0: "batch_size", 1: "image_tokens"}  # SD3's block samples
PACKED_AXES = {0: "batch_size", 1: PACKED_AXIS}  # FLUX's tokens, as optimum names them
FLUX_AXES = {  # a FLUX ControlNet's inputs, as optimum's FLUX transformer's; others {0: "batch_size"}
    "hidden_states": PACKED_AXES,
    "controlnet_cond": PACKED_AXES,
    "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
    "img_ids": {0: PACKED_AXIS},
    "txt_ids": {0: "sequence_length"},
}


def denoiser_for_export(pipe, optimum_models: dict, ctx: ExportContext, trace_ctx: ExportContext) -> dict:
    """{denoiser component: (module, optimum config)} of the UNet or SD3 transformer taking the residuals."""
    if getattr(pipe, "unet", None) is not None:
        return {"unet": unet_for_export(pipe.unet, ctx, trace_ctx)}
    return {"transformer": transformer_for_export(pipe.transformer, optimum_models["transformer"][1], ctx, trace_ctx)}


def used_inputs(transformer, ctx: ExportContext) -> set[str]:
    """The block-sample inputs the transformer adds, by diffusers' mapping of its blocks onto them. SD3: its last
    block adds none, so a ControlNet as deep as the transformer gives one that no block reads; FLUX: each stream's
    blocks take a sample every ceil(blocks / samples) blocks (interval_control), so samples past the last one are
    left unread."""
    names = token_inputs(ctx)
    if ctx.packing == 1:
        blocks = transformer.transformer_blocks
        interval = len(blocks) / len(names)
        return {names[int(i / interval)] for i, block in enumerate(blocks) if block.context_pre_only is False}
    double = len(names) - ctx.controlnet_single_blocks
    used = set()
    for blocks, group in (
        (transformer.transformer_blocks, names[:double]),
        (transformer.single_transformer_blocks, names[double:]),
    ):
        if group:
            interval = math.ceil(len(blocks) / len(group))
            used |= {group[i // interval] for i in range(len(blocks))}
    return used


def transformer_for_export(transformer, optimum_config, ctx: ExportContext, trace_ctx: ExportContext):
    """(module, optimum config) of the SD3 or FLUX transformer taking the ControlNet block samples it adds as inputs
    (the exporter would drop one that no block reads); its other inputs and its output keep optimum's names and
    axes."""
    from types import SimpleNamespace

    from .specs import _transformer_call

    unused = set(token_inputs(ctx)) - used_inputs(transformer, ctx)
    example = _transformer_inputs(ctx, np.random.default_rng(1))
    names = [name for name in example if name not in unused]
    token_axes = PACKED_AXES if ctx.packing > 1 else TOKEN_AXES
    axes = {name: dict(optimum_config.inputs.get(name) or token_axes) for name in names}

    def call(model, x):
        read = next(x[name] for name in names if is_block_input(name))
        filled = {**x, **dict.fromkeys(unused, read)}  # placeholders: diffusers counts them, no block reads them
        return _transformer_call(SimpleNamespace(transformer=model), filled)

    def dummies():
        return {k: v for k, v in _transformer_inputs(trace_ctx, np.random.default_rng(1)).items() if k in names}

    module = flat_module(transformer, names, call)
    patcher = type(optimum_config)._MODEL_PATCHER
    return module, export_config(transformer.config, axes, dict(optimum_config.outputs), dummies, patcher)


def controlnet_for_export(c: ControlNetSource, ctx: ExportContext, trace_ctx: ExportContext):
    """(module, optimum config) of one ControlNet's graph: its residuals unscaled, down ones then the mid one (SD3:
    its block samples)."""
    component = controlnet_component(c)
    example = component.random_inputs(ctx, np.random.default_rng(1))
    names = list(example)
    if c.flux:
        outputs = {name: dict(PACKED_AXES) for name in c.outputs}
        axes = {n: dict(FLUX_AXES.get(n, {0: "batch_size"})) for n in example}
    elif c.tokens:
        outputs = {name: dict(TOKEN_AXES) for name in c.outputs}
        axes = {
            n: {0: "batch_size", 2: "height", 3: "width"} if v.ndim == 4 else {0: "batch_size"}
            for n, v in example.items()
        }
        axes["timestep"] = {0: "step"}  # as optimum's SD3 transformer
        if "encoder_hidden_states" in axes:
            axes["encoder_hidden_states"] = {0: "batch_size", 1: "sequence_length"}
    else:
        *down, mid = c.levels
        outputs = {DOWN_OUTPUT.format(i): spatial_axes(level) for i, level in enumerate(down)}
        outputs[MID_OUTPUT] = spatial_axes(mid)
        axes = input_axes(example, {})
    module = flat_module(c.model, names, component.torch_call)
    config = export_config(
        c.model.config,
        axes,
        outputs,
        lambda: component.random_inputs(trace_ctx, np.random.default_rng(1)),
        _flux_patcher() if c.flux else None,
    )
    return module, config


def _flux_patcher():
    """optimum's FLUX transformer patcher: its blocks are the ControlNet's too."""
    from optimum.exporters.onnx.model_configs import FluxTransformerOnnxConfig

    return FluxTransformerOnnxConfig._MODEL_PATCHER


def controlnet_attributes(c: ControlNetSource) -> dict:
    if c.flux:
        return {
            "controlnet": {
                "name": c.name,
                "conditioning_type": c.conditioning_type,
                "blocks": len(c.levels) - c.single,
                "single_blocks": c.single,
            }
        }
    if c.tokens:
        config = c.model.config
        return {
            "controlnet": {
                "name": c.name,
                "conditioning_type": c.conditioning_type,
                "blocks": len(c.levels),
                "force_zeros_for_pooled_projection": bool(config.force_zeros_for_pooled_projection),
                "reads_text": config.joint_attention_dim is not None,
            }
        }
    return {
        "controlnet": {
            "name": c.name,
            "conditioning_channels": int(c.model.config.conditioning_channels),
            "conditioning_type": c.conditioning_type,
            "global_pool_conditions": bool(c.model.config.global_pool_conditions),
        }
    }
