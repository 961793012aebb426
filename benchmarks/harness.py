"""`edgediff bench`: seconds per image across bundles, providers, steps and sizes, per stage, with peers.

Each system runs in its own fresh process (its memory is its own), interleaved A B A B over
`rounds`; results go to results.json (schema: results.schema.json), results.md and chart.png. Each stage's
rate is held to a MatMul reference sampled before, between and after the systems, and to the ISA's
theoretical peak. With `quality`, every row's warm images are scored against a reference bundle's from the
same latents (speed_quality.png).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edgediff.runtime.denoisers.sd3 import counts_text
from edgediff.runtime.options import DECODERS, RuntimeOptions

from .quality import PSNR_FLOOR_DB, is_shipped_model

log = logging.getLogger("edgediff.bench")
RESULTS_SCHEMA_VERSION = 1
PEERS = ("diffusers", "optimum")
# "unet" is the key of the denoiser's stage in results files, whatever the family (a UNet or a transformer): the
# files under benchmarks/results/ and the docs tables read it; a row's `denoiser` names the component that ran.
STAGES = ("text_encoder", "unet", "vae_decoder")
# What a stage-sum may miss of the whole image (tokenising, sampler arithmetic, post-processing).
STAGE_SUM_MARGIN = 0.10
# precisions whose graphs run int8 kernels on CPUs (int4: MatMulNBits' int8 path): held to the int8 reference
INT_PRECISIONS = ("int8", "int8-static", "int4")


@dataclass
class BenchConfig:
    bundles: list[str]
    providers: list[str] = field(default_factory=lambda: ["auto"])  # each bundle runs on each of these
    steps: list[int] = field(default_factory=lambda: [1])
    sizes: list[int | None] = field(default_factory=lambda: [None])  # None: the bundle's default size
    repeat: int = 3  # warm runs per process
    warmup: int = 1  # warm-up runs per process, after the first (cold) image
    rounds: int = 2  # fresh processes per system, interleaved A B A B: drift hits every system alike
    compare: list[str] = field(default_factory=list)  # peers: diffusers, optimum
    source: str | None = None  # the diffusers folder the bundle came from (for peers)
    out: str = "bench-out"
    # how edgediff runs its bundles (peers run as they come); the provider comes from `providers` per row
    runtime: RuntimeOptions = field(default_factory=RuntimeOptions)
    # edgediff's starts from a graph cache one unmeasured start filled (a user's every start after the first);
    # off, each process optimizes its graphs, as a first-ever start does
    graph_cache: bool = False
    # a bundle whose images (CPU provider, same latents and prompt) every row's images are scored against
    quality: str | None = None
    # SANA: the diffusers peer encodes the prompt with its complex-human instruction, as it does by default; False:
    # the prompt alone, less work whatever the source's tokenizer makes of the instruction (a lower bound on its time)
    peer_instruction: bool = True

    @property
    def threads(self) -> int | None:
        return self.runtime.threads

    @property
    def decoder(self) -> str:
        return self.runtime.decoder

    @property
    def mode(self) -> dict:
        """What the report labels a row by: edgediff's memory and GPU modes."""
        r = self.runtime
        return {
            "low_memory": r.low_memory,
            "decoder": r.decoder,
            "decode_tile": r.decode_tile,
            "provider_options": dict(r.provider_options),
            "cuda_graph": r.cuda_graph,
            "graph_cache": self.graph_cache,
        }


class WorkerFailed(RuntimeError):
    """A worker process exited with an error: `last`, its stderr's last line; `stderr`, all of it."""

    def __init__(self, system: str, last: str, stderr: str):
        super().__init__(f"{system} worker failed: {last}")
        self.last, self.stderr = last, stderr


