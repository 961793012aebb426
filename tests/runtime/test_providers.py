"""Provider registry, the auto order and fallback, and the on-disk cache of optimized graphs."""

import dataclasses
import logging

import numpy as np
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from tiny_models import tiny_bundle

from edgediff.cli.main import cli
from edgediff.runtime import Pipeline, ProviderError, provider_loading
from edgediff.runtime import providers as prov

CPU = "CPUExecutionProvider"
LAYOUT_ATOL = 1e-5  # an image opened with and without onnxruntime's CPU layout rewrites (low memory skips them)


@pytest.mark.parametrize(
    "offered,expected",
    [
        ({CPU}, "cpu"),
        ({CPU, "CUDAExecutionProvider", "TensorrtExecutionProvider"}, "cuda"),  # TensorRT only when asked
        ({CPU, "DmlExecutionProvider"}, "directml"),
        ({CPU, "CoreMLExecutionProvider"}, "coreml"),
        ({CPU, "OpenVINOExecutionProvider", "DmlExecutionProvider"}, "directml"),  # GPUs before NPUs
        ({CPU, "QNNExecutionProvider"}, "cpu"),  # QNN only when asked (it wants QDQ int8 graphs)
        ({CPU, "MIGraphXExecutionProvider"}, "migraphx"),  # AMD GPUs since onnxruntime 1.23
        ({CPU, "ROCMExecutionProvider"}, "rocm"),  # the same through onnxruntime 1.22 and older
        ({CPU, "WebGpuExecutionProvider"}, "webgpu"),
        ({CPU, "WebGpuExecutionProvider", "CoreMLExecutionProvider"}, "webgpu"),  # a GPU before the Neural Engine
    ],
)
def test_auto_picks_the_best_offered_provider(offered, expected, monkeypatch):
    monkeypatch.setattr(prov, "openvino_devices", lambda: ["CPU", "GPU.0"])
    chosen = prov.resolve("auto", offered=offered)
    assert chosen.provider.name == expected and not chosen.fell_back
    names = chosen.names
    assert names[0] == prov.REGISTRY[expected].ort_name and names[-1] == CPU  # CPU backs up unsupported nodes
    assert names.count(CPU) == 1


def test_explicit_unavailable_provider_names_how_to_get_it_or_falls_back_logged(caplog):
    offered = {CPU}
    with pytest.raises(ProviderError, match=r"'directml' is not available.*edgediff\[directml\]"):
        prov.resolve("directml", offered=offered)
    with caplog.at_level(logging.WARNING, logger="edgediff.providers"):
        chosen = prov.resolve("directml", fallback=True, offered=offered)
    assert chosen.provider.name == "cpu" and chosen.fell_back and "falling back to cpu" in caplog.text
    with pytest.raises(ProviderError, match="unknown provider 'tpu'"):
        prov.resolve("tpu", offered=offered)


def test_each_provider_is_one_onnxruntime_knows_and_comes_from_an_extra_that_installs_it():
    """Provider names are onnxruntime's own (a typo would make a provider never available), and each one's extra
    exists in pyproject.toml and installs the build that has it. The runtime itself depends on no build: they
    overwrite each other (ort_builds.py)."""
    import re
    from pathlib import Path

    import tomllib

    from edgediff.runtime import ort_builds

    ours = {n: p for n, p in prov.REGISTRY.items() if p.runtime == "onnxruntime"}  # ov: OpenVINO's own runtime
    unknown = {n for n, p in ours.items() if p.ort_name not in ort.get_all_providers()}
    assert unknown <= {"rocm"}, unknown  # onnxruntime 1.23 removed ROCm's provider; kept for 1.22 and older
    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements):
        return {re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in requirements}

    assert not names(project["dependencies"]) & set(ort_builds.BUILDS)
    for build, extra in ort_builds.BUILDS.items():  # its build, and no other (openvino also brings OpenVINO on Windows)
        assert names(extras[extra]) & set(ort_builds.BUILDS) == {build}, (extra, extras[extra])
    assert {p.extra for p in ours.values()} <= set(ort_builds.BUILDS.values())
    assert names(extras[prov.REGISTRY["ov"].extra]) == {"openvino"}  # beside any build, replacing none
    # the tests' own install (cpu,export,dev) brings the CPU build only: optimum-onnx without its [onnxruntime], and
    # onnxruntime-qnn 2 or newer, a plugin beside it (1.x was a build)
    beside = [
        r.split(";")[0].replace(" ", "") for name in ("export", "dev") for r in extras[name] if "onnxruntime" in r
    ]
    assert beside == ["onnxruntime-qnn>=2"] and extras["qnn"] == ["onnxruntime-qnn>=2"]


