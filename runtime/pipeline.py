"""The text-to-image pipeline over a bundle: numpy + onnxruntime + tokenizers + pillow, never torch.

Names follow diffusers' StableDiffusionPipeline so its users feel at home; `None` arguments take
the bundle manifest's defaults. One sampling loop serves every family: what differs between a UNet and
SD3's transformer (conditioning, graph inputs, valid sizes) sits behind the denoiser (runtime/denoisers).
"""

from __future__ import annotations

import functools
import logging
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from . import decode as decoding
from . import graph_cache, openvino_session
from .bundle import Bundle
from .cancel import CancelToken
from .conditioning import NEGATIVE_ARGUMENTS, PROMPT_ARGUMENTS, per_encoder
from .control import ControlNets
from .coreml_session import CoreMLSession
from .coreml_session import check_available as check_coreml
from .cpu_features import int8_dot_product
from .denoisers import SIZE_MULTIPLE, make_denoiser, size_multiple
from .denoisers.base import IMAGE_TASKS, check_size
from .denoisers.unet import guidance_embedding  # noqa: F401  (training and older callers import it from here)
from .errors import BundleError, Cancelled, InputError, NaNOutputError, PipelineClosed, ProviderError
from .image import latents_to_images, load_image, to_model_input, to_pil
from .inpaint import outpaint_canvas, overlay, prepare_mask
from .ip_adapter import IPAdapter
from .lora_adapters import RuntimeLoras
from .lora_adapters import active as active_loras
from .options import DECODERS, RuntimeOptions
from .providers import REGISTRY, Provider, Resolution, resolve
from .schedulers import SAMPLERS, check_sampler_fits, make_sampler
from .segmented_session import SegmentedSession
from .session import GraphSession, SessionPool

log = logging.getLogger("edgediff.pipeline")

__all__ = ["SIZE_MULTIPLE", "Pipeline", "PipelineOutput", "StepEvent", "text_to_image_components"]


@dataclass
class StepEvent:
    """What a step callback receives after each denoiser call."""

    step: int  # 0-based index of the step just done
    total: int  # number of denoiser steps in this call
    timestep: float
    latents: np.ndarray  # the latents after this step (B, C, h, w)
    preview: list | None = None  # PIL images of the current clean estimate, when the call asked for previews


StepCallback = Callable[[StepEvent], None]


@dataclass
class PipelineOutput:
    images: list  # PIL images, or a float array (B, H, W, 3) in [0, 1] for output_type="np", or latents
    seeds: list[int | None]  # the seed of each image, to reproduce it alone
    # seconds per stage: tokenize, text_encoder, the denoiser's ("unet" or "transformer": one entry per call),
    # vae_decoder, total
    timings: dict = field(default_factory=dict)


def text_to_image_components(manifest) -> list[str]:
    """The graphs every text-to-image call runs: the text encoder(s), the denoiser and the full VAE decoder."""
    return [*(e["component"] for e in manifest.text_encoders), manifest.denoiser, "vae_decoder"]


def _can_capture(resolution: Resolution) -> bool:
    """cuda_graph=True: an error on an explicitly chosen provider that cannot capture; with `auto` (or after a
    fallback) it is dropped, logged, so one setting serves every machine."""
    provider = resolution.provider
    if provider.can_capture:
        return True
    if resolution.requested.lower() == provider.name:
        raise ProviderError("graph_capture_unsupported", name=provider.name)
    log.info("cuda_graph: %s cannot capture graphs; running without", provider.name)
    return False


def _check_gpu_only_graphs(bundle: Bundle, provider: Provider) -> None:
    """A bundle exported with `--optimize gpu` holds operators only the CUDA provider has: say so up front
    rather than as onnxruntime's 'not implemented' at load."""
    if provider.cuda_kernels:
        return
    for name, spec in bundle.manifest.components.items():
        record = spec.attributes.get("optimizer") or {}
        if record.get("gpu") and record.get("fused_ops"):
            raise BundleError("bundle_needs_gpu", path=bundle.path, component=name, provider=provider.name)


def onnxruntime_operators(spec) -> list[str]:
    """The operators of onnxruntime's own that a component's graph holds, as its manifest records how it was made."""
    found = []
    if (spec.attributes.get("rewrites") or {}).get("fast_gelu"):
        found.append("FastGelu")
    if (spec.attributes.get("attention") or {}).get("mode") == "fused":
        found.append("MultiHeadAttention")
    if spec.precision == "int4":
        found.append("MatMulNBits")
    if (spec.attributes.get("optimizer") or {}).get("fused_ops"):
        found.append("the optimizer's fusions")
    return found


def _note_foreign_operators(bundle: Bundle, provider: Provider) -> None:
    """A provider that takes only ONNX's standard operators whole runs a graph holding onnxruntime's own in pieces
    (onnxruntime-openvino 1.24 then fails at run time, "Output names mismatch"): name the export that avoids it."""
    if not provider.standard_ops_only:
        return
    for name, spec in bundle.manifest.components.items():
        found = onnxruntime_operators(spec)
        if found:
            log.warning(
                "%s: %s holds onnxruntime's own operators (%s), which %s runs in pieces and onnxruntime-openvino "
                "1.24 fails at run time; export with --standard-ops for it (or run on --provider cpu)",
                bundle.path,
                name,
                ", ".join(found),
                provider.name,
            )


