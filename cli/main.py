"""The `edgediff` command: a thin layer over the library (as huggingface_hub's CLI is over its API).

Errors print as one line and exit non-zero; set EDGEDIFF_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path

import click

try:
    from edgediff.runtime.errors import EdgediffError
except ModuleNotFoundError as exc:  # no onnxruntime build installed: the runtime's message says which to get
    if exc.name != "onnxruntime":
        raise
    sys.exit(f"error: {exc}")

from .options import export_options, runtime_options  # noqa: E402  (after the onnxruntime check above)

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
@click.option(
    "--model", "model", default=None, help="Bundle folder, or a name from `edgediff list` (default: the shipped model)."
)
@click.option("--steps", type=int, default=None, help="Denoising steps (default: the bundle's).")
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the bundle's).")
@click.option("--seed", type=int, default=None, help="Seed; image i of a batch uses seed + i.")
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--negative-prompt", default=None)
@click.option(
    "--true-cfg-scale",
    type=float,
    default=None,
    help="FLUX.1: true classifier-free guidance with --negative-prompt, above 1 (FluxPipeline's true_cfg_scale).",
)
@click.option("--num-images", type=int, default=1, show_default=True)
@click.option(
    "--image",
    "init_image",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Image-to-image: start from this image (its size, rounded to 8, unless --width/--height).",
)
@click.option(
    "--strength",
    type=float,
    default=None,
    help="Image-to-image: how much to change, 0 keeps the image, 1 ignores it (default 0.8; inpainting 1.0).",
)
@click.option(
    "--mask",
    "mask",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Inpainting: white areas of this image are repainted (with --image).",
)
@click.option(
    "--outpaint",
    default=None,
    metavar="LEFT,TOP,RIGHT,BOTTOM",
    help="Outpainting: grow --image by these many pixels per side and paint the new area.",
)
@click.option(
    "--control",
    "controls",
    multiple=True,
    metavar="NAME=IMAGE[:SCALE]",
    help="ControlNet NAME of the bundle (see `edgediff info`) steered by IMAGE, resized to the output size "
    "(repeatable; scale defaults to 1). Canny edges: `edgediff canny IN OUT`.",
)
@click.option(
    "--ip-adapter-image",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Reference image for a bundle exported with --ip-adapter.",
)
@click.option(
    "--ip-adapter-scale",
    default=1.0,
    show_default=True,
    type=float,
    help="How strongly --ip-adapter-image steers (0: not at all).",
)
@click.option(
    "--lora",
    "loras",
    multiple=True,
    metavar="NAME[:WEIGHT]",
    help="Run-time LoRA of the bundle (`edgediff lora list`; repeatable, weight defaults to 1).",
)
@runtime_options()
@click.option(
    "-o",
    "--output",
    default="edgediff.png",
    show_default=True,
    type=click.Path(),
    help="Image file; with --num-images N, files get _0.._N-1 suffixes.",
)
def generate(
    prompt,
    model,
    steps,
    guidance,
    seed,
    width,
    height,
    negative_prompt,
    true_cfg_scale,
    num_images,
    init_image,
    strength,
    mask,
    outpaint,
    controls,
    ip_adapter_image,
    ip_adapter_scale,
    loras,
    options,
    output,
):
    """Generate an image from PROMPT."""
    from tqdm.auto import tqdm

    from edgediff.runtime import Pipeline
    from edgediff.runtime.catalog import resolve_bundle
    from edgediff.runtime.image import check_writable, save_image
    from edgediff.runtime.lora_adapters import parse_lora_weight

    margins = None
    if outpaint:
        if not init_image or mask:
            raise click.UsageError("--outpaint needs --image (and makes its own mask)")
        try:
            margins = tuple(int(v) for v in outpaint.split(","))
            if len(margins) != 4:
                raise ValueError
        except ValueError:
            raise click.UsageError("--outpaint takes four integers: LEFT,TOP,RIGHT,BOTTOM") from None
    elif mask and not init_image:
        raise click.UsageError("--mask needs --image")
    control = parse_controls(controls)
    lora_weights = dict(parse_lora_weight(spec) for spec in loras)
    targets = (
        [Path(output)]
        if num_images == 1
        else [Path(output).with_name(f"{Path(output).stem}_{i}{Path(output).suffix}") for i in range(num_images)]
    )
    for target in targets:  # fail before minutes of work, not after
        check_writable(target)
    pipe = Pipeline.from_bundle(resolve_bundle(model), options)
    bars = []  # created at the first step, so that argument errors print without a bar

    def progress(event):
        if not bars:
            bars.append(tqdm(total=event.total, desc="denoising", unit="step"))
        bars[0].update(1)

    result = pipe(
        prompt,
        negative_prompt=negative_prompt,
        true_cfg_scale=true_cfg_scale,
        num_inference_steps=steps,
        guidance_scale=guidance,
        height=height,
        width=width,
        seed=seed,
        num_images_per_prompt=num_images,
        callback=progress,
        image=init_image,
        strength=strength,
        mask_image=mask,
        keep_unmasked=bool(mask),
        outpaint=margins,
        **control,
        ip_adapter_image=ip_adapter_image,
        ip_adapter_scale=ip_adapter_scale,
        loras=lora_weights,
    )
    for bar in bars:
        bar.close()
    for image, target, image_seed in zip(result.images, targets, result.seeds):
        save_image(image, target)
        click.echo(f"{target} (seed {image_seed})")


def parse_controls(values) -> dict:
    """--control NAME=IMAGE[:SCALE] options -> the pipeline's control_image and controlnet_conditioning_scale."""
    from edgediff.runtime.errors import InputError

    images, scales = {}, {}
    for value in values:
        name, sep, rest = value.partition("=")
        image, scale = rest, 1.0
        head, colon, tail = rest.rpartition(":")
        if colon and head and tail and "/" not in tail and "\\" not in tail:
            try:
                image, scale = head, float(tail)
            except ValueError:
                raise InputError("control_option", value=value) from None
        if not sep or not name or not image:
            raise InputError("control_option", value=value)
        images[name], scales[name] = image, scale
    return {"control_image": images, "controlnet_conditioning_scale": scales} if images else {}