def test_two_onnxruntime_builds_are_named_with_the_way_back_to_one(monkeypatch, caplog):
    """pip installing a GPU build beside the CPU one leaves whichever wrote last (seen: onnxruntime 1.32 and
    onnxruntime-webgpu 1.27 together offered only the CPU provider). Asking for the missing provider says so."""
    from edgediff.runtime import ort_builds

    two = {"onnxruntime": "1.32.0", "onnxruntime-webgpu": "1.27.0"}
    monkeypatch.setattr(ort_builds, "installed", lambda: two)
    with pytest.raises(
        ProviderError,
        match=r"'webgpu' is not available: 2 onnxruntime builds .*onnxruntime-webgpu "
        r"1\.27\.0.*pip uninstall -y onnxruntime onnxruntime-webgpu && "
        r'pip install "edgediff\[webgpu\]"',
    ):
        prov.resolve("webgpu", fallback=True, offered={CPU})  # not a fallback case: the install is broken
    with caplog.at_level(logging.WARNING, logger="edgediff.providers"):
        assert prov.resolve("auto", offered={CPU}).provider.name == "cpu"
    assert 'keep one: pip uninstall -y onnxruntime onnxruntime-webgpu && pip install "edgediff[webgpu]"' in caplog.text
    result = CliRunner().invoke(cli, ["providers"])
    assert result.exit_code == 0 and "2 onnxruntime builds are installed" in result.output
    monkeypatch.setattr(ort_builds, "installed", lambda: {"onnxruntime": "1.32.0"})
    with pytest.raises(ProviderError, match="not available in this onnxruntime build"):
        prov.resolve("webgpu", offered={CPU})
    assert "builds are installed" not in CliRunner().invoke(cli, ["providers"]).output


@pytest.mark.parametrize(
    "entry",
    [
        "import edgediff.runtime",
        "from edgediff.cli.main import main; main(['generate', 'a red circle'])",
    ],
)
def test_without_onnxruntime_the_runtime_says_which_build_to_install(entry):
    import subprocess
    import sys

    code = f"import sys; sys.modules['onnxruntime'] = None; {entry}"  # None: importing it fails as if absent
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert 'needs an onnxruntime build: pip install "edgediff[cpu]"' in last and '"edgediff[webgpu]"' in last, last


def test_each_provider_states_options_precisions_and_session_needs():
    for name, p in prov.REGISTRY.items():
        assert p.precisions and p.install and prov.preferred_precision(name) == p.precisions[0]
        assert p.ort_name.endswith("ExecutionProvider") or p.runtime != "onnxruntime"
    assert prov.preferred_precision("cpu") == "fp32" and prov.preferred_precision("cuda") == "fp16"
    opts = ort.SessionOptions()
    prov.REGISTRY["directml"].configure(opts)  # DirectML needs these per onnxruntime's docs
    assert opts.enable_mem_pattern is False and opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert prov.REGISTRY["coreml"].options["ModelFormat"] == "MLProgram"
    # only CUDA-backed providers run the CUDA-only fused operators of `export --optimize gpu` bundles
    assert {n for n, p in prov.REGISTRY.items() if p.cuda_kernels} == {"cuda", "tensorrt"}


def test_session_settings_for_shared_consumer_cpus():
    """Idle threads sleep rather than spin (spinning threads fight the Python thread on few cores),
    in every mode; threads default to the physical cores."""
    from edgediff.runtime.session import physical_cores, session_options

    for low_memory in (False, True):
        opts = session_options(low_memory=low_memory)
        assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
        assert opts.intra_op_num_threads == physical_cores()


def test_threads_follow_the_cpus_the_process_may_run_on(tmp_path, monkeypatch):
    """One thread per physical core the process may run on (its affinity: taskset, a container's cpuset), not per
    core of the machine: hyper-threads of one core count once, and without Linux's topology the machine's ratio of
    physical to logical CPUs stands in."""
    import os

    from edgediff.runtime import session_config
    from edgediff.runtime.session import session_options

    for cpu in range(8):  # 4 cores, 2 hyper-threads each: CPUs n and n + 4 share core n
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "core_id").write_text("0\n")  # core ids repeat across a package's dies: not read
        (topology / "thread_siblings_list").write_text(f"{cpu % 4},{cpu % 4 + 4}\n")
    count = session_config.allowed_physical_cores
    assert count({0, 4}, 8, 4, tmp_path) == 1 and count({0, 1}, 8, 4, tmp_path) == 2
    assert count(set(range(8)), 8, 4, tmp_path) == 4
    assert count({0, 1, 2, 3}, 8, 4, tmp_path / "elsewhere") == 2 and count({0}, 8, 4, tmp_path / "elsewhere") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert session_config.physical_cores() == 1 and session_options().intra_op_num_threads == 1


def test_provider_report_says_what_runs_where(models_root):
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root), provider="cpu")
    report = pipe.provider_report()
    assert report["provider"] == "cpu" and not report["fell_back"]
    assert set(report["graphs"]) == {"text_encoder", "unet", "vae_decoder"}
    assert all(g["providers"][0] == CPU and not g["cpu_fallback"] for g in report["graphs"].values())


