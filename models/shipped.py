"""Where the model that ships with edgediff lives, and how the runtime finds it."""

from __future__ import annotations

from pathlib import Path

from edgediff.runtime.errors import BundleError

SHIPPED_DIR = Path(__file__).parent / "shipped"
DEFAULT_BUNDLE = SHIPPED_DIR / "bundle-fp32"


def default_bundle() -> Path:
    """The shipped fp32 bundle; a clear error until one has been built and committed."""
    if not (DEFAULT_BUNDLE / "manifest.json").is_file():
        raise BundleError("bundle_not_found", path=DEFAULT_BUNDLE)
    return DEFAULT_BUNDLE