@cli.command()
@click.argument("image", type=click.Path(exists=True, dir_okay=False))
@click.argument("output", type=click.Path())
@click.option("--low", "low_threshold", type=float, default=100, show_default=True, help="Lower hysteresis threshold.")
@click.option(
    "--high", "high_threshold", type=float, default=200, show_default=True, help="Upper hysteresis threshold."
)
def canny(image, output, low_threshold, high_threshold):
    """Write IMAGE's Canny edge map to OUTPUT: a control image for canny ControlNets."""
    from edgediff.runtime.image import save_image
    from edgediff.runtime.preprocess import canny_image

    save_image(canny_image(image, low_threshold, high_threshold), output)
    click.echo(output)


@cli.group()
def lora():
    """Run-time LoRAs of bundles exported with --lora-slots."""


@lora.command("convert")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", required=True, help="The bundle (folder or name) the LoRA is for.")
@click.option("--name", default=None, help="The LoRA's name for --lora NAME (default: the file's stem).")
@click.option("--overwrite", is_flag=True, help="Replace an adapter of that name.")
def lora_convert(file, model, name, overwrite):
    """Convert a LoRA FILE (kohya, diffusers or PEFT safetensors) into an adapter in the bundle's loras/ folder."""
    from edgediff.export.lora_convert import convert_lora
    from edgediff.runtime.catalog import resolve_bundle

    click.echo(str(convert_lora(file, resolve_bundle(model), name, overwrite)))


