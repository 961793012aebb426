"""Estimates an export's memory from the model's shapes alone, with the rule the export itself applies.

The memory plan's stages (export/memory_plan.py) for a random_init architecture built on PyTorch's meta device, so
that models too large to build or hold here (FLUX.1's 12 B transformer) are planned by the same rule the export
refuses them by.

    python -m edgediff.benchmarks.export_plan flux-schnell sd3.5-medium --precision fp32 --precision int4 \\
        --memory 16 --memory 24 --out export-plan.json

Each architecture's components are counted as the export loads them (in the dtype the published model is stored
in, widened to fp32 per component), with its T5 and without where the family can drop it (SD3: --no-t5).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import tempfile
from pathlib import Path

from edgediff.export.options import PRECISIONS

RESULTS_KIND = "export-plan"  # the results file's "kind" (docs_tables)
T5_OPTIONAL = "text_encoder_3"  # SD3's T5, which the export and runtime can leave out (--no-t5)


@functools.lru_cache(maxsize=None)  # one meta build per architecture, however many rows plan it
def _arch_weights(arch: str) -> dict:
    """{component: memory_plan.Weights} for a random_init architecture, from its modules' shapes (no weights are
    made). Tied tensors count once, as save_pretrained writes them."""
    import torch

    from edgediff.export.memory_plan import LOADED, Weights
    from edgediff.models.random_init import ARCHS, random_pipeline

    half = ARCHS[arch].get("stored") in ("float16", "bfloat16")
    with tempfile.TemporaryDirectory() as scratch, torch.device("meta"):
        pipe, _ = random_pipeline(arch, scratch)
    weights = {}
    for name in LOADED:
        module = getattr(pipe, name, None)
        if not isinstance(module, torch.nn.Module):
            continue
        # what save_pretrained writes: persistent tensors, a tied one once
        tensors = list({id(t): t for t in module.state_dict(keep_vars=True).values()}.values())
        floats = [t.numel() for t in tensors if t.is_floating_point()]
        other = sum(t.numel() * t.element_size() for t in tensors if not t.is_floating_point())
        weights[name] = Weights(
            stored=sum(floats) * (2 if half else 4) + other,
            fp32=sum(floats) * 4 + other,
            largest=4 * max(floats),
            mapped=True,  # safetensors read in their stored dtype
        )
    return weights


def arch_weights(arch: str) -> dict:
    """{component: memory_plan.Weights} for a random_init architecture, from its modules' shapes (a copy of the
    cached count)."""
    return dict(_arch_weights(arch))


def plan(arch: str, precision: str, memory_bytes: int, t5: bool = True) -> dict:
    """One row: the stages of exporting `arch` at `precision` on a machine with `memory_bytes` free, the largest
    of them, and whether it fits."""
    from edgediff.export.memory_plan import export_stages
    from edgediff.export.options import QUANTIZED

    weights = arch_weights(arch)  # a copy: the T5 may be left out below
    optional = T5_OPTIONAL in weights  # None below where the family has no T5 to leave out
    if not t5:
        weights.pop(T5_OPTIONAL, None)
    quantised = precision if precision in QUANTIZED else False
    stages = export_stages(weights, quantised, free=memory_bytes)
    worst = max(stages, key=lambda s: s.bytes)
    return {
        "arch": arch,
        "precision": precision,
        "t5": t5 if optional else None,
        "memory_bytes": memory_bytes,
        "weights_fp32_bytes": {k: w.fp32 for k, w in weights.items()},
        "stages": [{"stage": s.name, "bytes": s.bytes} for s in stages],
        "peak_bytes": worst.bytes,
        "peak_stage": worst.name,
        "fits": worst.bytes <= memory_bytes,
    }


def main(argv: list[str] | None = None) -> None:
    from edgediff.models.random_init import ARCHS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("arch", nargs="+", choices=sorted(ARCHS), metavar="ARCH")
    parser.add_argument("--precision", action="append", choices=PRECISIONS)
    parser.add_argument("--memory", action="append", type=float, metavar="GIB", help="free memory to plan for")
    parser.add_argument("--out", default=None, help="write the rows as a results file (kind export-plan)")
    args = parser.parse_args(argv)
    rows = []
    for arch in args.arch:
        spec = ARCHS[arch]
        for t5 in (True, False) if "transformer" in spec else (True,):
            for precision in args.precision or ["fp32", "int4"]:
                for gib in args.memory or [16.0]:
                    row = plan(arch, precision, int(gib * 2**30), t5)
                    rows.append(row)
                    fits = "fits" if row["fits"] else "does not fit"
                    print(
                        f"{arch:<22}{'' if t5 else 'no T5':<6}{precision:<12}{gib:5.0f} GiB: peak "
                        f"{row['peak_bytes'] / 2**30:6.2f} GiB at {row['peak_stage']} ({fits})"
                    )
    if args.out:
        data = {
            "kind": RESULTS_KIND,
            "command": "python -m edgediff.benchmarks.export_plan "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "results": rows,
        }
        Path(args.out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
