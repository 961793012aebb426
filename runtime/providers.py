"""Execution providers: our short names, the order `auto` tries them in, and a logged, explicit fallback."""

from __future__ import annotations

import logging

import onnxruntime as ort

from .errors import ProviderError

log = logging.getLogger("edgediff.providers")

# short name -> onnxruntime provider name
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "directml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "qnn": "QNNExecutionProvider",
}
# `auto` picks the first available; GPUs before NPUs before the CPU. TensorRT is left to explicit
# choice: its engine build takes minutes on first use.
AUTO_ORDER = ("cuda", "rocm", "directml", "coreml", "openvino", "cpu")


def available() -> list[str]:
    """Short names of the providers this onnxruntime build offers."""
    offered = set(ort.get_available_providers())
    return [short for short, full in PROVIDERS.items() if full in offered]


def resolve(name: str = "auto", fallback: bool = False) -> list[str]:
    """onnxruntime provider list for a session: the chosen one, then CPU for nodes it cannot run."""
    have = available()
    key = name.lower()
    if key == "auto":
        chosen = next(p for p in AUTO_ORDER if p in have)
        log.info("provider auto -> %s (available: %s)", chosen, ", ".join(have))
    elif key not in PROVIDERS:
        raise ProviderError("provider_unknown", name=name, known=", ".join(["auto", *PROVIDERS]))
    elif key not in have:
        if not fallback:
            raise ProviderError("provider_unavailable", name=name, available=", ".join(have))
        chosen = next(p for p in AUTO_ORDER if p in have)
        log.warning("provider %s is not available; falling back to %s", name, chosen)
    else:
        chosen = key
    return [PROVIDERS[chosen]] + ([PROVIDERS["cpu"]] if chosen != "cpu" else [])
