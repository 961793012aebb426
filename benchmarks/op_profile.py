"""Where a graph's time goes, per operator type: one stage graph of each bundle, run with onnxruntime's profiler.

    python -m edgediff.benchmarks.op_profile BUNDLE [BUNDLE ...] --component unet --size 512

Each bundle's graph is opened as the runtime opens it on the CPU (every optimisation, `--threads` intra-op
threads), fed random inputs of one call's shapes, run `--warmup` times unprofiled and `--rounds` times profiled.
The result (JSON on stdout or `--out`) gives, per bundle, the median call and the seconds per call that each
fused operator type took (onnxruntime's own node events, after its fusions: QLinearConv, MatMulIntegerToFloat,
the NCHWc convolutions, ...), with how many nodes of that type ran. It answers questions that a stage's time
cannot: why an int8 graph is no faster than fp32 on one CPU and faster on another.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

NUMPY_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def random_feeds(session, shapes: dict[str, tuple], seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs for each of the session's declared inputs at `shapes`: token ids within a CLIP vocabulary, a
    mid-schedule timestep, unit normal elsewhere. ValueError for an input `shapes` does not size."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in session.get_inputs():
        if spec.name not in shapes:
            raise ValueError(f"input {spec.name!r}: no shape for it at this size")
        dtype = NUMPY_TYPES.get(spec.type)
        if dtype is None:
            raise ValueError(f"input {spec.name!r}: type {spec.type} is not fed by this profiler")
        shape = shapes[spec.name]
        if np.issubdtype(dtype, np.integer):
            high = 500 if "timestep" not in spec.name else 999
            feeds[spec.name] = rng.integers(0, high, size=shape).astype(dtype)
        else:
            feeds[spec.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def timed_nodes(events: list[dict], rounds: int) -> list[dict]:
    """The node kernel events of the last `rounds` calls of a profile (onnxruntime profiles from the session's
    creation: the warm-up calls are in it too, each a "model_run" event)."""
    runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"][-rounds:]
    if len(runs) < rounds:
        raise ValueError(f"the profile holds {len(runs)} calls, not {rounds}")
    windows = [(e["ts"], e["ts"] + e["dur"]) for e in runs]
    return [
        e
        for e in events
        if e.get("cat") == "Node"
        and e.get("name", "").endswith("_kernel_time")
        and any(start <= e["ts"] <= end for start, end in windows)
    ]


def per_op_seconds(events: list[dict], rounds: int) -> dict[str, dict]:
    """{op type: {"seconds": per call, "nodes": per call}} over the last `rounds` calls, costliest first."""
    seconds: dict[str, float] = defaultdict(float)
    nodes: dict[str, int] = defaultdict(int)
    for event in timed_nodes(events, rounds):
        op = event.get("args", {}).get("op_name", "?")
        seconds[op] += event["dur"] / 1e6
        nodes[op] += 1
    return {
        op: {"seconds": round(seconds[op] / rounds, 6), "nodes": nodes[op] // rounds}
        for op in sorted(seconds, key=seconds.get, reverse=True)
    }


def costliest_nodes(events: list[dict], rounds: int, count: int) -> list[dict]:
    """The `count` nodes that took the most time per call: name, op type, input shapes and seconds."""
    seconds: dict[str, float] = defaultdict(float)
    first: dict[str, dict] = {}
    for event in timed_nodes(events, rounds):
        name = event["name"].removesuffix("_kernel_time")
        seconds[name] += event["dur"] / 1e6
        first.setdefault(name, event.get("args", {}))
    return [
        {
            "node": name,
            "op": first[name].get("op_name", "?"),
            "inputs": [list(shape.values())[0] for shape in first[name].get("input_type_shape", [])],
            "seconds": round(seconds[name] / rounds, 6),
        }
        for name in sorted(seconds, key=seconds.get, reverse=True)[:count]
    ]


@dataclass
class _Graph:
    """One bundle's stage graph, open with onnxruntime's profiler on, and the wall time of each call timed."""

    bundle_path: str
    spec: object  # the manifest's component spec
    session: object
    feeds: dict
    calls: list = field(default_factory=list)

    def run(self, timed: bool = True) -> None:
        start = time.perf_counter()
        self.session.run(None, self.feeds)
        if timed:
            self.calls.append(time.perf_counter() - start)


def _open(bundle_path: str, component: str, size: int, threads: int | None, folder: Path) -> _Graph:
    import onnxruntime as ort

    from edgediff.runtime.bundle import Bundle
    from edgediff.runtime.options import DECODERS
    from edgediff.runtime.session_config import session_options

    from .harness import _guidance_batch, stage_shapes

    bundle = Bundle.open(bundle_path, verify="size")
    decoder = "tiny" if component == DECODERS["tiny"] else "full"
    shapes = stage_shapes(bundle, size, _guidance_batch(bundle.manifest), decoder)
    if component not in shapes or component not in bundle.manifest.components:
        stages = [name for name in shapes if name in bundle.manifest.components]
        raise ValueError(f"{bundle_path}: no {component!r} stage graph (has {', '.join(stages)})")
    opts = session_options(threads=threads)
    opts.enable_profiling = True
    folder.mkdir(parents=True, exist_ok=True)
    opts.profile_file_prefix = str(folder / "profile")
    session = ort.InferenceSession(str(bundle.component_path(component)), opts, providers=["CPUExecutionProvider"])
    return _Graph(bundle_path, bundle.manifest.components[component], session, random_feeds(session, shapes[component]))


def _row(graph: _Graph, rounds: int, nodes: int) -> dict:
    events = json.loads(Path(graph.session.end_profiling()).read_text())
    return {
        "bundle": Path(graph.bundle_path).name,
        "precision": graph.spec.precision,
        # "fused" where this graph's attention became MultiHeadAttention (a bundle-wide option: not every graph has it)
        "attention": "fused" if graph.spec.attributes.get("attention", {}).get("fused_layers") else "original",
        "call_seconds": round(statistics.median(graph.calls), 3),
        "calls": [round(c, 3) for c in graph.calls],
        "ops": per_op_seconds(events, rounds),
        "nodes": costliest_nodes(events, rounds, nodes),
    }


def profile_all(
    bundle_paths: list[str],
    component: str,
    size: int,
    threads: int | None,
    warmup: int,
    rounds: int,
    nodes: int = 0,
    interleave: bool = False,
) -> list[dict]:
    """Each bundle's stage graph in turn, `warmup` calls then `rounds` timed ones, one graph open at a time; with
    `interleave`, every graph open at once and their timed calls taken in turn (A B C A B C ...), so that a machine
    whose speed drifts over minutes slows each graph alike."""
    with tempfile.TemporaryDirectory() as tmp:
        if not interleave:
            rows = []
            for i, path in enumerate(bundle_paths):
                graph = _open(path, component, size, threads, Path(tmp) / str(i))
                for _ in range(warmup):
                    graph.run(timed=False)
                for _ in range(rounds):
                    graph.run()
                rows.append(_row(graph, rounds, nodes))
                del graph  # before the next one opens: one graph in memory at a time
            return rows
        graphs = [_open(path, component, size, threads, Path(tmp) / str(i)) for i, path in enumerate(bundle_paths)]
        for graph in graphs:
            for _ in range(warmup):
                graph.run(timed=False)
        for _ in range(rounds):
            for graph in graphs:
                graph.run()
        return [_row(graph, rounds, nodes) for graph in graphs]


def result_header(kind: str, tool: str, argv: list[str] | None) -> dict:
    """The fields every result file of a benchmark tool starts with: its kind, when, on what, and the command."""
    from .machine import describe

    return {
        "kind": kind,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(),
        "command": f"python -m edgediff.benchmarks.{tool} " + " ".join(argv if argv is not None else sys.argv[1:]),
    }


def write_result(result: dict, out: Path | None) -> None:
    """The result as JSON, to `out` or to standard output."""
    text = json.dumps(result, indent=1) + "\n"
    if out:
        out.write_text(text)
    else:
        sys.stdout.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--component", default="unet")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--nodes", type=int, default=20, help="the costliest nodes to list")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="open every bundle's graph at once and take their calls in turn: a drifting machine slows each alike",
    )
    args = parser.parse_args(argv)
    rows = profile_all(
        args.bundles, args.component, args.size, args.threads, args.warmup, args.rounds, args.nodes, args.interleave
    )
    result = {
        **result_header("op-profile", "op_profile", argv),
        "component": args.component,
        "size": args.size,
        "rounds": args.rounds,
        "interleaved": args.interleave,
        "results": rows,
    }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
