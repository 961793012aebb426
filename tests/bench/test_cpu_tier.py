"""The CPU-tier runner: a CPUID mask makes a process's kernels those of a lesser CPU, and the records say so."""

import json
import subprocess
import sys

import numpy as np
import pytest

from edgediff.benchmarks import cpu_tier
from edgediff.benchmarks.machine import ISA_FLAGS


def test_each_tier_hides_the_instruction_sets_above_it():
    hides = {name: set(tier.hides) for name, tier in cpu_tier.TIERS.items()}
    assert {"avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile"} <= hides["avx2"]
    assert "avx_vnni" not in hides["avx-vnni"] and {"avx512f", "amx_int8"} <= hides["avx-vnni"]
    assert not {"avx512f", "avx512bw", "avx512_vnni"} & hides["avx512-vnni"] and "amx_int8" in hides["avx512-vnni"]
    for name, hidden in hides.items():
        assert hidden <= set(cpu_tier.FEATURES), name
        spec = cpu_tier.hide_spec(name).split(",")
        assert len(spec) == len(hidden) and {item.partition(":")[0] for item in spec} == hidden


def test_an_unknown_tier_and_a_host_without_cpuid_faulting_are_refused():
    with pytest.raises(cpu_tier.CpuTierError, match="unknown tier 'sse2'"):
        cpu_tier.hide_spec("sse2")
    if sys.platform == "linux":
        with pytest.raises(cpu_tier.CpuTierError, match="no CPUID faulting"):
            cpu_tier.check_host(frozenset({"fpu", "sse2", "avx2", "hypervisor"}))


def test_the_command_line_lists_tiers_and_wants_a_command(capsys):
    assert cpu_tier.main(["--list"]) == 0
    listed = capsys.readouterr().out
    assert all(f"{name}: {tier.what}" in listed for name, tier in cpu_tier.TIERS.items())
    with pytest.raises(SystemExit):
        cpu_tier.main(["avx2"])


def _masked_host(tmp_path):
    try:
        cpu_tier.check_host()
        return cpu_tier.build(tmp_path / "cache")
    except (cpu_tier.CpuTierError, OSError) as e:
        pytest.skip(f"no CPUID mask on this machine: {e}")


PROBE = """
import json
import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
try:
    from numpy._core._multiarray_umath import __cpu_features__ as seen
except ImportError:
    from numpy.core._multiarray_umath import __cpu_features__ as seen
from edgediff.benchmarks.machine import describe
from edgediff.runtime.cpu_features import cpu_flags, cpuid_hidden

graph = helper.make_graph(
    [helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
    [helper.make_tensor_value_info(n, TensorProto.FLOAT, [64, 64]) for n in "ab"],
    [helper.make_tensor_value_info("c", TensorProto.FLOAT, [64, 64])],
)
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
a, b = np.random.default_rng(0).standard_normal((2, 64, 64)).astype(np.float32)
session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
(c,) = session.run(None, {"a": a, "b": b})
machine = describe()
print(json.dumps({
    "numpy": {k: bool(seen.get(k)) for k in ("AVX2", "AVX512F", "AVX512VNNI")},
    "hidden": sorted(cpuid_hidden()),
    "flags": sorted(cpu_flags()),
    "isa": machine["isa"],
    "cpuid_hidden": machine.get("cpuid_hidden"),
    "matmul_error": float(np.abs(c - a @ b).max()),
}))
"""


def _run_masked(env, code=PROBE):
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("tier", ["avx2", "avx512-vnni"])
def test_a_masked_process_sees_only_its_tier_and_records_what_was_hidden(tmp_path, tier):
    library = _masked_host(tmp_path)
    from edgediff.runtime.cpu_features import cpu_flags

    host = set(cpu_flags())
    if tier == "avx512-vnni" and "avx512_vnni" not in host:
        pytest.skip("the host has no AVX-512 VNNI to keep")
    result = _run_masked(cpu_tier.environment(tier, library=library))
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    hides = set(cpu_tier.TIERS[tier].hides)
    assert set(seen["hidden"]) == hides
    assert not hides & set(seen["flags"]) and not hides & set(seen["isa"])
    assert seen["cpuid_hidden"] == [f for f in ISA_FLAGS if f in hides & host]  # what this host had, now hidden
    assert seen["numpy"]["AVX2"] is True
    assert seen["numpy"]["AVX512F"] is (tier == "avx512-vnni")  # numpy asked CPUID and got the mask's answer
    assert seen["numpy"]["AVX512VNNI"] is (tier == "avx512-vnni")
    assert seen["matmul_error"] < 1e-3  # onnxruntime's kernels, chosen under the mask, still compute


