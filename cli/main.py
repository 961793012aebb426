"""The `edgediff` command: a thin layer over the library (as huggingface_hub's CLI is over its API).

Errors print as one line and exit non-zero; set EDGEDIFF_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import sys
import warnings

import click

try:
    from edgediff.runtime.errors import EdgediffError
except ModuleNotFoundError as exc:  # no onnxruntime build installed: the runtime's message says which to get
    if exc.name != "onnxruntime":
        raise
    sys.exit(f"error: {exc}")

EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(EXIT_ERROR)


class _Group(click.Group):
    """Turns our typed errors (and a few of the environment's) into one line and an exit code."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (EdgediffError, ImportError, OSError, ValueError) as exc:
            if os.environ.get("EDGEDIFF_DEBUG"):
                raise
            if isinstance(exc, ImportError) and exc.name != "onnxruntime":  # the runtime's own says which build
                _fail(f"{exc} (the export commands need `pip install 'edgediff[cpu,export]'`)")
            _fail(str(exc))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=_Group)
@click.option("-v", "--verbose", is_flag=True, help="Log provider choice and timings.")
def cli(verbose: bool) -> None:
    """edgediff: fast, small, offline text-to-image."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(name)s: %(message)s")
    warnings.simplefilter("default")
    warnings.formatwarning = lambda msg, cat, *a, **k: f"warning: {msg}\n"


@cli.command()
@click.argument("prompt")
@click.option("--model", "model", default=None,
              help="Bundle folder, or a name from `edgediff list` (default: the shipped model).")
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the bundle's).")
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the bundle's).")
@click.option("--seed", type=int, default=None, help="Seed; image i of a batch uses seed + i.")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--negative-prompt", default=None)
@click.option("--sampler", default=None, help="euler, euler_ancestral, ddim, lcm or tcd (default: the bundle's).")
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option("--provider", default="auto", show_default=True, help="auto, cpu, cuda, directml, coreml, openvino, qnn, ...")
@click.option("--fallback", is_flag=True, help="Fall back to the best available provider instead of failing.")
@click.option("--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
              help="onnxruntime provider option over edgediff's (repeatable), e.g. cudnn_conv_algo_search=EXHAUSTIVE.")
@click.option("--cuda-graph", is_flag=True,
              help="CUDA/TensorRT: capture each graph's kernel launches once per image size and replay them.")
@click.option("--image", "init_image", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Image-to-image: start from this image (its size, rounded to 8, unless --width/--height).")
@click.option("--strength", type=float, default=None,
              help="Image-to-image: how much to change, 0 keeps the image, 1 ignores it (default 0.8; inpainting 1.0).")
@click.option("--mask", "mask", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Inpainting: white areas of this image are repainted (with --image).")
@click.option("--outpaint", default=None, metavar="LEFT,TOP,RIGHT,BOTTOM",
              help="Outpainting: grow --image by these many pixels per side and paint the new area.")
@click.option("--decoder", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="tiny: the bundle's AutoencoderTiny decoder (fast, slightly softer).")
@click.option("--decode-tile", type=int, default=None, help="Decode in tiles of this many latent cells (bounded memory).")
@click.option("--low-memory", is_flag=True, help="Keep one graph in memory at a time (slower, smallest peak).")
@click.option("--compute-units", type=click.Choice(["all", "cpu_and_ne", "cpu_and_gpu", "cpu_only"]), default="all",
              show_default=True, help="Core ML bundles: where Core ML may run them.")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Keep onnxruntime's optimised graphs in the per-user cache (faster second start).")
@click.option("-o", "--output", default="edgediff.png", show_default=True, type=click.Path(),
              help="Image file; with --num-images N, files get _0.._N-1 suffixes.")
def generate(prompt, model, steps, guidance, seed, width, height, negative_prompt, sampler, num_images, provider,
             fallback, provider_options, cuda_graph, init_image, strength, mask, outpaint, decoder, decode_tile, low_memory, compute_units, cache, output):
    """Generate an image from PROMPT."""
    from pathlib import Path

    from tqdm.auto import tqdm

    from edgediff.runtime import Pipeline
    from edgediff.runtime.catalog import resolve_bundle
    from edgediff.runtime.image import check_writable, save_image
    from edgediff.runtime.providers import parse_options

    keep_unmasked = False
    if outpaint:
        from edgediff.runtime.inpaint import outpaint_canvas

        if not init_image or mask:
            raise click.UsageError("--outpaint needs --image (and makes its own mask)")
        try:
            margins = [int(v) for v in outpaint.split(",")]
            if len(margins) != 4:
                raise ValueError
        except ValueError:
            raise click.UsageError("--outpaint takes four integers: LEFT,TOP,RIGHT,BOTTOM") from None
        init_image, mask = outpaint_canvas(init_image, *margins)
        keep_unmasked = True  # the original pixels stay exactly as they were
    elif mask and not init_image:
        raise click.UsageError("--mask needs --image")
    targets = [Path(output)] if num_images == 1 else [
        Path(output).with_name(f"{Path(output).stem}_{i}{Path(output).suffix}") for i in range(num_images)]
    for target in targets:  # fail before minutes of work, not after
        check_writable(target)
    pipe = Pipeline.from_bundle(resolve_bundle(model), provider=provider, sampler=sampler, fallback=fallback,
                                low_memory=low_memory, decoder=decoder, cache=cache, compute_units=compute_units,
                                provider_options=parse_options(provider_options), cuda_graph=cuda_graph)
    bars = []  # created at the first step, so that argument errors print without a bar

    def progress(event):
        if not bars:
            bars.append(tqdm(total=event.total, desc="denoising", unit="step"))
        bars[0].update(1)

    result = pipe(prompt, negative_prompt=negative_prompt, num_inference_steps=steps, guidance_scale=guidance,
                  height=height, width=width, seed=seed, num_images_per_prompt=num_images, callback=progress,
                  decode_tile=decode_tile, image=init_image, strength=strength, mask_image=mask,
                  keep_unmasked=keep_unmasked or bool(mask))
    for bar in bars:
        bar.close()
    for image, target, image_seed in zip(result.images, targets, result.seeds):
        save_image(image, target)
        click.echo(f"{target} (seed {image_seed})")


@cli.command("list")
def list_():
    """List the bundles edgediff can find: the shipped model and those in the per-user models folder."""
    from edgediff.runtime.catalog import list_bundles, models_dir

    click.echo(f"models folder: {models_dir()} (set EDGEDIFF_MODELS_DIR to change)")
    for e in list_bundles():
        if e.manifest is None:
            click.echo(f"{e.name:<20}unreadable: {e.problem}")
            continue
        m = e.manifest
        precisions = "/".join(sorted({c.precision for c in m.components.values()}))
        decoders = "full+tiny" if "vae_decoder_tiny" in m.components else "full"
        click.echo(f"{e.name:<20}{m.family:<10}{precisions:<10}{m.defaults['width']}x{m.defaults['height']:<6}"
                   f"{decoders:<11}{e.size / 2**20:8.1f} MiB  {e.path}")


@cli.command()
@click.argument("bundle", default="shipped")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check every file's sha256.")
def info(bundle, verify):
    """Show what a bundle's manifest says: family, sampler, defaults, components, sizes (BUNDLE: folder or name)."""
    from edgediff.runtime import Bundle
    from edgediff.runtime.catalog import resolve_bundle

    b = Bundle.open(resolve_bundle(bundle), verify="full" if verify else "size")
    m = b.manifest
    click.echo(f"bundle        {b.path}")
    click.echo(f"family        {m.family} ({m.prediction_type})")
    click.echo(f"sampler       {m.scheduler['name']} ({m.scheduler['config'].get('timestep_spacing')} spacing)")
    d = m.defaults
    click.echo(f"defaults      {d['steps']} steps, guidance {d['guidance']}, {d['width']}x{d['height']}")
    click.echo(f"source        {m.provenance.get('source', '?')} ({m.provenance.get('date', '?')})")
    text = " + ".join(f"{e['component']} ({e['output']}" + (f", pooled {e['pooled']})" if e.get("pooled") else ")")
                      for e in m.text_encoders)
    click.echo(f"text          {text}" + ("; size/crop conditions" if m.conditioning.get("time_ids") else ""))
    for name, comp in m.components.items():
        shapes = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in comp.inputs)
        click.echo(f"{name:<16}{comp.precision:<6}{comp.size / 2**20:9.1f} MiB  {shapes}")
    click.echo(f"total         {b.size_on_disk / 2**20:.1f} MiB on disk" + ("; checksums ok" if verify else ""))


