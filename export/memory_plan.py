"""Whether an export fits this machine's memory, estimated from the source's files before anything is loaded.

An export loads the whole pipeline in fp32, then exports its components one at a time, smallest first, each
freed once its graph is written; quantised precisions then run the fp32 bundle once to record calibration
inputs. The estimate follows those stages, from each component's weights (counted from the safetensors
headers, in fp32 as loaded), with factors measured on the full-size SD-Turbo architecture (docs/benchmarks.md,
"Export cost"): the fp32 export peaked at 7.72 GB against 7.77 estimated, int8-static at 8.31 GB against 8.76.
A model that cannot fit is refused before any of it is loaded, naming the stage, the estimate and what to
do, instead of being killed half way (the bundle is atomic either way: nothing is left at the output).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from edgediff.runtime.errors import ExportError

# The process before it loads anything (Python, torch, diffusers, optimum, onnxruntime).
BASE_BYTES = 500_000_000
# Exporting one component holds, beside every weight not yet freed, about this many copies of its own weights
# (the traced graph and the serialised protobuf): 1.09 for SD-Turbo's UNet, 0.8 for its text encoder.
EXPORT_COPIES = 1.1
# Recording calibration inputs opens the whole fp32 bundle: its weights and about half as much again
# (activations at the bundle's size, onnxruntime's prepacked weights): 8.31 GB measured for 5.16 GB of weights.
RECORDING_COPIES = 1.6
IGNORE_ENV = "EDGEDIFF_IGNORE_MEMORY_ESTIMATE"  # "1": export even when the estimate exceeds free memory

_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def safetensors_elements(path: Path) -> tuple[int, int]:
    """(floating-point elements, other bytes) of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    floats = other = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in entry["shape"]:
            count *= d
        if entry["dtype"] in ("F64", "F32", "F16", "BF16"):
            floats += count
        else:
            other += count * _ITEM_BYTES.get(entry["dtype"], 8)
    return floats, other


def component_bytes(folder: Path) -> int:
    """A component folder's weights as loaded for export, in fp32. Safetensors files are counted from their
    headers (stored fp16 / bf16 weights count double); other weight files by their size on disk. Variants
    beside the plain weights (`.fp16.`, `.non_ema.`) are not loaded, so not counted; where a folder has both
    safetensors and other files, the safetensors count."""
    files = [f for f in folder.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)]
    # diffusers loads the plain weights (shards included), not the variants beside them (.fp16, .non_ema)
    plain = [f for f in files if "." not in f.name.rsplit(".", 1)[0]]
    files = plain or files
    safetensors = [f for f in files if f.suffix == ".safetensors"]
    if safetensors:
        total = 0
        for f in safetensors:
            floats, other = safetensors_elements(f)
            total += floats * 4 + other
        return total
    return sum(f.stat().st_size for f in files)


@dataclass(frozen=True)
class Stage:
    name: str
    bytes: int


def export_stages(weights: dict[str, int], quantised: bool) -> list[Stage]:
    """The export's stages with their estimated peaks, for components of these fp32 weight bytes."""
    total = sum(weights.values())
    stages = [Stage("loading the source", BASE_BYTES + total)]
    held = total
    for name, size in sorted(weights.items(), key=lambda kv: kv[1]):  # smallest first, each freed after it
        stages.append(Stage(f"{name}: export", BASE_BYTES + held + int(EXPORT_COPIES * size)))
        held -= size
    if quantised:
        stages.append(Stage("recording calibration inputs", BASE_BYTES + int(RECORDING_COPIES * total)))
    return stages


def available_bytes() -> int | None:
    """Memory this process can still take without swapping: psutil's `available`, else Linux's MemAvailable;
    None where neither says."""
    import importlib.util

    if importlib.util.find_spec("psutil") is not None:  # optional (the bench extra)
        import psutil

        return int(psutil.virtual_memory().available)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# the model_index entries an export loads as PyTorch modules (tokenizers and schedulers are small)
LOADED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")


def check_source(source: str, t5: bool = True, quantised: bool = False) -> list[Stage] | None:
    """check_fits for a local diffusers folder (hub ids are not on disk yet: None). SD3 without T5 leaves
    text_encoder_3 unloaded, as load_pipeline does."""
    folder = Path(source)
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    model_index = json.loads(index.read_text(encoding="utf-8"))
    components = [
        name
        for name in LOADED
        if isinstance(model_index.get(name), list)
        and model_index[name][-1] is not None
        and not (name == "text_encoder_3" and not t5)
    ]
    if "text_encoder_3" in components:
        advice = "export without T5 (--no-t5: most of SD3's weights), or on a machine with more memory"
    else:
        advice = "close other programs, or export on a machine with more memory"
    return check_fits(folder, components, quantised, advice)


def check_fits(folder: Path, components: list[str], quantised: bool, advice: str) -> list[Stage]:
    """Raises ExportError("export_memory") when the largest estimated stage exceeds the memory available now;
    returns the stages. `components`: the folders the export loads. Skipped when IGNORE_ENV is "1" or the
    available memory is unknown."""
    weights = {name: component_bytes(folder / name) for name in components if (folder / name).is_dir()}
    stages = export_stages(weights, quantised)
    free = available_bytes()
    if free is None or os.environ.get(IGNORE_ENV) == "1":
        return stages
    worst = max(stages, key=lambda s: s.bytes)
    if worst.bytes > free:
        raise ExportError(
            "export_memory",
            stage=worst.name,
            need=f"{worst.bytes / 2**30:.1f}",
            free=f"{free / 2**30:.1f}",
            advice=advice,
            env=IGNORE_ENV,
        )
    return stages
