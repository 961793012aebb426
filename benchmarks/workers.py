"""One benchmark worker per process: loads one system, times cold start, then warm images per stage.

Run as `python -m edgediff.benchmarks.workers SYSTEM JSON_ARGS`; prints one JSON line. Every system
gets the same prompt, size, steps, guidance, sampler settings and initial latents. With `images_to` (a .npy
path) a worker also saves its warm images there, as uint8 (repeat, H, W, 3), for the harness to score.
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

PROMPT = "a large red circle on a blue background"


def peak_rss_bytes() -> int | None:
    """This process's peak resident memory. On Linux the kernel's high-water mark of this address space
    (VmHWM), not getrusage: Linux carries a process's ru_maxrss over exec from the address space it
    replaces, so a worker spawned by a harness that had held 1 GiB reported at least 1 GiB
    (tests/bench/test_bench.py)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:  # not Linux
        pass
    try:
        import resource
    except ImportError:  # Windows: the peak working set is this process's own
        try:
            import psutil

            return psutil.Process().memory_info().peak_wset
        except (ImportError, AttributeError):
            return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # macOS: may include the spawning process's, unchecked
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def _latents(manifest, size: int, seed: int) -> np.ndarray:
    """The initial latents in the form every system's `latents=` takes: the grid, packed into tokens for FLUX."""
    from edgediff.runtime.denoisers.flux import pack_latents

    h = size // manifest.vae_scale_factor
    grid = np.random.default_rng(seed).standard_normal((1, manifest.latent_channels, h, h)).astype(np.float32)
    return pack_latents(grid, manifest.latent_packing) if manifest.latent_packing > 1 else grid


def _save_images(a: dict, images: list) -> str | None:
    """The warm images as uint8 in one .npy (a few KiB to MiB): what the quality column scores. None unless asked."""
    if not a.get("images_to"):
        return None
    warm = [np.asarray(x, dtype=np.float32) for x in images[1 + a["warmup"] :]]
    stacked = np.stack([(np.clip(x, 0, 1) * 255).round().astype(np.uint8) for x in warm])
    np.save(a["images_to"], stacked)
    return a["images_to"]


def _run_stats(runs: list[dict], calls: str) -> list[dict]:
    """Per run, the stages under the results' keys; `calls`: the run's key of the denoiser's calls (edgediff's
    timings name the component, "unet" or "transformer"), written under "unet" whatever the family."""
    return [
        {
            "tokenize": r.get("tokenize", 0.0),
            "text_encoder": r["text_encoder"],
            "unet_calls": r[calls],
            "unet": sum(r[calls]),
            "vae_decoder": r["vae_decoder"],
            "total": r["total"],
        }
        for r in runs
    ]


def edgediff(a: dict) -> dict:
    t0 = time.perf_counter()
    from edgediff.runtime import Pipeline, RuntimeOptions

    if a.get("cache_dir"):  # the graph cache's folder for this run (cold start with a warm cache)
        os.environ["EDGEDIFF_CACHE_DIR"] = a["cache_dir"]
    options = RuntimeOptions.from_dict(a["options"]).replace(cache=bool(a.get("cache_dir")))
    pipe = Pipeline.from_bundle(a["bundle"], options, verify="size")
    load = time.perf_counter() - t0
    runs, images = [], []
    for i in range(a["warmup"] + a["repeat"] + 1):
        out = pipe(
            PROMPT,
            num_inference_steps=a["steps"],
            height=a["size"],
            width=a["size"],
            latents=_latents(pipe.manifest, a["size"], i),
            seed=i,
            output_type="np",
        )
        runs.append(dict(out.timings))
        if a.get("images_to"):  # kept only when asked: a worker's peak memory stays its pipeline's own
            images.append(out.images[0])
    report = pipe.provider_report()  # read without opening anything (low-memory mode keeps only the last graph)
    graphs = report["graphs"]
    denoiser = pipe.manifest.denoiser
    return {
        "load_s": load,
        "first_image_s": runs[0]["total"],
        "runs": _run_stats(runs[1 + a["warmup"] :], denoiser),
        "providers": graphs.get(denoiser, next(iter(graphs.values()), {})).get("providers"),
        "provider_report": report,
        "images": _save_images(a, images),
    }


class _Timer:
    """Wraps a stage's call and records its wall time; `sync` (a GPU's synchronise) makes that time the
    stage's own rather than the time to queue its kernels."""

    def __init__(self, sync=None):
        self.marks: dict[str, list[float]] = {}
        self.sync = sync or (lambda: None)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.sync()
            self.marks.setdefault(name, []).append(time.perf_counter() - start)
            return out

        return timed