def test_graph_cache_second_start_reuses_the_optimized_graph(models_root, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(tmp_path / "cache"))
    bundle = tiny_bundle("tiny-sd1", models_root)
    uncached = Pipeline.from_bundle(bundle, cache=False)
    assert {g["cache"] for g in uncached.provider_report()["graphs"].values()} == {"off"}
    assert not (tmp_path / "cache").exists()

    first = Pipeline.from_bundle(bundle)
    assert {g["cache"] for g in first.provider_report()["graphs"].values()} == {"miss"}
    files = sorted(p.name for p in (tmp_path / "cache").glob("*.onnx"))
    assert len(files) == 3 and all(f"ort{ort.__version__}" in f and "-cpu-" in f for f in files)
    # weights beside each cached graph (onnxruntime loads them faster than inline protobuf)
    assert all(len(list((tmp_path / "cache").glob(f"{f}.*.data"))) == 1 for f in files)
    second = Pipeline.from_bundle(bundle)
    assert {g["cache"] for g in second.provider_report()["graphs"].values()} == {"hit"}
    images = [p("a cat", seed=3, num_inference_steps=2, output_type="np").images for p in (uncached, first, second)]
    np.testing.assert_allclose(images[2], images[0], atol=1e-6)

    # a damaged cached graph is thrown away and rebuilt, with a warning
    unet_file = next((tmp_path / "cache").glob("unet-*.onnx"))
    unet_file.write_bytes(b"not a graph")
    with caplog.at_level(logging.WARNING, logger="edgediff.cache"):
        third = Pipeline.from_bundle(bundle)
    assert "unusable" in caplog.text and third.provider_report()["graphs"]["unet"]["cache"] == "miss"
    assert len(list((tmp_path / "cache").glob(f"{unet_file.name}.*.data"))) == 1  # the damaged one's weights went too
    np.testing.assert_allclose(
        third("a cat", seed=3, num_inference_steps=2, output_type="np").images, images[0], atol=1e-6
    )


def test_graph_cache_key_follows_the_graph(models_root, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(tmp_path / "cache"))
    Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))
    Pipeline.from_bundle(tiny_bundle("tiny-sd2-v", models_root))  # other graphs: other keys, no mix-up
    unets = sorted((tmp_path / "cache").glob("unet-*.onnx"))
    assert len(unets) == 2


def test_graph_cache_key_follows_the_cpus_instruction_sets(models_root, tmp_path, monkeypatch):
    """A graph onnxruntime optimized where AVX-512 is (16-channel blocks) fails where only AVX2 is: each set of
    kernel-deciding flags has entries of its own, and entries named before the flags were in the key still count."""
    from edgediff.runtime import cpu_features, graph_cache

    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(folder))
    bundle = tiny_bundle("tiny-sd1", models_root)
    for flags in ({"avx2", "fma"}, {"avx2", "fma", "avx512f", "avx512bw"}, {"avx2", "fma", "hypervisor"}):
        monkeypatch.setattr(cpu_features, "cpu_flags", lambda flags=frozenset(flags): flags)
        Pipeline.from_bundle(bundle)
    unets = sorted(p.name for p in folder.glob("unet-*.onnx"))
    assert len(unets) == 2, unets  # a flag no kernel reads (hypervisor) shares the AVX2 entry
    old_style = unets[0].rsplit("-", 1)[0] + ".onnx"  # a key without the flags' tag
    (folder / old_style).write_bytes(b"")
    assert old_style.removesuffix(".onnx") in {e.name for e in graph_cache.entries(folder)}


def _cache_names(folder):
    from edgediff.runtime import graph_cache

    return {e.name for e in graph_cache.entries(folder)}


def test_graph_cache_evicts_least_recently_used_entries_past_its_limit(models_root, tmp_path, monkeypatch):
    """Each new bundle, provider option set or onnxruntime version adds entries: a save evicts the
    least recently used until the total is within EDGEDIFF_CACHE_MAX_GB, and a hit counts as a use."""
    import os
    import time

    from edgediff.runtime import graph_cache

    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(folder))
    Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))
    first = _cache_names(folder)
    Pipeline.from_bundle(tiny_bundle("tiny-sd2-v", models_root))
    second = _cache_names(folder) - first
    assert len(first) == len(second) == 3
    past = time.time() - 3600
    for age, entry in enumerate(graph_cache.entries(folder)):  # all an hour old
        for path in entry.paths:
            os.utime(path, (past + age, past + age))
    Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))  # hits: now the most recently used
    assert {e.name for e in graph_cache.entries(folder)[-3:]} == first
    lru = graph_cache.entries(folder)  # the second bundle's three, oldest first, then the first's
    limit = sum(e.size for e in lru[3:]) + lru[2].size  # room for the newest of the older three
    evicted = graph_cache.prune(folder, limit)
    assert [e.name for e in evicted] == [lru[0].name, lru[1].name] and lru[2].name in second
    assert _cache_names(folder) == first | {lru[2].name}

    # the limit applies at each save: at 0 only the graph just saved stays, and the images are unchanged
    monkeypatch.setenv("EDGEDIFF_CACHE_MAX_GB", "0")
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root))
    assert len(_cache_names(folder)) == 1
    uncached = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), cache=False)
    np.testing.assert_allclose(
        pipe("a cat", seed=1, num_inference_steps=1, output_type="np").images,
        uncached("a cat", seed=1, num_inference_steps=1, output_type="np").images,
        atol=1e-6,
    )


def test_eviction_passes_over_a_graph_another_process_holds_open(models_root, tmp_path, monkeypatch):
    """Windows refuses to delete a file another process has open: that entry stays, the next one goes instead,
    and the start that triggered the eviction goes on."""
    import pathlib

    from edgediff.runtime import graph_cache

    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(folder))
    Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))
    oldest, *rest = graph_cache.entries(folder)
    real_unlink = pathlib.Path.unlink

    def unlink(self, missing_ok=False):
        if self in oldest.paths:
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(pathlib.Path, "unlink", unlink)
    evicted = graph_cache.prune(folder, limit=oldest.size + rest[-1].size)
    assert [e.name for e in evicted] == [rest[0].name]
    assert _cache_names(folder) == {oldest.name, rest[-1].name}


