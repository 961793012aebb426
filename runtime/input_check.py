"""A graph's inputs checked against what the graph declares, before onnxruntime sees them.

As Apple's ml-stable-diffusion checks inputs against each Core ML model's description, we check names, ranks,
fixed dimensions and dtypes, so that a mismatch is a clear error, not an onnxruntime stack trace.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

from .errors import BundleError, InputError
from .manifest import ComponentSpec

ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
}


def check_manifest(name: str, spec: ComponentSpec, inputs: dict[str, ort.NodeArg], bundle_path) -> None:
    """The graph's inputs must be the ones its manifest lists: the pipeline builds its feeds from the manifest."""
    declared = {t.name for t in spec.inputs}
    if declared != set(inputs):
        raise BundleError(
            "graph_mismatch",
            path=bundle_path,
            component=name,
            detail=f"graph inputs {sorted(inputs)} but manifest lists {sorted(declared)}",
        )


class InputCheck:
    """Checks feeds against one graph's declared inputs; returns them as arrays of the declared dtypes."""

    def __init__(self, component: str, inputs: dict[str, ort.NodeArg]):
        self.component = component
        self.inputs = inputs

    def __call__(self, feeds: dict) -> dict[str, np.ndarray]:
        missing = set(self.inputs) - set(feeds)
        if missing:
            raise self._error(sorted(missing)[0], "is missing")
        out = {}
        for name, value in feeds.items():
            arg = self.inputs.get(name)
            if arg is None:
                raise self._error(name, "is not an input of this graph")
            value = np.asarray(value)
            if len(arg.shape) != value.ndim:
                raise self._error(name, f"has rank {value.ndim}, the graph declares {len(arg.shape)} ({arg.shape})")
            for axis, (want, got) in enumerate(zip(arg.shape, value.shape)):
                if isinstance(want, int) and want != got:
                    raise self._error(name, f"has size {got} on axis {axis}, the graph is fixed at {want}")
            out[name] = value.astype(ORT_TO_NUMPY.get(arg.type, value.dtype), copy=False)
        return out

    def _error(self, name: str, detail: str) -> InputError:
        return InputError("graph_input", component=self.component, name=name, detail=detail)
