"""A reference image (IP-Adapter) for the UNet families: the CLIP vision encoder as a graph of its own, and a UNet
graph whose cross-attention also attends to the image's tokens.

`--ip-adapter SOURCE` takes IP-Adapter weights as diffusers' `load_ip_adapter` reads them (a .safetensors file with
"image_proj." and "ip_adapter." keys, or a .bin holding those two dicts), and its CLIPVisionModelWithProjection in
an `image_encoder` folder beside them (`--ip-adapter-image-encoder` names another). They are loaded into the UNet
with diffusers' own loader (`_load_ip_adapter_weights`), so the exported UNet is the module diffusers runs.

The UNet graph takes `image_embeds` (the encoder's projected embedding, one row per UNet batch row) and
`ip_adapter_scale` (a scalar). The image projection (diffusers' `encoder_hid_proj`) stays inside the UNet graph,
as in diffusers' UNet forward: classifier-free guidance's negative embeddings are zeros *before* the projection,
so the projection must run on both halves; it is one small linear layer and a norm, and keeping it inside means
one check against PyTorch covers the whole path. The scale is a graph input, not a constant, so that one bundle
serves any scale; without a reference image the runtime feeds zero embeddings and scale 0, which adds exactly
0 to each attention output: the plain UNet's image.

Two kinds, told apart by the projection's keys as diffusers' loader tells them apart:
- plain ("proj.weight", ImageProjection): the encoder graph gives the projected `image_embeds` (B, D), 4 tokens;
- Plus ("latents", "proj_in.weight", IPAdapterPlusImageProjection, a perceiver resampler): the encoder graph gives
  the penultimate hidden state (B, N, H), as diffusers' encode_image takes it for any projection but ImageProjection,
  and the UNet's `image_embeds` input has that shape; its tokens are the resampler's queries (16 in the published).
Full-face and FaceID variants (FaceID needs insightface's face embeddings, not CLIP's) are refused, naming them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import ExportError, ExportOptionsError

from .specs import VALIDATION_BATCH, ComponentExport, ExportContext, _unet_inputs

COMPONENT = "image_encoder"
PLAIN, PLUS = "plain", "plus"
# the encoder graph's output per kind: what diffusers' encode_image hands the projection
ENCODER_OUTPUTS = {PLAIN: "image_embeds", PLUS: "penultimate_hidden_states"}
# projections diffusers' loader knows but edgediff does not export, by the key that marks them (checked in order)
UNSUPPORTED_KINDS = (
    ("proj.3.weight", "Full-face"),
    ("perceiver_resampler.proj_in.weight", "FaceID Plus (insightface face embeddings)"),
    ("norm.weight", "FaceID (insightface face embeddings)"),
)
IMAGE_EMBEDS, SCALE_INPUT = "image_embeds", "ip_adapter_scale"  # the UNet's extra inputs
WEIGHT_SUFFIXES = (".safetensors", ".bin")
DEFAULT_IMAGE_ENCODER = "image_encoder"  # diffusers' image_encoder_folder default, beside the weights
# CLIPImageProcessor's defaults, which diffusers' load_ip_adapter creates (sized to the encoder's image_size)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class IPAdapterSource:
    weights: Path
    image_encoder_folder: Path
    encoder: object  # the CLIPVisionModelWithProjection
    tokens: int  # image tokens per reference image
    kind: str = PLAIN

    @property
    def embeds_dim(self) -> int:
        """The width of what the encoder graph gives and the UNet takes."""
        config = self.encoder.config
        return int(config.hidden_size if self.kind == PLUS else config.projection_dim)

    @property
    def embeds_length(self) -> int | None:
        """Plus: the encoder's hidden-state tokens per image (patches and CLS); None: one embedding per image."""
        if self.kind != PLUS:
            return None
        return (self.image_size // int(self.encoder.config.patch_size)) ** 2 + 1

    @property
    def encoder_output(self) -> str:
        return ENCODER_OUTPUTS[self.kind]

    @property
    def image_size(self) -> int:
        return int(self.encoder.config.image_size)


def find_weights(source: str) -> Path:
    """The weights file `source` names: the file itself, or the one IP-Adapter weights file in a folder."""
    path = Path(source).expanduser()
    if path.is_file():
        return path
    if not path.is_dir():
        raise ExportError("export_source", source=source, detail="IP-Adapter: no such file or folder")
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    if len(found) != 1:
        listed = ", ".join(p.name for p in found) or "none"
        raise ExportError(
            "export_source",
            source=source,
            detail=f"IP-Adapter: name the weights file (.safetensors or .bin) in this folder; found {listed}",
        )
    return found[0]


def read_state_dict(weights: Path) -> dict:
    """{"image_proj": {...}, "ip_adapter": {...}} as diffusers' load_ip_adapter splits the file's keys."""
    if weights.suffix == ".safetensors":
        from safetensors import safe_open

        state = {"image_proj": {}, "ip_adapter": {}}
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            for key in f.keys():
                part, _, rest = key.partition(".")
                if part in state:
                    state[part][rest] = f.get_tensor(key)
        return state
    from diffusers.models.model_loading_utils import load_state_dict

    return load_state_dict(str(weights))


def load_ip_adapter(source: str | None, image_encoder: str | None, pipe, ctx: ExportContext):
    """Loads the IP-Adapter into the pipeline's UNet and its image encoder; None without `source`."""
    if not source:
        return None
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ExportOptionsError("export_family_option", option="--ip-adapter", family="transformer (SD3, FLUX, ...)")
    weights = find_weights(source)
    folder = Path(image_encoder).expanduser() if image_encoder else weights.parent / DEFAULT_IMAGE_ENCODER
    state = read_state_dict(weights)
    projection = state.get("image_proj") or {}
    kind = adapter_kind(projection, source)
    encoder = _load_encoder(folder, source)
    tokens, problems = _fit(kind, projection, encoder.config, ctx.cross_attention_dim)
    if problems:
        raise ExportError("export_source", source=source, detail=f"IP-Adapter does not fit: {'; '.join(problems)}")
    try:
        unet._load_ip_adapter_weights([state])
    except (RuntimeError, KeyError, ValueError) as exc:  # layer shapes or names of another UNet
        detail = f"IP-Adapter does not fit the UNet: {str(exc).splitlines()[0]}"
        raise ExportError("export_source", source=source, detail=detail) from exc
    unet.eval()
    return IPAdapterSource(weights, folder, encoder, tokens, kind)


def adapter_kind(projection: dict, source: str) -> str:
    """PLAIN or PLUS from the image projection's keys, as diffusers' loader tells them apart; others refused."""
    if "proj.weight" in projection:
        return PLAIN
    if "latents" in projection and "proj_in.weight" in projection:
        return PLUS
    found = next((name for key, name in UNSUPPORTED_KINDS if key in projection), None)
    found = found or ", ".join(sorted(projection)[:4]) or "no image_proj keys"
    detail = (
        "IP-Adapter: the plain IP-Adapter (image_proj.proj.weight) and IP-Adapter Plus (image_proj.latents and "
        f"proj_in) are supported; found {found}"
    )
    raise ExportError("export_source", source=source, detail=detail)


def _fit(kind: str, projection: dict, encoder_config, cross: int) -> tuple[int, list[str]]:
    """(image tokens, what does not fit) of the projection between this encoder and the UNet's text width."""
    if kind == PLUS:  # a resampler: its queries are the tokens, proj_in reads the encoder's hidden states
        tokens, width, reads = projection["latents"].shape[1], encoder_config.hidden_size, projection["proj_in.weight"]
        out = projection.get("proj_out.weight")
        values = None if out is None else int(out.shape[0])
        fits = values == cross
    else:  # one linear layer to `tokens` tokens of the text width
        reads, width = projection["proj.weight"], encoder_config.projection_dim
        values = int(reads.shape[0])
        tokens = values // cross
        fits = tokens > 0 and tokens * cross == values
    problems = []
    if int(reads.shape[1]) != int(width):
        problems.append(f"image embeddings of {reads.shape[1]}, the image encoder's {width}")
    if not fits:
        problems.append(f"projection to {values} values, not tokens of the text width {cross}")
    return int(tokens), problems


def _load_encoder(folder: Path, source: str):
    import torch
    from transformers import CLIPVisionModelWithProjection

    try:
        encoder = CLIPVisionModelWithProjection.from_pretrained(str(folder), torch_dtype=torch.float32)
    except (OSError, ValueError) as exc:
        detail = (
            f"IP-Adapter image encoder ({folder}): {str(exc).splitlines()[0]}; name it with --ip-adapter-image-encoder"
        )
        raise ExportError("export_source", source=source, detail=detail) from exc
    return encoder.eval()


def with_image_embeds(ctx: ExportContext, ip: IPAdapterSource | None) -> ExportContext:
    """The context whose UNet inputs include the image embeddings and the scale."""
    if ip is None:
        return ctx
    return dataclasses.replace(ctx, ip_adapter_embeds_dim=ip.embeds_dim, ip_adapter_embeds_length=ip.embeds_length)


def unet_attributes(ip: IPAdapterSource) -> dict:
    entry = {"image_embeds": IMAGE_EMBEDS, "scale": SCALE_INPUT, "embeds_dim": ip.embeds_dim}
    return {"ip_adapter": {**entry, "kind": ip.kind, "embeds_length": ip.embeds_length}}


def manifest_entry(ip: IPAdapterSource | None, out: Path) -> dict | None:
    from .manifest_builder import recorded_path

    if ip is None:
        return None
    return {
        "component": COMPONENT,
        # which encoder output the UNet takes, and so the negative embeddings: plain zeros, Plus the zero image's
        "kind": ip.kind,
        "encoder_output": ip.encoder_output,
        "image_embeds": IMAGE_EMBEDS,
        "scale": SCALE_INPUT,
        "embeds_dim": ip.embeds_dim,
        "embeds_length": ip.embeds_length,  # Plus: hidden-state tokens per image; None: one embedding
        "tokens": ip.tokens,
        # CLIPImageProcessor as diffusers' load_ip_adapter makes it: shortest side and centre crop to this size
        "image_size": ip.image_size,
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "source": recorded_path(str(ip.weights), out),
        "image_encoder_source": recorded_path(str(ip.image_encoder_folder), out),
    }


# --- the check's inputs and PyTorch calls -------------------------------------------------------------------------


def embeds_inputs(ctx: ExportContext, rng) -> dict[str, np.ndarray]:
    """Random image embeddings at unit scale (the plain adapter's projected embeddings, or Plus's hidden states)
    and a scale."""
    length = () if ctx.ip_adapter_embeds_length is None else (ctx.ip_adapter_embeds_length,)
    return {
        IMAGE_EMBEDS: rng.standard_normal((VALIDATION_BATCH, *length, ctx.ip_adapter_embeds_dim)).astype(np.float32),
        SCALE_INPUT: np.array(rng.uniform(0.3, 1.0), dtype=np.float32),
    }


def unet_ip_kwargs(unet, x: dict) -> dict:
    """diffusers' added_cond_kwargs entry for the image embeddings among a check's inputs (empty without them);
    sets every IP-Adapter attention processor's scale to the scale input, so that the trace keeps it an input."""
    if IMAGE_EMBEDS not in x:
        return {}
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            processor.scale = [x[SCALE_INPUT]]
    # one reference image per row, as the pipelines pass it: (B, 1, D) plain, (B, 1, N, H) Plus
    return {"image_embeds": [x[IMAGE_EMBEDS][:, None]]}


def _encoder_inputs(ip: IPAdapterSource):
    def inputs(ctx: ExportContext, rng):
        shape = (VALIDATION_BATCH, 3, ip.image_size, ip.image_size)
        return {"pixel_values": rng.standard_normal(shape).astype(np.float32)}  # normalised pixels

    return inputs


def _encoder_call(kind: str):
    """diffusers' encode_image: the projected embedding, or for Plus the penultimate hidden state."""

    def call(encoder, x):
        if kind == PLUS:
            return [encoder(pixel_values=x["pixel_values"], output_hidden_states=True).hidden_states[-2]]
        return [encoder(pixel_values=x["pixel_values"]).image_embeds]

    return call


def encoder_component(ip: IPAdapterSource) -> ComponentExport:
    return ComponentExport(COMPONENT, _encoder_call(ip.kind), _encoder_inputs(ip))


def encoder_for_export(ip: IPAdapterSource):
    """(module, optimum config) of the image encoder graph: pixel_values -> its output for the kind, at its fixed
    size."""
    from .controlnet import export_config, flat_module

    component = encoder_component(ip)
    module = flat_module(ip.encoder, ["pixel_values"], component.torch_call)
    config = export_config(
        ip.encoder.config,
        {"pixel_values": {0: "batch_size"}},
        {ip.encoder_output: {0: "batch_size"}},
        lambda: component.random_inputs(None, np.random.default_rng(1)),
    )
    return module, config


def unet_for_export(unet, ctx: ExportContext, trace_ctx: ExportContext):
    """(module, optimum config) of the UNet taking the image embeddings and scale (and any ControlNet residuals)."""
    from types import SimpleNamespace

    from .controlnet import export_config, flat_module, input_axes, residual_attributes, spatial_axes
    from .specs import _unet_call

    example = _unet_inputs(ctx, np.random.default_rng(1))
    levels = {}
    if ctx.controlnet_residuals:
        levels = {e["name"]: e["level"] for e in residual_attributes(ctx)["controlnet_residuals"]}
    axes = {**input_axes(example, levels), SCALE_INPUT: {}}
    module = flat_module(unet, list(example), lambda model, x: _unet_call(SimpleNamespace(unet=model), x))
    config = export_config(
        unet.config, axes, {"out_sample": spatial_axes(0)}, lambda: _unet_inputs(trace_ctx, np.random.default_rng(1))
    )
    return module, config