def test_a_crashed_save_is_removed_once_stale(tmp_path):
    """A save killed mid-write leaves its .partial file: eviction removes it when no live save could own it
    (untouched for STALE_PARTIAL_S), `clear` at once."""
    import os
    import time

    from edgediff.runtime import graph_cache

    stale, fresh = (
        tmp_path / f".unet-0123456789abcdef-01234567-cpu-ort1.32.0-x86_64.{pid}.partial.onnx" for pid in (123, 456)
    )
    for path in (stale, fresh):
        path.write_bytes(b"half a graph")
    old = time.time() - graph_cache.STALE_PARTIAL_S - 60
    os.utime(stale, (old, old))
    graph_cache.prune(tmp_path, limit=0)
    assert not stale.exists() and fresh.exists()
    graph_cache.clear(tmp_path)
    assert not fresh.exists()


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_bad_cache_limit_is_a_clear_error(models_root, tmp_path, monkeypatch, value):
    from edgediff.runtime import InputError

    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEDIFF_CACHE_MAX_GB", value)
    with pytest.raises(InputError, match="EDGEDIFF_CACHE_MAX_GB must be a size in GiB"):
        Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))
    result = CliRunner().invoke(cli, ["cache", "list"])
    assert result.exit_code == 1 and "EDGEDIFF_CACHE_MAX_GB" in result.output


def _disk_nearly_full(monkeypatch):
    import shutil

    from edgediff.runtime import graph_cache

    real = shutil.disk_usage
    monkeypatch.setattr(
        graph_cache.shutil, "disk_usage", lambda p: real(p)._replace(free=graph_cache.FREE_SPACE_RESERVE + 1024)
    )


def _save_fails(monkeypatch, folder, bundle_path):
    """A directory where onnxruntime's save would go makes that save fail, as a full disk would."""
    import os

    from edgediff.runtime import Bundle, graph_cache

    bundle = Bundle.open(bundle_path)
    for name, spec in bundle.manifest.components.items():
        key = graph_cache.cache_key(name, spec.files[spec.graph_file]["sha256"], "cpu", bundle.component_path(name))
        (folder / f".{key}.{os.getpid()}.partial.onnx").mkdir(parents=True)


def _cache_is_a_file(monkeypatch, folder, bundle_path):
    folder.write_text("not a folder")


@pytest.mark.parametrize(
    "trouble,logged",
    [
        ("disk nearly full", "not caching"),
        ("save fails", "could not save"),
        ("cache path is a file", "is unusable"),
        ("saved graph cannot take its place", "could not keep"),
    ],
)
def test_the_graph_cache_never_fails_a_generation(models_root, tmp_path, monkeypatch, caplog, trouble, logged):
    """A cache that cannot take a graph costs a slower next start, never the image, and never fills the disk."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(folder))
    bundle = tiny_bundle("tiny-sd1", models_root)
    if trouble == "disk nearly full":
        _disk_nearly_full(monkeypatch)
    elif trouble == "save fails":
        _save_fails(monkeypatch, folder, bundle)
    elif trouble == "cache path is a file":
        _cache_is_a_file(monkeypatch, folder, bundle)
    else:  # Windows, when another process has the cached graph open
        from edgediff.runtime import graph_cache

        def refuse(src, dst):
            raise PermissionError(13, "The process cannot access the file because it is being used by another process")

        monkeypatch.setattr(graph_cache.os, "replace", refuse)
    with caplog.at_level(logging.WARNING, logger="edgediff.cache"):
        pipe = Pipeline.from_bundle(bundle)
    assert {g["cache"] for g in pipe.provider_report()["graphs"].values()} == {"skipped"}
    assert logged in caplog.text
    assert not _cache_names(folder) if folder.is_dir() else folder.read_text() == "not a folder"
    assert not folder.is_dir() or not [p for p in folder.iterdir() if p.is_file()]  # no half-saved leftovers
    uncached = Pipeline.from_bundle(bundle, cache=False)
    np.testing.assert_allclose(
        pipe("a cat", seed=2, num_inference_steps=2, output_type="np").images,
        uncached("a cat", seed=2, num_inference_steps=2, output_type="np").images,
        atol=1e-6,
    )


def test_cache_command_lists_and_clears_only_its_own_files(models_root, tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(folder))
    Pipeline.from_bundle(tiny_bundle("tiny-sd1", models_root))
    (folder / "openvino").mkdir()
    (folder / "openvino" / "blob.bin").write_bytes(b"x" * 4096)
    (folder / "notes.txt").write_text("mine")  # EDGEDIFF_CACHE_DIR may be a folder of the user's
    (folder / "model.onnx").write_bytes(b"mine too")
    listed = CliRunner().invoke(cli, ["cache", "list"])
    assert listed.exit_code == 0, listed.output
    assert "4 entries" in listed.output and "openvino/" in listed.output and "unet-" in listed.output
    cleared = CliRunner().invoke(cli, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 4 entries" in cleared.output, cleared.output
    assert sorted(p.name for p in folder.iterdir()) == ["model.onnx", "notes.txt"]
    assert "0 entries" in CliRunner().invoke(cli, ["cache", "list"]).output


def test_every_providers_own_cache_folder_is_listed_counted_evicted_and_cleared(tmp_path, monkeypatch):
    """The registry is the one place that says which providers keep a compiled cache, and where
    (Provider.cache_option): MIGraphX's programs are listed, counted, evicted and cleared like OpenVINO's blobs
    and TensorRT's engines."""
    import os
    import time
    from pathlib import Path

    from edgediff.runtime import graph_cache

    folder = tmp_path / "cache"
    monkeypatch.setenv("EDGEDIFF_CACHE_DIR", str(folder))
    own = {name: p for name, p in prov.REGISTRY.items() if p.cache_option}
    assert set(own) == {"openvino", "tensorrt", "migraphx", "ov"}
    assert graph_cache.provider_folders() == {p.cache_folder for p in own.values()}
    past = time.time() - 3600
    for age, name in enumerate(("migraphx", "openvino", "tensorrt")):  # migraphx least recently used
        where = Path(own[name].cache_options(folder)[own[name].cache_option])  # where the provider is told to write
        assert where.parent == folder
        where.mkdir(parents=True)
        (where / "compiled.bin").write_bytes(b"x" * 4096)
        for path in (where / "compiled.bin", where):
            os.utime(path, (past + age, past + age))
    assert {e.name: e.size for e in graph_cache.entries(folder)} == {
        "migraphx/": 4096,
        "openvino/": 4096,
        "tensorrt/": 4096,
    }
    listed = CliRunner().invoke(cli, ["cache", "list"])
    assert listed.exit_code == 0 and "3 entries" in listed.output and "migraphx/" in listed.output, listed.output
    assert [e.name for e in graph_cache.prune(folder, limit=2 * 4096)] == ["migraphx/"]
    assert not (folder / "migraphx").exists()
    (folder / "migraphx").mkdir()
    (folder / "migraphx" / "compiled.bin").write_bytes(b"x" * 4096)
    cleared = CliRunner().invoke(cli, ["cache", "clear"])
    assert cleared.exit_code == 0 and "removed 3 entries" in cleared.output, cleared.output
    assert not list(folder.iterdir())