def _note_precision(bundle: Bundle, provider: Provider) -> None:
    """A bundle in a precision the provider gains nothing from still runs: say what to export instead. fp16 on
    the CPU provider runs slower than fp32 (x86 CPUs have no fp16 kernels, so onnxruntime inserts casts);
    int8-static on a CPU without int8 dot-product instructions runs about as fast as fp32 (it buys size
    only). Other mismatches (int8 or int4 on a GPU) are not measured, so not flagged."""
    denoiser = bundle.manifest.components[bundle.manifest.denoiser]
    name = {"unet": "UNet"}.get(bundle.manifest.denoiser, bundle.manifest.denoiser)
    if denoiser.precision == "fp16" and "fp16" not in provider.precisions:
        log.warning(
            "%s: its %s is %s, which the %s provider does not run natively (it suits %s); for speed there, "
            "export with --precision %s",
            bundle.path,
            name,
            denoiser.precision,
            provider.name,
            ", ".join(provider.precisions),
            provider.precisions[0],
        )
    elif denoiser.precision == "int8-static" and provider.name == "cpu" and not int8_dot_product():
        log.info(
            "%s: its %s is int8-static, but this CPU has no int8 dot-product instructions (VNNI): it runs about "
            "as fast as fp32 here (smaller, not faster; see `edgediff export --precision auto`)",
            bundle.path,
            name,
        )


