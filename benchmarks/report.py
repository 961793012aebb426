"""results.json -> results.md (a table a person reads), chart.png (stacked stage bars) and, with a quality
reference, speed_quality.png (seconds against PSNR).

Every row is labelled by what its system ran (model, precision, decoder): a peer never carries the bundle's
label, and a ratio between rows that did different work says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

# the stages by their results keys ("unet": the denoiser's, whatever the family); the denoiser's label is the row's
STACK = (("text_encoder", "text encoder"), ("unet", "{denoiser} (all calls)"), ("vae_decoder", "VAE decoder"))
PEER_NAMES = {"optimum": "optimum-onnx"}
QUANTISED = ("int8-static", "int8", "int4", "fp16")  # what a bundle's precision list says first, when mixed


def _gib(b):
    return f"{b / 2**30:.2f} GiB" if b else "n/a"


def _s(x):
    return f"{x:.3f} s" if x < 1 else f"{x:.2f} s"


def clock_label(machine: dict) -> str:
    """ " at 2.1 GHz" where the result file recorded the CPU's clock, else "": one CPU model name covers hosts of
    different clocks (2.1 and 2.6 GHz Xeons with AMX)."""
    return f" at {machine['clock_ghz']:.1f} GHz" if machine.get("clock_ghz") else ""


def _machine_line(machine: dict) -> str:
    gpus = f", GPU {'; '.join(machine['gpus'])}" if machine.get("gpus") else ""
    return (
        f"{machine['cpu']}{clock_label(machine)} ({machine['physical_cores']} cores, "
        f"{', '.join(machine['isa']) or 'no ISA flags read'}), "
        f"{machine['memory_gib']:.0f} GiB, {machine['os']}, Python {machine['python']}, onnxruntime "
        f"{machine['onnxruntime']}{gpus}"
    )


def denoiser_name(row: dict) -> str:
    """The row's denoiser as a person reads it: "UNet" or "transformer" (rows written before transformers: UNet)."""
    component = row.get("denoiser") or "unet"
    return {"unet": "UNet"}.get(component, component)


def _stack_label(key: str, name: str, rows: list[dict]) -> str:
    names = dict.fromkeys(denoiser_name(r) for r in rows)  # one label per denoiser the chart's rows ran
    return name.format(denoiser=" / ".join(names) or "UNet") if key == "unet" else name


def _where(sysrow: dict) -> str:
    """A peer's device and dtype when it ran on a GPU or in half precision."""
    tags = [
        t
        for t in (sysrow.get("device"), sysrow.get("dtype"))
        if t and t not in ("cpu", "float32", "CPUExecutionProvider")
    ]
    return f" ({', '.join(tags)})" if tags else ""


def _provider(row: dict, sysrow: dict) -> str:
    """The provider, and the graphs it did not take (they ran on the CPU provider instead)."""
    graphs = (sysrow.get("provider_report") or {}).get("graphs") or {}
    fell = [name for name, g in graphs.items() if g.get("cpu_fallback")]
    return row["provider"] + (f" ({', '.join(fell)} fell back to CPU)" if fell else "")


# ------------------------------------------------------------------------------------------ what ran


def work(row: dict, sysrow: dict, source: str | None = None) -> dict:
    """What a system ran in this row: model, precision (the denoiser's), decoder ("full" or "tiny") and the
    decoder's precision. From the row's `ran` record; inferred for files written before it existed."""
    if sysrow.get("ran"):
        return sysrow["ran"]
    if sysrow["system"] == "edgediff":
        mode = row.get("mode") or {}
        denoiser = (row.get("component_precision") or {}).get(row.get("denoiser") or "unet")
        precision = denoiser or next((p for p in QUANTISED if p in row.get("precision", ())), "fp32")
        return {
            "model": Path(row["bundle"]).name,
            "precision": precision,
            "decoder": mode.get("decoder") or "full",
            "decoder_precision": None,
        }
    half = sysrow.get("dtype") == "float16"
    return {
        "model": Path(source).name if source else None,
        "precision": "fp16" if half else "fp32",
        "decoder": "full",
        "decoder_precision": "fp16" if half else "fp32",
    }