@lora.command("list")
@click.option("--model", default=None, help="Bundle folder or name (default: the shipped model).")
def lora_list(model):
    """List the run-time LoRAs a bundle has."""
    from edgediff.runtime import Bundle
    from edgediff.runtime.catalog import resolve_bundle
    from edgediff.runtime.lora_adapters import RuntimeLoras

    loras = RuntimeLoras(Bundle.open(resolve_bundle(model), verify="size"))
    if not loras.slots:
        click.echo(f"{loras.path}: no LoRA slots (export with --lora-slots)")
    for name in loras.known():
        click.echo(name)


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
        click.echo(
            f"{e.name:<20}{m.family:<10}{precisions:<10}{m.defaults['width']}x{m.defaults['height']:<6}"
            f"{decoders:<11}{e.size / 2**20:8.1f} MiB  {e.path}"
        )


@cli.command()
@click.argument("bundle", default="shipped")
@click.option("--verify/--no-verify", default=True, show_default=True, help="Check every file's sha256.")
def info(bundle, verify):
    """Show what a bundle's manifest says: family, sampler, defaults, components, sizes (BUNDLE: folder or name)."""
    from edgediff.runtime import Bundle
    from edgediff.runtime.catalog import resolve_bundle
    from edgediff.runtime.denoisers import size_multiple

    b = Bundle.open(resolve_bundle(bundle), verify="full" if verify else "size")
    m = b.manifest
    click.echo(f"bundle        {b.path}")
    click.echo(f"family        {m.family} ({m.prediction_type})")
    config = m.scheduler["config"]
    # flow-matching configs (SD3, FLUX) have no timestep spacing: their grid is set by the shift, which FLUX.1-dev
    # takes per call from the image's token count; SANA's DPM-Solver++ reads flow_shift, SCM its fixed angles
    if "timestep_spacing" in config:
        grid = f"{config['timestep_spacing']} spacing"
    elif m.scheduler["name"] == "scm":
        grid = f"sigma_data {config.get('sigma_data')}"
    elif config.get("use_flow_sigmas"):
        grid = f"flow shift {config.get('flow_shift')}"
    else:
        grid = "dynamic shift" if config.get("use_dynamic_shifting") else f"shift {config.get('shift')}"
    click.echo(f"sampler       {m.scheduler['name']} ({grid})")
    d = m.defaults
    click.echo(f"defaults      {d['steps']} steps, guidance {d['guidance']}, {d['width']}x{d['height']}")
    click.echo(f"sizes         multiples of {size_multiple(m)} pixels a side")
    click.echo(f"source        {m.provenance.get('source', '?')} ({m.provenance.get('date', '?')})")
    text = " + ".join(
        f"{e['component']} ({e['output']}" + (f", pooled {e['pooled']})" if e.get("pooled") else ")")
        for e in m.text_encoders
    )
    click.echo(f"text          {text}" + ("; size/crop conditions" if m.conditioning.get("time_ids") else ""))
    for name, comp in m.components.items():
        shapes = ", ".join(f"{t.name}{list(t.shape)}:{t.dtype}" for t in comp.inputs)
        click.echo(f"{name:<17}{comp.precision:<6}{comp.size / 2**20:9.1f} MiB  {shapes}")  # vae_decoder_tiny: 16
    click.echo(f"total         {b.size_on_disk / 2**20:.1f} MiB on disk" + ("; checksums ok" if verify else ""))


@cli.command()
def families():
    """List the model families export detects and the runtime defaults each bundle of them gets."""
    from edgediff.export.families import FAMILIES

    click.echo(f"{'family':<16}{'sampler':<17}{'steps':>5}{'guidance':>10}  description")
    for f in FAMILIES:
        guidance = "embedded" if f.guidance_embedding else f"{f.default_guidance:g}"
        click.echo(f"{f.name:<16}{f.sampler:<17}{f.default_steps:>5}{guidance:>10}  {f.description}")