class Pipeline:
    """Generates images from a bundle. Safe to call from several threads at once (onnxruntime sessions
    are; each call keeps its own sampler and noise), except in low-memory mode, where calls take turns.
    On GPUs with I/O binding, calls take turns per graph call (they share its device buffers).
    Use as a context manager, or call close(), to give the sessions' memory back.
    """

    def __init__(
        self,
        bundle: Bundle,
        options: RuntimeOptions | None = None,
        *,
        graph_openers: dict[str, Callable[[], GraphSession]] | None = None,
        **overrides,
    ):
        """`options`: how to run the bundle (RuntimeOptions); keyword overrides change single fields of it,
        e.g. `Pipeline(bundle, provider="cpu")`. `graph_openers`: components whose graph opens otherwise than the
        options say, name -> a function returning an object run as GraphSession is (`run`, `inputs`,
        `output_names`, `check_inputs`); the exporter runs its calibration graphs in the pipeline this way."""
        self.options = o = RuntimeOptions.with_overrides(options, overrides)
        self.bundle = bundle
        self.manifest = m = bundle.manifest
        # optimized graphs are cached per user (graph_cache.py); the bundle folder itself is never written
        cache_folder = graph_cache.cache_dir() if o.cache else None
        self._refused: dict[str, str] = {}
        if m.target == "coreml":  # Core ML packages run through coremltools, on macOS (compute_units applies)
            check_coreml(o.compute_units)
            self.resolution = Resolution(REGISTRY["coreml"], o.provider, False)

            def opener(name):
                return CoreMLSession(name, bundle.component_path(name), m.components[name], o.compute_units)
        else:
            self.resolution = resolve(
                o.provider, o.fallback, options=o.provider_options, precision=m.components[m.denoiser].precision
            )
            _check_gpu_only_graphs(bundle, self.resolution.provider)
            _note_precision(bundle, self.resolution.provider)
            _note_foreign_operators(bundle, self.resolution.provider)
            self.resolution.provider.prepare()
            capture = o.cuda_graph and _can_capture(self.resolution)
            refused = self._refused  # graph -> why the provider failed to compile it (--fallback)

            def open_graph(name, spec):
                if self.resolution.provider.runtime == "openvino" and name not in refused:

                    def on_cpu(why):  # OpenVINO failed the graph at a call (--fallback): the CPU provider takes it
                        refused[name] = why
                        return open_graph(name, spec)

                    session, refused_why = openvino_session.open_or_refuse(
                        name, bundle, spec, self.resolution, o.threads, cache_folder, on_cpu
                    )
                    if session is not None:
                        return session
                    refused[name] = refused_why  # then onnxruntime's CPU provider takes it, below
                session = GraphSession(
                    name,
                    bundle.file(spec.graph_file),
                    spec,
                    self.resolution,
                    bundle.path,
                    o.threads,
                    cache_folder,
                    o.low_memory,
                    o.io_binding,
                    capture,
                    cpu_layout=o.cpu_layout,
                    refused=refused.get(name, ""),  # low memory reopens it: on the CPU, not a failed compile again
                )
                if session.refusal:
                    refused[name] = session.refusal
                return session

            def opener(name):
                spec = m.components[name]
                if not spec.segments:
                    return open_graph(name, spec)
                parts = [functools.partial(open_graph, f"{name}.{k}", s) for k, s in enumerate(spec.segments)]
                return SegmentedSession(name, spec, parts, bundle.path, o.low_memory)

        self.providers = self.resolution.names
        self.sampler_name = o.sampler or m.scheduler["name"]
        if self.sampler_name not in SAMPLERS:
            raise InputError("sampler_unknown", name=self.sampler_name, available=", ".join(SAMPLERS))
        try:  # a flow sampler cannot drive a UNet that predicts noise, nor the other way round
            check_sampler_fits(self.sampler_name, m.prediction_type)
        except ValueError as exc:
            raise InputError("sampler_mismatch", detail=str(exc)) from None
        self.decoder = self._check_decoder(o.decoder)
        # opened up front: what every call needs; the VAE encoder and the other decoder open on first use
        names = [*text_to_image_components(m), *([DECODERS[self.decoder]] if self.decoder != "full" else [])]
        parallel = m.target != "coreml" and self.resolution.provider.opens_in_parallel  # (not Core ML packages)
        openers = graph_openers or {}
        self.sessions = SessionPool(
            lambda name: openers[name]() if name in openers else opener(name),
            names,
            low_memory=o.low_memory,
            parallel=parallel,
        )
        self.denoiser = make_denoiser(bundle, self.sessions)
        self.controlnets = ControlNets(m, bundle.path)  # opened on first use, like the VAE encoder
        self.ip_adapter = IPAdapter(m, bundle.path)  # its image encoder graph opens on first use too
        self.text = self.denoiser.text  # the prompt conditioner (TextConditioner for UNets)
        self.loras = RuntimeLoras(bundle)  # run-time LoRAs: each call's mix, built on first use
        # low-memory mode swaps sessions within a call, so calls take turns; otherwise a no-op lock
        self._turns = threading.Lock() if o.low_memory else _NoLock()
        self._closed = False
        log.info(
            "bundle %s on %s%s%s",
            bundle.path,
            self.resolution.provider.name,
            f" (fell back from {o.provider})" if self.resolution.fell_back else "",
            " (low memory)" if o.low_memory else "",
        )

    @classmethod
    def from_bundle(
        cls, path: str | Path, options: RuntimeOptions | None = None, verify: str = "full", **overrides
    ) -> "Pipeline":
        """Opens the bundle at `path` (checking every file's sha256 unless verify="size") and a pipeline over it."""
        return cls(Bundle.open(path, verify=verify), options, **overrides)

    def provider_report(self) -> dict:
        """What runs where: the chosen provider, its options, the graphs it failed to compile (--fallback: they run on
        the CPU; loaded now or not, as low memory closes them), and per loaded graph its providers, whether it fell
        back to the CPU and whether its optimised form came from the cache."""
        return {
            "provider": self.resolution.provider.name,
            "requested": self.resolution.requested,
            "fell_back": self.resolution.fell_back,
            "options": self.resolution.options,
            "refused": dict(self._refused),
            "graphs": {
                name: {
                    "providers": s.providers,
                    "cpu_fallback": s.fell_back_to_cpu,
                    "refused": getattr(s, "refusal", ""),  # the provider's error, where it failed on the graph
                    "cache": s.cache,
                    "io_binding": getattr(s, "binding_state", "off"),
                    "cuda_graph": getattr(s, "capture_state", "off"),
                    "shapes": getattr(s, "shapes", "dynamic"),
                }
                for name, s in ((n, self.sessions.get(n)) for n in self.sessions.loaded)
            },
        }

    @property
    def decoders(self) -> list[str]:
        """The decoders this bundle has: "full", and "tiny" when it was exported with one."""
        return [d for d, c in DECODERS.items() if c in self.manifest.components]

    def _check_decoder(self, name: str) -> str:
        if name not in DECODERS:
            raise InputError("decoder_unknown", available=", ".join(DECODERS), name=name)
        if DECODERS[name] not in self.manifest.components:
            raise InputError("decoder_missing", path=self.bundle.path, name=name)
        return name

    def close(self) -> None:
        """Releases every session (and its memory); the pipeline cannot be used afterwards."""
        self._closed = True
        self.sessions.close()
        self.loras.close()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def tokenizer(self):
        """The (first) text encoder's tokenizer."""
        return self.text.tokenizer

    def _check_args(self, height, width, steps, batch):
        for what, value in (("height", height), ("width", width)):
            check_size(self.manifest, what, value)
        d = self.manifest.defaults
        if self.manifest.target == "coreml" and (height, width) != (d["height"], d["width"]):
            raise InputError("static_size", width=d["width"], height=d["height"])
        if not isinstance(steps, (int, np.integer)) or steps < 1:
            raise InputError("steps", value=steps)
        if batch < 1:
            raise InputError("batch", what="num_images_per_prompt", value=batch)

    def __call__(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        height: int | None = None,
        width: int | None = None,
        seed: int | None = None,
        latents: np.ndarray | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        callback: StepCallback | None = None,
        generator=None,
        preview: bool = False,
        cancel: CancelToken | None = None,
        decoder: str | None = None,
        decode_tile: int | None = None,
        image=None,
        strength: float | None = None,
        mask_image=None,
        keep_unmasked: bool = False,
        outpaint: tuple[int, int, int, int] | None = None,
        max_sequence_length: int | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        true_cfg_scale: float | None = None,
        control_image=None,
        controlnet_conditioning_scale: float | list | dict = 1.0,
        control_guidance_start: float | list | dict = 0.0,
        control_guidance_end: float | list | dict = 1.0,
        loras: dict[str, float] | None = None,
        ip_adapter_image=None,
        ip_adapter_scale: float = 1.0,
    ) -> PipelineOutput:
        """Generates images; see README "Embedding" for callbacks, previews, cancel and threads.

        preview: the callback's event carries images of the current estimate (tiny decoder when the bundle
        has one). cancel: a CancelToken; cancelling raises Cancelled within one denoiser call. decoder:
        "full" or "tiny" (default: the pipeline's). decode_tile: decode in tiles of this many latent cells
        (default: the pipeline's options).
        image, strength: image-to-image (diffusers' img2img): start from `image` noised to `strength`
        (0: unchanged, 1: pure noise; default 0.8), running the last strength * steps steps (SD3, FLUX and SANA-Sprint
        bundles: as StableDiffusion3Img2ImgPipeline, FluxImg2ImgPipeline and SanaSprintImg2ImgPipeline, which round
        that count up, not down).
        mask_image: inpainting (white is repainted; default strength 1.0): inpainting UNets (9 input
        channels) see the mask and the masked image; others get the known region blended back in latent
        space after each step (diffusers' StableDiffusionInpaintPipeline); UNet bundles only. keep_unmasked: paste the
        original pixels back outside the mask (the VAE round trip otherwise softens them).
        outpaint: (left, top, right, bottom) pixels to grow `image` by; the new area is painted and the
        original pixels are kept exactly (the canvas grows to the latent grid's multiple).
        max_sequence_length: SD3 and FLUX bundles: the T5 tokens of the text (default: the bundle's; SD3 256 as
        diffusers, FLUX.1-schnell 256, FLUX.1-dev 512); SANA bundles: Gemma-2's (300, the instruction prefix aside);
        other bundles ignore it.
        prompt_2, prompt_3, negative_prompt_2, negative_prompt_3: as diffusers, what the second and third text
        encoders read instead of the prompt (SDXL's second CLIP; SD3's CLIP-G and T5; FLUX's T5), each falling
        back to prompt / negative_prompt; a bundle without that encoder refuses them.
        true_cfg_scale: FLUX bundles, as FluxPipeline: above 1 with a negative_prompt, the transformer also runs on the
        negative prompt and the prediction is neg + true_cfg_scale * (pos - neg), dev's embedded guidance kept (default
        1: off; without negative_prompt it does nothing, as there); other bundles refuse it.
        latents: the starting noise, (B, C, h, w); FLUX bundles take FluxPipeline's packed form, (B, h/2 * w/2,
        C * 4). output_type="latent" and step callbacks give (B, C, h, w) for every family (what decode() takes).
        guidance_scale: for FLUX.1-dev the embedded guidance (as FluxPipeline); FLUX.1-schnell ignores it; for
        SANA-Sprint the embedded guidance (as SanaSprintPipeline).
        control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end: bundles exported
        with --controlnet, as diffusers' ControlNet pipelines: an image (one ControlNet), a list (one per ControlNet,
        in the manifest's order) or a dict by name; each of the others a float, a list or a dict (runtime/control.py).
        loras: {name: weight} of run-time LoRAs (bundles exported with --lora-slots; `edgediff lora convert`), any
        number at once; None or {} runs the plain graphs (runtime/lora_adapters.py).
        ip_adapter_image, ip_adapter_scale: bundles exported with --ip-adapter, as diffusers with load_ip_adapter and
        set_ip_adapter_scale: a reference image (PIL image, path or array) and how strongly it steers (default 1.0;
        0 gives the image without it) (runtime/ip_adapter.py).
        """
        if self._closed:
            raise PipelineClosed("closed")
        decoder = self.decoder if decoder is None else self._check_decoder(decoder)
        if outpaint is not None:
            image, mask_image = self._outpaint_canvas(image, mask_image, outpaint)
            keep_unmasked = True  # the original pixels stay exactly as they were
        call = _Call(
            prompt=prompt,
            negative_prompt=negative_prompt,
            steps=num_inference_steps,
            guidance=guidance_scale,
            height=height,
            width=width,
            seed=seed,
            latents=latents,
            images_per_prompt=num_images_per_prompt,
            output_type=output_type,
            callback=callback,
            generator=generator,
            preview=preview,
            cancel=cancel or CancelToken(),
            decoder=decoder,
            decode_tile=self.options.decode_tile if decode_tile is None else decode_tile,
            image=image,
            strength=strength,
            mask_image=mask_image,
            keep_unmasked=keep_unmasked,
            max_sequence_length=max_sequence_length,
            encoder_prompts={
                "prompt_2": prompt_2,
                "prompt_3": prompt_3,
                "negative_prompt_2": negative_prompt_2,
                "negative_prompt_3": negative_prompt_3,
            },
            true_cfg_scale=true_cfg_scale,
            control=(control_image, controlnet_conditioning_scale, control_guidance_start, control_guidance_end),
            ip_adapter=(ip_adapter_image, ip_adapter_scale),
        )
        adapters = self.loras.adapters(loras)
        if adapters is not None and self.options.cuda_graph:  # a captured graph replays bound runs only
            raise InputError("lora_capture")
        with self._turns, active_loras(adapters):
            return self._generate(call)

    def _outpaint_canvas(self, image, mask_image, margins):
        if image is None or mask_image is not None:
            raise InputError("outpaint_image")
        try:
            left, top, right, bottom = (int(v) for v in margins)
        except (TypeError, ValueError):
            raise InputError("outpaint_margins", value=margins) from None
        if min(left, top, right, bottom) < 0:
            raise InputError("outpaint_margins", value=margins)
        multiple = size_multiple(self.manifest)
        return outpaint_canvas(image, left, top, right, bottom, multiple=multiple)

    def _check_task(self, image, mask_image) -> None:
        """Refuses image= or mask_image= on a bundle whose denoiser does not take them, naming what it does."""
        tasks = self.denoiser.image_tasks
        does = " and ".join(["text-to-image", *(IMAGE_TASKS[t] for t in tasks)])
        if image is not None and "img2img" not in tasks:
            task = "image= (image-to-image, inpainting, outpainting)"
        elif mask_image is not None and "inpaint" not in tasks:
            task = "mask_image= (inpainting, outpainting)"
        else:
            return
        raise InputError("family_task", task=task, family=self.manifest.family, tasks=does)

    def _true_cfg(self, scale, negative_given: bool) -> float | None:
        """FluxPipeline's true_cfg_scale, checked: the scale to run true CFG at, or None where it does not run
        (as there: a scale of 1, or no negative_prompt)."""
        if scale is None:
            return None
        if not self.denoiser.true_cfg:
            raise InputError("true_cfg_family", family=self.manifest.family)
        # below 1 FluxPipeline silently ignores it, and at inf its images turn NaN: refuse both
        number = isinstance(scale, (int, float, np.integer, np.floating)) and not isinstance(scale, bool)
        if not number or not math.isfinite(scale) or scale < 1:
            raise InputError("true_cfg_scale", value=scale)
        return float(scale) if scale > 1 and negative_given else None

    def _generate(self, call: "_Call") -> PipelineOutput:
        m = self.manifest
        image, height, width, cancel = call.image, call.height, call.width, call.cancel
        if call.mask_image is not None and image is None:
            raise InputError("mask_without_image")
        strength = (1.0 if call.mask_image is not None else 0.8) if call.strength is None else call.strength
        denoiser = self.denoiser
        self._check_task(image, call.mask_image)
        if image is not None:  # the image's size (rounded down to the latent grid) unless asked otherwise
            image = load_image(image)
            multiple = size_multiple(m)
            height = height or image.height // multiple * multiple
            width = width or image.width // multiple * multiple
        start = time.perf_counter()
        timings: dict = {denoiser.component: []}
        # 1. Resolve defaults from the manifest and check the arguments.
        prompts = [call.prompt] if isinstance(call.prompt, str) else list(call.prompt)
        steps = m.defaults["steps"] if call.steps is None else call.steps
        guidance = m.defaults["guidance"] if call.guidance is None else float(call.guidance)
        height = m.defaults["height"] if height is None else height
        width = m.defaults["width"] if width is None else width
        self._check_args(height, width, steps, call.images_per_prompt)
        if image is not None and image.size != (width, height):
            image = image.resize((width, height), Image.LANCZOS)  # as diffusers' image processor resamples
        if not prompts:
            raise InputError("batch", what="number of prompts", value=0)
        if call.decode_tile is not None and call.decode_tile < decoding.MIN_TILE:
            raise InputError("tile_size", minimum=decoding.MIN_TILE, value=call.decode_tile)
        batch = len(prompts) * call.images_per_prompt
        # FLUX's true CFG rides on the same negative-first batch as CFG, at its own scale
        true_cfg = self._true_cfg(call.true_cfg_scale, call.negative_prompt is not None)
        do_cfg = true_cfg is not None or (guidance > 1.0 and not denoiser.guidance_embedded)
        cfg_scale = guidance if true_cfg is None else true_cfg

        # 2. Encode the prompts into the denoiser's fixed inputs (SDXL: pooled text and size conditions too; LCM:
        #    the guidance embedding; SD3: joint CLIP + T5 text and pooled text); with classifier-free guidance,
        #    the negative prompts go first in one batch.
        negative = call.negative_prompt
        negatives = (
            None if negative is None else ([negative] * len(prompts) if isinstance(negative, str) else list(negative))
        )
        if negatives is not None and len(negatives) != len(prompts):
            raise InputError("batch", what="negative prompts (one per prompt)", value=len(negatives))
        encoders, given = denoiser.text.components, call.encoder_prompts
        fixed = denoiser.condition(
            per_encoder(prompts, {k: v for k, v in given.items() if k in PROMPT_ARGUMENTS}, encoders, len(prompts)),
            per_encoder(negatives, {k: v for k, v in given.items() if k in NEGATIVE_ARGUMENTS}, encoders, len(prompts)),
            do_cfg,
            call.images_per_prompt,
            height,
            width,
            guidance,
            timings,
            call.max_sequence_length,
        )

        # 3. Set the sampler's timesteps; image-to-image starts part-way (diffusers' get_timesteps).
        sampler = make_sampler(self.sampler_name, m.scheduler["config"])
        try:  # e.g. more steps than a distilled model's timestep grid has
            sampler.set_timesteps(steps, **denoiser.schedule(sampler, steps, height, width))
        except ValueError as exc:
            raise InputError("sampler_steps", sampler=self.sampler_name, detail=str(exc)) from None
        timesteps = sampler.timesteps
        if image is not None:
            if not 0.0 < float(strength) <= 1.0:
                raise InputError("strength", value=strength)
            start_index = denoiser.start_index(steps, strength)  # UNet and flow pipelines round differently
            if start_index >= steps:
                raise InputError("strength_steps", strength=strength, steps=steps)
            sampler.begin(start_index)
            timesteps = timesteps[start_index:]

        # one seeded generator per image (image i of seed s uses seed s + i): the latents, each step's noise and SD3's
        # control images' VAE samples draw from it
        seeds: list[int | None] = [None] * batch
        if call.generator is not None:
            noise_sources = [call.generator] * batch
        else:
            base = int(np.random.SeedSequence().generate_state(1)[0] >> 1) if call.seed is None else int(call.seed)
            seeds = [base + i for i in range(batch)]
            noise_sources = [np.random.default_rng(s) for s in seeds]
        step_noise = _BatchNoise(noise_sources)

        def encode_control(x):  # SD3's and FLUX's ControlNets: the control images' VAE samples, drawn at step 0
            return denoiser.pack(self._encode_input(x, batch, step_noise, cancel))

        control = self.controlnets.prepare(*call.control, height, width, batch, do_cfg, timings, encode_control)
        fixed.update(  # the reference image's embeddings in place of the UNet's zeros
            self.ip_adapter.feeds(
                *call.ip_adapter,
                batch,
                do_cfg,
                timings,
                lambda c, **f: self._run_cancellable(cancel, 0, len(timesteps), c, **f),
            )
        )

        # 4. Initial latents: from an image (img2img, inpainting), given, or pure noise from the generators above.
        #    The loop runs on the denoiser's form of them (FLUX: packed into tokens), which is what `latents=`
        #    takes; noise is drawn on the grid, then packed.
        shape = (batch, m.latent_channels, height // m.vae_scale_factor, width // m.vae_scale_factor)
        loop_shape = denoiser.latent_shape(shape)
        unet_channels = denoiser.in_channels
        inpaint = None
        latents = call.latents
        if image is not None:
            latents, inpaint = self._start_from_image(
                sampler, timesteps, image, call.mask_image, strength, shape, unet_channels, step_noise, cancel
            )
        elif unet_channels != m.latent_channels:
            raise InputError("inpaint_unet", channels=unet_channels)
        elif latents is None:
            latents = np.stack([src.standard_normal(shape[1:], dtype=np.float32) for src in noise_sources])
            latents = denoiser.pack(latents) * np.float32(sampler.init_noise_sigma)
        elif tuple(latents.shape) != loop_shape:
            raise InputError("latents_shape", expected=loop_shape, found=tuple(latents.shape))
        else:
            latents = latents.astype(np.float32) * np.float32(sampler.init_noise_sigma)

        # 5. Denoising loop; a cancel lands before the next call or aborts the one in flight.
        total = len(timesteps)
        for i, t in enumerate(timesteps):
            model_in = sampler_in = sampler.scale_model_input(latents, t)
            if inpaint is not None and inpaint.channels_in_unet:  # 9-channel UNets: + mask + masked image
                model_in = np.concatenate([model_in, inpaint.mask_lat, inpaint.masked_latents], axis=1)
            if do_cfg:
                model_in = np.concatenate([model_in, model_in])
            feeds = denoiser.feeds(model_in, sampler.model_timestep(t), fixed)
            if control is not None:  # active ControlNets' residuals in place of the UNet's zeros
                feeds.update(
                    control.residuals(i, total, feeds, lambda c, **f: self._run_cancellable(cancel, i, total, c, **f))
                )
            t0 = time.perf_counter()
            noise_pred = self._run_cancellable(cancel, i, total, denoiser.component, **feeds)[0]
            timings[denoiser.component].append(time.perf_counter() - t0)
            noise_pred = denoiser.prediction(noise_pred)  # PixArt: without its learned-variance channels
            if do_cfg:
                uncond_pred, cond_pred = np.split(noise_pred, 2)
                noise_pred = uncond_pred + np.float32(cfg_scale) * (cond_pred - uncond_pred)
            # SCM: the transformer's flow velocity becomes TrigFlow's (SanaSprintPipeline); others: as it is
            noise_pred = sampler.model_prediction(noise_pred, sampler_in, t)
            out = sampler.step(noise_pred, t, latents, noise=step_noise)
            latents = out.prev_sample
            if inpaint is not None and not inpaint.channels_in_unet:
                # ordinary UNets: the known region comes back, noised to where the next step starts
                known = (
                    inpaint.image_latents
                    if i == total - 1
                    else sampler.add_noise(inpaint.image_latents, inpaint.noise, timesteps[i + 1])
                )
                latents = ((1 - inpaint.mask_lat) * known + inpaint.mask_lat * latents).astype(np.float32)
            if call.callback is not None:  # on the (B, C, h, w) grid, whatever the denoiser's form
                images = None
                if call.preview:
                    estimate = latents if out.denoised is None else sampler.final_latents(out.denoised)
                    estimate = denoiser.unpack(estimate, height, width)
                    images = latents_to_images(
                        self._decode(estimate, self._preview_decoder(), None, cancel, i, total), "pil"
                    )
                grid = denoiser.unpack(latents, height, width)
                call.callback(StepEvent(step=i, total=total, timestep=float(t), latents=grid, preview=images))
        if not np.isfinite(latents).all():
            raise NaNOutputError(
                "nan_output", component=f"denoiser ({denoiser.component})", hint=" (try an fp32 bundle)"
            )
        # (B, C, h, w) in the VAE's units (SCM's loop runs in sigma_data units): what decode() takes
        latents = denoiser.unpack(sampler.final_latents(latents), height, width)
        if call.output_type == "latent":
            timings["total"] = time.perf_counter() - start
            return PipelineOutput(images=latents, seeds=seeds, timings=timings)

        # 6. Decode one image at a time (or tile by tile): peak memory stays that of a single decode.
        t0 = time.perf_counter()
        decoded = self._decode_checked(latents, call.decoder, call.decode_tile, cancel, total)
        timings["vae_decoder"] = time.perf_counter() - t0

        # 7. To [0, 1] images, as diffusers' image processor does (with the original kept outside the mask).
        if inpaint is not None and call.keep_unmasked:
            images = overlay(latents_to_images(decoded, "np"), image, inpaint.mask_px)
            images = images if call.output_type == "np" else to_pil(images)
        else:
            images = latents_to_images(decoded, call.output_type)
        timings["total"] = time.perf_counter() - start
        return PipelineOutput(images=images, seeds=seeds, timings=timings)

    def _start_from_image(self, sampler, timesteps, image, mask_image, strength, shape, unet_channels, noise, cancel):
        """Image-to-image and inpainting start: the image's latents noised to the first timestep (pure
        noise for inpainting at full strength), and for inpainting the mask and masked-image latents."""
        m = self.manifest
        batch, height, width = shape[0], shape[2] * m.vae_scale_factor, shape[3] * m.vae_scale_factor
        full_noise = mask_image is not None and strength >= 1.0
        # an inpainting UNet at full strength never needs the image's latents (and diffusers draws no sample)
        encoded = (
            None
            if full_noise and unet_channels > m.latent_channels
            else self._encode_input(to_model_input(image), batch, noise, cancel)
        )
        start_noise = noise.standard_normal(shape)
        if full_noise:
            latents = start_noise * np.float32(sampler.init_noise_sigma)
        else:
            latents = sampler.add_noise(encoded, start_noise, timesteps[0])
        if mask_image is None:  # (FLUX: noised on the grid, then packed, as FluxImg2ImgPipeline)
            return self.denoiser.pack(latents), None
        mask_px, mask_lat = prepare_mask(mask_image, height, width, m.vae_scale_factor)
        masked_latents = self._encode_input(to_model_input(image) * (mask_px < 0.5), batch, noise, cancel)
        return latents, _Inpaint(
            encoded,
            start_noise,
            np.repeat(mask_lat, batch, 0),
            masked_latents,
            mask_px,
            channels_in_unet=unet_channels > m.latent_channels,
        )

    def _encode_input(self, model_input: np.ndarray, batch: int, noise, cancel) -> np.ndarray:
        """(B, C, h, w) scaled latents of a (1, 3, H, W) image, one sample of the encoder's distribution per image."""
        if "vae_encoder" not in self.manifest.components:
            raise InputError("encoder_missing", path=self.bundle.path)
        with _cancellable(cancel, 0, 0) as options:
            params = self.sessions.get("vae_encoder").run(options, sample=model_input.astype(np.float32))[0]
        if params.shape[1] == self.manifest.latent_channels:  # a deterministic encoder (SANA's DC-AE): no sample
            sample = np.repeat(params, batch, axis=0)
        else:
            mean, logvar = np.split(params, 2, axis=1)
            std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0))  # diffusers' DiagonalGaussianDistribution
            mean, std = np.repeat(mean, batch, axis=0), np.repeat(std, batch, axis=0)
            sample = mean + std * noise.standard_normal(mean.shape)
        shift = np.float32(self.manifest.vae_shift_factor)
        return ((sample - shift) * np.float32(self.manifest.vae_scaling_factor)).astype(np.float32)

    def decode(
        self, latents: np.ndarray, decoder: str | None = None, output_type: str = "pil", decode_tile: int | None = None
    ):
        """Images from latents as `output_type="latent"` returns them (decoder: "full" or "tiny")."""
        if self._closed:
            raise PipelineClosed("closed")
        decoder = self.decoder if decoder is None else self._check_decoder(decoder)
        tile = self.options.decode_tile if decode_tile is None else decode_tile
        with self._turns:
            decoded = self._decode_checked(np.asarray(latents, dtype=np.float32), decoder, tile, CancelToken(), 0)
        return latents_to_images(decoded, output_type)

    def _decode_checked(self, latents, decoder: str, tile, cancel: CancelToken, total: int) -> np.ndarray:
        decoded = self._decode(latents, decoder, tile, cancel, total, total)
        if not np.isfinite(decoded).all():
            raise NaNOutputError(
                "nan_output", component=f"{decoder} VAE decoder", hint=" (fp16 overflow? use an fp32 decoder)"
            )
        return decoded

    def _preview_decoder(self) -> str:
        return "tiny" if "tiny" in self.decoders else "full"

    def _decode(self, latents, decoder: str, tile, cancel: CancelToken, step: int, total: int) -> np.ndarray:
        component = DECODERS[decoder]
        # the full VAE takes unscaled (SD3: and shifted) latents; a tiny decoder records its own factor (TAESD's
        # is 1.0) and shift (none)
        attributes = self.manifest.components[component].attributes
        full = component == DECODERS["full"]
        scaling = attributes.get("scaling_factor", self.manifest.vae_scaling_factor)
        shift = attributes.get("shift_factor", self.manifest.vae_shift_factor if full else 0.0)
        session = self.sessions.get(component)
        with _cancellable(cancel, step, total) as options:
            return decoding.decode(
                session, latents / np.float32(scaling) + np.float32(shift), tile, run_options=options
            )

    def _run_cancellable(self, cancel: CancelToken, step: int, total: int, component: str, **feeds):
        session = self.sessions.get(component)
        with _cancellable(cancel, step, total) as options:
            return session.run(options, **feeds)