def test_providers_command_lists_the_registry():
    result = CliRunner().invoke(cli, ["providers"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in prov.REGISTRY:
        assert any(line.startswith(name) for line in lines)
    assert any(line.startswith("cpu") and "<- auto" in line for line in lines) or "cuda" in prov.available()


def test_providers_command_shows_where_each_graph_of_a_bundle_runs(models_root, monkeypatch):
    bundle = str(tiny_bundle("tiny-sd1", models_root))
    result = CliRunner().invoke(cli, ["providers", "--model", bundle])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.output.splitlines() if line.startswith("  ")}
    assert {"text_encoder", "unet", "vae_decoder"} <= set(rows) and rows["unet"][0] == "cpu"

    asked = CliRunner().invoke(cli, ["providers", "--model", bundle, "--provider", "cuda", "--fallback"])
    assert asked.exit_code == 0 and "cpu (asked for cuda: not available here)" in asked.output, asked.output
    refused = CliRunner().invoke(cli, ["providers", "--model", bundle, "--provider", "cuda"])
    assert refused.exit_code == 1 and "not available" in refused.output

    # a provider onnxruntime lists but that takes no graph (here: CUDA named on a CPU build) shows per graph
    monkeypatch.setattr(prov.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    result = CliRunner().invoke(cli, ["providers", "--model", bundle, "--provider", "cuda"])
    assert result.exit_code == 0, result.output
    assert sum("cpu (cuda refused it)" in line for line in result.output.splitlines()) == 3, result.output


@pytest.mark.parametrize(
    "present,expected",
    [
        (["CPU"], "CPU"),  # AUTO over one device adds nothing, and failed where CPU alone compiled
        (["CPU", "GPU.0", "GPU.1", "NPU"], "AUTO:GPU,NPU,CPU"),
        (["NPU", "CPU"], "AUTO:NPU,CPU"),
        ([], "CPU"),
        (None, "AUTO"),  # a build that cannot list its devices: OpenVINO's AUTO picks among all it finds
    ],
)
def test_openvino_names_only_the_devices_present(monkeypatch, present, expected):
    """onnxruntime-openvino 1.24 refuses "AUTO:GPU,NPU,CPU" on a machine without an Intel GPU and then runs
    every graph on its CPU provider, silently (seen here): the device list follows what is present."""
    monkeypatch.setattr(prov, "openvino_devices", lambda: present)
    chosen = prov.resolve("openvino", offered={CPU, "OpenVINOExecutionProvider"})
    assert chosen.options["device_type"] == expected
    assert chosen.ort_providers[0] == ("OpenVINOExecutionProvider", {"device_type": expected})


def test_a_compiling_provider_keeps_its_own_cache_and_never_ours(models_root, tmp_path, monkeypatch):
    """onnxruntime cannot save a graph whose nodes a provider compiled ("Unable to serialize model as it
    contains compiled nodes", onnxruntime-openvino 1.24 with our cache on): OpenVINO, TensorRT and MIGraphX get
    their own cache folder beside ours instead, and the caller's own option wins."""
    from edgediff.runtime import Bundle, graph_cache
    from edgediff.runtime.session import GraphSession

    assert {n for n, p in prov.REGISTRY.items() if p.compiles} == {
        "tensorrt",
        "migraphx",
        "coreml",
        "openvino",
        "qnn",
        "ov",
    }
    assert prov.REGISTRY["openvino"].cache_options(tmp_path) == {"cache_dir": str(tmp_path / "openvino")}
    assert prov.REGISTRY["tensorrt"].cache_options(tmp_path) == {"trt_engine_cache_path": str(tmp_path / "tensorrt")}
    assert prov.REGISTRY["migraphx"].cache_options(tmp_path) == {"migraphx_model_cache_dir": str(tmp_path / "migraphx")}
    # OpenVINO's behaviour on the CPU provider (which ignores the options): what reaches onnxruntime is checked
    seen, real = [], ort.InferenceSession
    monkeypatch.setattr(
        ort,
        "InferenceSession",
        lambda path, sess_options=None, providers=None: (
            seen.append((sess_options, providers))
            or real(path, sess_options=sess_options, providers=["CPUExecutionProvider"])
        ),
    )
    monkeypatch.setattr(graph_cache, "open_cached", lambda *a, **k: pytest.fail("our cache was used"))
    compiling = prov.OpenVINO(
        "openvino",
        CPU,
        ("fp32",),
        extra="openvino",
        compiles=True,
        cache_option="cache_dir",
        options={"device_type": "AUTO:GPU,NPU,CPU"},
    )
    monkeypatch.setattr(prov, "openvino_devices", lambda: ["CPU"])
    bundle = Bundle.open(tiny_bundle("tiny-sd-turbo", models_root), verify="size")
    for overrides, expected in (({}, str(tmp_path / "openvino")), ({"cache_dir": "/elsewhere"}, "/elsewhere")):
        resolution = prov.Resolution(compiling, "openvino", False, overrides)
        unet = GraphSession(
            "unet",
            bundle.component_path("unet"),
            bundle.manifest.components["unet"],
            resolution,
            bundle.path,
            cache_folder=tmp_path,
        )
        opts, providers = seen[-1]
        assert providers[0] == (CPU, {"device_type": "CPU", "cache_dir": expected})
        assert not opts.optimized_model_filepath and unet.cache == "provider"
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize(
    "present,expected",
    [(["CPU"], "cpu"), (["CPU", "NPU"], "openvino"), (["CPU", "GPU.0"], "openvino"), (None, "openvino")],
)
def test_auto_takes_openvino_for_an_intel_gpu_or_npu_only(monkeypatch, present, expected):
    """On a CPU alone OpenVINO trades exactness for speed (bf16) or loses to the CPU provider, by CPU
    (docs/benchmarks.md): `auto` keeps the CPU provider there; `--provider openvino` still chooses it."""
    monkeypatch.setattr(prov, "openvino_devices", lambda: present)
    offered = {CPU, "OpenVINOExecutionProvider"}
    assert prov.resolve("auto", offered=offered).provider.name == expected
    assert prov.resolve("openvino", offered=offered).provider.name == "openvino"


def test_a_pipeline_opens_its_graphs_side_by_side(models_root, monkeypatch):
    """Each graph opens in its own thread (onnxruntime releases the GIL while loading): the openers meet at a
    barrier that only all of them together can pass, which one-after-another opening never would."""
    import threading

    from edgediff.runtime import pipeline as pipeline_module
    from edgediff.runtime.session import SessionPool

    met = threading.Barrier(3, timeout=30)
    real_pool = SessionPool

    def pool(opener, names, low_memory=False, parallel=False):
        def meeting(name):
            met.wait()  # raises BrokenBarrierError if the graphs open one after another
            return opener(name)

        assert parallel and len(names) == 3
        return real_pool(meeting, names, low_memory=low_memory, parallel=parallel)

    monkeypatch.setattr(pipeline_module, "SessionPool", pool)
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root))
    assert set(pipe.sessions.loaded) == {"text_encoder", "unet", "vae_decoder"}
    monkeypatch.setattr(pipeline_module, "SessionPool", real_pool)
    plain = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root))
    np.testing.assert_allclose(
        pipe("a cat", seed=5, num_inference_steps=1, output_type="np").images,
        plain("a cat", seed=5, num_inference_steps=1, output_type="np").images,
        atol=1e-6,
    )