@cli.command()
def families():
    """List the model families export detects and the runtime defaults each bundle of them gets."""
    from edgediff.models.registry import FAMILIES

    click.echo(f"{'family':<16}{'sampler':<17}{'steps':>5}{'guidance':>10}  description")
    for f in FAMILIES:
        guidance = "embedded" if f.guidance_embedding else f"{f.default_guidance:g}"
        click.echo(f"{f.name:<16}{f.sampler:<17}{f.default_steps:>5}{guidance:>10}  {f.description}")


@cli.command()
@click.option("--model", default=None,
              help="Also open this bundle (folder or name) and show where each of its graphs runs.")
@click.option("--provider", default="auto", show_default=True, help="With --model: the provider to open it on.")
@click.option("--fallback", is_flag=True, help="With --model: fall back to the best available provider.")
@click.option("--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
              help="With --model: onnxruntime provider option over edgediff's (repeatable).")
def providers(model, provider, fallback, provider_options):
    """List the execution providers edgediff knows, which this onnxruntime offers, and what `auto` picks;
    with --model, where each of that bundle's graphs runs."""
    import onnxruntime as ort

    from edgediff.runtime import ort_builds
    from edgediff.runtime import providers as prov

    have = prov.available()
    auto = prov.resolve("auto").provider.name
    click.echo(f"onnxruntime {ort.__version__} ({ort.get_device()}); auto order: {', '.join(prov.AUTO_ORDER)}")
    clash = ort_builds.clash()
    if clash:
        click.echo(f"warning: {clash}", err=True)
    click.echo(f"{'name':<10}{'status':<19}{'precisions':<16}options / how to get it")
    for name, p in prov.REGISTRY.items():
        status = "available" if name in have else ("-" if p.on_this_platform() else "not on this OS")
        detail = ", ".join(f"{k}={v}" for k, v in p.provider_options().items()) if name in have else p.install
        if name in have and name in prov.AUTO_ORDER and not p.auto_eligible():
            detail += " (auto skips it on this machine)"
        click.echo(f"{name:<10}{status + (' <- auto' if name == auto else ''):<19}{'/'.join(p.precisions):<16}{detail}")
    if model is not None:
        _show_placement(model, provider, fallback, prov.parse_options(provider_options))


