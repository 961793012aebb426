"""This machine's measured peak: a large MatMul through onnxruntime on the run's provider, in MACs per second
(fp32 on CPUs; fp16 on GPUs, as their bundles are).

The ratio "graph MACs / stage time" against this number says how far each stage is from the
hardware's limit on the same runtime and thread count.
"""

from __future__ import annotations

import time

import numpy as np

PEAK_SIZE = 2048  # large enough to be compute-bound on CPUs, small enough to take < 1 s
GPU_PEAK_SIZE = 8192  # a GPU needs a much larger product to be compute-bound (8192^3 MACs: ~1 ms at 1 PMAC/s)


def matmul_peak(
    threads: int | None = None, provider: str = "CPUExecutionProvider", repeat: int = 5, half: bool = False
) -> dict:
    """`half`: an fp16 MatMul (a GPU's tensor cores; what fp16 bundles are measured against)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper  # only to build the one-node graph

    from edgediff.runtime.session import session_options

    on_cuda = provider == "CUDAExecutionProvider"
    n = GPU_PEAK_SIZE if on_cuda else PEAK_SIZE
    elem, dtype = (TensorProto.FLOAT16, np.float16) if half else (TensorProto.FLOAT, np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["c"])],
        "peak",
        [helper.make_tensor_value_info("a", elem, [n, n]), helper.make_tensor_value_info("b", elem, [n, n])],
        [helper.make_tensor_value_info("c", elem, [n, n])],
    )
    # IR version 10: what onnxruntime 1.17+ reads (newer onnx packages default to newer IR versions)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    session = ort.InferenceSession(
        model.SerializeToString(), sess_options=session_options(threads), providers=[provider]
    )
    rng = np.random.default_rng(0)
    feeds = {
        "a": rng.standard_normal((n, n), dtype=np.float32).astype(dtype),
        "b": rng.standard_normal((n, n), dtype=np.float32).astype(dtype),
    }
    if on_cuda:
        # operands and result stay on the GPU: the rate of the multiply, not of PCIe copies
        binding = session.io_binding()
        for name, value in feeds.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0))
        binding.bind_output("c", "cuda")

        def call():
            session.run_with_iobinding(binding)
            binding.synchronize_outputs()
    else:

        def call():
            session.run(None, feeds)

    call()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    best = min(times)
    return {
        "size": n,
        "seconds": best,
        "macs_per_second": n**3 / best,
        "provider": provider,
        "dtype": "float16" if half else "float32",
    }
