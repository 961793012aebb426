"""What control and run-time LoRAs cost: a ControlNet's time per denoising step, and a run-time LoRA's switch
and per-image time against the plain and the fused bundle. One process, calls interleaved, medians.

    python -m edgediff.benchmarks.adapter_cost --controlnet-bundle CN --slots-bundle SLOTS --lora NAME:WEIGHT \\
        --fused-bundle FUSED --out adapter-cost.json

CN: a bundle exported with `--controlnet`; SLOTS: with `--lora-slots` and NAME converted into it (`edgediff
lora convert`); FUSED: the same LoRA fused at export (`--lora FILE:WEIGHT`). Every call is text to image at the
bundles' default size, on the CPU provider.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

RESULTS_KIND = "adapter-cost"  # the results file's "kind": docs_tables and the schema test tell it apart
PROMPT = "a photo of a cat sitting on a windowsill"


def _timed(call) -> tuple[float, dict]:
    start = time.perf_counter()
    out = call()
    return time.perf_counter() - start, out.timings


def _median(values) -> float:
    return round(statistics.median(values), 4)


def controlnet_cost(bundle: str, steps: int, repeat: int) -> dict:
    """Whole image and denoiser time with and without one ControlNet (scale 1 over every step)."""
    from edgediff.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle, provider="cpu")
    m = pipe.manifest
    name = m.controlnets[0]["name"]
    edges = (np.random.default_rng(0).random((m.defaults["height"], m.defaults["width"], 3)) > 0.9) * 255
    control = {name: edges.astype(np.uint8)}
    calls = {
        "plain": lambda: pipe(PROMPT, seed=0, num_inference_steps=steps, output_type="latent"),
        "controlnet": lambda: pipe(
            PROMPT, seed=0, num_inference_steps=steps, output_type="latent", control_image=control
        ),
    }
    for call in calls.values():  # warm-up: graphs opened, first-run allocations made
        call()
    wall = {k: [] for k in calls}
    net = []
    for _ in range(repeat):
        for key, call in calls.items():
            seconds, timings = _timed(call)
            wall[key].append(seconds)
            if key == "controlnet":
                net.extend(timings.get("controlnet", []))
    pipe.close()
    plain, controlled = _median(wall["plain"]), _median(wall["controlnet"])
    return {
        "config": "controlnet",
        "bundle": Path(bundle).name,
        "steps": steps,
        "size": m.defaults["height"],
        "image_seconds": {"plain": plain, "controlnet": controlled},
        "extra_seconds_per_step": round((controlled - plain) / steps, 4),
        "controlnet_call_seconds": _median(net) if net else None,
    }


def lora_cost(slots: str, fused: str, lora: str, weight: float, steps: int, repeat: int) -> dict:
    """A run-time LoRA's switch times (first build of a mix, another weight, a mix already built) and the image
    time with it, beside the slotted bundle without a LoRA and the bundle with it fused."""
    from edgediff.runtime import Pipeline

    pipe = Pipeline.from_bundle(slots, provider="cpu")
    fused_pipe = Pipeline.from_bundle(fused, provider="cpu")
    switch = {}
    for label, mix in (("first", {lora: weight}), ("other weight", {lora: weight / 2}), ("built", {lora: weight})):
        start = time.perf_counter()
        pipe.loras.adapters(mix)
        switch[label] = round(time.perf_counter() - start, 4)
    calls = {
        "slots, no LoRA": lambda: pipe(PROMPT, seed=0, num_inference_steps=steps, output_type="latent"),
        "slots, run-time LoRA": lambda: pipe(
            PROMPT, seed=0, num_inference_steps=steps, output_type="latent", loras={lora: weight}
        ),
        "fused LoRA": lambda: fused_pipe(PROMPT, seed=0, num_inference_steps=steps, output_type="latent"),
    }
    for call in calls.values():
        call()
    wall = {k: [] for k in calls}
    for _ in range(repeat):
        for key, call in calls.items():
            wall[key].append(_timed(call)[0])
    size = pipe.manifest.defaults["height"]
    pipe.close()
    fused_pipe.close()
    return {
        "config": "lora",
        "bundles": {"slots": Path(slots).name, "fused": Path(fused).name},
        "lora": {"name": lora, "weight": weight},
        "steps": steps,
        "size": size,
        "switch_seconds": switch,
        "image_seconds": {k: _median(v) for k, v in wall.items()},
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--controlnet-bundle", required=True)
    parser.add_argument("--slots-bundle", required=True)
    parser.add_argument("--fused-bundle", required=True)
    parser.add_argument("--lora", required=True, metavar="NAME:WEIGHT")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="adapter-cost.json")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    name, _, weight = args.lora.partition(":")
    from .machine import describe

    rows = [
        controlnet_cost(args.controlnet_bundle, args.steps, args.repeat),
        lora_cost(args.slots_bundle, args.fused_bundle, name, float(weight or 1.0), args.steps, args.repeat),
    ]
    data = {
        "kind": RESULTS_KIND,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(),
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
