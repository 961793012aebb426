"""Seconds per stage for one bundle, edgediff next to diffusers on the same source, same work.

Each system runs in its own fresh subprocess (so its peak memory is its own), interleaved A B A B.
This is the spine's measurement; the full harness (`edgediff bench`) grows from it.

    python -m edgediff.benchmarks.stage_times --bundle B --source DIFFUSERS_FOLDER --steps 1 --repeat 3
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

PROMPT = "a photo of a cat on a red background"
SYSTEMS = ("edgediff", "diffusers")


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def run_edgediff(args) -> dict:
    t0 = time.perf_counter()
    from edgediff.runtime import Pipeline

    pipe = Pipeline.from_bundle(args.bundle, provider="cpu", threads=args.threads, verify="size")
    load = time.perf_counter() - t0
    runs = []
    for i in range(args.warmup + args.repeat):
        out = pipe(PROMPT, num_inference_steps=args.steps, height=args.size, width=args.size, seed=i, output_type="np")
        t = out.timings
        runs.append({"text_encoder": t["tokenize"] + t["text_encoder"], "unet": sum(t["unet"]),
                     "unet_call": statistics.median(t["unet"]), "vae_decoder": t["vae_decoder"], "total": t["total"]})
    return {"load": load, "first": runs[0]["total"], "runs": runs[args.warmup:], "peak_rss_gib": _peak_rss_gib()}


def run_diffusers(args) -> dict:
    t0 = time.perf_counter()
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline

    from edgediff.runtime import Bundle

    torch.set_num_threads(args.threads)
    manifest = Bundle.open(args.bundle, verify="none").manifest
    pipe = StableDiffusionPipeline.from_pretrained(args.source, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    load = time.perf_counter() - t0
    marks: dict = {}

    def timed(name, fn):
        def wrapper(*a, **k):
            s = time.perf_counter()
            out = fn(*a, **k)
            marks.setdefault(name, []).append(time.perf_counter() - s)
            return out
        return wrapper

    pipe.text_encoder.forward = timed("text_encoder", pipe.text_encoder.forward)
    pipe.unet.forward = timed("unet", pipe.unet.forward)
    pipe.vae.decode = timed("vae_decoder", pipe.vae.decode)
    latent = args.size // manifest.vae_scale_factor
    runs = []
    for i in range(args.warmup + args.repeat):
        marks.clear()
        latents = torch.from_numpy(np.random.default_rng(i).standard_normal((1, 4, latent, latent)).astype(np.float32))
        s = time.perf_counter()
        with torch.inference_mode():
            pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=manifest.defaults["guidance"],
                 height=args.size, width=args.size, latents=latents, output_type="np")
        runs.append({"text_encoder": sum(marks["text_encoder"]), "unet": sum(marks["unet"]),
                     "unet_call": statistics.median(marks["unet"]), "vae_decoder": sum(marks["vae_decoder"]),
                     "total": time.perf_counter() - s})
    return {"load": load, "first": runs[0]["total"], "runs": runs[args.warmup:], "peak_rss_gib": _peak_rss_gib()}


def _child(system: str, args) -> dict:
    cmd = [sys.executable, "-m", "edgediff.benchmarks.stage_times", "--one", system, "--bundle", args.bundle,
           "--steps", str(args.steps), "--size", str(args.size), "--repeat", str(args.repeat),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    if args.source:
        cmd += ["--source", args.source]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _median(runs, key):
    return statistics.median(r[key] for r in runs)


def report(results: dict[str, list[dict]], args) -> str:
    lines = [f"{args.size}x{args.size}, {args.steps} step(s), {args.threads} threads, medians of {args.repeat} warm runs "
             f"x {args.rounds} rounds (fresh process per round)", "",
             "| system | text encoder | UNet call | UNet total | VAE decode | whole image | load | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for system, rounds in results.items():
        runs = [r for rnd in rounds for r in rnd["runs"]]
        load = statistics.median(r["load"] for r in rounds)
        rss = max(r["peak_rss_gib"] for r in rounds)
        lines.append(f"| {system} | {_median(runs, 'text_encoder'):.2f} s | {_median(runs, 'unet_call'):.2f} s | "
                     f"{_median(runs, 'unet'):.2f} s | {_median(runs, 'vae_decoder'):.2f} s | {_median(runs, 'total'):.2f} s | "
                     f"{load:.1f} s | {rss:.2f} GiB |")
    if len(results) == 2:
        a, b = ([r for rnd in results[s] for r in rnd["runs"]] for s in SYSTEMS)
        ratios = ", ".join(f"{k} {_median(b, k) / _median(a, k):.2f}x" for k in ("text_encoder", "unet_call", "vae_decoder", "total"))
        lines += ["", f"diffusers / edgediff (higher = edgediff faster): {ratios}"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--source", help="diffusers folder the bundle was exported from (enables the diffusers row)")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1, help="fresh processes per system, interleaved A B A B")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    if args.one:
        print(json.dumps((run_edgediff if args.one == "edgediff" else run_diffusers)(args)))
        return
    systems = SYSTEMS if args.source else SYSTEMS[:1]
    results: dict[str, list[dict]] = {s: [] for s in systems}
    for _ in range(args.rounds):
        for system in systems:
            results[system].append(_child(system, args))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "results": results}, fh, indent=2)
    print(report(results, args))


if __name__ == "__main__":
    main()