def _decoder_text(w: dict) -> str:
    text = "tiny decoder" if w["decoder"] == "tiny" else "full VAE"
    if w.get("decoder_precision") and w["decoder_precision"] != w["precision"]:
        text += f" in {w['decoder_precision']}"
    return text


def _mode_parts(mode: dict, decoder: bool = True) -> list[str]:
    return [
        p
        for p, on in (
            ("low memory", mode.get("low_memory")),
            (f"{mode.get('decoder')} decoder", decoder and mode.get("decoder", "full") != "full"),
            (f"tiles of {mode.get('decode_tile')}", mode.get("decode_tile")),
            ("CUDA graphs", mode.get("cuda_graph")),
            ("graph cache", mode.get("graph_cache")),
            (
                " ".join(f"{k}={v}" for k, v in (mode.get("provider_options") or {}).items()),
                mode.get("provider_options"),
            ),
        )
        if on
    ]


def row_label(row: dict) -> str:
    """The bundle's name, with edgediff's memory mode when it is not the default (edgediff's rows only)."""
    parts = _mode_parts(row.get("mode") or {})
    return Path(row["bundle"]).name + (f" ({', '.join(parts)})" if parts else "")


def system_label(row: dict, sysrow: dict, source: str | None = None) -> str:
    """What this system ran, e.g. "edgediff fast, int8-static, tiny decoder" against "diffusers fp32, full VAE
    (source SRC)": a peer row never carries the bundle's name or modes."""
    w = work(row, sysrow, source)
    if sysrow["system"] == "edgediff":
        parts = [f"edgediff {w['model']}", w["precision"], _decoder_text(w)]
        return ", ".join(parts + _mode_parts(row.get("mode") or {}, decoder=False))
    device = sysrow.get("device")
    on = f" on {device}" if device and device not in ("cpu", "CPUExecutionProvider") else ""
    name = PEER_NAMES.get(sysrow["system"], sysrow["system"])
    prompt = f", prompt {w['prompt']}" if w.get("prompt") else ""
    return f"{name} {w['precision']}{on}, {_decoder_text(w)}{prompt}" + (
        f" (source {w['model']})" if w.get("model") else ""
    )


def work_difference(a: dict, b: dict) -> list[str]:
    """How two systems' work differs ("int8-static vs fp32", "tiny decoder vs full VAE"); [] when alike."""
    out = []
    if a["precision"] != b["precision"]:
        out.append(f"{a['precision']} vs {b['precision']}")
    if a["decoder"] != b["decoder"]:
        out.append(
            f"{_decoder_text({**a, 'decoder_precision': None})} vs {_decoder_text({**b, 'decoder_precision': None})}"
        )
    elif a.get("decoder_precision") and b.get("decoder_precision") and a["decoder_precision"] != b["decoder_precision"]:
        out.append(f"decoder in {a['decoder_precision']} vs {b['decoder_precision']}")
    return out


def _same_work(data: dict, row: dict, peer: dict, source: str | None) -> tuple[dict, dict] | None:
    """An edgediff row of this run (same machine, provider, family, steps and size) that did the peer's work."""
    want = work(row, peer, source)
    for other in data["results"]:
        if any(other.get(k) != row.get(k) for k in ("provider", "family", "steps", "size", "machine")):
            continue
        ours = other["systems"][0]
        if (
            ours["system"] == "edgediff"
            and "failed" not in ours
            and not work_difference(work(other, ours, source), want)
        ):
            return other, ours
    return None


def ratio_cell(data: dict, row: dict, sysrow: dict, source: str | None = None) -> str:
    """A peer's time against edgediff's in this row, saying when the two did different work, with the
    same-work ratio where this run measured one."""
    ours = row["systems"][0]
    if sysrow is ours:
        return "1.00x"
    if "failed" in sysrow or "failed" in ours:
        return "-"
    text = f"{sysrow['stages']['total']['median'] / ours['stages']['total']['median']:.2f}x time"
    differs = work_difference(work(row, ours, source), work(row, sysrow, source))
    if not differs:
        return text + " (same work)"
    text += f" (different work: {', '.join(differs)})"
    same = _same_work(data, row, sysrow, source)
    if same:
        other, theirs = same
        ratio = sysrow["stages"]["total"]["median"] / theirs["stages"]["total"]["median"]
        return text + f"; same work: {ratio:.2f}x time against {system_label(other, theirs, source)}"
    return text + "; no same-work edgediff row in this run"