def _show_placement(model: str, provider: str, fallback: bool, options: dict) -> None:
    """Opens the bundle as `generate` would and prints what runs where: the issue's 'any graph that fell back
    to the CPU is shown', before a minutes-long generation finds out."""
    from edgediff.runtime import Pipeline
    from edgediff.runtime import providers as prov
    from edgediff.runtime.catalog import resolve_bundle

    path = resolve_bundle(model)
    with Pipeline.from_bundle(path, provider=provider, fallback=fallback, provider_options=options) as pipe:
        report = pipe.provider_report()
    short = {p.ort_name: name for name, p in prov.REGISTRY.items()}
    asked = f" (asked for {report['requested']}: not available here)" if report["fell_back"] else ""
    options_text = ", ".join(f"{k}={v}" for k, v in report["options"].items()) or "no options"
    click.echo(f"\n{path}: {report['provider']}{asked}; {options_text}")
    click.echo(f"  {'graph':<16}{'runs on':<22}{'graph cache':<13}{'I/O binding':<13}captured")
    for name, graph in report["graphs"].items():
        runs_on = short.get(graph["providers"][0], graph["providers"][0])
        if graph["cpu_fallback"]:
            runs_on += f" ({report['provider']} refused it)"
        click.echo(f"  {name:<16}{runs_on:<22}{graph['cache']:<13}{graph['io_binding']:<13}{graph['cuda_graph']}")


@cli.group()
def cache():
    """The per-user cache of optimised graphs (README, "Platforms and execution providers")."""


@cache.command("list")
def cache_list():
    """Show what the graph cache holds, least recently used first, and its size limit."""
    from datetime import datetime

    from edgediff.runtime import graph_cache

    folder, limit = graph_cache.cache_dir(), graph_cache.cache_limit()
    found = graph_cache.entries(folder)
    for entry in found:
        used = datetime.fromtimestamp(entry.last_used).strftime("%Y-%m-%d %H:%M")
        click.echo(f"{entry.size / 2**20:10.1f} MiB  {used}  {entry.name}")
    total = sum(e.size for e in found)
    click.echo(f"{len(found)} entries, {total / 2**30:.2f} GiB of {limit / 2**30:.1f} GiB "
               f"({graph_cache.LIMIT_ENV}) in {folder}")


