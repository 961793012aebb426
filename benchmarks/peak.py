"""This machine's measured peak: a large fp32 MatMul through onnxruntime, in MACs per second.

The ratio "graph MACs / stage time" against this number says how far each stage is from the
hardware's limit on the same runtime and thread count.
"""

from __future__ import annotations

import time

import numpy as np

PEAK_SIZE = 2048  # large enough to be compute-bound on CPUs, small enough to take < 1 s


def matmul_peak(threads: int | None = None, provider: str = "CPUExecutionProvider", repeat: int = 5) -> dict:
    import onnxruntime as ort
    from onnx import TensorProto, helper  # only to build the one-node graph

    from edgediff.runtime.session import session_options

    n = PEAK_SIZE
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])], "peak",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [n, n]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, [n, n])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    session = ort.InferenceSession(model.SerializeToString(), sess_options=session_options(threads), providers=[provider])
    rng = np.random.default_rng(0)
    feeds = {"a": rng.standard_normal((n, n), dtype=np.float32), "b": rng.standard_normal((n, n), dtype=np.float32)}
    session.run(None, feeds)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {"size": n, "seconds": best, "macs_per_second": n**3 / best}
