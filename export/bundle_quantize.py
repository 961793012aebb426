"""The quantisation phase of an ONNX export: the fp32 bundle's calibration inputs recorded, then each graph the
policy names quantised (quantize.py) and put in place of its fp32 graph, the manifest recording how.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np

from edgediff.runtime.errors import ExportOptionsError
from edgediff.runtime.manifest import Manifest

from .checksums import BackgroundChecksums
from .memory_plan import available_bytes, record_one_at_a_time
from .options import ExportOptions
from .quantize import component_policy, release_memory

log = logging.getLogger("edgediff.export")


def plan_quantization(stages, sizes: dict[str, float], precision: str, options: ExportOptions, family) -> None:
    """Adds the quantisation stages to the progress bar: recording the calibration inputs, then per quantised
    component calibration (static schemes), the sensitivity pass (keep="auto"), quantising and checking. A
    component --quantize-only names that this model lacks is refused here, before any graph is exported."""
    from .calibration import CALIBRATION_PROMPTS
    from .progress import STAGE_COST
    from .quantize import MAX_CALIBRATION_FEEDS, SCHEMES, SENSITIVITY_FEEDS, component_policy, quantisable

    keep, prompts = options.keep, options.calibration_prompts
    # a name this model lacks, or one this family keeps fp32 (the VAE decoder is static int8 only where
    # Family.static_int8_decoder says so)
    known = [n for n in quantisable(precision, family) if n in sizes]
    missing = [n for n in options.quantize_only if n not in known]
    if missing:
        raise ExportOptionsError("export_quantize_only_missing", names=", ".join(missing), known=", ".join(known))
    policy = component_policy(precision, options.quantize_only, family)
    stages.plan(
        "recording calibration inputs", STAGE_COST["record"] * sum(sizes.values()) * len(prompts or CALIBRATION_PROMPTS)
    )
    for name, millions in sizes.items():
        if policy.get(name) is None:
            continue
        if SCHEMES[policy[name]].calibrated:  # ranges taken while recording (_ranges_while_recording)
            stages.plan("recording calibration inputs", STAGE_COST["calibrate"] * millions * MAX_CALIBRATION_FEEDS)
        if keep == "auto":
            stages.plan(f"{name}: sensitivity", STAGE_COST["sensitivity"] * millions * SENSITIVITY_FEEDS)
        stages.plan(f"{name}: quantize", STAGE_COST["quantize"] * millions)
        stages.plan(f"{name}: final check", STAGE_COST["final check"] * millions * MAX_CALIBRATION_FEEDS)


def _ranges_while_recording(manifest: Manifest, name: str, scheme: str) -> bool:
    """Whether a component's activation ranges are taken while its calibration inputs are recorded (a static scheme,
    one graph) rather than by running it over them again (calibration.record_feeds)."""
    from .quantize import SCHEMES

    return SCHEMES[scheme].calibrated and not manifest.components[name].segments


def quantize_bundle(
    staging: Path,
    manifest: Manifest,
    precision: str,
    options: ExportOptions,
    stages,
    family,
    checksums: BackgroundChecksums,
    ahead=None,
) -> None:
    """Replaces the components the policy names (those --quantize-only names, when given) with quantized graphs,
    recording how in the manifest (their checksums started in `checksums`). `ahead`: a text_ahead.TextAhead
    quantising text encoders (waited for before the recording, which then records no feeds for them and takes their
    outputs from it). The largest graph is quantised beside the others (they follow one another on a second thread)
    where both fit in the memory available (memory_plan.quantise_side_by_side), else one at a time: much of a
    quantisation runs on one core (the quantiser itself, writing graphs, opening sessions), and the full-size SD-Turbo
    text encoder's took 11 s of the 49 s its fastest export spent quantising on 2 cores."""
    from concurrent.futures import ThreadPoolExecutor, as_completed

    from .calibration import CALIBRATION_PROMPTS, record_feeds
    from .memory_plan import graph_largest, quantise_side_by_side
    from .quantize import SCHEMES

    keep, prompts = options.keep, options.calibration_prompts
    policy = component_policy(precision, options.quantize_only, family)
    # the graphs open together where they fit, else one at a time (the memory plan's rule)
    alone = record_one_at_a_time([spec.size for spec in manifest.components.values()], available_bytes())
    # the text encoders quantised ahead ({} where their process could not give them back): no feeds recorded for
    # them, and their fp32 graphs stay in place until the recording is done (the UNet's inputs come from them)
    quantised = ahead.records() if ahead is not None else {}
    names = [n for n in manifest.components if policy.get(n) and n not in quantised]
    if alone and names:
        log.info("recording calibration inputs one graph at a time: the fp32 graphs do not fit in memory together")
    with stages.stage("recording calibration inputs"):
        feeds = (
            record_feeds(
                staging,
                prompts or CALIBRATION_PROMPTS,
                names,
                one_at_a_time=alone,
                bounded=bounded(policy, manifest.components),
                ranges_for={n: SCHEMES[policy[n]] for n in names if _ranges_while_recording(manifest, n, policy[n])},
                replayed=ahead.text_runs if ahead is not None else None,  # the text encoders' runs, made there
            )
            if names
            else {}  # every graph quantised ahead
        )
    replan_from_recording(stages, manifest, feeds, keep)
    release_memory()
    for name, record in quantised.items():
        stages.run_elsewhere(f"{name}: ")
        place_one(staging, manifest, name, SCHEMES[policy[name]], record)
        checksums.start(manifest.components[name].files)
    for name, spec in manifest.components.items():
        if policy.get(name) is None:
            why = (
                "not named by --quantize-only" if options.quantize_only else "kept fp32 by policy (export/quantize.py)"
            )
            spec.attributes["quantization"] = {"scheme": None, "why": why}
    largest_first = sorted(names, key=lambda n: -manifest.components[n].size)
    graphs = {
        n: (manifest.components[n].size, policy[n], graph_largest(staging / manifest.components[n].graph_file))
        for n in largest_first
    }
    workers = 2 if quantise_side_by_side(graphs, available_bytes()) else 1
    if workers > 1:
        log.info("quantising %s beside %s", largest_first[0], ", ".join(largest_first[1:]))
    with ThreadPoolExecutor(workers, thread_name_prefix="edgediff-quantize") as pool:
        quantising = {
            pool.submit(
                quantize_one,
                staging,
                manifest.components[n].graph_file,
                n,
                SCHEMES[policy[n]],
                feeds.pop(n),
                keep,
                stages,
                checksums,
            ): n
            for n in largest_first
        }
        try:
            for done in as_completed(quantising):  # each placed as it is done, here: one writer of the manifest
                name = quantising[done]
                place_one(staging, manifest, name, SCHEMES[policy[name]], done.result())
                checksums.start(manifest.components[name].files)  # read while the other graphs are quantised
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # the graph being quantised beside it is finished first
            raise