@cache.command("clear")
def cache_clear():
    """Delete every cached graph (the next start of each bundle optimises its graphs again)."""
    from edgediff.runtime import graph_cache

    folder = graph_cache.cache_dir()
    count, size = graph_cache.clear(folder)
    click.echo(f"removed {count} entries ({size / 2**20:.1f} MiB) from {folder}")


@cli.command()
@click.argument("source")
@click.argument("out", type=click.Path())
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "int8-static", "int4"]), default="fp32",
              show_default=True, help="int8: dynamic int8 MatMul/Gemm; int8-static: calibrated QDQ int8 UNet "
              "(convolutions too); int4: 4-bit weight-only MatMul. The VAE stays fp32.")
@click.option("--keep", default="none", show_default=True,
              help="int8/int4: blocks left in fp32: none, auto (sensitivity pass), or comma-separated block names.")
@click.option("--calibration-prompts", type=click.Path(exists=True, dir_okay=False), default=None,
              help="int8/int4: a text file of prompts (one per line) to calibrate on.")
@click.option("--height", type=int, default=None, help="Default height recorded in the bundle (and checked at).")
@click.option("--width", type=int, default=None)
@click.option("--family", default=None, help="Override family detection (see models/registry.py).")
@click.option("--default-steps", type=int, default=None, help="Steps the bundle defaults to (default: the family's).")
@click.option("--default-guidance", type=float, default=None, help="Guidance the bundle defaults to (default: the family's).")
@click.option("--tiny-decoder", default=None,
              help="AutoencoderTiny folder or hub id to add as the fast decoder (e.g. madebyollin/taesd).")
@click.option("--vae", default=None,
              help="AutoencoderKL folder or hub id replacing the model's VAE (e.g. madebyollin/sdxl-vae-fp16-fix "
                   "for fp16 SDXL bundles).")
@click.option("--optimize", type=click.Choice(["cpu", "gpu"]), is_flag=False, flag_value="cpu", default=None,
              help="Apply onnxruntime's transformer fusions (checked against PyTorch); `--optimize gpu` adds the "
                   "CUDA-only ones (checked on CUDA; the bundle then needs the CUDA provider).")
@click.option("--lora", "loras", multiple=True, metavar="FILE[:SCALE]",
              help="LoRA safetensors fused into the weights before export (repeatable; scale defaults to 1).")
@click.option("--target", type=click.Choice(["onnx", "coreml"]), default="onnx", show_default=True,
              help="coreml: ML program packages (fp16, static shapes) for Macs and the Neural Engine.")
@click.option("--palettize", type=click.Choice(["8", "6", "4"]), default=None,
              help="coreml: k-means palettised weights with this many bits.")
@click.option("--attention", type=click.Choice(["original", "sliced", "split_einsum"]), default="original",
              show_default=True, help="UNet attention: sliced computes one head at a time (lower peak memory, same "
                                      "result); split_einsum (coreml): per head in the Neural Engine's layout.")
@click.option("--overwrite", is_flag=True, help="Replace OUT once the new bundle is complete.")
def export(source, out, precision, keep, calibration_prompts, height, width, family, default_steps, default_guidance,
           tiny_decoder, vae, optimize, loras, target, palettize, attention, overwrite):
    """Export a diffusers model (folder or hub id) SOURCE into a bundle at OUT."""
    from edgediff.export import export_bundle
    from edgediff.export.lora import parse_lora

    if target == "coreml":
        from edgediff.export.coreml import export_coreml

        if precision != "fp32" or tiny_decoder or optimize or keep != "none" or loras or vae:
            raise click.UsageError("--target coreml is fp16 (or --palettize); --precision, --keep, --tiny-decoder, "
                                   "--vae, --optimize and --lora apply to ONNX bundles")
        path = export_coreml(source, out, height=height, width=width, palettize=int(palettize) if palettize else None,
                             attention=attention, family=family, overwrite=overwrite, default_steps=default_steps,
                             default_guidance=default_guidance)
        click.echo(str(path))
        return
    if palettize or attention == "split_einsum":
        raise click.UsageError("--palettize and --attention split_einsum apply to --target coreml")
    prompts = None
    if calibration_prompts:
        prompts = [line.strip() for line in Path(calibration_prompts).read_text(encoding="utf-8").splitlines() if line.strip()]
    path = export_bundle(source, out, precision=precision, height=height, width=width, family=family,
                         overwrite=overwrite, default_steps=default_steps, default_guidance=default_guidance,
                         tiny_decoder=tiny_decoder, keep=keep if keep in ("none", "auto") else keep.split(","),
                         calibration_prompts=prompts, optimize=optimize, loras=[parse_lora(x) for x in loras], vae=vae,
                         attention=attention)
    click.echo(str(path))