@contextmanager
def _cancellable(cancel: CancelToken, step: int, total: int):
    """RunOptions for one graph call; a cancel before or during it becomes Cancelled."""
    if cancel.cancelled:
        raise Cancelled("cancelled", step=step, total=total)
    with cancel.run_options() as options:
        try:
            yield options
        except Exception:  # onnxruntime raises its own error type when RunOptions.terminate stops a run
            if cancel.cancelled:
                raise Cancelled("cancelled", step=step, total=total) from None
            raise


@dataclass
class _Call:
    """One call's arguments, as __call__ received them (defaults are resolved in _generate's step 1)."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None
    steps: int | None
    guidance: float | None
    height: int | None
    width: int | None
    seed: int | None
    latents: np.ndarray | None
    images_per_prompt: int
    output_type: str
    callback: StepCallback | None
    generator: object
    preview: bool
    cancel: CancelToken
    decoder: str
    decode_tile: int | None
    image: object
    strength: float | None
    mask_image: object
    keep_unmasked: bool
    max_sequence_length: int | None = None
    encoder_prompts: dict = field(default_factory=dict)  # prompt_2, prompt_3 and their negatives, as given
    true_cfg_scale: float | None = None  # FLUX's second batch on the negative prompt (None: not given)
    control: tuple = (None, 1.0, 0.0, 1.0)  # control_image and its scale, guidance start and end
    ip_adapter: tuple = (None, 1.0)  # ip_adapter_image and ip_adapter_scale


@dataclass
class _Inpaint:
    image_latents: np.ndarray  # the whole image, encoded (the known region's source)
    noise: np.ndarray  # the noise that noised them at the start (re-used to noise the known region)
    mask_lat: np.ndarray  # (B, 1, h, w): 1 = repaint
    masked_latents: np.ndarray  # the image with the masked area blanked, encoded (9-channel UNets)
    mask_px: np.ndarray  # (1, 1, H, W), for pasting the original back
    channels_in_unet: bool  # True: an inpainting UNet takes mask and masked image as extra channels


class _NoLock:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _BatchNoise:
    """Draws step noise per image from that image's own generator, so each image is reproducible alone."""

    def __init__(self, sources):
        self.sources = sources

    def standard_normal(self, size, dtype=np.float32):
        if len(set(map(id, self.sources))) == 1:  # one shared (e.g. replayed) source: draw the batch at once
            return self.sources[0].standard_normal(size, dtype=dtype)
        return np.stack([src.standard_normal(size[1:], dtype=dtype) for src in self.sources])
