"""The Core ML backend: runs a Core ML bundle's packages (macOS) behind the same interface as
GraphSession, so the pipeline, its samplers and checks are shared with ONNX bundles.

Packages have static shapes; a call whose batch is a multiple of the declared one runs in chunks.
"""

from __future__ import annotations

import sys

import numpy as np

from .errors import ProviderError
from .manifest import ComponentSpec
from .options import COMPUTE_UNITS
from .session_states import CacheStatus


def check_available(compute_units: str) -> None:
    if compute_units not in COMPUTE_UNITS:
        raise ProviderError(
            "provider_unknown", name=f"coreml:{compute_units}", known=", ".join(f"coreml:{c}" for c in COMPUTE_UNITS)
        )
    if sys.platform != "darwin":
        raise ProviderError(
            "provider_unavailable",
            name="coreml",
            available="onnx bundles only on this OS",
            install="Core ML bundles run on macOS; export an ONNX bundle for this machine",
        )


class CoreMLSession:
    def __init__(self, name: str, package, spec: ComponentSpec, compute_units: str = "all"):
        import coremltools as ct

        check_available(compute_units)
        self.name = name
        self.spec = spec
        self.model = ct.models.MLModel(
            str(package), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units])
        )
        self.inputs = {t.name: t for t in spec.inputs}
        self.output_names = [t.name for t in spec.outputs]
        self.cache = CacheStatus.OFF
        self.fell_back_to_cpu = compute_units == "cpu_only"

    @property
    def providers(self) -> list[str]:
        return ["CoreML"]

    def _feeds(self, feeds: dict) -> list[dict]:
        """Cast to the declared dtypes and shapes; split a larger batch into declared-size chunks."""
        fixed, batched, chunks = {}, {}, 1
        for name, value in feeds.items():
            t = self.inputs[name]
            value = np.asarray(value, dtype=t.dtype)
            if value.ndim == 0 or tuple(value.shape) == tuple(t.shape):
                fixed[name] = value.reshape(t.shape)
            else:
                batched[name] = value
                chunks = max(chunks, value.shape[0] // t.shape[0])
        return [
            {
                **fixed,
                **{k: v[i * self.inputs[k].shape[0] : (i + 1) * self.inputs[k].shape[0]] for k, v in batched.items()},
            }
            for i in range(chunks)
        ]

    def run(self, run_options=None, **feeds) -> list[np.ndarray]:
        results = [self.model.predict(chunk) for chunk in self._feeds(feeds)]
        return [np.concatenate([np.asarray(r[n], dtype=np.float32) for r in results]) for n in self.output_names]