@cli.command()
@click.option(
    "--model", default=None, help="Also open this bundle (folder or name) and show where each of its graphs runs."
)
@click.option("--provider", default="auto", show_default=True, help="With --model: the provider to open it on.")
@click.option(
    "--fallback",
    is_flag=True,
    help="With --model: fall back to the best available provider, and show a graph the provider cannot take on the CPU.",
)
@click.option(
    "--provider-option",
    "provider_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="With --model: onnxruntime provider option over edgediff's (repeatable).",
)
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
    from edgediff.runtime import Pipeline, RuntimeOptions
    from edgediff.runtime import providers as prov
    from edgediff.runtime.catalog import resolve_bundle

    path = resolve_bundle(model)
    with Pipeline.from_bundle(
        path, RuntimeOptions(provider=provider, fallback=fallback, provider_options=options)
    ) as pipe:
        report = pipe.provider_report()
    short = {p.ort_name: name for name, p in prov.REGISTRY.items()}
    asked = f" (asked for {report['requested']}: not available here)" if report["fell_back"] else ""
    options_text = ", ".join(f"{k}={v}" for k, v in report["options"].items()) or "no options"
    click.echo(f"\n{path}: {report['provider']}{asked}; {options_text}")
    runs_on = {
        name: short.get(graph["providers"][0], graph["providers"][0])
        + (f" ({report['provider']} refused it)" if graph["cpu_fallback"] else "")
        for name, graph in report["graphs"].items()
    }
    width = max([22, *(len(text) + 2 for text in runs_on.values())])
    click.echo(f"  {'graph':<16}{'runs on':<{width}}{'graph cache':<13}{'I/O binding':<13}captured")
    for name, graph in report["graphs"].items():
        click.echo(
            f"  {name:<16}{runs_on[name]:<{width}}{graph['cache']:<13}{graph['io_binding']:<13}{graph['cuda_graph']}"
        )
        if graph.get("refused"):  # the provider's reason: the end of its message (graph_loader.summarize)
            click.echo(f"    {report['provider']} failed on it: {graph['refused'].rpartition(' ... ')[2]}")


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
    click.echo(
        f"{len(found)} entries, {total / 2**30:.2f} GiB of {limit / 2**30:.1f} GiB "
        f"({graph_cache.LIMIT_ENV}) in {folder}"
    )


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
@export_options
def export(source, out, options):
    """Export a diffusers model (folder or hub id) SOURCE into a bundle at OUT."""
    from edgediff.export import export as export_to

    click.echo(str(export_to(source, out, options)))


def _csv_ints(value: str | None) -> list:
    return [int(v) for v in value.split(",")] if value else []