def _csv_ints(value: str | None) -> list:
    return [int(v) for v in value.split(",")] if value else []


@cli.group(invoke_without_command=True)
@click.option("--model", "models", multiple=True, type=click.Path(), help="Bundle to measure (repeatable).")
@click.option("--provider", "providers", multiple=True, help="Execution provider (repeatable; default auto).")
@click.option("--steps", default="1", show_default=True, help="Comma-separated step counts.")
@click.option("--size", default=None, help="Comma-separated square sizes (default: each bundle's).")
@click.option("--repeat", type=int, default=3, show_default=True, help="Warm runs per process.")
@click.option("--warmup", type=int, default=1, show_default=True, help="Warm-up runs per process.")
@click.option("--rounds", type=int, default=2, show_default=True, help="Fresh processes per system, interleaved.")
@click.option("--compare", default="", help="Peers: diffusers,optimum (need --source).")
@click.option("--source", type=click.Path(), default=None, help="The diffusers folder the bundle came from.")
@click.option("--threads", type=int, default=None, help="Intra-op threads (default: physical cores).")
@click.option("--out", type=click.Path(), default="bench-out", show_default=True)
@click.option("--low-memory", is_flag=True, help="edgediff: one graph loaded at a time (peak memory).")
@click.option("--decoder", type=click.Choice(["full", "tiny"]), default="full", show_default=True,
              help="edgediff: the VAE decoder or the bundle's tiny decoder.")
@click.option("--decode-tile", type=int, default=None, help="edgediff: decode in tiles of this many latent cells.")
@click.option("--provider-option", "provider_options", multiple=True, metavar="KEY=VALUE",
              help="edgediff: onnxruntime provider option over edgediff's (repeatable), e.g. cudnn_conv_algo_search=EXHAUSTIVE.")
@click.option("--cuda-graph", is_flag=True,
              help="edgediff on CUDA/TensorRT: capture each graph's kernel launches once per image size and replay them.")
@click.option("--graph-cache", is_flag=True,
              help="edgediff: start from a graph cache one unmeasured start filled (a user's usual start); "
                   "without it every start optimises its graphs, as a first-ever start does.")
@click.pass_context
def bench(ctx, models, providers, steps, size, repeat, warmup, rounds, compare, source, threads, out, low_memory,
          decoder, decode_tile, provider_options, cuda_graph, graph_cache):
    """Measure seconds per image per stage, cold and warm, with memory; `bench merge` joins machines."""
    if ctx.invoked_subcommand:
        return
    from edgediff.benchmarks.harness import BenchConfig, run_bench
    from edgediff.benchmarks.report import write_outputs
    from edgediff.runtime.catalog import resolve_bundle
    from edgediff.runtime.providers import parse_options

    if min(repeat, rounds) < 1 or warmup < 0:
        raise click.UsageError("--repeat and --rounds must be >= 1, --warmup >= 0")
    cfg = BenchConfig(bundles=[str(resolve_bundle(m)) for m in models or [None]], providers=list(providers) or ["auto"],
                      steps=_csv_ints(steps), sizes=_csv_ints(size) or [None], repeat=repeat, warmup=warmup,
                      rounds=rounds, compare=[c for c in compare.split(",") if c], source=source, threads=threads,
                      out=out, low_memory=low_memory, decoder=decoder, decode_tile=decode_tile,
                      provider_options=parse_options(provider_options), cuda_graph=cuda_graph, graph_cache=graph_cache)
    data = run_bench(cfg)
    for note in data["notes"]:
        click.echo(f"note: {note}", err=True)
    for path in write_outputs(data, Path(out)):
        click.echo(str(path))


@bench.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", type=click.Path(), default="bench-merged", show_default=True)
def bench_merge(files, out):
    """Combine results.json FILES from several machines into one table."""
    from edgediff.benchmarks.harness import merge
    from edgediff.benchmarks.report import write_outputs

    for path in write_outputs(merge(list(files)), Path(out)):
        click.echo(str(path))


def main() -> None:
    cli(prog_name="edgediff")


if __name__ == "__main__":
    main()