def _reference_runs(
    pipe, timer, manifest, a, torch_mode: bool, device: str = "cpu", dtype=None
) -> tuple[list[dict], list]:
    """The peer's runs, timed per stage, and its images (float, HWC)."""
    runs, images = [], []
    for i in range(a["warmup"] + a["repeat"] + 1):
        timer.marks.clear()
        latents = _latents(manifest, a["size"], i)
        if torch_mode:
            import torch

            latents = torch.from_numpy(latents).to(device, dtype or torch.float32)
        timer.sync()
        start = time.perf_counter()
        out = pipe(
            PROMPT,
            num_inference_steps=a["steps"],
            guidance_scale=manifest.defaults["guidance"],
            height=a["size"],
            width=a["size"],
            latents=latents,
            output_type="np",
            **_text_length(pipe, manifest),
            **_scm_steps(pipe, a["steps"]),
            **_instruction(pipe, a),
        )
        m = timer.marks
        runs.append(
            {
                "text_encoder": sum(m.get("text_encoder", [])),
                "denoiser": m.get("denoiser", []),
                "vae_decoder": sum(m.get("vae_decoder", [])),
                "total": time.perf_counter() - start,
            }
        )
        if a.get("images_to"):
            images.append(_numpy_image(out.images[0]))
    return runs, images


