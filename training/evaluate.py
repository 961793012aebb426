"""Measures what the shipped model draws: prompts from unseen seeds, images read back by the checker.

python -m training.evaluate --bundle models/shipped/bundle-fp32 --steps 1,2,4 --n 200
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np

from . import checker
from .shapes import random_scene
from .shipped_config import EVAL_SEED

ATTRIBUTES = ("colour", "background", "shape", "size", "position")


def eval_prompts(n: int, seed: int = EVAL_SEED):
    rng = np.random.default_rng(seed)
    return [random_scene(rng, p_omit=0.3) for _ in range(n)]


def adherence(images, scenes) -> dict:
    """Accuracy per attribute as the checker reads `images` (size and position only where asked)."""
    hits = {a: [] for a in ATTRIBUTES}
    for image, scene in zip(images, scenes):
        r = checker.read(image)
        hits["colour"].append(r.colour == scene.colour)
        hits["background"].append(r.background == scene.background)
        hits["shape"].append(r.shape == scene.shape)
        if scene.say_size:
            hits["size"].append(r.size == scene.size)
        if scene.say_position:
            hits["position"].append(r.position == scene.position)
    return {a: float(np.mean(v)) for a, v in hits.items()}


def score(pipe, scenes, steps: int, guidance: float | None = None, sampler: str | None = None, batch: int = 20) -> dict:
    """Accuracy per attribute (size and position only where the prompt names them), and ms per image."""
    images, per_image = [], []
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        t0 = time.perf_counter()
        out = pipe([s.caption for s in chunk], num_inference_steps=steps, guidance_scale=guidance, seed=start)
        per_image.append((time.perf_counter() - t0) / len(chunk))
        images.extend(out.images)
    result = adherence(images, scenes)
    result.update(n=len(scenes), steps=steps, ms_per_image_batched=1000 * statistics.median(per_image))
    return result


def latency_ms(pipe, steps: int, repeat: int = 20, warmup: int = 3) -> float:
    """Median warm seconds for one image alone (batch 1), in ms."""
    times = []
    for i in range(warmup + repeat):
        t0 = time.perf_counter()
        pipe("a large red circle on a blue background", num_inference_steps=steps, seed=i)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times[warmup:])


def main() -> None:
    from edgediff.runtime import Pipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--steps", default="1,2,4")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--sampler", default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    pipe = Pipeline.from_bundle(args.bundle, provider="cpu", sampler=args.sampler, threads=args.threads)
    scenes = eval_prompts(args.n)
    rows = []
    print("| steps | shape colour | background | shape | size (asked) | position (asked) | ms/image (batch 1) |")
    print("|---|---|---|---|---|---|---|")
    for steps in (int(s) for s in args.steps.split(",")):
        r = score(pipe, scenes, steps, args.guidance)
        r["ms_batch1"] = latency_ms(pipe, steps)
        rows.append(r)
        print(
            f"| {steps} | {r['colour']:.1%} | {r['background']:.1%} | {r['shape']:.1%} | {r['size']:.1%} | "
            f"{r['position']:.1%} | {r['ms_batch1']:.1f} |",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"bundle": args.bundle, "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
