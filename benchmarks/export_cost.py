"""What an export costs: wall time and peak memory of `edgediff export` configurations, each in a fresh process,
one after another on the same machine (so that their ratios compare like with like).

    python -m edgediff.benchmarks.export_cost SRC --out export-cost.json \\
        --config "fp32=" --config "fastest=--precision int8-static --keep auto --tiny-decoder TAESD"

Each CONFIG is NAME=ARGS, the arguments `edgediff export SRC OUT` would take. The JSON records per configuration the
seconds, the CPU seconds (user and system, on every core, its own processes' included; the system seconds and page
faults apart), the peak resident memory (the export's, with the process it quantises text encoders in:
export/text_ahead.py), the bundle's size on disk, the manifest's quantization records (blocks kept in fp32, output
error) and each stage of the export with its seconds, the peak memory when it ended (the stage that raised it set the
peak) and the most the export held while it ran (sampled from outside), beside the memory plan's estimate of each
stage (export/memory_plan.py), made before the export loaded anything.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_KIND = "export-cost"  # the results file's "kind": docs_tables tells it from `edgediff bench` results


# How often the export's resident memory is read, in seconds, for each stage's own peak (held_rss_bytes): the
# process's high-water mark says which stage raised it, not what a later stage held, which is what the memory plan
# estimates. Read from this process, not a thread of the export's: a thread there waits for Python's lock, which
# PyTorch's exporter holds for seconds while it serialises a graph (a text encoder's peak went unseen that way).
# A peak shorter than this can be missed.
RSS_SAMPLE_SECONDS = 0.02


def _child(source: str, out: str, args: list[str]) -> None:
    """Runs `edgediff export` as this process's only child and prints one JSON line: its seconds and peak RSS
    (the larger of its own high-water mark and the most it held with its own child processes, sampled), and each
    stage with the most the export held while it ran (sampled)."""
    import os
    import resource

    from edgediff.export.progress import STAGES_LOG_ENV

    stages_log = Path(out).with_name(f".{Path(out).name}.stages.jsonl")
    stages_log.unlink(missing_ok=True)
    start = time.perf_counter()
    returncode, stderr, samples = run_sampled(
        [sys.executable, "-m", "edgediff.cli", "export", source, out, *args],
        env={**os.environ, STAGES_LOG_ENV: str(stages_log)},
    )
    seconds = time.perf_counter() - start
    records = [json.loads(line) for line in stages_log.read_text().splitlines()] if stages_log.exists() else []
    stages = [{**r, "held_rss_bytes": held_during(r, samples)} for r in records if "stage" in r]
    estimate = next((r["estimate"] for r in records if "estimate" in r), None)
    stages_log.unlink(missing_ok=True)
    if returncode != 0:  # the CLI's one-line error, not the progress bar's last frame
        lines = stderr.replace("\r", "\n").splitlines()
        errors = [line for line in lines if line.startswith("error:") or "Error" in line]
        print(json.dumps({"error": (errors or lines)[-1:]}))
        sys.exit(1)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the export's, with every process of its own it waited for
    peak = usage.ru_maxrss  # KiB on Linux, bytes on macOS
    # the largest process's high-water mark, or more where processes of the export's own ran at once (sampled)
    peak = max(peak if sys.platform == "darwin" else peak * 1024, max((rss for _, rss in samples), default=0))
    # the work done on every core (user and system): over the cores, the least wall time the export could take
    cpu = usage.ru_utime + usage.ru_stime
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                # of which the kernel's, much of it mapping fresh memory a page at a time: the page faults
                "system_seconds": usage.ru_stime,
                "page_faults": usage.ru_minflt + usage.ru_majflt,
                "peak_rss_bytes": peak,
                "stages": stages,
                "estimate": estimate,
            }
        )
    )


def run_sampled(command: list[str], env: dict | None = None) -> tuple[int, str, list[tuple[float, int]]]:
    """Runs `command`, reading its resident memory every RSS_SAMPLE_SECONDS until it exits; returns its exit status,
    its stderr and the samples (wall-clock time, bytes). No samples where the memory cannot be read (not Linux,
    and psutil missing)."""
    with tempfile.TemporaryFile("w+", encoding="utf-8", errors="replace") as err:
        proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env, text=True)
        try:
            read = _rss_reader(proc.pid)
            samples = []
            while proc.poll() is None:
                rss = read() if read else None
                if rss:  # 0: an exited process's (Linux reads a zombie's as 0)
                    samples.append((time.time(), rss))
                time.sleep(RSS_SAMPLE_SECONDS)
        except BaseException:  # Ctrl-C included: the export does not outlive its measurement
            proc.kill()
            proc.wait()
            raise
        err.seek(0)
        return proc.returncode, err.read(), samples


def _rss_reader(pid: int):
    """A function reading the resident memory of process `pid` and its descendants, in bytes (None once it has gone;
    the export quantises text encoders in a process of its own, export/text_ahead.py); None where it cannot."""
    import os

    if sys.platform.startswith("linux"):
        page = os.sysconf("SC_PAGE_SIZE")

        def resident(p: int) -> int:
            with open(f"/proc/{p}/statm", encoding="ascii") as f:
                return int(f.read().split()[1]) * page

        def children(p: int) -> list[int]:
            found = []
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children", encoding="ascii") as f:
                    found += [int(c) for c in f.read().split()]
            return found

        def statm() -> int | None:
            try:
                total = resident(pid)
            except (OSError, ValueError, IndexError):  # the process ended between poll and read
                return None
            todo = [pid]
            while todo:
                try:
                    found = children(todo.pop())
                    total += sum(resident(c) for c in found)
                    todo += found
                except (OSError, ValueError, IndexError):  # a descendant gone between the reads: not held now
                    continue
            return total

        return statm
    try:
        import psutil
    except ImportError:
        return None
    try:
        process = psutil.Process(pid)
    except psutil.Error:  # the process gone already
        return None

    def held(p) -> int:
        try:
            return int(p.memory_info().rss)
        except psutil.Error:  # a descendant gone between the reads: not held now
            return 0

    def rss() -> int | None:
        try:
            own, descendants = int(process.memory_info().rss), process.children(recursive=True)
        except psutil.Error:
            return None
        return own + sum(held(p) for p in descendants)

    return rss


def held_during(stage: dict, samples: list[tuple[float, int]]) -> int | None:
    """The most of `samples` (wall-clock time, bytes) taken while a logged stage ran (from ended_at - seconds to
    ended_at; stages side by side count each other's memory); None where no sample fell in it."""
    if "ended_at" not in stage:
        return None
    start = stage["ended_at"] - stage["seconds"]
    inside = [rss for t, rss in samples if start <= t <= stage["ended_at"]]
    return max(inside) if inside else None


def _error_lines(stderr: str) -> list[str]:
    """The CLI's own error lines ("error: ..."), else the last line: the progress bar redraws over the end of
    stderr, so its last line alone hid why an export failed (a full disk read as a stalled bar)."""
    lines = stderr.replace("\r", "\n").strip().splitlines()
    errors = [line[line.index("error: ") :] for line in lines if "error: " in line]  # mid-line after a bar
    return errors or lines[-1:]


def measure(source: str, configs: dict[str, list[str]], work: Path, keep_bundles: bool = False) -> list[dict]:
    """Each configuration exported once, in a fresh process, into `work/NAME`; the bundle is removed after
    unless `keep_bundles` (to run or benchmark it next)."""
    from edgediff.runtime import Bundle

    rows = []
    for name, args in configs.items():
        out = work / name
        proc = subprocess.run(
            [sys.executable, "-m", "edgediff.benchmarks.export_cost", "--child", source, str(out), *args],
            capture_output=True,
            text=True,
        )
        lines = proc.stdout.strip().splitlines()
        record = json.loads(lines[-1]) if lines else {"error": _error_lines(proc.stderr)}
        row = {"config": name, "args": args, **record}
        if proc.returncode == 0:
            bundle = Bundle.open(out, verify="size")
            row["bundle_bytes"] = bundle.size_on_disk
            row["components"] = {
                c: {"precision": spec.precision, "quantization": spec.attributes.get("quantization")}
                for c, spec in bundle.manifest.components.items()
            }
            row["export_check"] = bundle.manifest.provenance.get("export_check")
        rows.append(row)
        if not keep_bundles:
            shutil.rmtree(out, ignore_errors=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--child":
        _child(argv[1], argv[2], argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="diffusers folder or hub id")
    parser.add_argument("--config", action="append", required=True, metavar="NAME=ARGS")
    parser.add_argument("--out", default="export-cost.json")
    parser.add_argument("--work", default=None, help="where the bundles are written (default: a temporary folder)")
    parser.add_argument("--keep-bundles", action="store_true", help="keep the bundles in --work/NAME")
    args = parser.parse_args(argv)
    configs = {}
    for spec in args.config:
        name, sep, rest = spec.partition("=")
        if not sep or not name:
            parser.error(f"--config takes NAME=ARGS, got {spec!r}")
        configs[name] = shlex.split(rest)
    from .machine import describe

    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.keep_bundles:
        if not args.work:
            parser.error("--keep-bundles needs --work")
        rows = measure(args.source, configs, Path(args.work), keep_bundles=True)
    else:
        with tempfile.TemporaryDirectory(prefix="edgediff-export-cost-", dir=args.work) as work:
            rows = measure(args.source, configs, Path(work))
    data = {
        "kind": RESULTS_KIND,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": describe(),
        "source": Path(args.source).name,
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    for row in rows:
        if "seconds" in row:
            print(f"{row['config']:<16}{row['seconds']:8.1f} s  peak {row['peak_rss_bytes'] / 2**30:6.2f} GiB")
        else:
            print(f"{row['config']:<16}failed: {row.get('error')}")


if __name__ == "__main__":
    main()
