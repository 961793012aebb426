"""Regenerates the tables in docs/benchmarks.md from the result files in benchmarks/results/.

    python -m edgediff.benchmarks.docs_tables            # rewrite the doc's generated blocks
    python -m edgediff.benchmarks.docs_tables --check    # exit 1 when the doc is stale

Each table sits between `<!-- table:NAME -->` and `<!-- /table:NAME -->`; the text around the markers is
written by hand and left alone. Which result files (and which of their rows) feed a table is set in TABLES
below; every row of a table links to its file, and `<!-- table:sources -->` lists every file with the
command that measured it. Result files follow results.schema.json (`edgediff bench` writes them).

Runs from a source checkout (the docs and the results are not installed); `--root` names one elsewhere.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .report import clock_label, quality_cell, work, work_difference

DOC = Path("docs") / "benchmarks.md"
RESULTS = Path("benchmarks") / "results"
MARKER = re.compile(r"(<!-- table:(?P<name>[a-z0-9-]+) -->\n)(?P<body>.*?)(<!-- /table:(?P=name) -->)", re.DOTALL)

FAMILIES = {
    "sd-turbo": "SD-Turbo",
    "sdxl-turbo": "SDXL-Turbo",
    "lcm-sd1": "shipped model",
    "sana-sprint": "SANA-Sprint 0.6B",
    "sd3.5": "SD3.5-medium",
}
# what the bundle name says and the manifest's precisions do not
BUNDLE_LABELS = {
    "sd-turbo-sliced-int8s": "int8-static, head-sliced attention",
    "sd-turbo-fp32-opt": "fp32, `--optimize`",
    "sd-turbo-int4-sliced": "int4 (4-bit MatMuls and convolutions), head-sliced attention",
    "sd-turbo-int4-seg2": "int4, head-sliced attention, UNet in 2 segments",
    "sd-turbo-int4-seg3": "int4, head-sliced attention, UNet in 3 segments",
    "sd-turbo-int4-seg4": "int4, head-sliced attention, UNet in 4 segments",
    "fp32-no-t5": "fp32 without T5",
    "sd35-medium-int8-fused": "int8 without T5, fused attention",
    "sd35-medium-int8-fused-tiny": "int8 without T5, fused attention",
    "sd35-medium-int8-fused-tiny-counted": "int8 without T5 (its zero tokens counted), fused attention",
    "sd35-medium-int8-fused-tiny-gelu": "int8 without T5 (its zero tokens counted), fused attention, FastGelu",
    "sd-turbo-avx2-int8": "int8 (dynamic, MatMuls)",
    "sd-turbo-avx2-int8s-all": "int8-static, every block",
    "sd-turbo-avx2-int8s-all-fused": "int8-static, every block",
    "sd-turbo-avx2-int8s-keep-8bit": "int8-static, `--keep auto`, 8-bit weights",
    "sd-turbo-avx2-fastest": "int8-static, `--keep auto`",
    "sd-turbo-avx2-int4": "int4 (4-bit MatMuls and convolutions)",
    "sd-turbo-vnni-int8s-all-fused": "int8-static, every block",
    "sd-turbo-amx-int8s-all-fused": "int8-static, every block",
    "sd-turbo-amx-fastest": "int8-static, `--keep auto`",
    "sd-turbo-amx-openvino": "int8-static, `--keep auto`, attention unfused",
    "sana-sprint-amx-openvino": "transformer and DC-AE fp32 (bf16 in OpenVINO), Gemma-2 int8 `--keep auto` on the CPU "
    "provider, `--standard-ops`",
    "sd-turbo-vnni-fastest": "int8-static, `--keep auto`",
    "sd-turbo-vnni-int8": "int8 (dynamic, MatMuls)",
    "sd-turbo-vnni-int8s-all": "int8-static, every block",
    "sd-turbo-vnni-int4": "int4 (4-bit MatMuls and convolutions)",
    "sd-turbo-tier-int8": "int8 (dynamic, MatMuls)",
    "sd-turbo-tier-int8s-all-fused": "int8-static, every block",
    "sd-turbo-tier-fastest": "int8-static, `--keep auto`",
    "sd-turbo-tier-int4": "int4 (4-bit MatMuls and convolutions)",
    "sd-turbo-fp32-before": "fp32, upsampling as traced",
    "sd-turbo-fp32-subpixel": "fp32, sub-pixel upsampling in the decoders",
    "sd-turbo-fp32-subpixel-unet": "fp32, sub-pixel upsampling in the decoders and the UNet",
    "sd-turbo-fastest-before": "int8-static, `--keep auto`, fused attention, upsampling as traced",
    "sd-turbo-fastest-subpixel": "int8-static, `--keep auto`, fused attention, sub-pixel upsampling",
    "sana-fp32-before": "fp32, upsampling as traced",
    "sana-fp32-subpixel": "fp32, sub-pixel upsampling in the DC-AE decoder",
    "sana-dcae-int8s": "fp32, the DC-AE decoder in static int8 (every block), sub-pixel upsampling",
}
# bundles whose UNet attention is onnxruntime's MultiHeadAttention (export --attention fused)
FUSED_ATTENTION = (
    "sd-turbo-avx2-fp32-fused",
    "sd-turbo-vnni-fp32-fused",
    "sd-turbo-avx2-int8s-all-fused",
    "sd-turbo-avx2-fastest",
    "sd-turbo-vnni-int8s-all-fused",
    "sd-turbo-vnni-fastest",
    "sd-turbo-amx-int8s-all-fused",
    "sd-turbo-amx-fastest",
    "sd-turbo-tier-fp32-fused",
    "sd-turbo-tier-int8s-all-fused",
    "sd-turbo-tier-fastest",
)
TINY_DECODERS = {
    "sd-turbo-int8s-fmm": "fp32 tiny decoder",
    "sd-turbo-int8-static-taesd": "fp32 tiny decoder",
    "sd-turbo-int8s-tiny8": "int8 tiny decoder",
    "sd-turbo-int8-static-tiny-int8": "int8 tiny decoder",
    "sd-turbo-avx2-fp32": "fp32 tiny decoder",
    "sd-turbo-avx2-fp32-fused": "fp32 tiny decoder",
    "sd-turbo-avx2-int8": "fp32 tiny decoder",
    "sd-turbo-avx2-int4": "fp32 tiny decoder",
    "sd-turbo-avx2-int8s-all": "int8 tiny decoder",
    "sd-turbo-avx2-int8s-all-fused": "int8 tiny decoder",
    "sd-turbo-avx2-fastest": "int8 tiny decoder",
    "sd-turbo-vnni-int8s-all-fused": "int8 tiny decoder",
    "sd-turbo-vnni-fastest": "int8 tiny decoder",
    "sd-turbo-vnni-fp32": "fp32 tiny decoder",
    "sd-turbo-vnni-fp32-fused": "fp32 tiny decoder",
    "sd-turbo-vnni-int8": "fp32 tiny decoder",
    "sd-turbo-vnni-int4": "fp32 tiny decoder",
    "sd-turbo-amx-fp32": "fp32 tiny decoder",
    "sd-turbo-amx-int8s-all-fused": "int8 tiny decoder",
    "sd-turbo-amx-fastest": "int8 tiny decoder",
    "sd-turbo-amx-openvino": "int8 tiny decoder",
    # made once on the AMX CPU, run with each tier's kernels (benchmarks/cpu_tier.py)
    "sd-turbo-tier-fp32-fused": "fp32 tiny decoder",
    "sd-turbo-tier-int8": "fp32 tiny decoder",
    "sd-turbo-tier-int4": "fp32 tiny decoder",
    "sd-turbo-tier-int8s-all-fused": "int8 tiny decoder",
    "sd-turbo-tier-fastest": "int8 tiny decoder",
}
PEERS = {"optimum": "optimum-onnx"}
CACHE_STARTS = {"off": "no cache", "miss": "first start (optimise and save)", "hit": "from the graph cache"}


@dataclass(frozen=True)
class Source:
    path: str  # relative to benchmarks/results
    rows: tuple[int, ...] | None = None  # which of its rows, in this order (None: all)


@dataclass(frozen=True)
class Table:
    columns: tuple[str, ...]
    sources: tuple[Source, ...]
    unit: str = "s"  # of stage and whole-image times ("s" or "ms"); start times are always in seconds
    p90: bool = False  # whole image as "median (p90)"
    full_decoder: bool = False  # name the full VAE decoder in the configuration, not only the tiny one
    headers: dict = field(default_factory=dict)  # column -> header, over HEADERS


E, A, G = "epyc-2c-avx512/", "x86-2c-avx2/", "nvidia-h100-80gb/"
X = "xeon-2c-amx/"  # a 2-core Intel Xeon with AMX (int8 and bf16 tile units) beside AVX-512 VNNI and BF16
# each stage's time on a CPU beside diffusers' in the same run, across machines
CPU_STAGE_COLUMNS = (
    "machine",
    "config",
    "system",
    "total",
    "text_encoder",
    "unet_call",
    "vae_decoder",
    "rss",
    "vs_diffusers",
    "data",
)
V = "epyc-2c-avx2/"  # a 2-core AMD EPYC with AVX2 alone


def _tier_runs(what: str) -> tuple[str, ...]:
    """The AMX CPU's result files of `what` with each tier's kernels (benchmarks/cpu_tier.py), two passes."""
    return tuple(
        X + f"2026-12-07-{what}-{tier}-{run}.json"
        for run in (1, 2)
        for tier in ("avx2", "avx-vnni", "avx512-vnni", "native")
    )


# the shipped models' tables: every stage, cold start and memory, against diffusers
# the transformer families' tables (SANA-Sprint, SD3.5): per stage, cold start and memory, against diffusers and fp32
# whole-image tables beside diffusers fp32: the decoder column and the ratio named for what they compare
VS_DIFFUSERS_HEADERS = {"vae_decoder": "decoder", "vs_diffusers": "diffusers fp32 time / this"}
TRANSFORMER_COLUMNS = (
    "model",
    "steps",
    "config",
    "system",
    "total",
    "text_encoder",
    "unet_call",
    "vae_decoder",
    "cold",
    "rss",
    "vs_diffusers",
    "quality",
    "data",
)
SHIPPED_COLUMNS = (
    "machine",
    "provider",
    "config",
    "steps",
    "system",
    "total",
    "unet_call",
    "vae_decoder",
    "cold",
    "rss",
    "vs_diffusers",
    "data",
)
# SD3.5-medium without T5, fp32 against diffusers: 512 with every graph open, 1024 in low-memory mode
SD35_SOURCES = (
    Source(E + "2026-12-03-sd35-medium.json"),
    Source(E + "2026-12-03-sd35-medium-1024-low-memory.json"),
)
TABLES = {
    "cpu-fp32": Table(
        ("model", "steps", *CPU_STAGE_COLUMNS[2:]),
        (Source(E + "2026-11-25-sd-turbo-fp32.json"), Source(E + "2026-11-25-sdxl-turbo-fp32.json")),
    ),
    "cpu-fastest": Table(
        CPU_STAGE_COLUMNS,
        (
            Source(E + "2026-11-26-int8-static-tiny-int8.json"),
            Source(E + "2026-11-26-int8-static-tiny-int8-rerun.json"),
            Source(A + "2026-12-02-int8-static-tiny-int8.json"),
            Source(V + "2026-12-03-sd-turbo-configs.json"),
            Source(V + "2026-12-03-sd-turbo-fastest.json"),
            Source(E + "2026-12-03-sd-turbo-fastest.json"),
            Source(X + "2026-12-06-sd-turbo-cpu.json"),
        ),
        headers=VS_DIFFUSERS_HEADERS,
    ),
    # the same bundles with each instruction-set tier's kernels on the AMX CPU (benchmarks/cpu_tier.py), two passes
    "cpu-tiers": Table(
        CPU_STAGE_COLUMNS,
        tuple(Source(path) for path in _tier_runs("sd-turbo-tier")),
        headers=VS_DIFFUSERS_HEADERS,
    ),
    # every precision in the same form, one run per ISA (each beside diffusers)
    "cpu-precisions": Table(
        CPU_STAGE_COLUMNS,
        (Source(V + "2026-12-08-sd-turbo-precisions.json"), Source(E + "2026-12-05-sd-turbo-precisions.json")),
        headers=VS_DIFFUSERS_HEADERS,
    ),
    "cpu-optimize": Table(
        ("config", "total", "unet_call", "vae_decoder", "cold", "rss", "data"),
        (Source(E + "2026-11-26-optimize-fp32.json"),),
    ),
    "cpu-int8-unet": Table(
        ("machine", "config", "unet_call", "vs_fp32", "data"),
        (
            Source(E + "2026-11-26-int8-static-unet.json"),
            Source(A + "2026-12-02-int8-static-unet-1.json"),
            Source(A + "2026-12-02-int8-static-unet-2.json"),
        ),
    ),
    "openvino-cpu": Table(
        ("config", "provider", "total", "text_encoder", "unet_call", "vae_decoder", "cold", "rss", "data"),
        (
            Source(E + "2026-11-26-openvino-auto-cpu.json", (1,)),
            Source(E + "2026-11-26-openvino-cpu.json"),
            Source(E + "2026-11-26-openvino-auto-cpu.json", (0,)),
            Source(E + "2026-11-26-openvino-accuracy.json"),
            Source(E + "2026-11-26-openvino-int8-static-tiny.json", (1, 0)),
        ),
        headers={"vae_decoder": "decoder"},
    ),
    # the AMX CPU: OpenVINO computes fp32 graphs in bf16 on its tile units, beside diffusers in the same run
    "openvino-amx": Table(
        ("config", "provider", *TRANSFORMER_COLUMNS[3:11], "data"),  # system ... vs_diffusers
        (
            Source(X + "2026-12-06-sd-turbo-openvino.json"),
            Source(X + "2026-12-06-sd-turbo-openvino-fp32.json"),
            Source(X + "2026-12-06-sd-turbo-openvino-int8-static.json"),
        ),
        headers=VS_DIFFUSERS_HEADERS,
    ),
    # OpenVINO's own runtime (--provider ov) beside onnxruntime's CPU provider, two passes in reverse orders
    "ov-amx": Table(
        ("config", "provider", *TRANSFORMER_COLUMNS[3:11], "data"),
        (Source(X + "2026-12-07-sd-turbo-ov-1.json"), Source(X + "2026-12-07-sd-turbo-ov-2.json")),
        headers=VS_DIFFUSERS_HEADERS,
    ),
    # the whole image on `ov` with each graph compiled for its shapes and compiled dynamic, runs in turn, and three
    # interleaved rounds against diffusers
    "ov-amx-shapes": Table(
        ("config", "provider", *TRANSFORMER_COLUMNS[3:11], "data"),
        (
            *(Source(X + f"2026-12-07-sd-turbo-ov-shapes-{run}.json") for run in (1, 2, 3, 4)),
            Source(X + "2026-12-07-sd-turbo-ov-rounds.json"),
        ),
        headers=VS_DIFFUSERS_HEADERS,
    ),
    # starts from the graph cache on `ov`: each graph compiled for its shapes, and compiled dynamic
    "ov-amx-cache": Table(
        ("config", "provider", *TRANSFORMER_COLUMNS[4:10], "data"),
        tuple(Source(X + f"2026-12-07-sd-turbo-ov-cache-{run}.json") for run in (1, 2, 3)),
        headers={"vae_decoder": "decoder"},
    ),
    # the AVX2-only EPYC: each bundle on both providers, no peer in the run
    "ov-avx2": Table(
        ("config", "provider", *TRANSFORMER_COLUMNS[3:10], "data"),
        (Source(V + "2026-12-08-sd-turbo-ov.json"),),
    ),
    # the whole image on `ov` on the AMX CPU with AMX hidden (benchmarks/cpu_tier.py avx512-vnni: AVX-512 BF16
    # left, as on Zen 4)
    "ov-tier": Table(
        ("machine", "config", "provider", *TRANSFORMER_COLUMNS[3:11], "data"),
        tuple(Source(X + f"2026-12-07-sd-turbo-ov-tier-avx512-vnni-{run}.json") for run in (1, 2)),
        headers=VS_DIFFUSERS_HEADERS,
    ),
    "low-memory": Table(
        ("config", "total", "text_encoder", "unet_call", "rss", "data"),
        (
            Source(E + "2026-11-26-low-memory.json", (2,)),
            Source(E + "2026-11-26-low-memory-graph-cache.json"),
            Source(E + "2026-11-26-low-memory.json", (1,)),
            Source(E + "2026-11-26-low-memory-sliced.json"),
            Source(E + "2026-12-02-low-memory-int4.json"),
            Source(E + "2026-12-02-low-memory-segments.json"),
        ),
        full_decoder=True,
        headers={"total": "whole image (opening each graph included)"},
    ),
    # the smallest peak (4-bit, head-sliced attention, the UNet in 2 segments) on an AVX2-only CPU, and its time cost
    "low-memory-avx2": Table(
        ("config", "total", "text_encoder", "unet_call", "rss", "data"),
        (
            Source(V + "2026-12-08-int4-seg2-all-open.json"),
            Source(V + "2026-12-08-low-memory-int4-seg2.json"),
        ),
        headers={"total": "whole image (opening each graph included)"},
    ),
    "cold-start": Table(
        ("start", "system", "load", "first_image", "total", "rss", "data"),
        (
            Source(E + "2026-11-26-cold-start.json"),
            Source(E + "2026-11-26-cold-start-repeat3.json"),
            Source(E + "2026-11-26-graph-cache-vs-diffusers.json"),
        ),
        headers={"total": "warm image"},
    ),
    "nvidia": Table(
        (
            "steps",
            "config",
            "system",
            "total",
            "text_encoder",
            "unet_call",
            "vae_decoder",
            "cold",
            "vs_diffusers",
            "data",
        ),
        (
            Source(G + "2026-11-26-sd-turbo-fp16-cuda-graph.json", (0,)),
            Source(G + "2026-11-26-sd-turbo-fp16-cuda-graph-nhwc.json"),
            Source(G + "2026-11-26-sd-turbo-fp16-cuda-graph-tiny.json"),
            Source(G + "2026-11-26-sd-turbo-fp16-vs-diffusers.json", (0,)),
            Source(G + "2026-11-26-sd-turbo-fp16-cuda-graph.json", (1,)),
            Source(G + "2026-11-26-sd-turbo-fp16-vs-diffusers.json", (1,)),
        ),
        unit="ms",
        p90=True,
        headers={"vae_decoder": "decoder"},
    ),
    "cpu-sana-sprint": Table(
        TRANSFORMER_COLUMNS,
        (
            Source(E + "2026-12-03-sana-sprint.json"),
            Source(E + "2026-12-03-sana-sprint-int4.json"),
            Source(E + "2026-12-03-sana-sprint-int4-low-memory.json"),
        ),
        full_decoder=True,
        headers={"unet_call": "transformer call"},
    ),
    "cpu-sana-sprint-avx2": Table(
        TRANSFORMER_COLUMNS,
        (Source(V + "2026-12-04-sana-sprint-int8-static.json"),),
        full_decoder=True,
        headers={"unet_call": "transformer call"},
    ),
    # the best configuration on AVX2: the DC-AE decoder alone in static int8 (--quantize-only vae_decoder)
    "cpu-sana-sprint-dcae-int8": Table(
        TRANSFORMER_COLUMNS,
        (Source(V + "2026-12-05-sana-sprint-dcae-int8.json"),),
        full_decoder=True,
        headers={"unet_call": "transformer call"},
    ),
    # the AMX CPU, OpenVINO in bf16, against diffusers without the instruction (a lower bound on its time)
    "cpu-sana-sprint-amx": Table(
        TRANSFORMER_COLUMNS,
        (Source(X + "2026-12-06-sana-sprint-openvino.json"),),
        full_decoder=True,
        headers={"unet_call": "transformer call"},
    ),
    # the same source exported with its upsamplings as traced and rewritten (export/upsample_conv.py)
    "cpu-subpixel": Table(
        ("model", "steps", "config", "system", "total", "unet_call", "vae_decoder", "vs_diffusers", "quality", "data"),
        (
            Source(V + "2026-12-04-subpixel-sd-turbo.json"),
            Source(V + "2026-12-04-subpixel-unet.json"),
            Source(V + "2026-12-04-subpixel-sana-sprint.json"),
        ),
        full_decoder=True,
        headers={"unet_call": "denoiser call"},
    ),
    # the fastest bundle with and without the rewrite: no quality column (the reference decodes with the full VAE,
    # these rows with the random tiny decoder; the file's notes give the two bundles' images against each other)
    "cpu-subpixel-fastest": Table(
        ("model", "steps", "config", "system", "total", "text_encoder", "unet_call", "vae_decoder", "rss", "data"),
        (Source(V + "2026-12-05-subpixel-fastest.json"),),
    ),
    "cpu-sd35-medium": Table(
        TRANSFORMER_COLUMNS,
        SD35_SOURCES,
        full_decoder=True,
        headers={"unet_call": "transformer call"},
    ),
    "cpu-sd35-medium-avx2": Table(
        ("model", "steps", *CPU_STAGE_COLUMNS[1:]),
        (
            Source(V + "2026-12-05-sd35-medium-int8-512.json"),
            Source(V + "2026-12-03-sd35-medium-fused-1024.json"),
            Source(V + "2026-12-05-sd35-medium-int8-low-memory.json"),
            Source(V + "2026-12-05-sd35-medium-int8-tiny.json"),
            Source(V + "2026-12-05-sd35-medium-int8-tiny-counted.json"),
            Source(V + "2026-12-05-sd35-medium-int8-tiny-gelu.json"),
            Source(V + "2026-12-05-sd35-medium-int8-tiny-gelu-rerun.json"),
            Source(V + "2026-12-05-sd35-medium-int8-512-counted.json"),
            Source(V + "2026-12-05-sd35-medium-int8-low-memory-counted.json"),
        ),
        full_decoder=True,
        headers={"unet_call": "transformer call"},
    ),
    "shipped": Table(
        SHIPPED_COLUMNS,
        (
            Source(E + "2026-11-26-shipped.json"),
            Source(E + "2026-11-26-shipped-fp16-cpu.json"),
            Source(G + "2026-11-26-shipped-cuda-graph.json"),
        ),
        unit="ms",
    ),
    "shipped-flow": Table(
        SHIPPED_COLUMNS,
        (Source(V + "2026-12-05-shapes-flow.json"),),
        unit="ms",
        headers={"unet_call": "transformer call"},
    ),
}

HEADERS = {
    "machine": "machine",
    "model": "model",
    "config": "bundle and mode",
    "provider": "provider",
    "steps": "steps",
    "system": "system",
    "total": "whole image",
    "text_encoder": "text encoder",
    "unet_call": "UNet call",
    "vae_decoder": "VAE decode",
    "cold": "load + first image",
    "load": "load",
    "first_image": "first image",
    "rss": "peak RSS",
    "vs_diffusers": "diffusers time / this",
    "vs_fp32": "fp32 time / this",
    "quality": "PSNR / SSIM against fp32",
    "start": "start",
    "data": "data",
}


@dataclass(frozen=True)
class ExportTable:
    """A table of one export_cost.py file: each configuration's time, peak and size, or one configuration's
    stages (`stages_of`, its name), or each configuration's memory estimate beside what it measured (`memory`).
    `runs`: more files of the same exports on the same machine, run after `file`: the cost table then has a row
    per configuration and run, each ratio within its own run (an export's time on a shared disk moves by a
    tenth and more from run to run)."""

    file: str
    stages_of: str | None = None
    memory: bool = False
    runs: tuple[str, ...] = ()


# the VNNI EPYC's runs (the code of their date)
EXPORT_COST = tuple(E + f"2026-12-06-export-cost-{run}.json" for run in (5, 6, 7, 8))
# the current code's runs
EXPORT_COST_AMX = tuple(X + f"2026-12-07-export-cost-{run}.json" for run in (51, 52, 53, 54, 55))
EXPORT_COST_AVX2 = tuple(V + f"2026-12-08-export-cost-{run}.json" for run in (4, 5, 6))
EXPORT_COST_SD35 = E + "2026-12-03-export-cost-sd35-medium.json"
EXPORT_STAGES_OF = "fastest"
EXPORT_TABLES = {
    "export-cost": ExportTable(EXPORT_COST[0], runs=EXPORT_COST[1:]),
    # the current code's stages, with what each held (sampled): the first of the AMX CPU's runs
    "export-stages": ExportTable(EXPORT_COST_AMX[0], EXPORT_STAGES_OF),
    "export-memory-sd-turbo": ExportTable(EXPORT_COST_AMX[0], memory=True),
    "export-cost-sana-sprint": ExportTable(E + "2026-12-03-export-cost-sana-sprint.json"),
    "export-memory-flux": ExportTable(E + "2026-12-03-export-cost-flux-reduced.json", memory=True),
    "export-cost-avx2": ExportTable(EXPORT_COST_AVX2[0], runs=EXPORT_COST_AVX2[1:]),
    "export-cost-amx": ExportTable(EXPORT_COST_AMX[0], runs=EXPORT_COST_AMX[1:]),
    # the same command with OpenVINO's own runtime installed: --precision auto makes fp32 there
    "export-cost-amx-ov": ExportTable(
        X + "2026-12-07-export-cost-ov-1.json", runs=(X + "2026-12-07-export-cost-ov-2.json",)
    ),
    "export-cost-sd35-medium": ExportTable(EXPORT_COST_SD35),
    "export-memory-sd35-medium": ExportTable(EXPORT_COST_SD35, memory=True),
}
# export_plan.py files: estimates from shapes alone, for architectures too large to export here
PLAN_TABLES = {"export-plan": "estimates/2026-12-06-export-plan.json"}
# op_profile.py files: one stage graph's time per operator type, a column per bundle
PROFILE_TABLES = {
    "op-profile-unet-avx2": V + "2026-12-03-op-profile-unet.json",
    "op-profile-unet-vnni": E + "2026-12-05-op-profile-unet.json",
    "op-profile-unet-amx": X + "2026-12-06-op-profile-unet.json",
    "op-profile-tiny-decoder-avx2": V + "2026-12-03-op-profile-tiny-decoder.json",
    "op-profile-fastest-avx2": V + "2026-12-03-op-profile-unet-fastest.json",
}
# op_profile.py --interleave files of the same bundles, one per kernel tier and pass (benchmarks/cpu_tier.py)
TIER_TABLES = {"cpu-tier-unet-calls": _tier_runs("op-profile-tier")}
# openvino_call.py files: one stage graph's call in OpenVINO's own runtime at each precision, beside onnxruntime's
OPENVINO_TABLES = {
    "openvino-call-unet": E + "2026-12-06-openvino-call-unet.json",
    "openvino-call-unet-amx": X + "2026-12-07-openvino-call-unet.json",
    "openvino-call-shapes-amx": X + "2026-12-07-openvino-call-unet-shapes.json",
    "openvino-call-unet-avx2": V + "2026-12-07-openvino-call-unet.json",
}
# an operator type gets a row of its own where it takes at least this share of a call in some bundle
PROFILE_ROW_SHARE = 0.02


# ------------------------------------------------------------------------------------------ formatting


def _num(x: float) -> str:
    return f"{x:.4g}"  # four significant digits: what a timing on a shared machine can claim


def _time(summary: dict | None, unit: str, p90: bool = False) -> str:
    if not summary:
        return "-"
    scale = 1000 if unit == "ms" else 1
    if "median" not in summary:  # a range of runs: both ends to the same decimals
        ends = [_num(summary[k] * scale) for k in ("min", "max")]
        places = max(len(e.partition(".")[2]) for e in ends)
        return "-".join(f"{summary[k] * scale:.{places}f}" for k in ("min", "max")) + f" {unit}"
    text = f"{_num(summary['median'] * scale)} {unit}"
    return text + (f" ({_num(summary['p90'] * scale)})" if p90 and "p90" in summary else "")


def _gib(b: int | None) -> str:
    return f"{b / 2**30:.2f} GiB" if b else "-"


def machine_label(m: dict) -> str:
    if m.get("gpus"):
        return m["gpus"][0].split(",")[0]
    tag = _isa_tag(set(m.get("isa") or ()))
    if m.get("cpuid_hidden"):  # a lesser tier's kernels on this CPU (benchmarks/cpu_tier.py)
        host = {**m, "isa": [*(m.get("isa") or ()), *m["cpuid_hidden"]], "cpuid_hidden": None}
        return f"{tag} kernels, emulated on a {machine_label(host)}"
    return f"{m['physical_cores']}-core {m['cpu'].split(',')[0]}, {tag}"


def _isa_tag(isa: set[str]) -> str:
    if "amx_int8" in isa:
        return "AMX, AVX-512 VNNI"
    if "avx512_vnni" in isa:
        return "AVX-512 VNNI"
    if "avx_vnni" in isa:
        return "AVX-VNNI"
    if "avx2" in isa:
        return "AVX2 only" if not isa & {"avx512f", "avx512_vnni", "avx_vnni"} else "AVX2"
    return ", ".join(sorted(isa)) or "ISA not recorded"


def machine_line(m: dict) -> str:
    parts = [f"{m['physical_cores']}-core {m['cpu']}{clock_label(m)}"]
    if m.get("isa"):
        parts.append(" ".join(m["isa"]))
    if m.get("cpuid_hidden"):
        parts.append(f"CPUID mask hiding {' '.join(m['cpuid_hidden'])}")
    if m.get("memory_gib"):
        parts.append(f"{_num(m['memory_gib'])} GiB")
    parts += list(m.get("gpus") or ())
    if m.get("onnxruntime"):
        parts.append(f"onnxruntime {m['onnxruntime']}")
    return ", ".join(parts)


def config_label(row: dict, sysrow: dict, table: Table) -> str:
    name = Path(row["bundle"]).name
    precision = row["precision"]
    label = BUNDLE_LABELS.get(name) or next(
        (p for p in ("int8-static", "int8", "int4", "fp16") if p in precision), "fp32"
    )
    if sysrow["system"] != "edgediff":  # what the peer ran: the source model, in its own precision and VAE
        w = work(row, sysrow)
        prompt = f", prompt {w['prompt']}" if w.get("prompt") else ""
        return f"source model, {w['precision']}, {'tiny decoder' if w['decoder'] == 'tiny' else 'full VAE'}{prompt}"
    mode = row.get("mode") or {}
    parts = [label] + (["fused attention"] if name in FUSED_ATTENTION else [])
    if mode.get("low_memory"):
        parts.append("low memory")
    elif table.full_decoder:
        parts.append("all graphs open")
    if mode.get("decoder") == "tiny":
        parts.append(TINY_DECODERS.get(name, "tiny decoder"))
    elif table.full_decoder:
        parts.append("full VAE decoder")
    if mode.get("decode_tile"):
        parts.append(f"tiles of {mode['decode_tile']}")
    if mode.get("cuda_graph"):
        parts.append("`--cuda-graph`")
    if mode.get("graph_cache") and "start" not in table.columns:
        parts.append("graph cache")
    if mode.get("provider_options") and not (sysrow.get("provider_report") or {}).get("options"):
        parts += [f"`{k}={v}`" for k, v in mode["provider_options"].items()]
    return ", ".join(parts)


def _provider(row: dict, sysrow: dict) -> str:
    options = (sysrow.get("provider_report") or {}).get("options") or {}
    return row["provider"] + (f" (`{', '.join(f'{k}={v}' for k, v in options.items())}`)" if options else "")


def _system(sysrow: dict) -> str:
    tags = [t for t in (sysrow.get("device"), sysrow.get("dtype")) if t and t not in ("cpu", "float32")]
    return PEERS.get(sysrow["system"], sysrow["system"]) + (f" ({', '.join(tags)})" if tags else "")


def _start(row: dict, sysrow: dict) -> str:
    if sysrow["system"] != "edgediff":
        return "-"
    states = {g.get("cache") for g in ((sysrow.get("provider_report") or {}).get("graphs") or {}).values()}
    if len(states) == 1:
        return CACHE_STARTS.get(states.pop(), "?")
    return CACHE_STARTS["hit" if (row.get("mode") or {}).get("graph_cache") else "off"]


def _median(summary: dict | None) -> float | None:
    return (summary or {}).get("median")


def _ratio(base: float | None, this: float | None) -> str:
    return f"{base / this:.2f}x" if base and this else "-"


def _cell(col: str, table: Table, data: dict, row: dict, sysrow: dict, ref: int) -> str:
    st, cold = sysrow.get("stages") or {}, sysrow.get("cold") or {}
    if col == "machine":
        return machine_label(row.get("machine") or data["machine"])
    if col == "model":
        return f"{FAMILIES.get(row['family'], row['family'])} {row['size']}"
    if col == "config":
        return config_label(row, sysrow, table)
    if col == "provider":
        return _provider(row, sysrow)
    if col == "steps":
        return str(row["steps"])
    if col == "system":
        return _system(sysrow)
    if col in ("total", "text_encoder", "unet_call", "vae_decoder"):
        return _time(st.get(col), table.unit, p90=table.p90 and col == "total")
    if col == "cold":
        if "load_s" not in cold:
            return "-"
        return _time(cold["load_s"], "s") + (
            f" + {_time(cold['first_image_s'], 's')}" if "first_image_s" in cold else ""
        )
    if col == "load":
        return _time(cold.get("load_s"), "s")
    if col == "first_image":
        return _time(cold.get("first_image_s"), "s")
    if col == "rss":
        return _gib(sysrow.get("peak_rss_bytes"))
    if col == "start":
        return _start(row, sysrow)
    if col == "vs_diffusers":
        peer = next((s for s in row["systems"] if s["system"] == "diffusers"), None)
        ratio = _ratio(_median((peer or {}).get("stages", {}).get("total")), _median(st.get("total")))
        differs = work_difference(work(row, sysrow), work(row, peer)) if peer and ratio != "-" else []
        # a ratio between different work (a tiny decoder, int8) is not a like-for-like speed-up: say so beside it
        return ratio + (f" (different work: {', '.join(differs)})" if differs else "")
    if col == "vs_fp32":
        fp32 = next(
            (
                r
                for r in data["results"]
                if r["precision"] == ["fp32"] and r["steps"] == row["steps"] and r["size"] == row["size"]
            ),
            None,
        )
        base = next((s for s in (fp32 or {}).get("systems", []) if s["system"] == sysrow["system"]), {})
        return _ratio(_median(base.get("stages", {}).get("unet_call")), _median(st.get("unet_call")))
    if col == "quality":  # against the run's reference bundle (bench --quality): PSNR / SSIM
        return quality_cell(sysrow, (data.get("quality_reference") or {}).get("floor_db", 30.0))
    if col == "data":  # the file's number in the list under the table
        return str(ref)
    raise KeyError(col)


# ------------------------------------------------------------------------------------------ tables


def load_results(root: Path) -> dict[str, dict]:
    """Every result file under benchmarks/results, by its path relative to that folder (posix)."""
    base = root / RESULTS
    return {
        p.relative_to(base).as_posix(): json.loads(p.read_text(encoding="utf-8")) for p in sorted(base.rglob("*.json"))
    }


def _link(rel: str) -> str:
    return f"[`{rel}`](../{(RESULTS / rel).as_posix()})"


def render_table(name: str, results: dict[str, dict]) -> str:
    table = TABLES[name]
    headers = {**HEADERS, **table.headers}
    lines = [
        "| " + " | ".join(headers[c] + (" (p90)" if c == "total" and table.p90 else "") for c in table.columns) + " |",
        "|" + "---|" * len(table.columns),
    ]
    files: list[str] = []
    for src in table.sources:
        if src.path not in results:
            raise FileNotFoundError(f"table {name}: {RESULTS / src.path} is missing")
        data = results[src.path]
        if src.path not in files:
            files.append(src.path)
        ref = files.index(src.path) + 1
        picked = [data["results"][i] for i in src.rows] if src.rows is not None else data["results"]
        for row in picked:
            for sysrow in row["systems"]:
                if sysrow.get("measured_with"):  # a peer measured once for bundles of one source: shown with the first
                    continue
                lines.append("| " + " | ".join(_cell(c, table, data, row, sysrow, ref) for c in table.columns) + " |")
    lines += ["", "Data:", ""]
    for i, rel in enumerate(files, 1):
        data = results[rel]
        lines.append(f"{i}. {_link(rel)}: {machine_line(data['machine'])}, {data.get('date', '?')}")
    return "\n".join(lines) + "\n"


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def render_export_cost(name: str, results: dict[str, dict]) -> str:
    """The export-cost table (each configuration: time, its ratio to fp32's, peak and the stage that set it,
    bundle size) or the export-stages table (one configuration's stages, repeated stages summed)."""
    table = EXPORT_TABLES[name]
    files = (table.file, *table.runs)
    for rel in files:
        if rel not in results:
            raise FileNotFoundError(f"table {name}: {RESULTS / rel} is missing")
    data = results[table.file]
    rows = [r for r in data["results"] if "seconds" in r]

    def peak_stage(row: dict) -> str:
        """The stage that raised the export's high-water mark to the peak, or the longest stage during which the
        peak was sampled (the export and a process of its own together: export/text_ahead.py)."""
        stages = row.get("stages") or []
        first = next((s for s in stages if s.get("peak_rss_bytes") == row["peak_rss_bytes"]), None)
        held = [s for s in stages if s.get("held_rss_bytes") == row["peak_rss_bytes"]]
        first = first or max(held, key=lambda s: s["seconds"], default=None)  # the longest of those it overlapped
        return first["stage"] if first else "-"

    if table.memory:
        lines = _memory_lines(rows)
    elif table.stages_of is None:
        # CPU time where the files record it (export_cost's later results): the work done on every core, beside the
        # wall time, and how many cores it kept busy on average
        cpu = any("cpu_seconds" in r for rel in files for r in results[rel]["results"])
        lines = [
            "| export | arguments | wall time | wall time / fp32's | quantising after the exports |"
            + (" CPU time (cores busy) |" if cpu else "")
            + " peak RSS | set by | bundle |",
            "|---|---|---|---|---|" + ("---|" if cpu else "") + "---|---|---|",
        ]
        for run, rel in enumerate(files, 1):
            measured = [r for r in results[rel]["results"] if "seconds" in r]
            fp32 = next((r["seconds"] for r in measured if r["config"] == "fp32"), None)
            for r in measured:
                label = f"{r['config']}, run {run}" if len(files) > 1 else r["config"]
                args = f"`{' '.join(r['args'])}`" if r["args"] else "-"
                ratio = f"{r['seconds'] / fp32:.2f}x" if fp32 else "-"
                quantising = _quantisation_seconds(r)
                work = r.get("cpu_seconds")
                cpu_cell = (f" {_minutes(work)} ({work / r['seconds']:.2f}) |" if work else " - |") if cpu else ""
                lines.append(
                    f"| {label} | {args} | {_minutes(r['seconds'])} | {ratio} | "
                    f"{_minutes(quantising) if quantising else '-'} |{cpu_cell} {_gib(r['peak_rss_bytes'])} | "
                    f"{peak_stage(r)} | {_gib(r.get('bundle_bytes'))} |"
                )
    else:
        row = next(r for r in rows if r["config"] == table.stages_of)
        stages = row.get("stages") or []
        sampled = _held_sampled(stages)
        totals: dict[str, list] = {}
        for stage in stages:
            seconds, peak, held, count = totals.setdefault(stage["stage"], [0.0, 0, 0, 0])
            totals[stage["stage"]] = [
                seconds + stage["seconds"],
                max(peak, stage["peak_rss_bytes"] or 0),
                max(held, stage.get("held_rss_bytes") or 0),
                count + 1,
            ]
        if sampled:
            lines = [
                "| stage | seconds | runs | held during the stage | peak RSS when it ended |",
                "|---|---|---|---|---|",
            ]
        else:
            lines = ["| stage | seconds | runs | peak RSS when it ended |", "|---|---|---|---|"]
        for stage, (seconds, peak, held, count) in totals.items():
            held_cell = f" {_gib(held or None)} |" if sampled else ""
            lines.append(f"| {stage} | {seconds:.1f} | {count} |{held_cell} {_gib(peak)} |")
        most = max((held for _, _, held, _ in totals.values()), default=0)
        whole = f" {_gib(most or None)} |" if sampled else ""
        lines.append(f"| whole export | {row['seconds']:.1f} | |{whole} {_gib(row['peak_rss_bytes'])} |")
    for rel in files if table.stages_of is None and not table.memory else files[:1]:
        lines += ["", f"Data: {_link(rel)}: {machine_line(results[rel]['machine'])}, {results[rel].get('date', '?')}"]
    return "\n".join(lines) + "\n"


# a measured stage's step -> the memory plan's phase it belongs to (the rest are the quantisation's: calibrate,
# sensitivity, quantize, final check); LoRA slots are made and checked within the graph's check
_PHASES = {"export": "export", "check": "export", "LoRA slots": "LoRA slots", "segments": "segments"}
RECORDING_STAGE = "recording calibration inputs"  # bundle_writer's stage, before any graph's quantisation


def _quantisation_seconds(row: dict) -> float:
    """What an export spent on quantisation (recording calibration inputs, then each graph's stages past its export
    and check): the part of its wall time an fp32 export does not have, and what the disk's speed moves least. Where
    stages say when they ended, the wall time from the last graph's export or check to the last quantisation stage:
    graphs quantised side by side count once, and text encoders quantised while the UNet is exported
    (export/text_ahead.py) add nothing where they are done by then."""
    stages = row.get("stages") or []
    quantising = [s for s in stages if _measured_phase(s["stage"])[1] in ("quantize", "recording")]
    if quantising and all("ended" in s for s in stages):
        exported = max((s["ended"] for s in stages if _measured_phase(s["stage"])[1] == "export"), default=0.0)
        start = min((s["ended"] - s["seconds"] for s in quantising if s["ended"] > exported), default=exported)
        return max(0.0, max(s["ended"] for s in quantising) - max(start, exported))
    return sum(s["seconds"] for s in quantising)


def _measured_phase(stage: str) -> tuple[str, str]:
    """The memory plan's (component, phase) a measured stage belongs to: a graph's export and check are its
    component's export (the VAE's two graphs are one component), the rest of its stages its quantisation.
    ControlNets are named by folder when measured and by number when estimated: they do not meet."""
    graph, sep, step = stage.partition(": ")
    if stage == RECORDING_STAGE:
        return stage, "recording"
    if not sep:
        return stage.split(",")[0], ""
    component = "vae" if graph.startswith("vae") else graph
    return component, _PHASES.get(step, "quantize")


def _held_sampled(stages: list[dict]) -> bool:
    """Whether these logged stages say what each held (export_cost samples it; older results have the process's
    high-water mark alone)."""
    return bool(stages) and all("held_rss_bytes" in s for s in stages)


def _memory_lines(rows: list[dict]) -> list[str]:
    """Each configuration's estimated stages beside what was measured: the most the process held during that
    stage's work where the stages log says (held_rss_bytes, sampled), else the process's peak when it ended (a
    high-water mark: a stage cannot show less than the stages before it)."""
    held = _held_sampled([st for r in rows for st in r.get("stages") or []])
    measured_as = "held during the stage" if held else "measured peak so far"
    lines = [f"| export | stage | estimated | {measured_as} |", "|---|---|---|---|"]
    for r in rows:
        measured: dict[tuple[str, str], int] = {}
        for st in r.get("stages") or []:
            key = _measured_phase(st["stage"])
            value = st.get("held_rss_bytes" if held else "peak_rss_bytes") or 0
            measured[key] = max(measured.get(key, 0), value)
        for est in r.get("estimate") or []:
            key = _measured_phase(est["stage"])
            lines.append(f"| {r['config']} | {est['stage']} | {_gib(est['bytes'])} | {_gib(measured.get(key))} |")
        worst = max(r.get("estimate") or [{"bytes": None}], key=lambda e: e["bytes"] or 0)
        lines.append(
            f"| {r['config']} | **whole export** | **{_gib(worst['bytes'])}** | **{_gib(r['peak_rss_bytes'])}** |"
        )
    return lines


def render_export_plan(name: str, results: dict[str, dict]) -> str:
    """An export_plan.py file: each architecture and precision with, per amount of free memory, its estimated
    peak, the stage that sets it, and whether it fits (how calibration inputs are recorded depends on the memory
    free, so the peak may too)."""
    rel = PLAN_TABLES[name]
    if rel not in results:
        raise FileNotFoundError(f"table {name}: {RESULTS / rel} is missing")
    data = results[rel]
    memories = sorted({r["memory_bytes"] for r in data["results"]})
    lines = [
        "| architecture | T5 | precision | weights in fp32 | "
        + " | ".join(f"with {m / 2**30:.0f} GiB free" for m in memories)
        + " |",
        "|---|---|---|---|" + "---|" * len(memories),
    ]
    groups: dict[tuple, dict[int, dict]] = {}
    for r in data["results"]:
        groups.setdefault((r["arch"], r["t5"], r["precision"]), {})[r["memory_bytes"]] = r

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        return f"{'fits' if r['fits'] else '**does not fit**'}: {_gib(r['peak_bytes'])} ({r['peak_stage']})"

    for (arch, t5, precision), by_memory in groups.items():
        weights = sum(next(iter(by_memory.values()))["weights_fp32_bytes"].values())
        cells = " | ".join(cell(by_memory.get(m)) for m in memories)
        t5_cell = "-" if t5 is None else "yes" if t5 else "no"
        lines.append(f"| {arch} | {t5_cell} | {precision} | {_gib(weights)} | {cells} |")
    lines += ["", f"Data: {_link(rel)}: estimates from shapes alone, {data.get('date', '?')}"]
    return "\n".join(lines) + "\n"


def profile_label(row: dict) -> str:
    label = BUNDLE_LABELS.get(row["bundle"], row["precision"])
    return label + (", fused attention" if row.get("attention") == "fused" else "")


def render_op_profile(name: str, results: dict[str, dict]) -> str:
    """An op_profile.py file: each bundle's call, then the seconds (and node count) of each operator type that
    takes a noticeable share of some bundle's call, the rest summed."""
    rel = PROFILE_TABLES[name]
    if rel not in results:
        raise FileNotFoundError(f"table {name}: {RESULTS / rel} is missing")
    data = results[rel]
    rows = data["results"]
    shown = [
        op
        for op in dict.fromkeys(op for r in rows for op in r["ops"])
        if any(r["ops"].get(op, {}).get("seconds", 0) >= PROFILE_ROW_SHARE * r["call_seconds"] for r in rows)
    ]
    lines = [
        "| operator (nodes) | " + " | ".join(profile_label(r) for r in rows) + " |",
        "|---|" + "---|" * len(rows),
        "| **whole call** | " + " | ".join(f"**{_num(r['call_seconds'])} s**" for r in rows) + " |",
    ]

    def cell(r: dict, op: str) -> str:
        o = r["ops"].get(op)
        return f"{_num(o['seconds'])} s ({o['nodes']})" if o else "-"

    for op in shown:
        lines.append(f"| {op} | " + " | ".join(cell(r, op) for r in rows) + " |")
    rest = [sum(o["seconds"] for op, o in r["ops"].items() if op not in shown) for r in rows]
    lines.append("| everything else | " + " | ".join(f"{_num(x)} s" for x in rest) + " |")
    lines += ["", f"Data: {_link(rel)}: {machine_line(data['machine'])}, {data.get('date', '?')}"]
    return "\n".join(lines) + "\n"


def render_tier_calls(name: str, results: dict[str, dict]) -> str:
    """op_profile.py files of the same bundles, each run with one tier's kernels: per file, each bundle's median call
    and the first bundle's call over it, then the numbered data list."""
    rels = TIER_TABLES[name]
    missing = [rel for rel in rels if rel not in results]
    if missing:
        raise FileNotFoundError(f"table {name}: {RESULTS / missing[0]} is missing")
    first = results[rels[0]]["results"]
    lines = [
        "| kernels | " + " | ".join(profile_label(r) for r in first) + " | data |",
        "|---|" + "---|" * (len(first) + 1),
    ]
    for i, rel in enumerate(rels, 1):
        data = results[rel]
        if [r["bundle"] for r in data["results"]] != [r["bundle"] for r in first]:
            raise ValueError(f"table {name}: {rel} profiles other bundles than {rels[0]}")
        base = data["results"][0]["call_seconds"]
        kernels = _isa_tag(set(data["machine"].get("isa") or ())) + (
            " (emulated)" if data["machine"].get("cpuid_hidden") else ""
        )
        cells = [f"{_num(r['call_seconds'])} s ({base / r['call_seconds']:.2f}x)" for r in data["results"]]
        lines.append(f"| {kernels} | " + " | ".join(cells) + f" | {i} |")
    lines += ["", "Data:", ""]
    lines += [
        f"{i}. {_link(rel)}: {machine_line(results[rel]['machine'])}, {results[rel].get('date', '?')}"
        for i, rel in enumerate(rels, 1)
    ]
    return "\n".join(lines) + "\n"


def render_openvino_call(name: str, results: dict[str, dict]) -> str:
    """An openvino_call.py file: per bundle, onnxruntime's CPU call, then OpenVINO's at each inference precision,
    with the ratio to onnxruntime's, the output's error against the fp32 reference and OpenVINO's compile time."""
    rel = OPENVINO_TABLES[name]
    if rel not in results:
        raise FileNotFoundError(f"table {name}: {RESULTS / rel} is missing")
    data = results[rel]
    lines = [
        "| bundle | runtime | call | onnxruntime's time / this | output against fp32 (relative RMS) | compile |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        label, base = profile_label(r), r["onnxruntime_seconds"]
        error = r.get("onnxruntime_relative_rms_to_reference")
        lines.append(
            f"| {label} | onnxruntime {data['onnxruntime']} CPU | {_num(base)} s | 1.00x | "
            f"{'-' if error is None else f'{error:.4f}'} | - |"
        )
        for o in r["openvino"]:
            error = o.get("relative_rms_to_reference")
            shapes = f", {o['shapes']} shapes" if "shapes" in o else ""  # files before --shapes: static
            lines.append(
                f"| {label} | OpenVINO {data['openvino'].split('-')[0]} CPU, {o['inference_precision']}{shapes} | "
                f"{_num(o['call_seconds'])} s | {base / o['call_seconds']:.2f}x | "
                f"{'-' if error is None else f'{error:.4f}'} | {o['compile_seconds']:.1f} s |"
            )
    lines += ["", f"Data: {_link(rel)}: {machine_line(data['machine'])}, {data.get('date', '?')}"]
    return "\n".join(lines) + "\n"


def render_sources(results: dict[str, dict]) -> str:
    lines = ["| file | machine | date | measured with | transcribed from |", "|---|---|---|---|---|"]
    for rel, data in results.items():
        prov = data.get("provenance") or {}
        command = prov.get("command") or data.get("command")
        command = f"`{command}`" if command else "not recorded (see the file's notes)"
        origin = prov.get("transcribed_from", "")
        origin = f"commit {origin[:10]}" if re.fullmatch(r"[0-9a-f]{40}", origin) else (origin or "-")
        lines.append(
            f"| {_link(rel)} | {machine_label(data['machine']) if 'machine' in data else 'none: estimates'} | "
            f"{data.get('date', '?')} | "
            f"{command.replace('|', '&#124;')} | {origin} |"
        )
    return "\n".join(lines) + "\n"


def _all_tables() -> set[str]:
    return {*TABLES, *EXPORT_TABLES, *PLAN_TABLES, *PROFILE_TABLES, *OPENVINO_TABLES, *TIER_TABLES}


def render(doc: str, results: dict[str, dict]) -> str:
    """The doc with every marked block regenerated; an unknown block name is an error."""

    def block(m: re.Match) -> str:
        name = m.group("name")
        if name == "sources":
            body = render_sources(results)
        elif name in TABLES:
            body = render_table(name, results)
        elif name in EXPORT_TABLES:
            body = render_export_cost(name, results)
        elif name in PLAN_TABLES:
            body = render_export_plan(name, results)
        elif name in PROFILE_TABLES:
            body = render_op_profile(name, results)
        elif name in OPENVINO_TABLES:
            body = render_openvino_call(name, results)
        elif name in TIER_TABLES:
            body = render_tier_calls(name, results)
        else:
            known = ", ".join(sorted(_all_tables()))
            raise KeyError(f"{DOC}: no table named {name!r} (known: {known}, sources)")
        return m.group(1) + body + m.group(4)

    missing = _all_tables() - {m.group("name") for m in MARKER.finditer(doc)}
    if missing:
        raise KeyError(f"{DOC} has no block for {', '.join(sorted(missing))}")
    return MARKER.sub(block, doc)


def _default_root() -> Path:
    here = Path(__file__).resolve().parent.parent  # the checkout, when installed editable or run in place
    return here if (here / DOC).exists() else Path.cwd()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when docs/benchmarks.md is not what the results make"
    )
    parser.add_argument("--root", type=Path, default=None, help="the repository checkout (default: this one)")
    args = parser.parse_args(argv)
    root = args.root or _default_root()
    path = root / DOC
    doc = path.read_text(encoding="utf-8")
    new = render(doc, load_results(root))
    if args.check:
        if new != doc:
            print(f"{path} is stale: run python -m edgediff.benchmarks.docs_tables", file=sys.stderr)
            return 1
        return 0
    if new != doc:
        path.write_text(new, encoding="utf-8")
        print(f"rewrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
