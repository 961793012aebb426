"""edgediff's runtime: runs a bundle with numpy + onnxruntime + tokenizers + pillow (never torch)."""

from .bundle import Bundle
from .errors import (
    BundleError, ChecksumError, EdgediffError, InputError, NaNOutputError, OutputPathError, ProviderError,
    SchemaVersionError,
)
from .manifest import SCHEMA_VERSION, Manifest
from .pipeline import Pipeline, PipelineOutput
from .tokenizer import PromptTruncatedWarning

__all__ = [
    "Bundle", "BundleError", "ChecksumError", "EdgediffError", "InputError", "Manifest", "NaNOutputError",
    "OutputPathError", "Pipeline", "PipelineOutput", "PromptTruncatedWarning", "ProviderError", "SCHEMA_VERSION",
    "SchemaVersionError",
]
