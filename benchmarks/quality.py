"""Quality kept by each variant of a bundle (precision, decoder) against the fp32 reference, on the
shipped model's evaluation prompts: PSNR and SSIM from the same seeds, the checker's prompt adherence,
size on disk and warm ms per image.

    python -m edgediff.benchmarks.quality --reference models/shipped/bundle-fp32 \\
        --variant int8=/tmp/shipped-int8 --variant int4=/tmp/shipped-int4 --variant tiny-decoder=@tiny --n 100

A variant is NAME=BUNDLE, NAME=BUNDLE@DECODER (that bundle through its "tiny" or "full" decoder) or NAME=@tiny
(the reference bundle's tiny decoder); --reference-decoder tiny judges tiny decoders against fp32's tiny one.
The reference runs on the CPU provider; `--provider` (with `--provider-option KEY=VALUE`) runs the variants
elsewhere, so that NAME=BUNDLE with the reference's own bundle measures what a provider changes (OpenVINO's
bf16 on CPUs that have it, say); `--fallback` runs a graph that provider cannot take on the CPU provider.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .metrics import psnr, ssim

# The floor below which a variant's images are judged changed, not kept (the quantisation tests' floor too).
PSNR_FLOOR_DB = 30.0


def _generate(pipe, scenes, decoder: str | None):
    images, times = [], []
    for i, scene in enumerate(scenes):
        t0 = time.perf_counter()
        images.append(pipe(scene.caption, seed=i, output_type="np", decoder=decoder).images[0])
        times.append(time.perf_counter() - t0)
    return images, 1000 * float(np.median(times[3:] or times))


def _variant(spec: str, reference: str) -> tuple[str, str | None]:
    """'BUNDLE', 'BUNDLE@DECODER' or '@DECODER' -> (bundle, decoder or None for the bundle's default)."""
    bundle, _, decoder = spec.rpartition("@") if "@" in spec else (spec, "", None)
    return bundle or reference, decoder


def _shipped_model_scoring():
    """The checker-based scoring of the shipped model's domain, which lives with its training code in the
    repository's training/ folder (not installed): this benchmark runs from a source checkout."""
    try:
        from training.evaluate import adherence, eval_prompts
    except ModuleNotFoundError as exc:
        if exc.name != "training":  # training/ is there but something it needs is not: that error says what
            raise
        checkout = Path(__file__).resolve().parent.parent  # an editable install run from another folder
        if (checkout / "training" / "evaluate.py").is_file() and str(checkout) not in sys.path:
            sys.path.append(str(checkout))
            return _shipped_model_scoring()
        raise ImportError(
            "the quality benchmark scores images with the shipped model's checker (training/ in "
            "edgediff's repository): run it from a source checkout's root"
        ) from exc
    return adherence, eval_prompts


def score_images(images: np.ndarray, reference: np.ndarray) -> dict:
    """A row's images against the reference's, both uint8 (N, H, W, 3) from the same latents: PSNR over all
    the images together (infinite only when every pixel agrees), the worst image's PSNR, and mean SSIM."""
    if images.shape != reference.shape:
        raise ValueError(f"images {images.shape} and reference images {reference.shape} differ in shape")
    a, b = images.astype(np.float64) / 255, reference.astype(np.float64) / 255
    per_image = [psnr(x, y) for x, y in zip(a, b)]
    return {
        "psnr": float(psnr(a, b)),
        "psnr_min": float(min(per_image)),
        "ssim": float(np.mean([ssim(x, y) for x, y in zip(a, b)])),
        "n": int(len(a)),
    }


_CAPTION = re.compile(
    r"a (?:(?P<size>small|large) )?(?P<colour>\w+) (?P<shape>\w+)(?: at the (?P<position>\w+))? "
    r"on a (?P<background>\w+) background"
)


def prompt_adherence(images: np.ndarray, prompt: str) -> dict:
    """The shipped model's checker on images of one prompt: the share of images whose colour, background,
    shape (and size and position, where the prompt names them) it reads as the prompt says. Raises
    ImportError outside a source checkout (the checker lives in training/), ValueError for another prompt."""
    adherence, _ = _shipped_model_scoring()  # first: it finds training/ in the checkout
    from training.shapes import Scene

    m = _CAPTION.fullmatch(prompt)
    if not m:
        raise ValueError(f"not a prompt of the shapes domain: {prompt!r}")
    scene = Scene(
        colour=m["colour"],
        shape=m["shape"],
        background=m["background"],
        size=m["size"] or "large",
        position=m["position"] or "center",
        say_size=bool(m["size"]),
        say_position=bool(m["position"]),
    )
    with warnings.catch_warnings():  # an attribute the prompt does not name has no images: its mean is NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        scores = adherence(list(images), [scene] * len(images))
    return {k: v for k, v in scores.items() if not np.isnan(v)}


def is_shipped_model(bundle_path) -> bool:
    """The shipped model's bundle, or a bundle exported from its diffusers folder (another precision, say)."""
    import json

    from edgediff.models.shipped import SHIPPED_DIR

    path = Path(bundle_path).resolve()
    if path == (SHIPPED_DIR / "bundle-fp32").resolve():
        return True
    try:
        source = json.loads((path / "manifest.json").read_text())["provenance"]["source"]
    except (OSError, KeyError, TypeError, ValueError):
        return False
    return bool(source) and (path / source).resolve() == (SHIPPED_DIR / "diffusers").resolve()


def compare(
    reference: str,
    variants: dict[str, str],
    n: int,
    threads: int | None = None,
    reference_decoder: str | None = None,
    provider: str = "cpu",
    provider_options: dict | None = None,
    fallback: bool = False,
) -> list[dict]:
    from PIL import Image

    from edgediff.runtime import Bundle, Pipeline

    adherence, eval_prompts = _shipped_model_scoring()
    scenes = eval_prompts(n)
    ref_pipe = Pipeline.from_bundle(reference, provider="cpu", threads=threads)
    ref_images, ref_ms = _generate(ref_pipe, scenes, reference_decoder)

    def pil(images):
        return [Image.fromarray((np.clip(x, 0, 1) * 255).round().astype(np.uint8)) for x in images]

    label = f"fp32 (reference, {reference_decoder} decoder)" if reference_decoder else "fp32 (reference)"
    rows = [
        {
            "variant": label,
            "psnr": float("inf"),
            "psnr_min": float("inf"),
            "ssim": 1.0,
            "ms": ref_ms,
            "bytes": Bundle.open(reference, verify="size").size_on_disk,
            **adherence(pil(ref_images), scenes),
        }
    ]
    for name, path in variants.items():
        bundle, decoder = _variant(path, reference)
        same = bundle == reference and provider == "cpu" and not provider_options
        pipe = (
            ref_pipe
            if same
            else Pipeline.from_bundle(
                bundle, provider=provider, threads=threads, provider_options=provider_options, fallback=fallback
            )
        )
        images, ms = _generate(pipe, scenes, decoder)
        scores = [psnr(a, b) for a, b in zip(images, ref_images)]
        rows.append(
            {
                "variant": name,
                "psnr": float(np.mean(scores)),
                "psnr_min": float(np.min(scores)),
                "ssim": float(np.mean([ssim(a, b) for a, b in zip(images, ref_images)])),
                "ms": ms,
                "bytes": Bundle.open(bundle, verify="size").size_on_disk,
                **adherence(pil(images), scenes),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True)
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="NAME=BUNDLE, NAME=BUNDLE@DECODER, or NAME=@tiny for the reference's tiny decoder",
    )
    parser.add_argument("--reference-decoder", choices=("full", "tiny"), default=None)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--provider", default="cpu", help="where the variants run (the reference runs on the CPU)")
    parser.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--fallback", action="store_true", help="a graph the provider cannot take runs on the CPU")
    args = parser.parse_args()
    from edgediff.runtime.providers import parse_options

    variants = dict(v.split("=", 1) for v in args.variant)
    rows = compare(
        args.reference,
        variants,
        args.n,
        args.threads,
        args.reference_decoder,
        args.provider,
        parse_options(args.provider_option),
        args.fallback,
    )
    print(
        "| variant | PSNR vs fp32 (mean / min) | SSIM | colour | background | shape | size | position | ms/image | MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['variant']} | {r['psnr']:.1f} / {r['psnr_min']:.1f} dB | {r['ssim']:.3f} | {r['colour']:.1%} | "
            f"{r['background']:.1%} | {r['shape']:.1%} | {r['size']:.1%} | {r['position']:.1%} | {r['ms']:.0f} | "
            f"{r['bytes'] / 2**20:.1f} |"
        )


if __name__ == "__main__":
    main()
