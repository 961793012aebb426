"""How a pipeline runs a bundle: one options object for the library, the CLI and the benchmarks.

Adding a runtime option means one field here (and one click option in cli/options.py); `Pipeline`,
`edgediff generate`, `edgediff bench` and its worker processes all take this object.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace

from .errors import InputError

# decoder choice -> bundle component; "tiny" is the optional AutoencoderTiny (TAESD-style) decoder
DECODERS = {"full": "vae_decoder", "tiny": "vae_decoder_tiny"}
# where Core ML may run a package (coremltools' ComputeUnit names)
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_and_gpu": "CPU_AND_GPU", "cpu_only": "CPU_ONLY"}
MIN_TILE = 4  # latent cells; smaller tiles lose too much context in the decoder's mid-block


@dataclass(frozen=True)
class RuntimeOptions:
    # which execution provider runs the graphs: a name from `edgediff providers`, or the first available one
    provider: str = "auto"
    # an unavailable provider falls back to the best available one, and a graph the provider cannot take to the CPU
    # provider (both logged and in the provider report), instead of being an error
    fallback: bool = False
    # onnxruntime's own provider options over edgediff's (e.g. prefer_nhwc=1); they also key the graph cache
    provider_options: dict = field(default_factory=dict)
    # intra-op threads; None: the physical cores (hyper-threads slow convolutions down)
    threads: int | None = None
    # one graph in memory at a time: the smallest peak, at the cost of reloading graphs every call
    low_memory: bool = False
    # onnxruntime's CPU layout rewrite of float graphs (blocked NCHWc convolutions, reordered weight copies): calls up
    # to a few % faster, but the full-size fp32 SD-Turbo pipeline took 13-19 s to open with it, 2-3 s without; off
    # suits runs of a few calls without the graph cache. Static int8 graphs keep it (their kernels need it)
    cpu_layout: bool = True
    # the decoder every call uses unless it names another: the bundle's "full" VAE or its "tiny" one
    decoder: str = "full"
    # decode in tiles of this many latent cells: bounded memory for large images; None decodes whole
    decode_tile: int | None = None
    # keep onnxruntime's optimized graphs in the per-user cache, so the next start skips the optimizer
    cache: bool = True
    # GPU inputs and outputs in device buffers at fixed addresses; None: wherever the provider supports it
    io_binding: bool | None = None
    # capture each graph's kernel launches once per image size and replay them (CUDA graphs)
    cuda_graph: bool = False
    # Core ML bundles: the compute units Core ML may use
    compute_units: str = "all"
    # the sampler; None: the one the bundle was exported with
    sampler: str | None = None

    def __post_init__(self):
        # a dict field in a frozen dataclass: copy it, so a caller's later edits cannot change these options
        object.__setattr__(self, "provider_options", dict(self.provider_options or {}))
        if self.decoder not in DECODERS:
            raise InputError("decoder_unknown", available=", ".join(DECODERS), name=self.decoder)
        if self.decode_tile is not None and self.decode_tile < MIN_TILE:
            raise InputError("tile_size", minimum=MIN_TILE, value=self.decode_tile)
        if self.threads is not None and self.threads < 1:
            raise InputError("batch", what="threads", value=self.threads)
        if self.cuda_graph and self.low_memory:
            raise InputError("capture_low_memory")

    def replace(self, **changes) -> "RuntimeOptions":
        """A copy with these fields changed (an unknown name is a TypeError, as for the constructor)."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-ready: the benchmark harness hands options to its worker processes this way."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "RuntimeOptions":
        return cls(**values)

    @classmethod
    def with_overrides(cls, options: "RuntimeOptions | None", overrides: dict) -> "RuntimeOptions":
        """`options` (default: the defaults) with keyword overrides, as `Pipeline(bundle, provider="cpu")` passes them."""
        base = options or cls()
        return base.replace(**overrides) if overrides else base


FIELD_NAMES = tuple(f.name for f in fields(RuntimeOptions))
