"""edgediff's runtime: runs a bundle with numpy + onnxruntime + tokenizers + pillow (never torch)."""

try:
    import onnxruntime  # noqa: F401  (edgediff depends on no build of it: each extra brings one, see ort_builds.py)
except ModuleNotFoundError as exc:
    if exc.name != "onnxruntime":
        raise
    from .ort_builds import missing_message

    raise ModuleNotFoundError(missing_message(), name="onnxruntime") from None

from .bundle import Bundle
from .cancel import CancelToken
from .catalog import list_bundles, models_dir, resolve_bundle
from .errors import (
    BundleError,
    Cancelled,
    ChecksumError,
    EdgediffError,
    InputError,
    NaNOutputError,
    OutputPathError,
    PipelineClosed,
    ProviderError,
    SchemaVersionError,
)
from .manifest import SCHEMA_VERSION, Manifest
from .options import RuntimeOptions
from .pipeline import Pipeline, PipelineOutput, StepEvent
from .tokenizer import PromptTruncatedWarning

__all__ = [
    "Bundle",
    "BundleError",
    "CancelToken",
    "Cancelled",
    "ChecksumError",
    "EdgediffError",
    "InputError",
    "Manifest",
    "NaNOutputError",
    "OutputPathError",
    "Pipeline",
    "PipelineClosed",
    "PipelineOutput",
    "PromptTruncatedWarning",
    "ProviderError",
    "RuntimeOptions",
    "SCHEMA_VERSION",
    "SchemaVersionError",
    "StepEvent",
    "list_bundles",
    "models_dir",
    "resolve_bundle",
]
