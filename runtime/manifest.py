"""The bundle's manifest: what a bundle holds and how to run it. Written by export, read by the runtime.

A bundle is data: the manifest is plain JSON, every path in it is a file name inside the bundle folder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import BundleError, SchemaVersionError

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_2_NAME = "tokenizer_2.json"  # SDXL's and SD3's second (OpenCLIP-bigG) tokenizer; FLUX's T5 tokenizer
TOKENIZER_3_NAME = "tokenizer_3.json"  # SD3's T5 tokenizer
DENOISERS = ("unet", "transformer")  # the denoiser component a bundle holds: a UNet, or SD3's / FLUX's MMDiT
TARGETS = ("onnx", "coreml")


@dataclass
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: float32, float16, int64, int32
    shape: list  # ints for fixed dims, strings for named dynamic dims


@dataclass
class ComponentSpec:
    files: dict[
        str, dict
    ]  # file name -> {"size": bytes, "sha256": hex}; the first is the graph, the rest its external data
    precision: str  # fp32 | fp16
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    # component facts the runtime needs, e.g. a tiny decoder's {"scaling_factor": 1.0}; optional, so v1 bundles still read
    attributes: dict = field(default_factory=dict)

    @property
    def graph_file(self) -> str:
        return next(iter(self.files))

    @property
    def size(self) -> int:
        return sum(f["size"] for f in self.files.values())

    @property
    def segments(self) -> list["ComponentSpec"]:
        """A denoiser exported in segments (export --segments): each segment's graph as a component of its own,
        run in this order (runtime/segmented_session.py); [] for a graph in one piece."""
        return [
            ComponentSpec(
                files={name: self.files[name] for name in seg["files"]},
                precision=self.precision,
                inputs=[TensorSpec(**t) for t in seg["inputs"]],
                outputs=[TensorSpec(**t) for t in seg["outputs"]],
            )
            for seg in self.attributes.get("segments", [])
        ]


@dataclass
class Manifest:
    family: str  # row of edgediff.export.families
    prediction_type: str  # epsilon | v_prediction | sample
    scheduler: dict  # {"name": sampler name, "config": ScheduleConfig as dict}
    defaults: dict  # {"steps", "guidance", "height", "width"}
    latent_channels: int
    vae_scaling_factor: float  # latents are divided by this before decoding
    vae_scale_factor: int  # pixels per latent cell along each side
    tokenizer: dict  # {"file", "max_length", "pad_id"}
    guidance_embedding_dim: int | None  # LCM: width of the guidance embedding fed as timestep_cond
    components: dict[str, ComponentSpec]
    # How prompts become the UNet's conditioning (runtime/conditioning.py): {"encoders": [{"component",
    # "tokenizer", "output", "pooled"?}], "zero_negative"?, "time_ids"?}. Empty in bundles written before
    # SDXL: then the one text encoder's first output, as SD 1.x / 2.x.
    conditioning: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)  # source model, tool versions, date
    target: str = "onnx"  # onnx (onnxruntime graphs) | coreml (ML program packages, macOS)
    # added to latents after dividing by vae_scaling_factor, before decoding (SD3's VAE: 0.0609); 0 before SD3
    vae_shift_factor: float = 0.0
    # FLUX: latents reach the transformer as packing x packing patches of latent cells, one token each
    # (FluxPipeline._pack_latents: 2); 1 for every other family
    latent_packing: int = 1
    # ControlNets (export --controlnet), each a graph of its own: [{"name", "component", "conditioning_channels",
    # "conditioning_type" (None when unknown), "source"}]; the UNet then takes their residuals (runtime/control.py)
    controlnets: list = field(default_factory=list)
    # IP-Adapter (export --ip-adapter): {"component" (the image encoder), "image_embeds" and "scale" (the UNet's
    # inputs), "embeds_dim", "tokens", "image_size", "image_mean", "image_std", sources}; None without one
    ip_adapter: dict | None = None
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False)

    @classmethod
    def load(cls, bundle_dir: Path) -> "Manifest":
        path = bundle_dir / MANIFEST_NAME
        if not path.is_file():
            raise BundleError("bundle_not_found", path=bundle_dir)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError("manifest_unreadable", path=bundle_dir, detail=exc) from None
        return cls.from_dict(raw, bundle_dir)

    @classmethod
    def from_dict(cls, raw: dict, bundle_dir: Path) -> "Manifest":
        if not isinstance(raw, dict):
            raise BundleError("manifest_invalid", path=bundle_dir, detail="top level is not an object")
        version = raw.get("schema_version")
        if not isinstance(version, int):
            raise BundleError("manifest_invalid", path=bundle_dir, detail="schema_version is missing")
        if version > SCHEMA_VERSION:
            raise SchemaVersionError("schema_too_new", path=bundle_dir, found=version, supported=SCHEMA_VERSION)
        try:
            components = {
                name: ComponentSpec(
                    files=dict(c["files"]),
                    precision=c["precision"],
                    inputs=[TensorSpec(**t) for t in c["inputs"]],
                    outputs=[TensorSpec(**t) for t in c["outputs"]],
                    attributes=dict(c.get("attributes", {})),
                )
                for name, c in raw["components"].items()
            }
            fields_ = {
                k: raw[k]
                for k in (
                    "family",
                    "prediction_type",
                    "scheduler",
                    "defaults",
                    "latent_channels",
                    "vae_scaling_factor",
                    "vae_scale_factor",
                    "tokenizer",
                    "guidance_embedding_dim",
                )
            }
            for c in components.values():
                c.segments  # noqa: B018  (a malformed entry raises here, not when the graph opens)
        except (KeyError, TypeError) as exc:
            raise BundleError("manifest_invalid", path=bundle_dir, detail=f"missing or malformed field {exc}") from None
        conditioning = raw.get("conditioning", {})
        encoders = conditioning.get("encoders", []) if isinstance(conditioning, dict) else None
        if not isinstance(encoders, list) or not all(
            isinstance(e, dict) and isinstance(e.get("tokenizer"), dict) and "component" in e and "output" in e
            for e in encoders
        ):
            raise BundleError("manifest_invalid", path=bundle_dir, detail="malformed conditioning")
        for required in ("text_encoder", "vae_decoder", *(e["component"] for e in encoders)):
            if required not in components:
                raise BundleError("manifest_invalid", path=bundle_dir, detail=f"no {required} component")
        if not any(d in components for d in DENOISERS):
            raise BundleError("manifest_invalid", path=bundle_dir, detail=f"no {' or '.join(DENOISERS)} component")
        shift = raw.get("vae_shift_factor", 0.0)
        if not isinstance(shift, (int, float)):
            raise BundleError("manifest_invalid", path=bundle_dir, detail="vae_shift_factor is not a number")
        packing = raw.get("latent_packing", 1)
        if not isinstance(packing, int) or isinstance(packing, bool) or packing < 1:
            raise BundleError("manifest_invalid", path=bundle_dir, detail="latent_packing is not a positive integer")
        controlnets = raw.get("controlnets", [])
        if not isinstance(controlnets, list) or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and c.get("component") in components
            for c in controlnets
        ):
            raise BundleError("manifest_invalid", path=bundle_dir, detail="malformed controlnets")
        ip_adapter = raw.get("ip_adapter")
        if ip_adapter is not None and not (isinstance(ip_adapter, dict) and ip_adapter.get("component") in components):
            raise BundleError("manifest_invalid", path=bundle_dir, detail="malformed ip_adapter")
        target = raw.get("target", "onnx")
        if target not in TARGETS:
            raise BundleError("manifest_invalid", path=bundle_dir, detail=f"unknown target {target!r}")
        return cls(
            **fields_,
            components=components,
            conditioning=conditioning,
            provenance=raw.get("provenance", {}),
            target=target,
            vae_shift_factor=float(shift),
            latent_packing=packing,
            controlnets=controlnets,
            ip_adapter=ip_adapter,
            schema_version=version,
        )

    @property
    def denoiser(self) -> str:
        """The denoiser's component name: "unet", or "transformer" (SD3)."""
        return next(d for d in DENOISERS if d in self.components)

    @property
    def text_encoders(self) -> list[dict]:
        """Each text encoder's component, tokenizer entry and the output the UNet takes (pre-SDXL bundles: one)."""
        return self.conditioning.get("encoders") or [
            {
                "component": "text_encoder",
                "tokenizer": self.tokenizer,
                "output": self.components["text_encoder"].outputs[0].name,
            }
        ]
