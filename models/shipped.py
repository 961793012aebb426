"""The small models that ship with edgediff, where they live, and how the runtime finds them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgediff.runtime.errors import BundleError

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class ShippedModel:
    name: str  # its catalogue name: `edgediff list`, `--model NAME`
    folder: Path  # the diffusers folder (`diffusers/`) and the fp32 bundle exported from it (`bundle-fp32/`)
    summary: str

    @property
    def bundle(self) -> Path:
        return self.folder / "bundle-fp32"

    @property
    def diffusers(self) -> Path:
        return self.folder / "diffusers"


DEFAULT_NAME = "shipped"  # the model `generate` draws with when none is named (models/MODEL_CARD.md)
SHIPPED_MODELS = {
    m.name: m
    for m in (
        ShippedModel(DEFAULT_NAME, _HERE / "shipped", "SD 1.x-style UNet, LCM-distilled (models/MODEL_CARD.md)"),
        ShippedModel(
            "shapes-flow",
            _HERE / "shapes_flow",
            "SD3-style flow transformer with CLIP and T5, reflow-distilled to 2 steps (models/MODEL_CARD_SHAPES_FLOW.md)",
        ),
    )
}
SHIPPED_DIR = SHIPPED_MODELS[DEFAULT_NAME].folder
DEFAULT_BUNDLE = SHIPPED_MODELS[DEFAULT_NAME].bundle


def shipped_bundle(name: str | None = None) -> Path:
    """A shipped model's fp32 bundle (None: the default model's); a clear error until it has been built and
    committed."""
    path = SHIPPED_MODELS[name or DEFAULT_NAME].bundle
    if not (path / "manifest.json").is_file():
        raise BundleError("bundle_not_found", path=path)
    return path


def default_bundle() -> Path:
    """The default shipped model's fp32 bundle."""
    return shipped_bundle(DEFAULT_NAME)
