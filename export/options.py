"""What an export makes: one options object for the library and the CLI, with the choices each option
takes and the combinations refused.

    export("stabilityai/sd-turbo", "out/sd-turbo", ExportOptions(precision="fp16", optimize="cpu"))

Adding an export option means one field here (and one click option in the CLI); both targets and
`edgediff export` take this object. It imports no torch: the CLI reads its tables before any export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from edgediff.runtime.errors import ExportOptionsError

from .attention import PROCESSORS
from .controlnet import parse_controlnet
from .lora import parse_lora
from .lora_slots import LAYER_SETS

# onnx: graphs for any onnxruntime provider; coreml: ML program packages for Macs and the Neural Engine
TARGETS = ("onnx", "coreml")
# ONNX bundles' precisions; Core ML packages are fp16 (or palettized, PALETTE_BITS)
PRECISIONS = ("fp32", "fp16", "int8", "int8-static", "int4")
# "auto": the fastest precision that holds the quality floor on the exporting machine's CPU (auto_precision)
AUTO = "auto"
# made from the checked fp32 graphs, after the bundle is otherwise complete (quantize.py)
QUANTIZED = ("int8", "int8-static", "int4")
# onnxruntime's transformer fusions (optimize.py): "cpu" runs on any provider, "gpu" adds CUDA-only ones
OPTIMIZE_TARGETS = ("cpu", "gpu")
# coremltools' k-means palettization: 2**bits weight values per tensor
PALETTE_BITS = (8, 6, 4)
# attention per target (attention.py): split_einsum is laid out for the Neural Engine, so Core ML only;
# fused is onnxruntime's own operator, so ONNX only
ATTENTION_MODES = {"onnx": ("original", "sliced", "fused"), "coreml": ("original", *PROCESSORS)}
# `keep` besides block names: quantize every eligible node, or let the sensitivity pass choose
KEEP_MODES = ("none", "auto")
# options only one target uses: the other refuses them rather than silently ignoring them
ONNX_ONLY = (
    "precision",
    "keep",
    "quantize_only",
    "calibration_prompts",
    "tiny_decoder",
    "vae",
    "optimize",
    "loras",
    "t5",
    "controlnets",
    "lora_slots",
    "ip_adapter",
    "ip_adapter_image_encoder",
    "segments",
    "standard_ops",
)
COREML_ONLY = ("palettize",)
# what each option writes that --standard-ops refuses: onnxruntime's own operators, which other runtimes lack
STANDARD_OPS_REFUSED = {
    "attention": "--attention fused writes onnxruntime's MultiHeadAttention",
    "optimize": "--optimize writes onnxruntime's fused operators",
    "precision": "--precision int4 writes onnxruntime's MatMulNBits",
}
# why --lora-slots refuses these (docs/loras.md, "Quantised bundles")
LORA_SLOTS_REFUSED = {
    "precision": "the quantisers do not keep the LoRA slots (int8 and int8-static fail on their empty defaults, int4 "
    "folds most of them into constants); export fp32 or fp16 for run-time LoRAs, or fuse the LoRA with --lora",
    "optimize": "onnxruntime's attention fusions would swallow the slotted layers; export without --optimize",
}


@dataclass(frozen=True)
class ExportOptions:
    # which runtime the bundle is for: ONNX graphs for onnxruntime, or Core ML packages for Apple devices
    target: str = "onnx"
    # weights and compute of the ONNX graphs: fp16 halves the size; int8 / int4 are quantized from checked fp32
    precision: str = "fp32"
    # quantized bundles: blocks left in fp32, "none", "auto" (sensitivity pass) or block names (a tuple)
    keep: str | tuple[str, ...] = "none"
    # quantized bundles: only these components are quantised, the rest stay fp32 (SD3 / FLUX: "text_encoder_3" or
    # "text_encoder_2", T5 in 4 bits with the denoiser in fp32, where T5 is most of the weights); (): all the policy's
    quantize_only: tuple[str, ...] = ()
    # quantized bundles: prompts whose recorded inputs calibrate and rank blocks; None: calibration.py's own
    calibration_prompts: tuple[str, ...] | None = None
    # the size the bundle defaults to and is checked at; None: the family's native size
    height: int | None = None
    width: int | None = None
    # the family row (families.py) when detection from the source's configs would pick the wrong one
    family: str | None = None
    # steps the bundle defaults to; None: the family's (a distilled model's few steps)
    default_steps: int | None = None
    # guidance the bundle defaults to; None: the family's (<= 1 turns classifier-free guidance off)
    default_guidance: float | None = None
    # an AutoencoderTiny (folder or hub id) added as the fast decoder for previews and `--decoder tiny`
    tiny_decoder: str | None = None
    # an AutoencoderKL (folder or hub id) replacing the model's own, e.g. one that stays finite in fp16
    vae: str | None = None
    # onnxruntime's fusions, checked like the plain graphs: "cpu" (any provider), "gpu" (CUDA only), None
    optimize: str | None = None
    # (file, scale) LoRAs fused into the weights before export, so the graphs stay plain and fast
    loras: tuple[tuple[str, float], ...] = ()
    # layers that take LoRAs at run time ("attention", "transformer", "all": lora_slots.py); None: plain graphs
    lora_slots: str | None = None
    # (source, name) ControlNets exported as graphs of their own; the UNet then takes their residuals as inputs
    controlnets: tuple[tuple[str, str], ...] = ()
    # IP-Adapter weights (a file, or a folder holding one) whose reference image the UNet then attends to; its CLIP
    # vision encoder is the `image_encoder` folder beside them unless named (export/ip_adapter.py)
    ip_adapter: str | None = None
    ip_adapter_image_encoder: str | None = None
    # Core ML: weights palettized to this many bits (smaller packages); None keeps fp16 weights
    palettize: int | None = None
    # "sliced" (UNets) lowers peak memory, "fused" (every family) lowers it and runs flash attention on CPU;
    # "split_einsum" suits the Neural Engine. Same result from each.
    attention: str = "original"
    # SD3: export the T5 text encoder (most of SD3's weights); without it the runtime feeds zeros in its place,
    # as diffusers does when text_encoder_3 is None (smaller and faster, weaker on long or typographic prompts)
    t5: bool = True
    # the denoiser as this many graphs run in turn: low-memory mode then holds one segment's weights at a time
    # (segments.py); 1 keeps it whole
    segments: int = 1
    # only ONNX's standard operators: no onnxruntime fusion (FastGelu). OpenVINO runs a graph with onnxruntime's own
    # operators in pieces, which onnxruntime-openvino 1.24 fails at run time ("Output names mismatch")
    standard_ops: bool = False
    # replace an existing bundle at the output folder, once the new one is whole
    overwrite: bool = False

    def __post_init__(self):
        if self.precision == AUTO:  # resolved here, once: the options then say what the export makes
            object.__setattr__(self, "precision", auto_precision(self.target))
        # accepted as Python callers pass them: keep "a,b" or a list, loras "FILE[:SCALE]" or pairs,
        # optimize True / False (export_bundle's older spelling), prompts as any sequence
        object.__setattr__(self, "keep", parse_keep(self.keep))
        only = self.quantize_only
        only = only.split(",") if isinstance(only, str) else only or ()
        object.__setattr__(self, "quantize_only", tuple(n.strip() for n in only if n and n.strip()))
        object.__setattr__(
            self,
            "loras",
            tuple(parse_lora(x) if isinstance(x, str) else (str(x[0]), float(x[1])) for x in self.loras or ()),
        )
        object.__setattr__(
            self,
            "controlnets",
            tuple(
                parse_controlnet(x) if isinstance(x, str) else (str(x[0]), str(x[1])) for x in self.controlnets or ()
            ),
        )
        if isinstance(self.optimize, bool):
            object.__setattr__(self, "optimize", "cpu" if self.optimize else None)
        if self.calibration_prompts is not None:
            object.__setattr__(self, "calibration_prompts", tuple(self.calibration_prompts))
        self.validate()

    def validate(self) -> None:
        """Raises ExportOptionsError for an unknown value or options that do not combine (before any work)."""
        for option, value, available in (
            ("target", self.target, TARGETS),
            ("precision", self.precision, PRECISIONS),
            ("optimize", self.optimize, (None, *OPTIMIZE_TARGETS)),
            ("palettize", self.palettize, (None, *PALETTE_BITS)),
            ("lora_slots", self.lora_slots, (None, *LAYER_SETS)),
        ):
            if value not in available:
                raise ExportOptionsError(
                    "export_choice", option=option, value=value, available=", ".join(str(a) for a in available)
                )
        if self.default_steps is not None and self.default_steps < 1:
            raise ExportOptionsError("export_default_steps", value=self.default_steps)
        if not any(self.attention in modes for modes in ATTENTION_MODES.values()):
            raise ExportOptionsError(
                "export_attention",
                value=self.attention,
                target=self.target,
                available=", ".join(ATTENTION_MODES[self.target]),
            )
        if self.controlnets and self.precision == "int8-static":
            # its activation ranges would be calibrated on calls without control (zero residuals)
            raise ExportOptionsError("export_controlnet_static")
        if self.ip_adapter and self.precision == "int8-static":
            raise ExportOptionsError("export_ip_adapter_static")  # calibrated on calls without a reference image
        if self.ip_adapter and self.attention != "original":
            raise ExportOptionsError("export_ip_adapter_attention", value=self.attention)
        if self.quantize_only:
            self._check_quantize_only()
        if isinstance(self.segments, bool) or not isinstance(self.segments, int) or self.segments < 1:
            raise ExportOptionsError("export_segments_value", value=self.segments)
        if self.segments > 1 and self.lora_slots:
            raise ExportOptionsError("export_segments_slots")
        if self.lora_slots and (self.quantized or self.optimize):
            # measured in docs/loras.md ("Quantised bundles"); fused graphs: attention ops swallow the slotted layers
            why = LORA_SLOTS_REFUSED["precision" if self.quantized else "optimize"]
            option = f"--precision {self.precision}" if self.quantized else "--optimize"
            raise ExportOptionsError("export_lora_slots", option=option, why=why)
        if self.standard_ops:
            for option, writes in (
                ("attention", self.attention == "fused"),
                ("optimize", self.optimize),
                ("precision", self.precision == "int4"),
            ):
                if writes:
                    raise ExportOptionsError("export_standard_ops", why=STANDARD_OPS_REFUSED[option])
        if self.target == "coreml":
            given = self._set(ONNX_ONLY)
            if given:
                raise ExportOptionsError("export_onnx_only", options=_listing(given))
        else:
            given = self._set(COREML_ONLY)
            if self.attention not in ATTENTION_MODES[self.target]:
                given.append(f"--attention {self.attention}")
            if given:
                raise ExportOptionsError("export_coreml_only", options=_listing(given))

    def _check_quantize_only(self) -> None:
        if not self.quantized:
            raise ExportOptionsError("export_quantize_only", precision=self.precision)
        from .quantize import quantisable

        known = quantisable(self.precision)
        unknown = [n for n in self.quantize_only if n not in known]
        if unknown:
            raise ExportOptionsError(
                "export_quantize_only_component",
                names=", ".join(unknown),
                precision=self.precision,
                known=", ".join(known),
            )

    def _set(self, names) -> list[str]:
        """The options among `names` that differ from their defaults, as the CLI spells them."""
        defaults = {f.name: f.default for f in fields(self)}
        return [_flag(name) for name in names if getattr(self, name) != defaults[name]]

    @property
    def quantized(self) -> bool:
        return self.precision in QUANTIZED

    def replace(self, **changes) -> "ExportOptions":
        """A copy with these fields changed (checked again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_cli(
        cls, *, palettize: str | int | None = None, calibration_prompts: str | Path | None = None, **values
    ) -> "ExportOptions":
        """Options as `edgediff export` spells them: --palettize as text, --calibration-prompts a text file
        of prompts (one per line); --keep and --lora are parsed by the constructor."""
        prompts = read_prompts(calibration_prompts) if calibration_prompts is not None else None
        return cls(palettize=int(palettize) if palettize is not None else None, calibration_prompts=prompts, **values)


def auto_precision(target: str = "onnx") -> str:
    """The fastest precision at the quality floor for this machine's CPU: fp32 where OpenVINO's runtime is installed
    and the CPU has AMX (`auto` then runs the bundle there, in bf16); int8-static where its int8 kernels
    beat fp32 (CPUs with int8 dot products, where that was measured; elsewhere measured here by int8_probe), int8
    (MatMuls only) where only int8 matrix products win, fp32 where int8 would buy size alone."""
    import logging

    from edgediff.runtime.cpu_features import int8_dot_product, int8_is_faster
    from edgediff.runtime.providers import REGISTRY

    from .int8_probe import probe

    log = logging.getLogger("edgediff.export")
    if target != "onnx":
        return "fp32"
    openvino = REGISTRY["ov"]
    if openvino.available() and openvino.auto_eligible("fp32"):
        log.info(
            "--precision auto: fp32 (this CPU has AMX and OpenVINO's runtime is installed: an fp32 bundle runs there "
            "in bf16, faster than an int8 one on onnxruntime, at a higher PSNR; provider auto picks it)"
        )
        return "fp32"
    if int8_is_faster():
        log.info("--precision auto: int8-static (this CPU has %s, where int8 was measured faster)", int8_dot_product())
        return "int8-static"
    measured = probe()
    choice = measured.choice
    how = f"int8 convolutions {measured.conv:.2f}x and matrix products {measured.matmul:.2f}x fp32's speed here"
    if choice == "fp32":
        log.warning("--precision auto: fp32 (%s: int8 would buy size, not speed)", how)
    else:
        log.info("--precision auto: %s (%s)", choice, how)
    return choice


def parse_keep(keep) -> str | tuple[str, ...]:
    """ "none" / "auto" as they are; block names from "a,b" or a sequence, as a tuple."""
    if isinstance(keep, str) and keep in KEEP_MODES:
        return keep
    names = tuple(
        name.strip() for name in (keep.split(",") if isinstance(keep, str) else keep) if name and name.strip()
    )
    if not names:
        raise ExportOptionsError("export_keep", value=keep)
    return names


def read_prompts(path: str | Path) -> tuple[str, ...]:
    """A text file's non-blank lines, stripped: one prompt each."""
    return tuple(line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def _flag(name: str) -> str:
    flags = {"loras": "--lora", "t5": "--no-t5", "controlnets": "--controlnet"}
    return flags.get(name) or "--" + name.replace("_", "-")


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


FIELD_NAMES = tuple(f.name for f in fields(ExportOptions))
