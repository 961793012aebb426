"""LoRA adapters fused into the weights before export (LCM-LoRA, Hyper-SD, TCD and style LoRAs).

diffusers loads each file (kohya, diffusers or PEFT layouts) through PEFT; the adapters are fused at
their scales and unloaded, so the exported graphs are plain and run at full speed. The manifest
records each LoRA's file name, scale and sha256.
"""

from __future__ import annotations

from pathlib import Path

from edgediff.runtime.bundle import sha256_file
from edgediff.runtime.errors import ExportError


def parse_lora(spec: str) -> tuple[str, float]:
    """ "FILE[:SCALE]" -> (file, scale); a Windows drive's colon is not a scale."""
    head, sep, tail = spec.rpartition(":")
    if sep and head and not (len(head) == 1 and head.isalpha()):
        try:
            return head, float(tail)
        except ValueError:
            pass
    return spec, 1.0


def fuse_loras(pipe, loras: list[tuple[str, float]]) -> list[dict]:
    """Loads, fuses and unloads each LoRA into `pipe`; returns the manifest records."""
    records, names = [], []
    for i, (path, scale) in enumerate(loras):
        file = Path(path)
        if not file.is_file():
            raise ExportError("export_source", source=path, detail="LoRA file not found")
        name = f"lora{i}"
        try:
            pipe.load_lora_weights(str(file), adapter_name=name)
        except (ValueError, KeyError, OSError) as exc:
            raise ExportError("export_source", source=path, detail=f"not a LoRA diffusers can load: {exc}") from None
        names.append(name)
        records.append({"file": file.name, "scale": scale, "sha256": sha256_file(file)})
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _, scale in loras])
        pipe.fuse_lora(adapter_names=names, lora_scale=1.0)
        pipe.unload_lora_weights()
    return records