# ------------------------------------------------------------------------------------------ references


def _gmacs(x: float) -> str:
    return f"{x / 1e9:.1f} GMAC/s"


def _reference_lines(data: dict) -> list[str]:
    lines = []
    for key, peak in (data.get("peaks") or {"": data.get("peak")}).items():
        if not peak:
            continue
        where = f" on {key.split('/')[0]}" if key else ""
        samples = peak.get("samples") or []
        if len(samples) > 1:
            rates = [s["macs_per_second"] for s in samples]
            spots = ", ".join(dict.fromkeys(s["at"] for s in samples))
            how = (
                f"the best of {len(samples)} samples ({spots} the systems); they moved by {peak['spread']:.0%} "
                f"({_gmacs(min(rates))} to {_gmacs(max(rates))})"
            )
        else:
            how = "timed once"
        lines.append(
            f"- measured MatMul reference, {peak.get('dtype', 'float32')}{where}: {_gmacs(peak['macs_per_second'])}, "
            f"{how} ({data.get('threads')} threads)"
        )
        theory = peak.get("theoretical")
        if theory:
            lines.append(
                f"- ISA theoretical peak, {theory['dtype']}{where}: {_gmacs(theory['macs_per_second'])} = {theory['basis']}"
            )
    return lines


def _noisy_line(data: dict) -> str | None:
    moved = {k: p["spread"] for k, p in (data.get("peaks") or {}).items() if p and p.get("noisy")}
    for source in data.get("merged_from") or []:  # merged files: each run's own mark
        moved.update({f"{k} ({source.get('file', '?')})": v for k, v in (source.get("noisy") or {}).items()})
    if not moved:
        return None
    detail = ", ".join(f"{k} by {v:.0%}" for k, v in moved.items())
    return (
        f"**Noisy run:** the measured MatMul reference moved by more than 20% during the run ({detail}): the "
        "machine's speed changed under the benchmark; read its times and ratios with care."
    )


def _fraction(value: float | None) -> str:
    return f"{value:.0%}" if value is not None else "n/a"


def _of_measured(a: dict) -> str:
    text = _fraction(a.get("fraction_of_peak"))
    if a.get("reference"):
        text += f" ({a['reference'].split('/')[-1]})"
    if (a.get("fraction_of_peak") or 0) > 1:
        text += ", above the measured reference: it was timed slower than this stage ran"
    return text


def _of_theoretical(a: dict) -> str:
    value = a.get("fraction_of_theoretical")
    if value is not None and value > 1:
        return f"**{value:.0%}: above the theoretical peak, the measurement is off**"
    return _fraction(value)


# ------------------------------------------------------------------------------------------ quality


def _psnr(q: dict) -> float:
    return float(q["psnr"])  # written as the string "inf" for identical images (JSON has no infinity)


def _db(x) -> str:
    x = float(x)
    return "identical" if math.isinf(x) else f"{x:.1f} dB"


def _floor_mark(q: dict, floor: float) -> str:
    if not q.get("below_floor"):
        return ""
    if q.get("faster_below_floor"):
        return f"faster, but below the {floor:g} dB floor"
    return f"below the {floor:g} dB floor"


def quality_cell(sysrow: dict, floor: float) -> str:
    q = sysrow.get("quality")
    if not q:
        return "-"
    if "psnr" not in q:
        return f"not scored: {q.get('why', '?')}"
    text = f"{_db(q['psnr'])} / {q['ssim']:.3f}"
    mark = _floor_mark(q, floor)
    return f"**{text}, {mark}**" if mark else text


def _adherence(q: dict) -> str:
    scores = q.get("adherence")
    return ", ".join(f"{k} {v:.0%}" for k, v in scores.items()) if scores else "-"