@cli.group(invoke_without_command=True)
@click.option("--model", "models", multiple=True, type=click.Path(), help="Bundle to measure (repeatable).")
@click.option("--steps", default="1", show_default=True, help="Comma-separated step counts.")
@click.option("--size", default=None, help="Comma-separated square sizes (default: each bundle's).")
@click.option("--repeat", type=click.IntRange(min=1), default=3, show_default=True, help="Warm runs per process.")
@click.option("--warmup", type=click.IntRange(min=0), default=1, show_default=True, help="Warm-up runs per process.")
@click.option(
    "--rounds",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="Fresh processes per system, interleaved.",
)
@click.option(
    "--compare",
    default="",
    help="Peers: diffusers (every family), optimum (SD and SDXL); both need --source.",
)
@click.option("--source", type=click.Path(), default=None, help="The diffusers folder the bundle came from.")
@click.option("--out", type=click.Path(), default="bench-out", show_default=True)
@click.option(
    "--graph-cache",
    is_flag=True,
    help="edgediff: start from a graph cache one unmeasured start filled (a user's usual start); "
    "without it every start optimizes its graphs, as a first-ever start does.",
)
@click.option(
    "--quality",
    "quality",
    type=click.Path(),
    default=None,
    metavar="REFERENCE_BUNDLE",
    help="Score every row's images against this bundle's (CPU provider, same latents and prompt): PSNR, SSIM, "
    "and the shapes checker's adherence for the shipped model; rows below 30 dB are marked.",
)
@click.option(
    "--peer-without-instruction",
    is_flag=True,
    help="SANA: diffusers encodes the prompt alone, without its complex-human instruction: less work than its "
    "default, so that each ratio is a lower bound whatever the source's tokenizer makes of the instruction.",
)
@runtime_options(multiple_providers=True)
@click.pass_context
def bench(
    ctx,
    models,
    steps,
    size,
    repeat,
    warmup,
    rounds,
    compare,
    source,
    out,
    graph_cache,
    quality,
    peer_without_instruction,
    providers,
    options,
):
    """Measure seconds per image per stage, cold and warm, with memory; `bench merge` joins machines.
    The runtime options apply to edgediff's rows; peers run as they come."""
    if ctx.invoked_subcommand:
        return
    from edgediff.benchmarks.harness import BenchConfig, failed_rows, run_bench
    from edgediff.benchmarks.report import write_outputs
    from edgediff.runtime.catalog import resolve_bundle
    from edgediff.runtime.errors import BenchError

    cfg = BenchConfig(
        bundles=[str(resolve_bundle(m)) for m in models or [None]],
        providers=providers,
        steps=_csv_ints(steps),
        sizes=_csv_ints(size) or [None],
        repeat=repeat,
        warmup=warmup,
        rounds=rounds,
        compare=[c for c in compare.split(",") if c],
        source=source,
        out=out,
        runtime=options,
        graph_cache=graph_cache,
        quality=str(resolve_bundle(quality)) if quality else None,
        peer_instruction=not peer_without_instruction,
    )
    data = run_bench(cfg)
    for note in data["notes"]:
        click.echo(f"note: {note}", err=True)
    for path in write_outputs(data, Path(out)):
        click.echo(str(path))
    failed = failed_rows(data)
    if failed:  # written first: the rows that ran are kept; the exit status says some did not
        which = "; ".join(f"{Path(row['bundle']).name} on {row['provider']}, {s['system']}" for row, s in failed)
        total = sum(len(row["systems"]) for row in data["results"])
        raise BenchError("bench_failed", count=len(failed), total=total, which=which, out=out)


@bench.command("merge")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True))
@click.option("--out", type=click.Path(), default="bench-merged", show_default=True)
def bench_merge(files, out):
    """Combine results.json FILES from several machines into one table."""
    from edgediff.benchmarks.harness import merge
    from edgediff.benchmarks.report import write_outputs

    for path in write_outputs(merge(list(files)), Path(out)):
        click.echo(str(path))


@cli.command()
@click.option(
    "--model",
    "models",
    multiple=True,
    metavar="NAME",
    help="A bundle name from `edgediff list` to serve (repeatable; default: every readable one, shipped first).",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on; others need --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=7860, show_default=True, help="0: any free port.")
@click.option(
    "--api-key",
    envvar="EDGEDIFF_API_KEY",
    default=None,
    help="Require `Authorization: Bearer KEY` on every request (or set EDGEDIFF_API_KEY: keeps it out of `ps`).",
)
@click.option("--queue-size", type=click.IntRange(min=0), default=16, show_default=True, help="Jobs that may wait.")
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Jobs generated at once.")
@click.option(
    "--idle-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
    help="Close a model's pipeline after this many seconds unused.",
)
@runtime_options()
def serve(models, host, port, api_key, queue_size, workers, idle_timeout, options):
    """Serve images over HTTP: OpenAI's images API, AUTOMATIC1111's API and a web page (docs/server.md)."""
    try:
        from edgediff.server import ServerConfig
        from edgediff.server import serve as run_server
    except ImportError as exc:  # starlette, uvicorn or python-multipart: the serve extra
        _fail(f"{exc}; `edgediff serve` needs `pip install 'edgediff[cpu,serve]'`")

    config = ServerConfig(
        models=models,
        runtime=options,
        api_key=api_key,
        queue_size=queue_size,
        workers=workers,
        idle_seconds=idle_timeout,
    )
    run_server(config, host=host, port=port)


def main() -> None:
    cli(prog_name="edgediff")


if __name__ == "__main__":
    main()