def test_an_unmasked_process_sees_the_host_and_records_nothing_hidden(tmp_path):
    library = _masked_host(tmp_path)
    env = cpu_tier.environment("avx2", library=library)
    del env[cpu_tier.HIDE_VARIABLE]  # the library loaded, no mask asked for
    result = _run_masked(env)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["hidden"] == [] and seen["cpuid_hidden"] is None


def test_a_mask_that_cannot_be_read_ends_the_process_and_real_faults_still_crash(tmp_path):
    library = _masked_host(tmp_path)
    env = cpu_tier.environment("avx2", library=library)
    result = _run_masked(dict(env, **{cpu_tier.HIDE_VARIABLE: "avx512f:7.0.9.16"}), "print('ran')")
    assert result.returncode == 70 and "NAME:LEAF.SUBLEAF.REGISTER.BIT" in result.stderr and "ran" not in result.stdout
    crash = _run_masked(env, "import ctypes; ctypes.string_at(0)")
    assert crash.returncode == -11  # a SIGSEGV that is not CPUID ends the process as without the mask


GENERATE = """
import sys
import numpy as np
from edgediff.runtime import Pipeline
pipe = Pipeline.from_bundle(sys.argv[1])
np.save(sys.argv[2], pipe("a cat", seed=3, num_inference_steps=1, output_type="np").images)
print(pipe.provider_report()["graphs"]["unet"]["cache"])
"""


def test_a_graph_cache_filled_with_this_cpus_kernels_serves_a_lesser_tier(models_root, tmp_path):
    """onnxruntime lays convolutions out in 16-channel blocks where AVX-512 is, in 8 where AVX2 alone is: a graph it
    optimized and cached on the one fails on the other, so the cache keeps one entry per instruction-set tier."""
    from tiny_models import tiny_bundle

    library = _masked_host(tmp_path)
    from edgediff.runtime.cpu_features import cpu_flags

    if "avx512f" not in cpu_flags():
        pytest.skip("the host has no AVX-512 to hide")
    bundle = tiny_bundle("tiny-sd1", models_root)
    env = dict(cpu_tier.environment("avx2", library=library), EDGEDIFF_CACHE_DIR=str(tmp_path / "cache"))
    native = {k: v for k, v in env.items() if k not in ("LD_PRELOAD", cpu_tier.HIDE_VARIABLE)}
    runs = []
    for name, run_env in (("native", native), ("avx2", env), ("avx2-again", env)):
        result = subprocess.run(
            [sys.executable, "-c", GENERATE, str(bundle), str(tmp_path / f"{name}.npy")],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr[-2000:]
        runs.append(result.stdout.split()[-1])
    assert runs == ["miss", "miss", "hit"]  # the AVX2 process made its own entry, then used it
    images = [np.load(tmp_path / f"{name}.npy") for name in ("native", "avx2", "avx2-again")]
    np.testing.assert_allclose(images[1], images[0], atol=1e-3)  # other kernels, the same image
    np.testing.assert_array_equal(images[2], images[1])


def test_images_of_each_run_are_scored_against_the_first_runs(tmp_path, capsys):
    """--compare: the same bench image file in each run against the first run's, worst of its images; the same
    pixels give no PSNR (null), a missing image is an error that names it."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    noisy = base.copy()
    noisy[1, :4, :4, 0] ^= 0x40  # a patch of the second image's red channel, each value 64 off
    for run, images in {"native": base, "avx2": noisy, "same": base}.items():
        (tmp_path / run / "images").mkdir(parents=True)
        np.save(tmp_path / run / "images" / "00-b-auto-1step-16px-edgediff.npy", images)
        np.save(tmp_path / run / "images" / "00-b-auto-1step-16px-diffusers.npy", images)  # a peer's: not scored
    out = tmp_path / "images.json"
    runs = [f"{name}={tmp_path / name}" for name in ("native", "avx2", "same")]
    assert cpu_tier.main(["--compare", *runs, "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["kind"] == "cpu-tier-images" and record["baseline"] == "native" and record["machine"]["isa"]
    rows = {r["tier"]: r for r in record["results"]}
    assert len(record["results"]) == 2 and rows["same"]["psnr_db"] is None and rows["same"]["ssim"] == 1.0
    expected = 10 * np.log10(1 / (16 * (0x40 / 255) ** 2 / (16 * 16 * 3)))
    assert rows["avx2"]["psnr_db"] == pytest.approx(expected, abs=0.01) and rows["avx2"]["ssim"] < 1.0
    (tmp_path / "same" / "images" / "00-b-auto-1step-16px-edgediff.npy").unlink()
    assert cpu_tier.main(["--compare", *runs]) == 2
    assert "no such image in the same run" in capsys.readouterr().err
