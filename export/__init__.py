"""edgediff's exporter: diffusers model -> bundle (graphs or Core ML packages + manifest.json + tokenizer.json).

    from edgediff.export import ExportOptions, export

    export("stabilityai/sd-turbo", "sd-turbo-int8", ExportOptions(precision="int8", keep="auto"))

Layout: options.py (what an export makes), source.py and families.py (the model and its family),
bundle_writer.py (the ONNX target; its quantisation phase in bundle_quantize.py, text encoders quantised
during the UNet's export in text_ahead.py) and coreml.py (the Core ML target), both written through
staging.py (atomic output folder) and manifest_builder.py (the manifest they share).
"""

from __future__ import annotations

from pathlib import Path

from .bundle_writer import export_bundle
from .options import ExportOptions


def export(source: str, out: str | Path, options: ExportOptions | None = None, progress: bool = True) -> Path:
    """Exports `source` (a diffusers folder or hub id) into a bundle at `out` for `options.target`; returns
    `out`. Atomic: on any failure nothing is left at `out`."""
    options = options or ExportOptions()
    options.validate()
    if options.target == "coreml":
        from .coreml import write_coreml_bundle

        return write_coreml_bundle(source, out, options, progress)
    from .bundle_writer import write_onnx_bundle

    return write_onnx_bundle(source, out, options, progress)


__all__ = ["ExportOptions", "export", "export_bundle"]