def _numpy_image(image) -> np.ndarray:
    """A peer's image as numpy (diffusers may hand back a torch tensor on the GPU in fp16)."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
    return np.asarray(image, dtype=np.float32)


def _text_length(pipe, manifest) -> dict:
    """The text tokens the bundle runs on (SD3, FLUX, SANA: max_sequence_length), where the pipeline takes them:
    FluxPipeline's default (512) is not the bundle's."""
    import inspect

    length = manifest.conditioning.get("max_sequence_length")
    takes = "max_sequence_length" in inspect.signature(pipe.__call__).parameters
    return {"max_sequence_length": int(length)} if length and takes else {}


def _instruction(pipe, a: dict) -> dict:
    """SANA's pipelines prefix the prompt with a complex-human instruction before encoding it; without it
    (`peer_instruction` False) they encode the prompt alone, padded to max_sequence_length."""
    import inspect

    takes = "complex_human_instruction" in inspect.signature(pipe.__call__).parameters
    return {"complex_human_instruction": None} if takes and not a.get("peer_instruction", True) else {}


def _scm_steps(pipe, steps: int) -> dict:
    """SanaSprintPipeline's intermediate timestep (1.3) holds for 2 steps only; other counts need None, which
    diffusers otherwise refuses (edgediff's SCM sampler does the same by itself)."""
    import inspect

    takes = "intermediate_timesteps" in inspect.signature(pipe.__call__).parameters
    return {"intermediate_timesteps": None} if takes and steps != 2 else {}


def _same_scheduler(pipe, manifest):
    import diffusers

    from edgediff.runtime.schedulers import SAMPLER_TO_DIFFUSERS_CLASS

    name = SAMPLER_TO_DIFFUSERS_CLASS.get(manifest.scheduler["name"])
    if name is None or not hasattr(diffusers, name):  # no diffusers twin: the source's own scheduler stays
        return
    pipe.scheduler = getattr(diffusers, name).from_config(manifest.scheduler["config"])


def _text_encoders(pipe) -> list:
    """The pipeline's text encoders (SDXL: two, SD3: three, FLUX: CLIP and T5): all count as the text-encoder stage."""
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return [enc for enc in (getattr(pipe, n, None) for n in names) if enc is not None]


def diffusers(a: dict) -> dict:
    t0 = time.perf_counter()
    import torch

    from edgediff.export.source import denoiser, load_pipeline  # each family's pipeline, as the export loads it
    from edgediff.runtime import Bundle

    torch.set_num_threads(a["threads"])
    manifest = Bundle.open(a["bundle"], verify="none").manifest
    # where and in what precision peers run is decided once, by the harness (peer_gpu, peer_half)
    device = "cuda" if a.get("peer_gpu") else "cpu"
    dtype = torch.float16 if a.get("peer_half") else torch.float32
    pipe = load_pipeline(a["source"], t5=_runs_t5(a["source"], manifest)).to(device, dtype)
    _same_scheduler(pipe, manifest)
    sync = torch.cuda.synchronize if device == "cuda" else None
    if sync:
        sync()
    load = time.perf_counter() - t0
    timer = _Timer(sync)
    for encoder in _text_encoders(pipe):
        encoder.forward = timer.wrap("text_encoder", encoder.forward)
    net = denoiser(pipe)  # its UNet or transformer
    net.forward = timer.wrap("denoiser", net.forward)
    pipe.vae.decode = timer.wrap("vae_decoder", pipe.vae.decode)
    with torch.inference_mode():
        runs, images = _reference_runs(pipe, timer, manifest, a, torch_mode=True, device=device, dtype=dtype)
    return {
        "device": device,
        "dtype": str(dtype).removeprefix("torch."),
        "load_s": load,
        "first_image_s": runs[0]["total"],
        "runs": _run_stats(runs[1 + a["warmup"] :], "denoiser"),
        "images": _save_images(a, images),
    }


def _runs_t5(source: str, manifest) -> bool:
    """Whether the peer loads SD3's T5: not when the bundle was exported without it (`--no-t5`), so that both
    systems run the same encoders. FLUX's T5 (its text_encoder_2) is always there."""
    from diffusers import DiffusionPipeline

    return "text_encoder_3" in manifest.components or "text_encoder_3" not in DiffusionPipeline.load_config(source)


def optimum(a: dict) -> dict:
    t0 = time.perf_counter()
    import onnxruntime as ort

    from edgediff.runtime import Bundle
    from edgediff.runtime.session import session_options

    manifest = Bundle.open(a["bundle"], verify="none").manifest
    opts: ort.SessionOptions = session_options(a["threads"])
    # optimum's own fp32 export, on the row's provider (its CUDA runs copy inputs and outputs each call)
    provider = "CUDAExecutionProvider" if a.get("peer_gpu") else "CPUExecutionProvider"
    pipe = _optimum_class(a["optimum_dir"]).from_pretrained(a["optimum_dir"], provider=provider, session_options=opts)
    pipe.set_progress_bar_config(disable=True)
    _same_scheduler(pipe, manifest)
    load = time.perf_counter() - t0
    timer = _Timer()
    parts = [("text_encoder", enc) for enc in _text_encoders(pipe)] + [
        ("denoiser", pipe.unet),
        ("vae_decoder", pipe.vae_decoder),
    ]
    for name, part in parts:
        part.forward = timer.wrap(name, part.forward)
    runs, images = _reference_runs(pipe, timer, manifest, a, torch_mode=True)  # its scheduler steps in torch
    return {
        "device": provider,
        "load_s": load,
        "first_image_s": runs[0]["total"],
        "runs": _run_stats(runs[1 + a["warmup"] :], "denoiser"),
        "images": _save_images(a, images),
    }


def _optimum_class(folder: str):
    """optimum's SDXL or SD pipeline class, read from the diffusers-layout folder as our export reads it."""
    import optimum.onnxruntime as ort_pipelines
    from diffusers import DiffusionPipeline

    from edgediff.export.source import has_second_text_encoder

    sdxl = has_second_text_encoder(DiffusionPipeline.load_config(folder))
    return ort_pipelines.ORTStableDiffusionXLPipeline if sdxl else ort_pipelines.ORTStableDiffusionPipeline


def prepare_optimum(source: str, out_dir: str) -> None:
    """optimum-onnx's own fp32 export of the source, once per benchmark output folder."""
    _optimum_class(source).from_pretrained(source, export=True).save_pretrained(out_dir)


def count_stage_macs(a: dict) -> dict:
    """The harness's MAC count (harness._macs_in_worker): {"macs": per stage or None, "why": if it failed}."""
    from edgediff.runtime import Bundle

    from .harness import _graph_macs

    try:
        return {"macs": _graph_macs(Bundle.open(a["bundle"], verify="size"), a["size"], a["batch"], a["decoder"])}
    except Exception as exc:  # shape inference fails on some graphs: the harness reports it and keeps the timings
        return {"macs": None, "why": (str(exc).splitlines() or [type(exc).__name__])[0]}


SYSTEMS = {"edgediff": edgediff, "diffusers": diffusers, "optimum": optimum}


def main() -> None:
    system, args = sys.argv[1], json.loads(sys.argv[2])
    if system == "prepare-optimum":
        prepare_optimum(args["source"], args["optimum_dir"])
        print(json.dumps({"ok": True}))
        return
    if system == "macs":
        print(json.dumps(count_stage_macs(args)))
        return
    result = SYSTEMS[system](args)
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