def _quality_section(data: dict, source: str | None) -> list[str]:
    ref = data.get("quality_reference") or {}
    floor = ref.get("floor_db", 30.0)
    lines = [
        "",
        f"Speed against quality: each row's warm images against `{Path(ref.get('bundle', '?')).name}`'s (CPU "
        f"provider, the same latents and prompt); PSNR over all the images together, then the worst image's; "
        f"floor {floor:g} dB:",
        "",
        "| what ran | size | steps | whole image | PSNR (all / worst image) | SSIM | checker adherence | floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in data["results"]:
        for sysrow in row["systems"]:
            q = sysrow.get("quality")
            if not q or "psnr" not in q:
                continue
            lines.append(
                f"| {system_label(row, sysrow, source)} | {row['size']} | {row['steps']} | "
                f"{_s(sysrow['stages']['total']['median'])} | {_db(q['psnr'])} / {_db(q['psnr_min'])} | "
                f"{q['ssim']:.3f} | {_adherence(q)} | {_floor_mark(q, floor) or 'kept'} |"
            )
    return lines


# ------------------------------------------------------------------------------------------ outputs


def to_markdown(data: dict) -> str:
    source = (data.get("config") or {}).get("source")
    lines = ["# edgediff bench results", ""]
    noisy = _noisy_line(data)
    if noisy:
        lines += [noisy, ""]
    machines = data.get("merged_from") or [{"machine": data["machine"], "date": data["date"]}]
    for m in machines:
        lines.append(f"- {_machine_line(m['machine'])} ({m['date']})")
    lines += _reference_lines(data)
    lines += [f"- note: {n}" for n in data.get("notes", [])]
    scored = any(s.get("quality") for row in data["results"] for s in row["systems"])
    floor = (data.get("quality_reference") or {}).get("floor_db", 30.0)
    columns = [
        "machine",
        "what ran",
        "provider",
        "size",
        "steps",
        "system",
        "whole image (median / p90 / min / max)",
        "text enc",
        "denoiser call",
        "VAE dec",
        "cold: load + first image",
        "peak RSS",
        "bundle",
        "vs edgediff",
    ] + (["PSNR / SSIM vs reference"] if scored else [])
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in data["results"]:
        machine = (row.get("machine") or data.get("machine") or {}).get("cpu", "?")
        for sysrow in row["systems"]:
            if "failed" in sysrow:  # the bench went on without it
                head = [machine, system_label(row, sysrow, source), _provider(row, sysrow), row["size"], row["steps"]]
                cells = head + [sysrow["system"], f"failed: {sysrow['failed']} (log: {sysrow.get('log', '-')})"]
                cells += ["-"] * (len(columns) - len(cells))
                lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
                continue
            st = sysrow["stages"]
            tot = st["total"]
            cells = [
                machine,
                system_label(row, sysrow, source),
                _provider(row, sysrow),
                row["size"],
                row["steps"],
                f"{sysrow['system']}{_where(sysrow)}",
                f"{_s(tot['median'])} / {_s(tot['p90'])} / {_s(tot['min'])} / {_s(tot['max'])}",
                _s(st["text_encoder"]["median"]),
                f"{_s(st['unet_call']['median'])} ({denoiser_name(row)})",
                _s(st["vae_decoder"]["median"]),
                f"{_s(sysrow['cold']['load_s']['median'])} + {_s(sysrow['cold']['first_image_s']['median'])}",
                _gib(sysrow["peak_rss_bytes"]),
                f"{row['bundle_bytes'] / 2**20:.1f} MiB" if sysrow["system"] == "edgediff" else "-",
                ratio_cell(data, row, sysrow, source),
            ] + ([quality_cell(sysrow, floor)] if scored else [])
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    achieved = [(row, row["systems"][0]) for row in data["results"] if row["systems"][0].get("achieved")]
    if achieved:
        lines += [
            "",
            "Achieved compute (edgediff; MACs counted from each graph at this size, per call), against the "
            "measured reference in the stage's precision and the ISA's theoretical peak:",
            "",
            "| what ran | size | stage | GMACs | GMAC/s | of measured reference | of ISA theoretical peak |",
            "|---|---|---|---|---|---|---|",
        ]
        for row, ours in achieved:
            for stage, a in ours["achieved"].items():
                shown = f"{denoiser_name(row)} call" if stage == "unet" else stage
                lines.append(
                    f"| {system_label(row, ours, source)} | {row['size']} | {shown} | {a['macs'] / 1e9:.2f} | "
                    f"{a['macs_per_second'] / 1e9:.1f} | {_of_measured(a)} | {_of_theoretical(a)} |"
                )
    if scored:
        lines += _quality_section(data, source)
    return "\n".join(lines) + "\n"


def _axis_label(row: dict, sysrow: dict, source: str | None) -> str:
    """A chart's label: what ran, broken over lines at its commas."""
    return system_label(row, sysrow, source).replace(", ", ",\n") + f"\n{row['size']}px {row['steps']} step"


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def _timed(data: dict) -> list[tuple[dict, dict]]:
    """(row, system row) of every measurement that finished (harness: a failed one has no timings)."""
    return [(row, sysrow) for row in data["results"] for sysrow in row["systems"] if "failed" not in sysrow]


def chart_labels(data: dict) -> list[str]:
    """The bar chart's x-axis, one label per system and config that was timed: what each ran, as in the table."""
    source = (data.get("config") or {}).get("source")
    return [_axis_label(row, sysrow, source) for row, sysrow in _timed(data)]


def chart(data: dict, path: Path) -> Path | None:
    """Stacked bars of stage medians per system and config; None when matplotlib is missing or nothing was timed."""
    plt = _pyplot()
    if plt is None:
        return None
    labels, stacks = chart_labels(data), {k: [] for k, _ in STACK}
    if not labels:
        return None
    others = []
    for _, sysrow in _timed(data):
        st = sysrow["stages"]
        for key, _ in STACK:
            stacks[key].append(st[key]["median"])
        others.append(max(0.0, st["total"]["median"] - sum(st[k]["median"] for k, _ in STACK)))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)), 5))
    bottom = [0.0] * len(labels)
    for key, name in STACK:
        ax.bar(labels, stacks[key], bottom=bottom, label=_stack_label(key, name, data["results"]))
        bottom = [b + v for b, v in zip(bottom, stacks[key])]
    ax.bar(labels, others, bottom=bottom, label="other")
    ax.set_ylabel("seconds per image (median, warm)")
    if _noisy_line(data):
        ax.set_title("noisy run: the measured reference moved by more than 20%", color="tab:red")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def quality_chart(data: dict, path: Path) -> Path | None:
    """Seconds per image against PSNR to the quality reference, the floor drawn and the rows below it marked;
    None without matplotlib or without quality scores."""
    points = [(row, s) for row in data["results"] for s in row["systems"] if "psnr" in (s.get("quality") or {})]
    plt = _pyplot()
    if plt is None or not points:
        return None
    source = (data.get("config") or {}).get("source")
    floor = (data.get("quality_reference") or {}).get("floor_db", 30.0)
    finite = [_psnr(s["quality"]) for _, s in points if not math.isinf(_psnr(s["quality"]))]
    top = max([floor, *finite]) + 10  # where identical images are drawn
    fig, ax = plt.subplots(figsize=(9, 5.5))
    ax.margins(x=0.3, y=0.08)  # room for the labels beside the points
    ax.axhline(floor, color="tab:red", linestyle="--", linewidth=1, label=f"{floor:g} dB floor")
    ax.axhline(top, color="grey", linestyle=":", linewidth=1, label="identical to the reference")
    for row, s in points:
        q = s["quality"]
        y = top if math.isinf(_psnr(q)) else _psnr(q)
        below = q.get("below_floor")
        ax.scatter(
            s["stages"]["total"]["median"],
            y,
            marker="x" if below else "o",
            color="tab:red" if below else "tab:blue",
        )
        ax.annotate(
            system_label(row, s, source),
            (s["stages"]["total"]["median"], y),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
        )
    ax.set_xlabel("seconds per image (median, warm)")
    ax.set_ylabel("PSNR against the reference (dB)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _strict(value):
    """JSON without Infinity: a PSNR of identical images is written as the string "inf" (float() reads it)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_strict(v) for v in value]
    return value


def write_outputs(data: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_strict(data), indent=2, allow_nan=False))
    (out / "results.md").write_text(to_markdown(data))
    written = [out / "results.json", out / "results.md"]
    png = chart(data, out / "chart.png")
    scatter = quality_chart(data, out / "speed_quality.png")
    return written + [p for p in (png, scatter) if p]