def _worker(system: str, args: dict) -> dict:
    proc = subprocess.run(
        [sys.executable, "-m", "edgediff.benchmarks.workers", system, json.dumps(args)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [f"exit status {proc.returncode}, no output"]
        raise WorkerFailed(system, tail[0], proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _failure(exc: WorkerFailed, out: Path, slug: str) -> dict:
    """A system's row where its worker failed: the error's last line, its whole stderr kept in the run's failures/
    folder. The bench goes on: one provider or bundle that cannot run loses its own rows, not the run's."""
    logs = out / "failures"
    logs.mkdir(exist_ok=True)
    (logs / f"{slug}.log").write_text(exc.stderr, encoding="utf-8")
    log.warning("%s; its log: %s", exc, logs / f"{slug}.log")
    return {"failed": exc.last, "log": f"failures/{slug}.log"}


def _row(system: str, outcome: list[dict] | dict) -> dict:
    """A system's row: its processes' timings aggregated, or its failure (_failure)."""
    return {"system": system, **outcome} if isinstance(outcome, dict) else _aggregate(system, outcome)


def failed_rows(data: dict) -> list[tuple[dict, dict]]:
    """(row, system row) of every measurement that failed in a bench's results."""
    return [(row, s) for row in data["results"] for s in row["systems"] if "failed" in s]


def peer_available(peer: str) -> str | None:
    """None when the peer can run here, else why not (the report says it and skips the peer)."""
    import importlib.util

    needs = {"diffusers": ["torch", "diffusers"], "optimum": ["optimum.onnxruntime", "diffusers"]}[peer]
    for module in needs:
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{peer} skipped: {module} is not installed (pip install 'edgediff[cpu,export]')"
    return None


def summarise(values: list[float]) -> dict:
    ordered = sorted(values)
    p90 = ordered[min(len(ordered) - 1, int(round(0.9 * (len(ordered) - 1))))]
    return {"median": statistics.median(ordered), "p90": p90, "min": ordered[0], "max": ordered[-1], "n": len(ordered)}


def _aggregate(system: str, procs: list[dict]) -> dict:
    runs = [r for p in procs for r in p["runs"]]
    stages = {s: summarise([r[s] for r in runs]) for s in ("tokenize", *STAGES, "total")}
    stages["unet_call"] = summarise([c for r in runs for c in r["unet_calls"]])
    # per run, what no stage accounts for (sampler arithmetic, glue): robust to drift between runs
    stages["untimed"] = summarise([max(0.0, r["total"] - sum(r[k] for k in ("tokenize", *STAGES))) for r in runs])
    rss = [p["peak_rss_bytes"] for p in procs if p.get("peak_rss_bytes")]
    return {
        "system": system,
        "stages": stages,
        "cold": {
            "load_s": summarise([p["load_s"] for p in procs]),
            "first_image_s": summarise([p["first_image_s"] for p in procs]),
        },
        "peak_rss_bytes": max(rss) if rss else None,
        "processes": len(procs),
        "providers": procs[0].get("providers"),
        "provider_report": procs[0].get("provider_report"),
        # peers: where they ran (torch device or onnxruntime provider) and torch's dtype
        **{k: procs[0][k] for k in ("device", "dtype") if procs[0].get(k)},
    }


def stage_shapes(bundle, size: int, guidance_batch: int, decoder: str = "full") -> dict[str, dict[str, tuple]]:
    """Each stage graph's input shapes for one call at this size, as the runtime feeds them: every text encoder at
    its own token count, the denoiser, and the decoder that runs (`decoder`: "full" or "tiny"). Keyed by component.
    Raises ValueError where the manifest does not give every input's shape."""
    m = bundle.manifest
    lat = size // m.vae_scale_factor
    if m.conditioning.get("joint") == "sana":
        return _sana_shapes(bundle, lat, guidance_batch, decoder)
    encoders, text_tokens = _text_tokens(m)
    if m.denoiser == "unet":
        denoiser = {
            "sample": (guidance_batch, m.latent_channels, lat, lat),
            "timestep": (),
            "encoder_hidden_states": (guidance_batch, text_tokens, _hidden(m)),
            "timestep_cond": (guidance_batch, m.guidance_embedding_dim or 0),
        }
    else:
        packed = (lat // m.latent_packing) ** 2
        dims = {
            "batch_size": guidance_batch,
            "step": guidance_batch,  # one timestep per batch row
            "height": lat,
            "width": lat,
            "packed_height_width": packed,
            "sequence_length": text_tokens,
        }
        denoiser = _resolve(m.components[m.denoiser].inputs, dims, m.denoiser)
    shapes = {name: {"input_ids": (1, tokens)} for name, tokens in encoders}
    shapes[m.denoiser] = denoiser
    shapes[DECODERS[decoder]] = {"latent_sample": (1, m.latent_channels, lat, lat)}
    return shapes


def _sana_shapes(bundle, lat: int, guidance_batch: int, decoder: str) -> dict[str, dict[str, tuple]]:
    """SANA's stage shapes: Gemma-2 on the bench prompt's tokens after the stored instruction prefix, as the runtime
    runs it (a negative prompt's few tokens under CFG are left out), and the transformer on max_sequence_length."""
    from edgediff.runtime.denoisers.sana import SanaConditioner

    from .workers import PROMPT

    m = bundle.manifest
    text = SanaConditioner(bundle, {})
    length = int(m.conditioning["max_sequence_length"])
    prefix, tokens = text.prompt_tokens(PROMPT, length)
    gemma = text.gemma.component
    dims = {"batch_size": 1, "sequence_length": tokens, "prefix_length": prefix}
    dims["prefix_length + sequence_length"] = prefix + tokens  # the attention mask's width, named as exported
    denoiser = {"batch_size": guidance_batch, "height": lat, "width": lat, "sequence_length": length}
    return {
        gemma: _resolve(m.components[gemma].inputs, dims, gemma),
        m.denoiser: _resolve(m.components[m.denoiser].inputs, denoiser, m.denoiser),
        DECODERS[decoder]: {"latent_sample": (1, m.latent_channels, lat, lat)},
    }


def _graph_macs(bundle, size: int, guidance_batch: int, decoder: str = "full") -> dict | None:
    """MACs per stage call at this size, counted from the bundle's graphs (needs the onnx package): the text
    encoders' summed (SDXL: two, SD3: three, each at its own token count), the denoiser's, and the decoder that was
    timed. Raises ValueError where the manifest does not give every input's shape."""
    try:
        from .macs import count_macs
    except ImportError:
        return None
    m = bundle.manifest
    shapes = stage_shapes(bundle, size, guidance_batch, decoder)
    try:
        text = sum(_count(count_macs, bundle, e["component"], shapes[e["component"]]) for e in m.text_encoders)
        return {
            "text_encoder": text,
            "unet": _count(count_macs, bundle, m.denoiser, shapes[m.denoiser]),
            "vae_decoder": _count(count_macs, bundle, DECODERS[decoder], shapes[DECODERS[decoder]]),
        }
    except ImportError:
        return None


def _count(count_macs, bundle, component: str, shapes: dict) -> int:
    """One graph's MACs; ValueError naming the graph when its shapes cannot be inferred (onnxruntime's symbolic
    shape inference stops on some graphs, FLUX's transformer among them)."""
    if bundle.manifest.components[component].segments:  # a segment's inputs have no sizes to infer from
        raise ValueError(f"{component} graph: exported in segments, whose MACs are not counted")
    try:
        return count_macs(bundle.component_path(component), shapes)["total"]
    except ImportError:
        raise
    except Exception as exc:
        detail = (str(exc).splitlines() or [""])[0]
        raise ValueError(f"{component} graph: {type(exc).__name__}{': ' + detail if detail else ''}") from exc


def _text_tokens(manifest) -> tuple[list[tuple[str, int]], int]:
    """Each text encoder's (component, tokens per call) and the denoiser's text tokens, as the runtime feeds them."""
    c = manifest.conditioning
    joint = c.get("joint")
    if joint is None and manifest.denoiser == "unet":
        return [(e["component"], e["tokenizer"]["max_length"]) for e in manifest.text_encoders], manifest.tokenizer[
            "max_length"
        ]
    if joint not in ("sd3", "flux"):  # SANA's are the prompt's (_sana_shapes); PixArt's not counted yet
        raise ValueError(f"the {manifest.family} family's text token counts are not in its manifest")
    long = int(c["max_sequence_length"])
    # T5 (the encoder without a pooled output) runs on max_sequence_length tokens, the CLIPs on their own length
    encoders = [
        (e["component"], e["tokenizer"]["max_length"] if "pooled" in e else long) for e in manifest.text_encoders
    ]
    # SD3: CLIP's tokens, then T5's (zeros without T5, or one zero token where the transformer counts them); FLUX:
    # T5's alone
    clip = manifest.text_encoders[0]["tokenizer"]["max_length"]
    counted = counts_text(manifest.components[manifest.denoiser])
    return encoders, (clip + (1 if counted else long) if joint == "sd3" else long)


def _guidance_batch(manifest) -> int:
    """The denoiser's batch per image: 2 with classifier-free guidance; 1 where guidance is embedded (LCM, FLUX,
    SANA-Sprint) or off, as the runtime's denoisers decide."""
    c = manifest.conditioning
    embedded = manifest.guidance_embedding_dim is not None or c.get("joint") == "flux" or c.get("guidance_embedding")
    return 2 if manifest.defaults["guidance"] > 1 and not embedded else 1


def _resolve(inputs, dims: dict, component: str) -> dict[str, tuple]:
    """A graph's input shapes with its named dimensions filled in; ValueError for a name not in `dims`."""
    shapes = {}
    for spec in inputs:
        unknown = [d for d in spec.shape if isinstance(d, str) and d not in dims]
        if unknown:
            raise ValueError(f"{component} input {spec.name}: dimension {unknown[0]!r} has no known size")
        shapes[spec.name] = tuple(dims[d] if isinstance(d, str) else int(d) for d in spec.shape)
    return shapes


def _macs_in_worker(bundle, size: int, guidance_batch: int, decoder: str, notes: list | None = None) -> dict | None:
    """_graph_macs in a process of its own: counting a full-size graph took the harness to 5.8 GiB, and on
    Linux every worker spawned after that reported at least that as its own peak (workers.peak_rss_bytes)."""
    try:
        out = _worker("macs", {"bundle": str(bundle.path), "size": size, "batch": guidance_batch, "decoder": decoder})
    except RuntimeError as exc:  # the counting process died (out of memory, say): never lose the timings
        out = {"macs": None, "why": str(exc)}
    if out.get("why"):  # shape inference fails on some graphs: report, never lose the timings
        log.warning("MACs not counted for %s: %s", bundle.path, out["why"])
        if notes is not None:  # the report says so: no achieved-compute rows rather than invented ones
            notes.append(f"MACs not counted for {bundle.path.name} at {size}px: {out['why']}")
    return out["macs"]


def _hidden(manifest) -> int:
    spec = next(t for t in manifest.components["unet"].inputs if t.name == "encoder_hidden_states")
    return int(spec.shape[-1])


def _peak_key(provider: str, dtype: str) -> str:
    return f"{provider}/{dtype}"


def _reference_dtype(precision: str, gpu: bool, half_on_gpu: bool) -> str:
    """Which measured reference a stage is held to: on GPUs the denoiser's precision (fp16 or fp32); on CPUs the
    int8 MatMul for quantised graphs (their kernels' own ceiling, well above fp32's), else fp32."""
    if gpu:
        return "float16" if half_on_gpu else "float32"
    return "int8" if precision in INT_PRECISIONS else "float32"


def _stage_graphs(decoder: str, denoiser: str = "unet") -> dict[str, str]:
    """Each stage's graph: the first text encoder's, the denoiser's (UNet or transformer) and the timed decoder's."""
    return {"text_encoder": "text_encoder", "unet": denoiser, "vae_decoder": DECODERS[decoder]}


def _references(cfg: BenchConfig, bundles, chosen: dict, threads: int, notes: list) -> dict:
    """The measured MatMul references this run needs, per provider and dtype, each with the ISA's theoretical
    peak where the provider computes on this CPU and the flags and clock can be read."""
    from edgediff.runtime.session import physical_cores

    from .machine import theoretical_peak
    from .peak import PeakReference

    quantised = any(
        b.manifest.components[g].precision in INT_PRECISIONS
        for b in bundles
        for g in _stage_graphs(cfg.decoder, b.manifest.denoiser).values()
        if g in b.manifest.components
    )
    refs = {}
    for provider in cfg.providers:
        info = chosen[provider]
        if info.runtime != "onnxruntime":  # the reference is an onnxruntime graph: it would time the CPU provider
            notes.append(
                f"no MatMul reference on {provider}: it runs {info.runtime}, which the reference does not time"
            )
            continue
        on_cpu = info.ort_name == "CPUExecutionProvider"
        dtypes = ("float32", "float16") if info.gpu else ("float32", "int8") if quantised and on_cpu else ("float32",)
        for dtype in dtypes:
            theory = theoretical_peak(dtype, min(threads, physical_cores())) if on_cpu else None
            ref = PeakReference(threads, info.ort_name, dtype, theory)
            try:
                ref.sample("before")
            except ImportError:  # building the one-node graph needs onnx
                notes.append("MatMul reference not measured: the onnx package is not installed")
                return {}
            except Exception as exc:  # a provider without this dtype's MatMul: hold stages to fp32's instead
                if dtype == "float32":
                    raise
                notes.append(f"{dtype} MatMul reference not measured on {provider}: {str(exc).splitlines()[0]}")
                continue
            refs[_peak_key(provider, dtype)] = ref
    return refs


def _achieved(macs: dict, stages: dict, precisions: dict, refs: dict, provider: str, gpu: bool, half: bool) -> dict:
    """Each stage's MACs per second, against the measured reference (best over the run) and the ISA's
    theoretical peak; above 100% of the latter the measurement is off, and the report says so."""
    out = {}
    for s in STAGES:
        rate = macs[s] / stages["unet_call" if s == "unet" else s]["median"]
        key = _peak_key(provider, _reference_dtype(precisions.get(s, "fp32"), gpu, half))
        if key not in refs:  # no int8 reference (another provider, or it failed): fp32's
            key = _peak_key(provider, "float32")
        ref = refs.get(key)
        measured = ref.summary() if ref else None
        theory = (measured or {}).get("theoretical")
        of_theory = rate / theory["macs_per_second"] if theory else None
        out[s] = {
            "macs": macs[s],
            "macs_per_second": rate,
            "reference": key if ref else None,
            "fraction_of_peak": rate / measured["macs_per_second"] if measured else None,
            "fraction_of_theoretical": of_theory,
            "above_theoretical": bool(of_theory and of_theory > 1),
        }
    return out


def _ran(system: str, bundle, cfg: BenchConfig, half_on_gpu: bool) -> dict:
    """What a row's system ran: its model, its denoiser's precision and decoder (peers: the source, in fp32 or fp16 on a
    GPU, through the source's own full VAE)."""
    if system == "edgediff":
        components = bundle.manifest.components
        decoder = DECODERS[cfg.decoder]
        return {
            "model": bundle.path.name,
            "precision": components[bundle.manifest.denoiser].precision,
            "decoder": cfg.decoder,
            "decoder_precision": components[decoder].precision if decoder in components else None,
        }
    half = system == "diffusers" and half_on_gpu  # optimum runs its own fp32 export everywhere
    ran = {
        "model": Path(cfg.source).name if cfg.source else None,
        "precision": "fp16" if half else "fp32",
        "decoder": "full",
        "decoder_precision": "fp16" if half else "fp32",
    }
    if system == "diffusers" and _without_instruction(cfg, bundle):
        ran["prompt"] = "without the instruction"
    return ran


def _without_instruction(cfg: BenchConfig, bundle) -> bool:
    """Whether the diffusers peer encodes this bundle's prompts without SANA's complex-human instruction."""
    return not cfg.peer_instruction and bundle.manifest.conditioning.get("joint") == "sana"


def _quality_reference(cfg, ref_bundle, steps: int, size: int, threads: int, images: Path, cache: dict) -> Path:
    """The reference bundle's warm images at this size and step count, on the CPU provider with default
    options: run once per (size, steps), from the same latents and prompt as every system."""
    key = (size, steps)
    if key not in cache:
        path = images / f"reference-{ref_bundle.path.name}-{steps}step-{size}px.npy"
        options = RuntimeOptions(provider="cpu", threads=threads)
        args = {
            "bundle": str(ref_bundle.path),
            "provider": "cpu",
            "steps": steps,
            "size": size,
            "repeat": cfg.repeat,
            "warmup": cfg.warmup,
            "threads": threads,
            "options": options.to_dict(),
            "images_to": str(path),
        }
        _worker("edgediff", args)
        cache[key] = path
    return cache[key]


def _unlike_latents(reference, bundle) -> str | None:
    """Why the reference's images do not start from the bundle's latents (another latent shape), or None."""
    a, b = reference.manifest, bundle.manifest
    if (a.latent_channels, a.vae_scale_factor) != (b.latent_channels, b.vae_scale_factor):
        return (
            f"the reference's latents ({a.latent_channels} channels, 1/{a.vae_scale_factor} scale) are not "
            f"this bundle's ({b.latent_channels}, 1/{b.vae_scale_factor}): not the same starting point"
        )
    return None


def _peer_noise(manifest, steps: int) -> str | None:
    """Why a peer's images differ from the reference's by noise alone (its sampler re-noises between steps, and a
    peer draws that noise from its own generator), or None. The tests compare them with the noise replayed."""
    from edgediff.runtime.schedulers import make_sampler

    sampler = make_sampler(manifest.scheduler["name"], manifest.scheduler["config"], manifest.prediction_type)
    if steps > 1 and sampler.stochastic:  # one step ends at sigma 0: nothing is re-noised
        return (
            f"the {sampler.name} sampler re-noises between steps, and this peer draws that noise from its own "
            "generator: its images differ by that noise, not by its work"
        )
    return None


def _score(sysrow: dict, images: str | None, reference: Path, shipped: bool, notes: list) -> None:
    """The row's quality against the reference images, in place (sysrow["quality"])."""
    import numpy as np

    from .quality import prompt_adherence, score_images
    from .workers import PROMPT

    if not images:
        return
    ours, ref = np.load(images), np.load(reference)
    try:
        quality = score_images(ours, ref)
    except ValueError as exc:  # another image size or latent shape: no like-for-like comparison
        sysrow["quality"] = {"why": str(exc)}
        return
    quality["images"] = Path(images).name
    quality["below_floor"] = bool(quality["psnr"] < PSNR_FLOOR_DB)
    if shipped:
        try:
            quality["adherence"] = prompt_adherence(ours, PROMPT)
        except ImportError:
            note = "adherence not scored: the shapes checker is in training/, only in a source checkout"
            if note not in notes:
                notes.append(note)
    sysrow["quality"] = quality


def _mark_faster_below_floor(results: list[dict]) -> None:
    """A row below the PSNR floor that is faster than every row at or above it (same size, steps and
    provider) bought its speed with quality: marked, so that no speed claim rests on it unseen."""
    groups: dict[tuple, list[dict]] = {}
    for row in results:
        for sysrow in row["systems"]:
            if "psnr" in (sysrow.get("quality") or {}):
                groups.setdefault((row["size"], row["steps"], row["provider"]), []).append(sysrow)
    for rows in groups.values():
        kept = [r["stages"]["total"]["median"] for r in rows if not r["quality"]["below_floor"]]
        for r in rows:
            q = r["quality"]
            q["faster_below_floor"] = bool(q["below_floor"] and kept and r["stages"]["total"]["median"] < min(kept))


def run_bench(cfg: BenchConfig, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    from edgediff.runtime import Bundle
    from edgediff.runtime.providers import resolve
    from edgediff.runtime.session import physical_cores

    from .machine import describe

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = cfg.threads or physical_cores()
    notes, peers = [], []
    for peer in cfg.compare:
        if peer not in PEERS:
            raise ValueError(f"unknown peer {peer!r}; choose from {', '.join(PEERS)}")
        why = peer_available(peer) or (
            None if cfg.source else f"{peer} skipped: --source (the diffusers folder) not given"
        )
        (notes.append(why) if why else peers.append(peer))
    chosen = {p: resolve(p).provider for p in cfg.providers}
    bundles = [Bundle.open(b, verify="size") for b in cfg.bundles]
    if "diffusers" in peers and any(_without_instruction(cfg, b) for b in bundles):
        notes.append(
            "diffusers encoded SANA's prompts without its complex-human instruction: less work than its default, so "
            "each ratio to it is a lower bound whatever the source's tokenizer makes of the instruction"
        )
    if "optimum" in peers and any(b.manifest.denoiser != "unet" for b in bundles):
        # optimum's pipelines here are SD and SDXL's (workers._optimum_class): a transformer source has none
        peers.remove("optimum")
        notes.append(
            "optimum skipped: it is run for UNet families (SD, SDXL) only, and a bundle here has a transformer"
        )
    # the MatMul references, sampled before, between and after the systems: one timing taken while the machine
    # was busy made every stage read as far above "peak"
    refs = _references(cfg, bundles, chosen, threads, notes)
    ref_bundle = Bundle.open(cfg.quality, verify="size") if cfg.quality else None
    images_dir = out / "images"
    if ref_bundle:
        images_dir.mkdir(exist_ok=True)
        reference_images: dict[tuple, Path] = {}
    configs = [
        (b, p, st, sz or b.manifest.defaults["height"])
        for b in bundles
        for p in cfg.providers
        for st in cfg.steps
        for sz in cfg.sizes
    ]
    optimum_dirs = {}
    if "optimum" in peers:
        digest = hashlib.sha256(str(Path(cfg.source).resolve()).encode()).hexdigest()[:10]
        optimum_dir = out / f"optimum-export-{digest}"
        try:
            if not (optimum_dir / "model_index.json").exists():
                _worker("prepare-optimum", {"source": cfg.source, "optimum_dir": str(optimum_dir)})
            optimum_dirs[cfg.source] = str(optimum_dir)
        except WorkerFailed as exc:  # no export for optimum to run: the peer goes, the bench goes on
            peers.remove("optimum")
            notes.append(f"optimum skipped: exporting the source for it failed ({exc.last})")

    results, pending = [], []
    # A peer's work depends on the source, steps, size and the bundle's sampler and guidance, not on the
    # bundle's precision: bundles of one source (fp32, int8, ...) share their peers' runs (or their failure).
    peer_runs: dict[tuple, tuple[str, list[dict] | dict]] = {}
    macs_by_graph: dict[tuple, dict | None] = {}  # the step count changes the calls, not the MACs per call
    bar = tqdm(total=len(configs) * (1 + len(peers)) * cfg.rounds, desc="bench", unit="process", disable=not progress)
    first_round = True
    for index, (bundle, provider, steps, size) in enumerate(configs):
        m = bundle.manifest
        # peers run where edgediff runs; on a GPU in the bundle's precision (fp16 or fp32), part of their work too
        on_gpu = chosen[provider].gpu
        half_on_gpu = on_gpu and m.components[m.denoiser].precision == "fp16"
        # peers read provider and threads; edgediff's worker reads its whole RuntimeOptions
        args = {
            "bundle": str(bundle.path),
            "provider": provider,
            "steps": steps,
            "size": size,
            "repeat": cfg.repeat,
            "warmup": cfg.warmup,
            "threads": threads,
            "source": cfg.source,
            "optimum_dir": optimum_dirs.get(cfg.source),
            "peer_gpu": on_gpu,
            "peer_half": half_on_gpu,
            "peer_instruction": cfg.peer_instruction,
            "options": cfg.runtime.replace(provider=provider, threads=threads).to_dict(),
        }
        stem = f"{index:02d}-{bundle.path.name}-{provider}-{steps}step-{size}px"
        failed: dict[str, dict] = {}  # system -> its failure: its later rounds are not run
        if cfg.graph_cache:  # a folder of this run's own, filled by one start that is not measured
            args["cache_dir"] = str(out / "graph-cache")
            try:
                _worker("edgediff", {**args, "repeat": 1, "warmup": 0})
            except WorkerFailed as exc:
                failed["edgediff"] = _failure(exc, out, f"{stem}-edgediff-graph-cache")
        reference = (
            _quality_reference(cfg, ref_bundle, steps, size, threads, images_dir, reference_images)
            if ref_bundle
            else None
        )
        work_key = (steps, size, json.dumps(m.scheduler, sort_keys=True), m.defaults["guidance"], provider, half_on_gpu)
        reused = {s: peer_runs[(s, *work_key)] for s in peers if (s, *work_key) in peer_runs}
        procs: dict[str, list[dict]] = {s: [] for s in ("edgediff", *peers) if s not in reused}
        for round_ in range(cfg.rounds):  # A B A B: drift hits every system alike
            if not first_round:
                for ref in refs.values():
                    ref.sample("between")
            first_round = False
            for system in procs:
                bar.update()
                if system in failed:
                    continue
                bar.set_postfix_str(f"{bundle.path.name} {provider} {steps} step {size}px {system}")
                # the first process of each system saves its warm images (the same latents in every round)
                keep = ref_bundle is not None and round_ == 0
                images_to = str(images_dir / f"{stem}-{system}.npy") if keep else None
                try:
                    procs[system].append(_worker(system, {**args, "images_to": images_to}))
                except WorkerFailed as exc:
                    failed[system] = _failure(exc, out, f"{stem}-{system}")
        bar.update(len(reused) * cfg.rounds)
        outcomes = {s: failed.get(s, procs.get(s)) for s in ("edgediff", *peers)}
        for system in peers:
            if system in reused:
                outcomes[system] = reused[system][1]
            else:
                peer_runs[(system, *work_key)] = (str(bundle.path), outcomes[system])
        rows = [_row(s, outcomes[s]) for s in ("edgediff", *peers)]
        macs = None
        if "failed" not in rows[0]:  # no timings of ours to rate against the graphs' MACs
            cfg_batch = _guidance_batch(m)
            graph_key = (str(bundle.path), size, cfg_batch)
            if graph_key not in macs_by_graph:
                macs_by_graph[graph_key] = _macs_in_worker(bundle, size, cfg_batch, cfg.decoder, notes)
            macs = macs_by_graph[graph_key]
        unlike = _unlike_latents(ref_bundle, bundle) if ref_bundle else None
        noise = _peer_noise(m, steps) if ref_bundle else None
        for row in rows:
            row["ran"] = _ran(row["system"], bundle, cfg, half_on_gpu)
            if "failed" in row:
                continue
            if unlike:
                row["quality"] = {"why": unlike}
            elif noise and row["system"] != "edgediff":
                row["quality"] = {"why": noise}
            elif reference is not None:
                _score(row, outcomes[row["system"]][0].get("images"), reference, is_shipped_model(bundle.path), notes)
        for row in rows[1:]:
            if row["system"] in reused:  # measured once, beside the first bundle of this source
                row["measured_with"] = reused[row["system"]][0]
        graphs = _stage_graphs(cfg.decoder, m.denoiser)
        precisions = {s: m.components[g].precision for s, g in graphs.items() if g in m.components}
        if macs:  # rated once the run is over, against the references' best sample
            pending.append((rows[0], macs, precisions, provider, on_gpu, half_on_gpu))
        results.append(
            {
                "bundle": str(bundle.path),
                "family": m.family,
                "denoiser": m.denoiser,  # the component behind the "unet" stage keys: "unet" or "transformer"
                "precision": sorted({c.precision for c in m.components.values()}),
                "component_precision": {name: c.precision for name, c in m.components.items()},
                "bundle_bytes": bundle.size_on_disk,
                "provider": provider,
                "steps": steps,
                "size": size,
                "guidance": m.defaults["guidance"],
                "mode": cfg.mode,
                "systems": rows,
            }
        )
    bar.close()
    for ref in refs.values():
        ref.sample("after")
    for ours, macs, precisions, provider, on_gpu, half in pending:
        ours["achieved"] = _achieved(macs, ours["stages"], precisions, refs, provider, on_gpu, half)
    if ref_bundle:
        _mark_faster_below_floor(results)
    peaks = {key: ref.summary() for key, ref in refs.items()}
    noisy = sorted(key for key, p in peaks.items() if p["noisy"])
    return {
        "schema_version": RESULTS_SCHEMA_VERSION,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(),
        "threads": threads,
        "peak": peaks.get(_peak_key(cfg.providers[0], "float32")),
        "peaks": peaks,
        # the measured reference moved by more than NOISE_LIMIT somewhere: the machine's speed changed under the run
        "noisy": bool(noisy),
        **(
            {
                "quality_reference": {
                    "bundle": str(ref_bundle.path),
                    "provider": "cpu",
                    "floor_db": PSNR_FLOOR_DB,
                    "shipped_model": is_shipped_model(ref_bundle.path),
                }
            }
            if ref_bundle
            else {}
        ),
        "config": asdict(cfg),
        "notes": notes,
        "results": results,
    }


def merge(files: list[str]) -> dict:
    """Several machines' results.json in one: every row keeps its machine."""
    merged = {"schema_version": RESULTS_SCHEMA_VERSION, "merged_from": [], "results": [], "notes": []}
    references = []
    for name in files:
        data = json.loads(Path(name).read_text())
        if data.get("schema_version", 0) > RESULTS_SCHEMA_VERSION:
            raise ValueError(f"{name}: results schema {data.get('schema_version')} is newer than this edgediff")
        rows = data.get("results", [])
        # a noisy run stays marked once merged, with how far each of its references moved
        moved = {k: p["spread"] for k, p in (data.get("peaks") or {}).items() if p and p.get("noisy")}
        own = {"file": name, "machine": data["machine"], "date": data["date"]}
        sources = data.get("merged_from") or [{**own, **({"noisy": moved} if moved else {})}]
        merged["merged_from"].extend(sources)
        for row in rows:
            merged["results"].append({**row, "machine": row.get("machine", data.get("machine"))})
        merged["notes"].extend(data.get("notes", []))
        if data.get("quality_reference"):
            references.append(data["quality_reference"])
    if references and all(r == references[0] for r in references):  # one reference: its floor and name hold
        merged["quality_reference"] = references[0]
    return merged
