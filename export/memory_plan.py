"""Whether an export fits this machine's memory, estimated from the source's files before anything is loaded.

An export loads the whole pipeline, each component in the half precision its weights are stored in (fp32 when they
are stored so, mixed, or not in safetensors), then exports its components one at a time, smallest first, each
widened to fp32 for its own export and freed once its graph is written; quantised precisions then run the fp32
bundle once to record calibration inputs and quantise its graphs (the denoiser beside the others where both fit,
else one at a time); with --lora-slots, the UNet's and text encoders' graphs are each slotted and checked right
after their own export. The estimate follows those stages, from each component's weights (counted from the
safetensors headers), with factors measured on full-size architectures (docs/benchmarks.md, "Export cost" and
"Models larger than the machine"): SD-Turbo's fp32 and fastest int8-static exports peaked at 6.2-6.4 GB (their text
encoder's stage) against 6.9 estimated, the latter's quantisation stages at most 5.9 GB; SANA-Sprint's fp32 at
17.59 GB against 18.80 (Gemma-2's stage); FLUX.1-schnell's at full width with 6 of its 57 blocks at 9.43 GB against
10.23 (T5's stage).
A model that cannot fit is refused before any of it is loaded, naming the stage, the estimate and what to
do, instead of being killed half way (the bundle is atomic either way: nothing is left at the output). The UNet
families' text encoders are quantised in a process of their own during the UNet's export only where both fit in the
memory free then (quantise_ahead, text_ahead.py), so the stages here, which decide a refusal, leave it out.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from edgediff.runtime.errors import ExportError

from .lora_slots import SLOT_COMPONENTS
from .quantize import QUANT_POLICY

# The process before it loads anything (Python, torch, diffusers, optimum, onnxruntime).
BASE_BYTES = 500_000_000
# Weights loaded from safetensors in the dtype they are stored in stay memory-mapped until read: a component not yet
# exported costs no memory the system cannot reclaim (loading full-size SANA-Sprint's 14 GB of fp32 safetensors
# took the process to 0.57 GB, FLUX.1's 3.8 GB of bf16 to 0.53 GB). Weights converted as they load (a half-precision
# source loaded in fp32 to fuse LoRAs, mixed dtypes, .bin files) are held in full from the start. Not counted:
# modules transformers keeps in fp32 when loading half precision (T5's feed-forward output layers), and optimum's
# copies of the VAE made at loading (the VAE is the smallest component, exported first).
# Under protobuf's 2 GB, PyTorch's exporter holds the whole graph three times beside the module (its constant-folded
# weights, the serialised protobuf, the bytes written): 3.02-3.06x the weights on synthetic MLPs of 0.38 and 1.50 GiB.
# A whole stage (the check's PyTorch reference run included) measured 3.2x on full-size SD-Turbo's CLIP text encoder
# (1.36 GB), 3.3x on T5-XXL's encoder cut to 2 layers (2.07 GB) and 3.7x on FLUX.1's CLIP-L (0.49 GB).
EXPORT_COPIES = 3.7
# Past protobuf's 2 GB, PyTorch writes each weight to a file of its own and the export gathers them into one, a
# tensor at a time (tracing.gather_external_data; not a graph that quantisation replaces, whose files stay as they
# are, which holds less): beside its weights the stage holds the tracer's state and the largest tensor. A 6-layer
# Gemma-2 (3.94 GiB) held 0.10 GiB over its weights when PyTorch had written the graph and 2.24 GiB while gathering
# its 2.20 GiB embedding. Once the module is freed, onnxruntime opens the graph
# (optimum's dynamic-axes fix, then the check), holding its weights and their prepacked copies: Gemma-2-2B's
# stage (10.46 GB of weights, full-size SANA-Sprint) peaked at 18.23 GB, 1.70x its weights over the base.
LARGE_GRAPH_BYTES = 2**31
LARGE_EXPORT_COPIES = 0.1
OPENED_COPIES = 1.75
# Recording calibration inputs opens the fp32 graphs it runs and runs them at a reduced size (without the CPU layout
# rewrite's reordered copies of the weights, which onnxruntime otherwise reads memory-mapped): full-size SD-Turbo's
# (5.17 GB of weights in all) held at most 5.53 GB, sampled, for its fastest bundle and for a dynamic int8 one: 0.97x
# its weights over the base. Where they do not fit together, it opens one graph at a time (record_one_at_a_time),
# the largest setting the peak.
RECORDING_COPIES = 1.1
# Quantising a graph holds it whole (onnxruntime's quantisers load every weight), its quantised weights and the
# quantiser's working copies. Full-size SANA-Sprint's Gemma-2 (10.46 GB in fp32) was killed past 23.25 GB in
# onnxruntime's dynamic int8 quantiser, so at least 2.2x. VAE graphs are left out: the KL VAEs' stay fp32, and
# DC-AE's decoder, the one quantised (Family.static_int8_decoder), is a fifth of SANA's transformer: never the
# quantisation's peak. Schemes that quantise a weight at a time hold less (STREAMED_SCHEMES).
QUANTIZE_COPIES = 2.3
# Static int8 quantises a weight at a time at any size (stream_quant.py). Its stage holds the sensitivity pass's fp32
# graph open (its weights memory-mapped and read whole by a run; the packed copies onnxruntime makes of its matrices
# take the place of the pages they were packed from: the full-size fp32 UNet's session peaked at 3.47 GiB with them
# or without) and, beside it, the graph quantised whole and cut at its blocks (int8 weights, their packed copies).
# Full-size SD-Turbo's UNet (3.46 GB) held at most 5.42 GB, sampled, while quantised alone: 1.39x its weights over
# the base and its largest tensor; with its fp32 graph open for the ranking while it is quantised (block_errors), the
# export held 5.09-5.42 GiB at that stage, the tiny decoder quantised beside it.
STATIC_INT8_COPIES = 1.5
# int4 bundles quantise a graph past 2 GB a weight at a time (stream_quant.py): the packed weights (an eighth of their
# fp32 bytes) and one fp32 weight while quantising, then the 4-bit graph open for its check, whose unquantised
# weights (embeddings) stay fp32: counted as half the fp32 weights besides the largest tensor.
STREAMED_QUANTIZE_COPIES = 0.5
# int8 (dynamic) quantises every graph a weight at a time, and holds more: its int8 weights (a quarter of their
# fp32 bytes), the Gemm weights onnxruntime's quantiser transposes in memory (SD3's adaptive norms: 2.7 GB) and their
# copies in the protobuf messages while the graph is written. Measured on full-size SD3.5-medium's transformer
# (9.88 GB of fp32 graph): 17.55 GiB peak, 1.8x besides its largest tensor (onnxruntime's own quantiser: about 2.3x).
STREAMED_INT8_QUANTIZE_COPIES = 1.8
# scheme -> (copies held besides the largest tensor, the graph size past which it streams), as quantize.quantize chooses
STREAMED_SCHEMES = {
    "int4-weight-only": (STREAMED_QUANTIZE_COPIES, LARGE_GRAPH_BYTES),
    "int8-dynamic": (STREAMED_INT8_QUANTIZE_COPIES, 0),
    "int8-static": (STATIC_INT8_COPIES, 0),
}
# Slotting a graph for run-time LoRAs (--lora-slots: lora_slots.slot_graph, once the component's export has freed its
# PyTorch weights) peaks while the check fuses its random LoRA (lora_slots._random_lora), holding three copies of the
# graph's weights: the plain graph loaded by onnx, the slotted graph open in onnxruntime, and the plain graph's copy
# that the LoRA is fused into. Each fused weight replaces one of that copy's tensors, and the replaced bytes stay in
# the copy's protobuf arena (upb frees them only with the message): up to one more copy when every weight has a slot.
# Measured (peak RSS over the process before slot_graph) on synthetic 0.2 GB fp32 graphs of 48 MatMul or 3x3 Conv
# layers, weights as external data as a UNet's are: 4.1 with every layer slotted ("all"), 3.6 with half of them; a
# UNet's "attention" or "transformer" slots lie in between. fp16 graphs hold half as much (counted as fp32 here).
# Under 2 GB, a graph's export (1 + EXPORT_COPIES) costs more than its slotting; past it, slotting sets the peak.
LORA_SLOT_COPIES = 4.1
IGNORE_ENV = "EDGEDIFF_IGNORE_MEMORY_ESTIMATE"  # "1": export even when the estimate exceeds free memory

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
_ITEM_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def safetensors_elements(path: Path) -> tuple[int, int]:
    """(floating-point elements, other bytes) of a safetensors file, from its header alone."""
    floats, other, _, _ = _header_counts(path)
    return floats, other


def _header_counts(path: Path) -> tuple[int, int, dict[str, int], int]:
    """(floating-point elements, other bytes, floating-point elements per stored dtype, the largest floating-point
    tensor's elements) from a safetensors header."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    floats = other = largest = 0
    by_dtype: dict[str, int] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        count = 1
        for d in entry["shape"]:
            count *= d
        if entry["dtype"] in FLOAT_DTYPES:
            floats += count
            largest = max(largest, count)
            by_dtype[entry["dtype"]] = by_dtype.get(entry["dtype"], 0) + count
        else:
            other += count * _ITEM_BYTES.get(entry["dtype"], 8)
    return floats, other, by_dtype, largest


@dataclass(frozen=True)
class Weights:
    """A component's weights: as loaded (`stored`: in their stored dtype where the export keeps it, see
    stored_dtype) and as exported (`fp32`), its largest tensor in fp32 (`largest`: 0 where unknown), and whether
    they load memory-mapped (`mapped`: safetensors read in their stored dtype, see BASE_BYTES)."""

    stored: int
    fp32: int
    largest: int = 0
    mapped: bool = False

    @property
    def resident(self) -> int:
        """What the loaded component holds before its own export."""
        return 0 if self.mapped else self.stored

    def export_extra(self) -> int:
        """What exporting the component holds beside its fp32 weights (EXPORT_COPIES, LARGE_EXPORT_COPIES)."""
        if self.fp32 > LARGE_GRAPH_BYTES:  # the larger of tracing and gathering, and the graph opened
            traced = int(LARGE_EXPORT_COPIES * self.fp32) + (self.largest or self.fp32)
            return max(traced, int((OPENED_COPIES - 1) * self.fp32))
        return int(EXPORT_COPIES * self.fp32)


def _weight_files(folder: Path) -> list[Path]:
    files = [f for f in folder.iterdir() if f.is_file() and f.name.endswith(_WEIGHT_SUFFIXES)]
    # diffusers loads the plain weights (shards included), not the variants beside them (.fp16, .non_ema)
    plain = [f for f in files if "." not in f.name.rsplit(".", 1)[0]]
    return plain or files


def _headers(folder: Path) -> tuple[list[Path], int, int, set[str], int] | None:
    """A component folder's weight files, their floating-point elements, other bytes, float dtypes and largest
    floating-point tensor's elements, from the safetensors headers; None when its weights are not all
    safetensors."""
    files = _weight_files(folder)
    if not files or any(f.suffix != ".safetensors" for f in files):
        return None
    floats = other = largest = 0
    dtypes: set[str] = set()
    for f in files:
        n, o, by_dtype, most = _header_counts(f)
        floats, other, largest = floats + n, other + o, max(largest, most)
        dtypes.update(by_dtype)
    return files, floats, other, dtypes, largest


def _half(dtypes: set[str]) -> str | None:
    return next(iter(dtypes)) if len(dtypes) == 1 and dtypes <= {"F16", "BF16"} else None


def stored_dtype(folder: Path) -> str | None:
    """ "F16" or "BF16" when every floating-point weight of a component folder's safetensors is stored in that one
    half-precision dtype (the export then loads it so, and widens it to fp32 only for its own export); None
    otherwise (fp32, mixed, or not safetensors: loaded in fp32)."""
    headers = _headers(folder) if folder.is_dir() else None
    return None if headers is None else _half(headers[3])


def component_weights(folder: Path, keep_stored: bool = True) -> Weights:
    """A component folder's weights as loaded for export (in their stored half precision when `keep_stored` and
    stored_dtype says so, else fp32) and in fp32. Safetensors files are counted from their headers; other
    weight files by their size on disk. Variants beside the plain weights (`.fp16.`, `.non_ema.`) are not loaded,
    so not counted; where a folder has both safetensors and other files, the safetensors count."""
    headers = _headers(folder)
    if headers is None:
        files = _weight_files(folder)
        safetensors = [f for f in files if f.suffix == ".safetensors"]
        if not safetensors:
            size = sum(f.stat().st_size for f in files)
            return Weights(size, size)
        counts = [_header_counts(f) for f in safetensors]  # mixed with other files: the safetensors count, in fp32
        floats, other = sum(c[0] for c in counts), sum(c[1] for c in counts)
        return Weights(floats * 4 + other, floats * 4 + other, 4 * max(c[3] for c in counts))
    _, floats, other, dtypes, largest = headers
    half = keep_stored and _half(dtypes) is not None
    as_stored = half or dtypes <= {"F32"}  # loaded without conversion, so memory-mapped
    return Weights(floats * (2 if half else 4) + other, floats * 4 + other, 4 * largest, mapped=as_stored)


def component_bytes(folder: Path) -> int:
    """A component folder's weights in fp32, as the export's graphs hold them (stored fp16 / bf16 weights count
    double); see component_weights."""
    return component_weights(folder).fp32


@dataclass(frozen=True)
class Stage:
    name: str
    bytes: int


def recording_bytes(graph_bytes: list[int], one_at_a_time: bool) -> int:
    """Recording calibration inputs over fp32 graphs of these sizes: open together, or one at a time."""
    return BASE_BYTES + int(RECORDING_COPIES * (max(graph_bytes, default=0) if one_at_a_time else sum(graph_bytes)))


def record_one_at_a_time(graph_bytes: list[int], free: int | None) -> bool:
    """Whether recording opens the graphs one at a time: only where they would not fit in `free` bytes together,
    since each prompt then reopens them (SANA-Sprint's 10.5 GB Gemma-2: minutes)."""
    return free is not None and recording_bytes(graph_bytes, False) > free


def export_stages(
    weights: dict[str, int | Weights], quantised: bool | str, slotted=(), free: int | None = None
) -> list[Stage]:
    """The export's stages with their estimated peaks, for components of these weights (ints: fp32 bytes, loaded
    as such). Components are loaded as stored, and each is widened to fp32 for its own export only. `slotted`:
    the components whose graphs then get LoRA slots (--lora-slots), a stage of their own after their export.
    `free`: the memory available, which decides how calibration inputs are recorded (record_one_at_a_time).
    `quantised`: the bundle's precision (or True: any quantised one), which decides how graphs are quantised."""
    weights = {k: w if isinstance(w, Weights) else Weights(w, w) for k, w in weights.items()}
    held = sum(w.resident for w in weights.values())
    stages = [Stage("loading the source", BASE_BYTES + held)]
    for name, w in sorted(weights.items(), key=lambda kv: kv[1].fp32):  # smallest first, each freed after it
        # the VAE's encoder and decoder graphs are traced from copies of it (optimum's wrappers): one more copy
        copies = w.fp32 if name.startswith("vae") else 0
        stages.append(Stage(f"{name}: export", BASE_BYTES + held - w.resident + w.fp32 + w.export_extra() + copies))
        held -= w.resident
        if name in slotted:
            stages.append(_slot_stage(name, w, held))
    if quantised:
        graphs = [w.fp32 for w in weights.values()]
        alone = record_one_at_a_time(graphs, free)
        label = "recording calibration inputs" + (", one graph at a time" if alone else "")
        stages.append(Stage(label, recording_bytes(graphs, alone)))
        for name, w in weights.items():
            if name.startswith("vae"):
                continue
            quantising = quantising_bytes(w.fp32, QUANT_POLICY.get(quantised, {}).get(name), w.largest)
            stages.append(Stage(f"{name}: quantize", BASE_BYTES + quantising))
    return stages


def quantising_bytes(fp32: int, scheme: str | None, largest: int | None = None) -> int:
    """What quantising a graph of `fp32` bytes with `scheme` holds (`largest`: its largest tensor, where known)."""
    copies, past = STREAMED_SCHEMES.get(scheme, (None, None))
    if copies is not None and fp32 > past:  # a weight at a time (stream_quant.py)
        return int(copies * fp32) + (largest or fp32)
    return int(QUANTIZE_COPIES * fp32)


def quantise_side_by_side(graphs: dict[str, tuple], free: int | None) -> bool:
    """Whether the largest of these graphs (name -> (fp32 bytes, scheme) or (fp32 bytes, scheme, largest tensor's
    bytes): graph_largest's) is quantised beside the others, one of them at a time (bundle_quantize.quantize_bundle):
    only where that fits in `free` bytes, the largest and the largest of the others together; else one graph at a
    time, as export_stages plans."""
    if free is None or len(graphs) < 2:
        return False
    needs = sorted((quantising_bytes(*graph) for graph in graphs.values()), reverse=True)
    return BASE_BYTES + needs[0] + needs[1] <= free


def quantise_ahead(graphs: dict[str, tuple], exports_left: dict[str, Weights], free: int | None, slotted=()) -> bool:
    """Whether text encoders' graphs (name -> quantising_bytes' arguments) are quantised in a process of their own
    while the components still to export (`exports_left`: name -> Weights, loaded already; `slotted`: those that get
    LoRA slots) are exported (text_ahead.py): only where that process (its base, then the encoders' fp32 graphs open
    together to record their feeds, then each quantised in turn) and the largest of those exports (its fp32 weights
    and what exporting or slotting holds beside them, as export_stages counts) fit in `free` bytes together."""
    if free is None or not graphs or not exports_left:
        return False
    exporting = max(
        max(w.fp32 + w.export_extra(), int(LORA_SLOT_COPIES * w.fp32) if name in slotted else 0)
        for name, w in exports_left.items()
    )
    recording = recording_bytes([graph[0] for graph in graphs.values()], one_at_a_time=False)
    quantising = BASE_BYTES + max(quantising_bytes(*graph) for graph in graphs.values())
    return max(recording, quantising) + exporting <= free


def graph_largest(path: Path) -> int:
    """The bytes of an ONNX graph's largest initializer, from its structure alone (weights stay on disk): what a
    weight-at-a-time quantisation holds besides its copies (quantising_bytes counts the whole graph where unknown)."""
    import onnx

    from .segments import initializer_bytes

    initializers = onnx.load(str(path), load_external_data=False).graph.initializer
    return max((initializer_bytes(t) for t in initializers), default=0)


def _slot_stage(name: str, w: Weights, held: int) -> Stage:
    """Slotting a component's graph: its PyTorch weights are freed by then, the components after it still held."""
    return Stage(f"{name}: LoRA slots", BASE_BYTES + held + int(LORA_SLOT_COPIES * w.fp32))


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


def check_source(
    source: str,
    t5: bool = True,
    quantised: bool | str = False,
    keep_stored: bool = True,
    controlnets=(),
    lora_slots: str | None = None,
) -> list[Stage] | None:
    """check_fits for a local diffusers folder (hub ids are not on disk yet: None). SD3 without T5 leaves
    text_encoder_3 unloaded, as load_pipeline does. `keep_stored`: half-precision weights stay so until their
    own export (load_pipeline's stored_dtype). `controlnets`: their sources; local folders are counted (in fp32,
    as they are loaded) as components of their own. `lora_slots` (ExportOptions.lora_slots): the UNet's and text
    encoders' graphs get slots (SLOT_COMPONENTS), a stage each."""
    folder = Path(source)
    index = folder / "model_index.json"
    if not index.is_file():
        return None
    model_index = json.loads(index.read_text(encoding="utf-8"))
    components = {
        name: folder / name
        for name in LOADED
        if isinstance(model_index.get(name), list)
        and model_index[name][-1] is not None
        and not (name == "text_encoder_3" and not t5)
    }
    for k, cn in enumerate(controlnets):
        if Path(cn).is_dir():
            components[f"controlnet {k + 1}"] = Path(cn)
    if "text_encoder_3" in components:
        advice = "export without T5 (--no-t5: most of SD3's weights), or on a machine with more memory"
    else:
        advice = "close other programs, or export on a machine with more memory"
    return check_fits(components, quantised, advice, keep_stored, SLOT_COMPONENTS if lora_slots else ())


def check_fits(
    components: dict[str, Path], quantised: bool | str, advice: str, keep_stored: bool = True, slotted=()
) -> list[Stage]:
    """Raises ExportError("export_memory") when the largest estimated stage exceeds the memory available now;
    returns the stages. `components`: the folders the export loads, by name; `slotted`: those of them that get
    LoRA slots. Skipped when IGNORE_ENV is "1" or the available memory is unknown."""
    weights = {
        name: component_weights(path, keep_stored=keep_stored and not name.startswith("controlnet"))
        for name, path in components.items()
        if path.is_dir()
    }
    if not keep_stored:  # LoRAs are fused into the denoiser's and text encoders' weights as they load: resident
        weights = {
            k: w if k.startswith(("vae", "controlnet")) else dataclasses.replace(w, mapped=False)
            for k, w in weights.items()
        }
    free = available_bytes()
    stages = export_stages(weights, quantised, slotted, free)
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