def bounded(policy: dict, components) -> bool:
    """Whether recording runs calibration.bounded_call: none of these components' schemes takes activation ranges."""
    from .quantize import SCHEMES

    return not any(SCHEMES[policy[n]].calibrated for n in components if policy.get(n))


def quantize_one(staging: Path, graph_file: str, name: str, scheme, recorded, keep, stages, checksums=None) -> dict:
    """Quantises component `name`'s fp32 graph (`graph_file` in `staging`) into a folder of its own there; returns
    its manifest record. `checksums`: the bundle's, where the final graph's checksums start while it is checked."""
    from .quantize import quantize_component

    work = staging / f".quantized-{name}"
    work.mkdir()
    return quantize_component(
        staging / graph_file,
        work / f"{name}.onnx",  # its external data, if any, is f"{name}.onnx.data": the bundle's names
        scheme,
        recorded,
        keep,
        stages=stages,
        references=recorded.outputs,
        ranges=recorded.ranges,
        checksums=checksums,
    )


def place_one(staging: Path, manifest: Manifest, name: str, scheme, record: dict) -> None:
    """Puts component `name`'s quantised graph (quantize_one's) in place of its fp32 graph."""
    spec = manifest.components[name]
    work = staging / f".quantized-{name}"
    for old in spec.files:  # the fp32 graph and any external data it had
        (staging / old).unlink()
    for folder in {(staging / old).parent for old in spec.files} - {staging}:  # its weights' own (_move_weights)
        folder.rmdir()
    # 4-bit bundles are the low-memory choice: their weights memory-mapped (0.91 against 1.15 GiB at the
    # peak for full-size SD-Turbo at 512 in low-memory mode, docs/benchmarks.md)
    spec.files = place_quantized(work / f"{name}.onnx", staging, name, scheme.precision == "int4", checksum=False)
    shutil.rmtree(work)
    spec.precision = scheme.precision
    spec.attributes["quantization"] = record
    release_memory()


def replan_from_recording(stages, manifest: Manifest, feeds: dict, keep) -> None:
    """Re-weighs each quantised graph's stages that run it (its final check over every feed, the sensitivity pass's
    whole-graph runs on its ranking feed) by the seconds a run took while recording. The plan weighed them by
    parameters, which under-weighs convolutional graphs at full size: SANA's DC-AE decoder, 0.16 B parameters and
    13 s a run at 512, showed 96% done with 54 s left at 22 minutes of a 37-minute export."""
    from .quantize import MAX_OUTPUT_RUNS, SENSITIVITY_FEEDS, cropped_for_ranking

    for name, recorded in feeds.items():
        per_run = recorded.seconds_per_run()
        if per_run is None or not recorded:
            continue
        stages.replan(f"{name}: final check", per_run * len(recorded))
        if keep == "auto":  # the quantisation the plan weighed stays; the runs are added
            shapes = {i.name: i.shape for i in manifest.components[name].inputs}
            ranked = cropped_for_ranking(shapes, recorded[0])
            fraction = sum(np.size(v) for v in ranked.values()) / max(sum(np.size(v) for v in recorded[0].values()), 1)
            stages.replan(
                f"{name}: sensitivity", per_run * fraction * SENSITIVITY_FEEDS * (1 + MAX_OUTPUT_RUNS), add=True
            )


def place_quantized(
    dst: Path, staging: Path, name: str, external: bool = False, checksum: bool = True
) -> dict[str, dict]:
    """Moves a quantized graph into the bundle under the component's names; returns its manifest `files`.
    Weights stay where the quantiser wrote them: beside it past 2 GB, and where it wrote them a weight at a time
    (int8, and any graph quantised from one past 2 GB), for onnxruntime reads them there as well, and
    re-saving them whole cost 5-6 s for each of full-size SD-Turbo's UNet and text encoder. They go beside it
    when `external` (4-bit graphs: onnxruntime memory-maps weights beside a graph instead of copying them into
    its heap, which low-memory mode needs)."""
    import onnx

    from .bundle_writer import _file_records, _save_graph  # the writer's own: it imports this module

    data = dst.with_name(f"{dst.name}.data")
    if external and not data.exists():  # the weights are not where they belong
        model = onnx.load(str(dst))
        files = _save_graph(model, staging, name, external=external, checksum=checksum)
        del model
        return files
    names = []
    for f in (dst, data):
        if f.exists():
            f.replace(staging / f.name)
            names.append(f.name)
    return _file_records(staging, names, checksum)