def test_parallel_opening_raises_the_first_graphs_error_and_is_only_where_checked(models_root, monkeypatch):
    from edgediff.runtime import BundleError
    from edgediff.runtime import pipeline as pipeline_module
    from edgediff.runtime.session import SessionPool

    def opener(name):
        if name in ("unet", "vae_decoder"):
            raise BundleError("graph_unloadable", path="b", file=f"{name}.onnx", detail="broken")
        return name

    with pytest.raises(BundleError, match="unet.onnx"):
        SessionPool(opener, ["text_encoder", "unet", "vae_decoder"], parallel=True)

    seen = []
    monkeypatch.setattr(
        pipeline_module,
        "SessionPool",
        lambda opener, names, low_memory=False, parallel=False: (
            seen.append(parallel) or SessionPool(opener, names, low_memory=low_memory, parallel=parallel)
        ),
    )
    assert [n for n, p in prov.REGISTRY.items() if p.opens_in_parallel] == ["cpu"]  # where it was checked
    unchecked = dataclasses.replace(prov.REGISTRY["cpu"], opens_in_parallel=False)
    monkeypatch.setitem(prov.REGISTRY, "cpu", unchecked)
    Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), provider="cpu", cache=False)
    assert seen == [False]


def test_a_bundle_in_a_precision_the_provider_does_not_suit_is_named_with_the_one_that_does(models_root, caplog):
    with caplog.at_level(logging.WARNING, logger="edgediff.pipeline"):
        Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), provider="cpu")
    assert "does not run natively" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="edgediff.pipeline"):
        Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root, "fp16"), provider="cpu")
    assert "its UNet is fp16, which the cpu provider does not run natively" in caplog.text
    assert "export with --precision fp32" in caplog.text


