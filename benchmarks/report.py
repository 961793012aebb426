"""results.json -> results.md (a table a person reads) and chart.png (stacked stage bars)."""

from __future__ import annotations

import json
from pathlib import Path

STACK = (("text_encoder", "text encoder"), ("unet", "UNet (all calls)"), ("vae_decoder", "VAE decoder"))


def _gib(b):
    return f"{b / 2**30:.2f} GiB" if b else "n/a"


def _s(x):
    return f"{x:.3f} s" if x < 1 else f"{x:.2f} s"


def _machine_line(machine: dict) -> str:
    gpus = f", GPU {'; '.join(machine['gpus'])}" if machine.get("gpus") else ""
    return (
        f"{machine['cpu']} ({machine['physical_cores']} cores, {', '.join(machine['isa']) or 'no ISA flags read'}), "
        f"{machine['memory_gib']:.0f} GiB, {machine['os']}, Python {machine['python']}, onnxruntime "
        f"{machine['onnxruntime']}{gpus}"
    )


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


def to_markdown(data: dict) -> str:
    lines = ["# edgediff bench results", ""]
    machines = data.get("merged_from") or [{"machine": data["machine"], "date": data["date"]}]
    for m in machines:
        lines.append(f"- {_machine_line(m['machine'])} ({m['date']})")
    for key, peak in (data.get("peaks") or {"": data.get("peak")}).items():
        if peak:
            where = f" ({key.split('/')[0]})" if key else ""
            lines.append(
                f"- peak {peak.get('dtype', 'float32')} MatMul through onnxruntime{where}: "
                f"{peak['macs_per_second'] / 1e9:.1f} GMAC/s ({data.get('threads')} threads)"
            )
    lines += [f"- note: {n}" for n in data.get("notes", [])]
    lines += [
        "",
        "| machine | bundle | provider | size | steps | system | whole image (median / p90 / min / max) | "
        "text enc | UNet call | VAE dec | cold: load + first image | peak RSS | bundle | vs edgediff |",
        "|" + "---|" * 14,
    ]
    for row in data["results"]:
        machine = (row.get("machine") or data.get("machine") or {}).get("cpu", "?")
        base = row["systems"][0]["stages"]["total"]["median"]
        for sysrow in row["systems"]:
            st = sysrow["stages"]
            tot = st["total"]
            ratio = tot["median"] / base
            lines.append(
                f"| {machine} | {row_label(row)} | {_provider(row, sysrow)} | {row['size']} | {row['steps']} | "
                f"{sysrow['system']}{_where(sysrow)} | {_s(tot['median'])} / {_s(tot['p90'])} / {_s(tot['min'])} / {_s(tot['max'])} | "
                f"{_s(st['text_encoder']['median'])} | {_s(st['unet_call']['median'])} | {_s(st['vae_decoder']['median'])} | "
                f"{_s(sysrow['cold']['load_s']['median'])} + {_s(sysrow['cold']['first_image_s']['median'])} | "
                f"{_gib(sysrow['peak_rss_bytes'])} | {row['bundle_bytes'] / 2**20:.1f} MiB | "
                f"{'1.00x' if sysrow is row['systems'][0] else f'{ratio:.2f}x time'} |"
            )
    achieved = [(row, row["systems"][0]["achieved"]) for row in data["results"] if row["systems"][0].get("achieved")]
    if achieved:
        lines += [
            "",
            "Achieved compute (edgediff; MACs counted from each graph at this size, per call):",
            "",
            "| bundle | size | stage | GMACs | GMAC/s | of peak |",
            "|---|---|---|---|---|---|",
        ]
        for row, ach in achieved:
            for stage, a in ach.items():
                frac = f"{a['fraction_of_peak']:.0%}" if a.get("fraction_of_peak") else "n/a"
                lines.append(
                    f"| {Path(row['bundle']).name} | {row['size']} | {stage} | {a['macs'] / 1e9:.2f} | "
                    f"{a['macs_per_second'] / 1e9:.1f} | {frac} |"
                )
    return "\n".join(lines) + "\n"


def row_label(row: dict) -> str:
    """The bundle's name, with edgediff's memory mode when it is not the default."""
    mode = row.get("mode") or {}
    parts = [
        p
        for p, on in (
            ("low memory", mode.get("low_memory")),
            (f"{mode.get('decoder')} decoder", mode.get("decoder", "full") != "full"),
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
    return Path(row["bundle"]).name + (f" ({', '.join(parts)})" if parts else "")


def chart(data: dict, path: Path) -> Path | None:
    """Stacked bars of stage medians per system and config; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    labels, stacks = [], {k: [] for k, _ in STACK}
    others = []
    for row in data["results"]:
        for sysrow in row["systems"]:
            st = sysrow["stages"]
            labels.append(f"{sysrow['system']}\n{row_label(row)}\n{row['size']}px {row['steps']} step")
            for key, _ in STACK:
                stacks[key].append(st[key]["median"])
            others.append(max(0.0, st["total"]["median"] - sum(st[k]["median"] for k, _ in STACK)))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(labels)), 4.5))
    bottom = [0.0] * len(labels)
    for key, name in STACK:
        ax.bar(labels, stacks[key], bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, stacks[key])]
    ax.bar(labels, others, bottom=bottom, label="other")
    ax.set_ylabel("seconds per image (median, warm)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(data: dict, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(data, indent=2))
    (out / "results.md").write_text(to_markdown(data))
    written = [out / "results.json", out / "results.md"]
    png = chart(data, out / "chart.png")
    return written + ([png] if png else [])
