"""edgediff's exporter: diffusers model -> bundle (ONNX graphs + manifest.json + tokenizer.json)."""

from .bundle_writer import export_bundle

__all__ = ["export_bundle"]
