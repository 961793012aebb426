"""One stage graph's call in OpenVINO's own runtime, at each inference precision asked for, beside onnxruntime's CPU
provider on the same inputs: what OpenVINO's CPU plugin would give on this CPU.

    python -m edgediff.benchmarks.openvino_call BUNDLE [BUNDLE ...] --component unet --size 512 \\
        --precision f32 --precision bf16

This is OpenVINO's Python package (`pip install openvino`), not the runtime's `openvino` provider: onnxruntime-openvino
1.24.1, the newest on PyPI, fails on today's bundles (an int8 text encoder in its bf16 mode, the fused int8-static UNet
in fp32), and only the CPU plugin itself says what bf16, its default precision on CPUs with AVX-512 BF16 or AMX,
does to these graphs. Each graph is read from the bundle, given the call's static shapes (`--shapes dynamic`: also
compiled with its dimensions dynamic, as the runtime's `ov` provider does with its provider option shapes=dynamic),
compiled for the CPU with `--threads` threads and a latency hint at each precision; then every compiled form runs
`--warmup` rounds and `--repeat` timed rounds, the forms taken in turn within a round and in the reverse order in the
next, so that a machine whose speed drifts slows each alike (every form is held at once: about 10 GB for the full-size
fp32 UNet in f32 and bf16, each for its shapes and dynamic). Each first output is compared
(relative RMS) with onnxruntime's on the same graph, run as the runtime opens it, and with `--reference`'s (an fp32
bundle of the same model, through onnxruntime): a quantised graph's error against fp32 in either runtime.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np


def _interleaved(calls: list, warmup: int, repeat: int) -> tuple[list[float], list]:
    """Each call's median seconds over `repeat` rounds that take the calls in turn (each round in the reverse order of
    the one before), after `warmup` unmeasured rounds; and each call's last result."""
    for _ in range(warmup):
        for call in calls:
            call()
    seconds, results = [[] for _ in calls], [None] * len(calls)
    for round_ in range(repeat):
        order = range(len(calls)) if round_ % 2 == 0 else reversed(range(len(calls)))
        for i in order:
            start = time.perf_counter()
            results[i] = calls[i]()
            seconds[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in seconds], results


def relative_rms(got: np.ndarray, ref: np.ndarray) -> float:
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    return float(np.sqrt(np.sum((got - ref) ** 2) / max(np.sum(ref**2), 1e-30)))


def _stage(bundle_path: str, component: str, size: int, threads: int):
    """The bundle's graph of `component`, its onnxruntime session (as the runtime opens it) and one call's inputs."""
    import onnxruntime as ort

    from edgediff.runtime.bundle import Bundle
    from edgediff.runtime.options import DECODERS
    from edgediff.runtime.session_config import session_options

    from .harness import _guidance_batch, stage_shapes
    from .op_profile import random_feeds

    bundle = Bundle.open(bundle_path, verify="size")
    decoder = "tiny" if component == DECODERS["tiny"] else "full"
    shapes = stage_shapes(bundle, size, _guidance_batch(bundle.manifest), decoder)
    if component not in shapes or component not in bundle.manifest.components:
        raise ValueError(f"{bundle_path}: no {component!r} stage graph")
    graph = str(bundle.component_path(component))
    session = ort.InferenceSession(graph, session_options(threads=threads), providers=["CPUExecutionProvider"])
    return bundle, graph, session, random_feeds(session, shapes[component])


def reference_output(bundle_path: str, component: str, size: int, threads: int) -> np.ndarray:
    """onnxruntime's first output of the bundle's graph on the call's inputs (random_feeds: the same for every
    bundle of a model)."""
    _, _, session, feeds = _stage(bundle_path, component, size, threads)
    return session.run(None, feeds)[0]


def measure(
    bundle_path: str,
    component: str,
    size: int,
    precisions: list[str],
    threads: int,
    warmup: int,
    repeat: int,
    reference: np.ndarray | None = None,
    shape_modes: tuple[str, ...] = ("static",),
) -> dict:
    """One bundle's row: onnxruntime's call, then OpenVINO's compile and call at each inference precision and for
    each of `shape_modes` ("static": the call's shapes; "dynamic": the graph's own)."""
    import openvino as ov

    bundle, graph, session, feeds = _stage(bundle_path, component, size, threads)
    (ort_seconds,), (ort_out,) = _interleaved([lambda: session.run(None, feeds)[0]], warmup, repeat)
    session = None  # its memory back before OpenVINO compiles

    def against_reference(out) -> dict:
        return {} if reference is None else {"relative_rms_to_reference": round(relative_rms(out, reference), 6)}

    core = ov.Core()
    forms, calls = [], []
    for shapes in shape_modes:
        model = core.read_model(graph)
        if shapes == "static":
            model.reshape({name: list(value.shape) for name, value in feeds.items()})
        for precision in precisions:
            start = time.perf_counter()
            compiled = core.compile_model(
                model,
                "CPU",
                {
                    "INFERENCE_PRECISION_HINT": precision,
                    "INFERENCE_NUM_THREADS": threads,
                    "PERFORMANCE_HINT": "LATENCY",
                },
            )
            forms.append(
                {
                    "inference_precision": precision,
                    "shapes": shapes,
                    "compile_seconds": round(time.perf_counter() - start, 2),
                }
            )
            request = compiled.create_infer_request()
            calls.append(lambda request=request, compiled=compiled: request.infer(feeds)[compiled.output(0)].copy())
    seconds, outs = _interleaved(calls, warmup, repeat)
    rows = [
        {
            **form,
            "call_seconds": round(t, 3),
            "relative_rms": round(relative_rms(out, ort_out), 6),
            **against_reference(out),
        }
        for form, t, out in zip(forms, seconds, outs)
    ]
    spec = bundle.manifest.components[component]
    return {
        "bundle": Path(bundle_path).name,
        "precision": spec.precision,
        "attention": "fused" if spec.attributes.get("attention", {}).get("fused_layers") else "original",
        "onnxruntime_seconds": round(ort_seconds, 3),
        **{f"onnxruntime_{k}": v for k, v in against_reference(ort_out).items()},
        "openvino": rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--component", default="unet")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--precision", action="append", help="OpenVINO inference precision (f32, bf16, f16)")
    parser.add_argument(
        "--shapes", action="append", choices=("static", "dynamic"), help="compile for the call's shapes, or dynamic"
    )
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--reference", default=None, help="an fp32 bundle of the same model")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        import openvino as ov
    except ImportError:
        parser.error("needs OpenVINO's own package: pip install openvino")
    import onnxruntime as ort

    from edgediff.runtime.session_config import physical_cores

    from .op_profile import result_header, write_result

    precisions = args.precision or ["f32", "bf16"]
    threads = args.threads or physical_cores()
    reference = reference_output(args.reference, args.component, args.size, threads) if args.reference else None
    rows = [
        measure(
            b,
            args.component,
            args.size,
            precisions,
            threads,
            args.warmup,
            args.repeat,
            reference,
            tuple(args.shapes or ["static"]),
        )
        for b in args.bundles
    ]
    result = {
        **result_header("openvino-call", "openvino_call", argv),
        "openvino": ov.__version__,
        "onnxruntime": ort.__version__,
        "component": args.component,
        "size": args.size,
        "reference": Path(args.reference).name if args.reference else None,
        "repeat": args.repeat,
        "results": rows,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
