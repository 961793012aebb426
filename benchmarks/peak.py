"""This machine's MatMul reference: a large MatMul through onnxruntime on the run's provider, in MACs per second
(fp32 on CPUs, int8 too for int8 bundles; fp16 on GPUs, as their bundles are).

The ratio "graph MACs / stage time" against it says how far each stage is from the hardware's limit on the
same runtime and thread count. One timing is not a reference: a busy moment makes it low, and every stage
then reads as above 100% of it. So the harness samples it several times over a run (PeakReference), keeps
the best, and records how much it moved; beside it stands the ISA's theoretical peak (machine.theoretical_peak).
"""

from __future__ import annotations

import time

import numpy as np

PEAK_SIZE = 2048  # large enough to be compute-bound on CPUs, small enough to take < 1 s
GPU_PEAK_SIZE = 8192  # a GPU needs a much larger product to be compute-bound (8192^3 MACs: ~1 ms at 1 PMAC/s)
# A reference whose samples moved more than this between its best and worst marks the run as noisy.
NOISE_LIMIT = 0.20
DTYPES = ("float32", "float16", "int8")


class MatMulProbe:
    """One n x n MatMul session, built once and timed whenever asked. int8 is MatMulInteger (u8 x s8 -> s32),
    the product int8 bundles' quantised kernels run."""

    def __init__(self, threads: int | None = None, provider: str = "CPUExecutionProvider", dtype: str = "float32"):
        import onnxruntime as ort
        from onnx import TensorProto, helper  # only to build the one-node graph

        from edgediff.runtime.session import session_options

        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; choose from {', '.join(DTYPES)}")
        self.provider, self.dtype = provider, dtype
        on_cuda = provider == "CUDAExecutionProvider"
        n = self.size = GPU_PEAK_SIZE if on_cuda else PEAK_SIZE
        rng = np.random.default_rng(0)
        if dtype == "int8":
            op, elems, out = "MatMulInteger", (TensorProto.UINT8, TensorProto.INT8), TensorProto.INT32
            feeds = {
                "a": rng.integers(0, 256, (n, n), dtype=np.uint8),
                "b": rng.integers(-128, 128, (n, n), dtype=np.int8),
            }
        else:
            elem, np_dtype = (
                (TensorProto.FLOAT16, np.float16) if dtype == "float16" else (TensorProto.FLOAT, np.float32)
            )
            op, elems, out = "MatMul", (elem, elem), elem
            feeds = {k: rng.standard_normal((n, n), dtype=np.float32).astype(np_dtype) for k in ("a", "b")}
        graph = helper.make_graph(
            [helper.make_node(op, ["a", "b"], ["c"])],
            "peak",
            [helper.make_tensor_value_info(k, e, [n, n]) for k, e in zip(("a", "b"), elems)],
            [helper.make_tensor_value_info("c", out, [n, n])],
        )
        # IR version 10: what onnxruntime 1.17+ reads (newer onnx packages default to newer IR versions)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
        session = ort.InferenceSession(
            model.SerializeToString(), sess_options=session_options(threads), providers=[provider]
        )
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

        self._call = call
        call()  # the first call allocates and prepacks: never timed

    def best_seconds(self, repeat: int = 3) -> float:
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            self._call()
            times.append(time.perf_counter() - t0)
        return min(times)


class PeakReference:
    """The measured reference of one provider and dtype over a run: samples taken before, between and after
    the systems; its rate is the best of them, and `spread` how far the worst fell below the best. Each
    sample opens its probe afresh, so that no session (nor GPU memory) is held while the systems run."""

    def __init__(
        self,
        threads: int | None = None,
        provider: str = "CPUExecutionProvider",
        dtype: str = "float32",
        theoretical: dict | None = None,
        repeat: int = 3,
    ):
        self.threads, self.provider, self.dtype = threads, provider, dtype
        self.theoretical, self.repeat = theoretical, repeat
        self.size = GPU_PEAK_SIZE if provider == "CUDAExecutionProvider" else PEAK_SIZE
        self.samples: list[dict] = []

    def sample(self, at: str) -> None:
        probe = MatMulProbe(self.threads, self.provider, self.dtype)
        self.record(at, probe.best_seconds(self.repeat))

    def record(self, at: str, seconds: float) -> None:
        self.samples.append({"at": at, "seconds": seconds, "macs_per_second": self.size**3 / seconds})

    def summary(self) -> dict:
        rates = [s["macs_per_second"] for s in self.samples]
        best = max(self.samples, key=lambda s: s["macs_per_second"])
        spread = 1 - min(rates) / max(rates)
        return {
            "size": self.size,
            "seconds": best["seconds"],
            "macs_per_second": best["macs_per_second"],
            "provider": self.provider,
            "dtype": self.dtype,
            "samples": self.samples,
            "spread": spread,
            "noisy": spread > NOISE_LIMIT,
            "theoretical": self.theoretical,
        }


def matmul_peak(
    threads: int | None = None, provider: str = "CPUExecutionProvider", repeat: int = 5, half: bool = False
) -> dict:
    """One reference, timed once (best of `repeat` calls); `half`: an fp16 MatMul (a GPU's tensor cores)."""
    reference = PeakReference(threads, provider, "float16" if half else "float32", repeat=repeat)
    reference.sample("once")
    return reference.summary()
