"""`edgediff lora convert`: a LoRA file as the adapter a bundle with LoRA slots takes at run time.

diffusers reads the file (kohya, diffusers or PEFT layouts: `lora_state_dict`) and turns it into PEFT's layout and
LoRA config, as `load_lora_weights` does; each layer's scale (alpha / rank, or alpha / sqrt(rank) for rsLoRA)
is folded into its `up` weights, and the result is written in the slots' layout (runtime/lora_adapters.py) as an
onnxruntime adapter file in the bundle's `loras/` folder. Needs the export extra (torch, diffusers, peft); the
runtime reads the file with onnxruntime alone.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from edgediff.runtime.bundle import Bundle
from edgediff.runtime.errors import ExportError, InputError
from edgediff.runtime.lora_adapters import (
    ADAPTER_SUFFIX,
    KEY_SEPARATOR,
    LORA_FOLDER,
    mismatch_error,
    mismatched_layers,
    slot_input_names,
)

# the state dict's prefixes, one per graph diffusers loads LoRAs into
PREFIXES = ("unet", "text_encoder", "text_encoder_2")
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _peft_layers(file: Path, sdxl: bool) -> dict[str, tuple[dict, dict]]:
    """prefix -> (PEFT state dict, LoRA config) as diffusers builds them when it loads the file."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, get_peft_kwargs
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
    from peft import LoraConfig

    loader = diffusers.StableDiffusionXLPipeline if sdxl else diffusers.StableDiffusionPipeline
    state_dict, alphas, metadata = loader.lora_state_dict(str(file), return_lora_metadata=True)
    found = {}
    for prefix in PREFIXES:
        part = {k.removeprefix(f"{prefix}."): v for k, v in state_dict.items() if k.startswith(f"{prefix}.")}
        if not part:
            continue
        if prefix == "unet":  # as UNet2DConditionModel.load_lora_adapter, but for every key: diffusers' training
            # scripts save files whose keys mix PEFT's names and its own (`...lora.down.weight`), and diffusers
            # decides from the first key alone; PEFT keys pass through the conversion unchanged
            part = convert_unet_state_dict_to_peft(part)
        else:  # as _load_lora_into_text_encoder
            part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        meta = {k.removeprefix(f"{prefix}."): v for k, v in (metadata or {}).items() if k.startswith(f"{prefix}.")}
        own_alphas = {k.removeprefix(f"{prefix}."): v for k, v in (alphas or {}).items() if k.startswith(f"{prefix}.")}
        ranks = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
        kwargs = meta or get_peft_kwargs(ranks, own_alphas, part, is_unet=prefix == "unet")
        found[prefix] = (part, LoraConfig(**kwargs))
    return found


def _scale(config, module: str, rank: int) -> float:
    """PEFT's scaling of one layer: its alpha (alpha_pattern first) over its rank (rsLoRA: over sqrt(rank))."""
    from peft.utils.other import get_pattern_key

    pattern = config.alpha_pattern or {}
    alpha = pattern.get(get_pattern_key(pattern.keys(), module), config.lora_alpha)
    return alpha / (math.sqrt(rank) if config.use_rslora else rank)


def lora_layers(file: Path, sdxl: bool) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray]]:
    """(component, module) -> (down, up) in the slots' layout, each layer's scale folded into up."""
    layers = {}
    for component, (part, config) in _peft_layers(file, sdxl).items():
        if config.use_dora:
            raise ValueError("DoRA LoRAs are not supported")
        other = [k for k in part if not k.endswith((".lora_A.weight", ".lora_B.weight"))]
        if other:
            raise ValueError(f"unsupported entries ({other[0]})")
        for key, a in part.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key.removesuffix(".lora_A.weight")
            a = a.float().numpy()
            b = part[f"{module}.lora_B.weight"].float().numpy() * _scale(config, module, a.shape[0])
            if a.ndim == 2:  # Linear: x @ down @ up
                layers[component, module] = (a.T, b.T)
            else:  # Conv: PEFT's own layout
                layers[component, module] = (a, b)
    return layers


def convert_lora(file: str | Path, bundle_path: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
    """Writes `file` as the adapter named `name` (default: the file's stem) into the bundle's loras/ folder;
    returns its path. A LoRA with layers the bundle's slots do not take is refused, naming them."""
    import onnxruntime as ort

    file = Path(file)
    bundle = Bundle.open(bundle_path, verify="size")
    name = name or file.stem
    if not NAME_PATTERN.fullmatch(name):
        raise ExportError("lora_convert", file=file, path=bundle.path, detail=f"{name!r} is not a usable LoRA name")
    if not file.is_file():
        raise ExportError("lora_convert", file=file, path=bundle.path, detail="no such file")
    slots = {
        c: spec.attributes["lora_slots"]
        for c, spec in bundle.manifest.components.items()
        if spec.attributes.get("lora_slots", {}).get("slots")
    }
    if not slots:
        raise InputError("lora_no_slots", path=bundle.path)
    out = bundle.path / LORA_FOLDER / f"{name}{ADAPTER_SUFFIX}"
    if out.exists() and not overwrite:
        raise ExportError("export_exists", path=out)
    try:
        layers = lora_layers(file, sdxl="text_encoder_2" in bundle.manifest.components)
    except (ValueError, KeyError, OSError) as exc:
        raise ExportError("lora_convert", file=file, path=bundle.path, detail=str(exc)) from None
    if not layers:
        raise ExportError("lora_convert", file=file, path=bundle.path, detail="no UNet or text encoder layers in it")
    bad = mismatched_layers(slots, {k: (d.shape, u.shape) for k, (d, u) in layers.items()})
    if bad:
        raise mismatch_error(name, bundle.path, bad)
    values = {}
    for (component, module), (down, up) in layers.items():
        dtype = np.dtype(slots[component]["dtype"])
        for input_name, array in zip(slot_input_names(module), (down, up)):
            key = f"{component}{KEY_SEPARATOR}{input_name}"
            values[key] = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=dtype))
    fmt = ort.AdapterFormat()
    fmt.set_parameters(values)
    out.parent.mkdir(exist_ok=True)
    partial = out.with_name(f".{out.name}.partial")  # whole or not at all
    fmt.export_adapter(str(partial))
    partial.replace(out)
    return out