def test_cuda_loads_cuda_and_cudnn_once_before_its_first_session(models_root, monkeypatch):
    """`edgediff[cuda]` installs CUDA and cuDNN from PyPI (onnxruntime-gpu's [cuda,cudnn] extras); onnxruntime's
    preload_dlls puts them in the process before the CUDA provider loads, once. Other providers leave it alone."""
    calls = []
    monkeypatch.setattr(prov.ort, "preload_dlls", lambda: calls.append("preload"), raising=False)
    monkeypatch.setattr(prov.ort, "get_available_providers", lambda: ["CUDAExecutionProvider", CPU])
    provider_loading.preload_cuda_libraries.cache_clear()
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    try:
        Pipeline.from_bundle(bundle, provider="cpu").close()
        assert calls == []
        for _ in range(2):  # (on this CPU build the graphs then run on the CPU: what is checked is the order)
            Pipeline.from_bundle(bundle, provider="cuda").close()
        assert calls == ["preload"]
    finally:
        provider_loading.preload_cuda_libraries.cache_clear()


def test_openvino_on_windows_puts_openvino_libraries_on_the_search_path_first(monkeypatch):
    """onnxruntime-openvino's Windows wheels need OpenVINO's own DLLs, found through onnxruntime's helper, before the
    provider loads; the helper ends the process when it finds none, which becomes a clear error instead."""
    import sys
    import types

    calls = []
    helper = types.ModuleType("onnxruntime.tools.add_openvino_win_libs")
    helper.add_openvino_libs_to_path = lambda: calls.append("added")
    monkeypatch.setitem(sys.modules, "onnxruntime.tools.add_openvino_win_libs", helper)
    monkeypatch.setattr(provider_loading.sys, "platform", "win32")
    provider_loading.openvino_windows_libraries.cache_clear()
    try:
        prov.REGISTRY["openvino"].prepare()
        prov.REGISTRY["openvino"].prepare()
        assert calls == ["added"]
        prov.REGISTRY["cpu"].prepare()
        assert calls == ["added"]

        def no_openvino():
            sys.exit("Error: Please set the OPENVINO_LIB_PATHS environment variable.")

        helper.add_openvino_libs_to_path = no_openvino
        provider_loading.openvino_windows_libraries.cache_clear()
        with pytest.raises(
            ProviderError, match=r"needs OpenVINO's own libraries.*edgediff\[openvino\].*OPENVINO_LIB_PATHS"
        ):
            prov.REGISTRY["openvino"].prepare()
        monkeypatch.setattr(
            provider_loading.sys, "platform", "linux"
        )  # elsewhere the wheels carry OpenVINO: nothing to do
        provider_loading.openvino_windows_libraries.cache_clear()
        prov.REGISTRY["openvino"].prepare()
    finally:
        provider_loading.openvino_windows_libraries.cache_clear()


def test_a_build_is_told_by_the_folder_it_installs_so_a_plugin_beside_the_cpu_build_is_no_clash():
    from pathlib import PurePosixPath

    from edgediff.runtime import ort_builds

    class Dist:  # what importlib.metadata gives: the files a distribution installed
        def __init__(self, *files):
            self.files = [PurePosixPath(f) for f in files]

    assert ort_builds._installs_onnxruntime(Dist("onnxruntime/__init__.py", "onnxruntime/capi/onnxruntime.so"))
    assert not ort_builds._installs_onnxruntime(Dist("onnxruntime_qnn/__init__.py", "onnxruntime_qnn/libQnnHtp.so"))
    ort_builds.installed.cache_clear()
    builds = ort_builds.installed()  # here: the CPU build, and (tests' install) the QNN plugin beside it
    assert list(builds.values()) == [ort.__version__] and ort_builds.clash() is None, builds


def test_a_plugin_provider_that_finds_no_device_is_a_clear_error(monkeypatch):
    """A plugin's library can load on a machine without its hardware; onnxruntime then lists no device for it."""
    monkeypatch.setattr(provider_loading, "_PLUGINS", {"QNNExecutionProvider"})
    monkeypatch.setattr(provider_loading.ort, "get_ep_devices", lambda: [])
    with pytest.raises(ProviderError, match="'QNNExecutionProvider' is installed but found no device"):
        provider_loading.new_session("unused.onnx", ort.SessionOptions(), [("QNNExecutionProvider", {})])


