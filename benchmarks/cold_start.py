"""Cold start with and without the graph cache: each start in a fresh process.

    python -m edgediff.benchmarks.cold_start BUNDLE [--repeat 3] [--threads 2] [--provider openvino] [--cuda-graph]

Rows: no cache (the optimiser runs every start), first start with an empty cache (optimises and
saves), later starts (load the saved graphs with the optimiser off). Times are session creation
(every graph loaded) and the first image at the bundle's defaults. Providers that compile graphs
(OpenVINO, TensorRT) keep their own compiled cache in the same folder instead ("provider"). With
--cuda-graph the first image includes opening each graph's shape-fixed session and capturing it, which
the cache also serves.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time

_CHILD = """
import json, sys, time
t0 = time.perf_counter()
from edgediff.runtime import Pipeline
pipe = Pipeline.from_bundle(sys.argv[1], provider=sys.argv[4], verify="size", cache=sys.argv[2] == "1",
                            threads=int(sys.argv[3]) or None, cuda_graph=sys.argv[5] == "1")
load = time.perf_counter() - t0
pipe("a large red circle on a blue background", seed=0)
states = sorted({g["cache"] for g in pipe.provider_report()["graphs"].values()})
print(json.dumps({"load_s": load, "first_image_s": time.perf_counter() - t0 - load, "cache": states}))
"""


def _start(bundle: str, cache: bool, threads: int, env: dict, provider: str, cuda_graph: bool) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            bundle,
            "1" if cache else "0",
            str(threads),
            provider,
            "1" if cuda_graph else "0",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(
    bundle: str, repeat: int = 3, threads: int = 0, provider: str = "cpu", cuda_graph: bool = False
) -> list[dict]:
    import os

    rows = []
    with tempfile.TemporaryDirectory(prefix="edgediff-cold-") as cache:
        env = {**os.environ, "EDGEDIFF_CACHE_DIR": cache}
        start = lambda cached: _start(bundle, cached, threads, env, provider, cuda_graph)  # noqa: E731
        no_cache = [start(False) for _ in range(repeat)]
        first = [start(True)]
        cached = [start(True) for _ in range(repeat)]
    for label, runs in (("no cache", no_cache), ("first start (cache empty)", first), ("cached", cached)):
        rows.append(
            {
                "start": label,
                "cache": runs[0]["cache"],
                "n": len(runs),
                "load_s": statistics.median(r["load_s"] for r in runs),
                "first_image_s": statistics.median(r["first_image_s"] for r in runs),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: physical cores)")
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--cuda-graph", action="store_true", help="capture each graph (cuda, tensorrt)")
    args = parser.parse_args()
    t0 = time.time()
    rows = measure(args.bundle, args.repeat, args.threads, args.provider, args.cuda_graph)
    print("| start | graphs from cache | starts | sessions created (s, median) | first image (s, median) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['start']} | {'/'.join(r['cache'])} | {r['n']} | {r['load_s']:.2f} | {r['first_image_s']:.2f} |")
    print(f"({time.time() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