def _provider_fails_on(monkeypatch, ort_name: str, graph: str, message: str) -> None:
    """`ort_name` is offered, and compiles every graph but `graph` (which it fails with `message`); the graphs it
    takes run on the CPU provider here, as onnxruntime does with a provider this build lacks."""
    from edgediff.runtime import graph_loader

    real = graph_loader.new_session

    def new_session(path, opts, providers):
        if providers[0][0] == ort_name and path.name == f"{graph}.onnx":
            raise RuntimeError(message)
        return real(path, opts, [(CPU, {})])

    monkeypatch.setattr(graph_loader, "new_session", new_session)
    monkeypatch.setattr(prov.ort, "get_available_providers", lambda: [ort_name, CPU])
    monkeypatch.setattr(prov, "openvino_devices", lambda: ["CPU"])


def test_with_fallback_a_graph_the_provider_cannot_compile_runs_on_the_cpu(models_root, monkeypatch, caplog):
    """onnxruntime-openvino 1.24 compiles SD-Turbo's UNet and decoder in bf16 but not its dynamic int8 text
    encoder ("Supported precisions set is not available for Constant operation"): without --fallback that is
    the bundle's error, naming the flag; with it that graph alone runs on the CPU, logged and reported, and
    the image is the one the CPU provider makes."""
    from edgediff.runtime import BundleError

    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    expected = Pipeline.from_bundle(bundle, provider="cpu", cache=False)("a cat", seed=3, output_type="np").images
    _provider_fails_on(
        monkeypatch,
        "OpenVINOExecutionProvider",
        "text_encoder",
        "[OpenVINO-EP] Exception while compiling\n  at src/plugin.cpp:42\nSupported precisions set is not available",
    )
    with pytest.raises(BundleError, match="text_encoder.onnx: .*Supported precisions.*--fallback runs a graph"):
        Pipeline.from_bundle(bundle, provider="openvino", cache=False)

    with caplog.at_level(logging.WARNING, logger="edgediff.session"):
        pipe = Pipeline.from_bundle(bundle, provider="openvino", fallback=True, cache=False)
    assert "text_encoder: openvino cannot take this graph ([OpenVINO-EP] Exception while compiling ..." in caplog.text
    assert "text_encoder: cpu did not take" not in caplog.text  # logged once, with the reason
    report = pipe.provider_report()
    assert report["provider"] == "openvino" and not report["fell_back"]
    assert report["graphs"]["text_encoder"]["cpu_fallback"]
    assert report["graphs"]["text_encoder"]["refused"].endswith("Supported precisions set is not available")
    assert report["graphs"]["unet"]["refused"] == report["graphs"]["vae_decoder"]["refused"] == ""
    np.testing.assert_array_equal(pipe("a cat", seed=3, output_type="np").images, expected)

    shown = CliRunner().invoke(cli, ["providers", "--model", str(bundle), "--provider", "openvino", "--fallback"])
    assert shown.exit_code == 0, shown.output
    assert "openvino failed on it: Supported precisions set is not available\n" in shown.output  # the cause


def test_in_low_memory_a_graph_the_provider_refused_is_not_compiled_again(models_root, monkeypatch):
    """Low-memory mode reopens every graph at each call: a graph the provider failed to compile reopens on the CPU,
    still reported as refused, without the provider's failed compile again (each can take seconds)."""
    from edgediff.runtime import graph_loader

    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    expected = Pipeline.from_bundle(bundle, provider="cpu", cache=False)("a cat", seed=3, output_type="np").images
    _provider_fails_on(monkeypatch, "OpenVINOExecutionProvider", "text_encoder", "Supported precisions set")
    attempts, failing = [], graph_loader.new_session

    def counted(path, opts, providers):
        attempts.append((path.name, providers[0][0]))
        return failing(path, opts, providers)

    monkeypatch.setattr(graph_loader, "new_session", counted)
    pipe = Pipeline.from_bundle(bundle, provider="openvino", fallback=True, cache=False, low_memory=True)
    for _ in range(2):  # low memory opens CPU graphs without the layout rewrites: float sums in another order
        np.testing.assert_allclose(pipe("a cat", seed=3, output_type="np").images, expected, rtol=0, atol=LAYOUT_ATOL)
    text = [provider for name, provider in attempts if name == "text_encoder.onnx"]
    assert text.count("OpenVINOExecutionProvider") == 1 and text.count(CPU) >= 2  # opened on each call, on the CPU
    assert [p for name, p in attempts if name == "unet.onnx"].count("OpenVINOExecutionProvider") >= 2  # still tried
    # closed after its call in low memory: the report still names it
    report = pipe.provider_report()
    assert "text_encoder" not in report["graphs"] and report["refused"] == {"text_encoder": "Supported precisions set"}


def test_a_graph_fallen_back_from_a_gpu_provider_runs_unbound(models_root, monkeypatch):
    """Its session is the CPU provider's: its inputs and outputs stay in host memory, not device buffers."""
    _provider_fails_on(monkeypatch, "CUDAExecutionProvider", "unet", "CUDA failure 2: out of memory")
    pipe = Pipeline.from_bundle(tiny_bundle("tiny-sd-turbo", models_root), provider="cuda", fallback=True, cache=False)
    unet = pipe.sessions.get("unet")
    assert unet.fell_back_to_cpu and unet.runner is None
    assert unet.binding_state == "refused: the graph runs on the CPU"
    assert pipe.sessions.get("text_encoder").binding_state == "on"
