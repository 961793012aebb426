"""The benchmark harness on tiny bundles: schema, stage sums, MAC counts, merge, missing peers.

No timed assertions: speed goals live in benchmark results, not in tests.
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from tiny_models import tiny_bundle, tiny_source

from edgediff.benchmarks.harness import STAGE_SUM_MARGIN, BenchConfig, merge, peer_available, run_bench
from edgediff.benchmarks.macs import count_macs
from edgediff.benchmarks.report import write_outputs
from edgediff.cli.main import cli
from edgediff.runtime import RuntimeOptions

PARENT_HOLDS_BYTES = 1 << 30  # far above a bare worker's import of numpy and edgediff (~100 MB)

jsonschema = pytest.importorskip("jsonschema")


def _schema():
    from importlib import resources

    return json.loads(resources.files("edgediff.benchmarks").joinpath("results.schema.json").read_text())


def test_mac_counter_agrees_with_a_hand_count(tmp_path):
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    w_conv = numpy_helper.from_array(np.zeros((4, 3, 3, 3), np.float32), "wc")
    w_mm = numpy_helper.from_array(np.zeros((32, 8), np.float32), "wm")
    w_gemm = numpy_helper.from_array(np.zeros((10, 5), np.float32), "wg")
    nodes = [
        helper.make_node("Conv", ["x", "wc"], ["y"], pads=[1, 1, 1, 1]),  # (1,3,8,8) -> (1,4,8,8)
        helper.make_node("MatMul", ["a", "wm"], ["b"]),  # (1,16,32) x (32,8)
        helper.make_node("Gemm", ["g", "wg"], ["h"]),  # (2,10) x (10,5)
        helper.make_node("Relu", ["y"], ["z"]),  # not counted
    ]
    graph = helper.make_graph(
        nodes,
        "hand",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"]),
            helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 16, 32]),
            helper.make_tensor_value_info("g", TensorProto.FLOAT, [2, 10]),
        ],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in ("z", "b", "h")],
        [w_conv, w_mm, w_gemm],
    )
    path = tmp_path / "hand.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    result = count_macs(path, {"x": (1, 3, 8, 8)})
    conv, matmul, gemm = 4 * 8 * 8 * (3 * 3 * 3), 16 * 8 * 32, 2 * 5 * 10
    assert result["by_op"] == {"Conv": conv, "MatMul": matmul, "Gemm": gemm}
    assert result["total"] == conv + matmul + gemm and result["uncounted"] == []
    # batch 2 doubles the convolution
    assert count_macs(path, {"x": (2, 3, 8, 8)})["by_op"]["Conv"] == 2 * conv


def test_mac_counter_reads_small_constants_a_large_graph_keeps_outside(tmp_path, monkeypatch):
    """Reshape targets held as Constant nodes' values in the external-data file (as the exporter writes graphs past
    2 GB) are read from the graph's own folder, whatever the working directory."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    target = numpy_helper.from_array(np.array([1, 16, 32], np.int64), "target_value")
    nodes = [
        helper.make_node("Constant", [], ["target"], value=target),
        helper.make_node("Reshape", ["a", "target"], ["r"]),  # (1,4,4,32) -> (1,16,32)
        helper.make_node("MatMul", ["r", "wm"], ["b"]),  # (1,16,32) x (32,8)
    ]
    graph = helper.make_graph(
        nodes,
        "outside",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [1, 4, "s", 32])],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.zeros((32, 8), np.float32), "wm")],
    )
    (tmp_path / "g").mkdir()
    path = tmp_path / "g" / "big.onnx"
    onnx.save_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        str(path),
        save_as_external_data=True,
        location="big.onnx.data",
        size_threshold=0,
        convert_attribute=True,
    )
    monkeypatch.chdir(tmp_path)  # not the graph's folder
    assert count_macs(path, {"a": (1, 4, 4, 32)})["by_op"] == {"MatMul": 16 * 8 * 32}


@pytest.fixture(scope="module")
def bench_results(models_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cfg = BenchConfig(
        bundles=[str(tiny_bundle("tiny-sd1", models_root))],
        steps=[2],
        repeat=2,
        warmup=1,
        rounds=2,
        compare=["diffusers", "optimum"],
        source=str(tiny_source("tiny-sd1", models_root)),
        runtime=RuntimeOptions(threads=2),
        out=str(out),
    )
    return run_bench(cfg, progress=False), out


def test_results_validate_and_stage_times_add_up(bench_results):
    data, out = bench_results
    jsonschema.validate(data, _schema())
    row = data["results"][0]
    assert [s["system"] for s in row["systems"]] == ["edgediff", "diffusers", "optimum"]
    for sysrow in row["systems"]:
        st = sysrow["stages"]
        assert st["total"]["n"] == 4 and sysrow["processes"] == 2  # repeat x rounds, fresh process per round
        parts = st["text_encoder"]["median"] + st["unet"]["median"] + st["vae_decoder"]["median"]
        assert parts <= st["total"]["median"] * (1 + STAGE_SUM_MARGIN)
        if sysrow["system"] == "edgediff":  # ours times every stage, so the parts cover the whole (run by run)
            assert st["untimed"]["median"] <= st["total"]["median"] * STAGE_SUM_MARGIN + 0.005
        assert sysrow["peak_rss_bytes"] > 0
    ours = row["systems"][0]
    assert set(ours["achieved"]) == {"text_encoder", "unet", "vae_decoder"}
    assert all(a["macs"] > 0 for a in ours["achieved"].values())
    assert data["machine"]["physical_cores"] >= 1 and data["peak"]["macs_per_second"] > 0
    # peers run where edgediff ran (here the CPU, in fp32), and say so; the peak is per provider and dtype
    peers = {s["system"]: s for s in row["systems"][1:]}
    assert peers["diffusers"]["device"] == "cpu" and peers["diffusers"]["dtype"] == "float32"
    assert peers["optimum"]["device"] == "CPUExecutionProvider"
    assert data["peaks"] == {"auto/float32": data["peak"]}


def test_outputs_are_written(bench_results, tmp_path):
    data, _ = bench_results
    paths = write_outputs(data, tmp_path / "o")
    names = {p.name for p in paths}
    assert {"results.json", "results.md", "chart.png"} <= names
    md = (tmp_path / "o" / "results.md").read_text()
    assert "| edgediff |" in md and "| diffusers |" in md and "GMAC/s" in md
    assert "fell back to CPU" not in md
    # each row says what its system ran; both peers did the fp32 bundle's work (full VAE, fp32)
    assert "| edgediff bundle-tiny-sd1-fp32, fp32, full VAE |" in md
    assert "| diffusers fp32, full VAE (source src-tiny-sd1) |" in md
    assert "| optimum-onnx fp32, full VAE (source src-tiny-sd1) |" in md
    assert md.count("x time (same work) |") == 2 and "different work" not in md


def test_graphs_that_fell_back_to_the_cpu_are_shown_in_the_table(bench_results):
    """A provider that did not take a graph ran it on the CPU provider: the table says so, not only the JSON."""
    import copy

    from edgediff.benchmarks.report import to_markdown

    data = copy.deepcopy(bench_results[0])
    row = data["results"][0]
    row["provider"] = "openvino"
    graphs = row["systems"][0]["provider_report"]["graphs"]
    for name in ("text_encoder", "unet"):
        graphs[name]["cpu_fallback"] = True
    assert "| openvino (text_encoder, unet fell back to CPU) |" in to_markdown(data)


def test_a_workers_peak_memory_is_its_own_not_its_parents():
    """The harness spawns each worker; a worker's peak must not include what the harness held (on Linux,
    getrusage's ru_maxrss carries over exec from the spawning address space)."""
    import subprocess
    import sys

    held = np.ones(PARENT_HOLDS_BYTES // 8)  # touched, so resident in this (the spawning) process
    code = "from edgediff.benchmarks.workers import peak_rss_bytes; print(peak_rss_bytes())"
    child = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert held.sum() > 0
    assert 0 < child < PARENT_HOLDS_BYTES, child


def test_a_graph_whose_macs_cannot_be_counted_is_reported_not_fatal(models_root, tmp_path, caplog):
    """MACs are counted in a process of their own; when that fails the bench says why and keeps its timings."""
    import shutil

    from edgediff.benchmarks.harness import _macs_in_worker
    from edgediff.runtime import Bundle

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(tiny_bundle("tiny-sd1", models_root), bundle_dir)
    bundle = Bundle.open(bundle_dir)
    assert _macs_in_worker(bundle, 64, 1, "full")["unet"] > 0
    (bundle_dir / "unet.onnx").write_bytes(b"not a graph" * 10)
    with caplog.at_level("WARNING", logger="edgediff.bench"):
        assert _macs_in_worker(bundle, 64, 1, "full") is None
    assert f"MACs not counted for {bundle_dir}" in caplog.text


def test_mac_count_follows_the_decoder_that_was_timed(models_root):
    """With --decoder tiny the decoder stage's rate divides the tiny decoder's MACs, not the full VAE's."""
    from tiny_models import tiny_bundle_with_tiny_decoder

    from edgediff.benchmarks.harness import _graph_macs
    from edgediff.runtime import Bundle

    bundle = Bundle.open(tiny_bundle_with_tiny_decoder(models_root))
    full, tiny = (_graph_macs(bundle, 64, 1, decoder) for decoder in ("full", "tiny"))
    side = 64 // bundle.manifest.vae_scale_factor
    lat = {"latent_sample": (1, bundle.manifest.latent_channels, side, side)}
    assert full["vae_decoder"] == count_macs(bundle.component_path("vae_decoder"), lat)["total"]
    assert (
        tiny["vae_decoder"]
        == count_macs(bundle.component_path("vae_decoder_tiny"), lat)["total"]
        != full["vae_decoder"]
    )
    assert tiny["unet"] == full["unet"] > 0


def test_sana_mac_shapes_are_what_the_runtime_feeds_gemma_and_the_transformer(models_root, monkeypatch):
    """SANA: Gemma-2 runs on the bench prompt's tokens after the stored instruction prefix, the transformer on
    max_sequence_length text tokens; the shapes counted and profiled (op_profile) are the ones a pipeline call
    feeds those graphs."""
    from edgediff.benchmarks.harness import _graph_macs, stage_shapes
    from edgediff.benchmarks.workers import PROMPT
    from edgediff.runtime import Bundle, Pipeline
    from edgediff.runtime.denoisers import sana

    path = tiny_bundle("tiny-sana-sprint", models_root)
    bundle = Bundle.open(path)
    m = bundle.manifest
    shapes = stage_shapes(bundle, 64, 1)
    fed = {}
    run_encoder = sana.run_encoder

    def recording(encoder, session, ids, mask, extra):
        fed.update(input_ids=ids.shape, attention_mask=mask.shape, **{k: v.shape for k, v in extra.items()})
        return run_encoder(encoder, session, ids, mask, extra)

    monkeypatch.setattr(sana, "run_encoder", recording)
    with Pipeline.from_bundle(path) as pipe:
        pipe(PROMPT, num_inference_steps=1, height=64, width=64, seed=0, output_type="np")
    assert shapes["text_encoder"] == fed and fed["prefix_keys"][3] > 0  # after a prefix really stored
    assert shapes["transformer"]["encoder_hidden_states"][1] == m.conditioning["max_sequence_length"]
    # Gemma-2's count at those shapes; the transformer's stops in onnxruntime's shape inference, as FLUX's, and
    # says so (the bench then notes it rather than count part of the image)
    assert count_macs(bundle.component_path("text_encoder"), shapes["text_encoder"])["total"] > 0
    with pytest.raises(ValueError, match="transformer graph"):
        _graph_macs(bundle, 64, 1)


def test_merge_keeps_every_machines_rows(bench_results, tmp_path):
    data, _ = bench_results
    other = json.loads(json.dumps(data))
    other["machine"]["cpu"] = "Apple M3 (pretend)"
    for i, d in enumerate((data, other)):
        (tmp_path / f"{i}.json").write_text(json.dumps(d))
    merged = merge([str(tmp_path / "0.json"), str(tmp_path / "1.json")])
    jsonschema.validate(merged, _schema())
    cpus = [r["machine"]["cpu"] for r in merged["results"]]
    assert len(cpus) == 2 and cpus[1] == "Apple M3 (pretend)" and len(merged["merged_from"]) == 2
    result = CliRunner().invoke(
        cli, ["bench", "merge", str(tmp_path / "0.json"), str(tmp_path / "1.json"), "--out", str(tmp_path / "m")]
    )
    assert result.exit_code == 0, result.output
    assert "Apple M3 (pretend)" in (tmp_path / "m" / "results.md").read_text()


def test_missing_peer_is_reported_and_skipped(models_root, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "optimum.onnxruntime" else real(name, *a)
    )
    assert "optimum skipped" in peer_available("optimum")
    cfg = BenchConfig(
        bundles=[str(tiny_bundle("tiny-sd1", models_root))],
        steps=[1],
        repeat=1,
        warmup=0,
        rounds=1,
        compare=["optimum"],
        source=str(tiny_source("tiny-sd1", models_root)),
        out=str(tmp_path),
    )
    data = run_bench(cfg, progress=False)
    assert any("optimum skipped" in n for n in data["notes"])
    assert [s["system"] for s in data["results"][0]["systems"]] == ["edgediff"]


def test_quality_metrics_behave():
    from edgediff.benchmarks.quality import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.random((32, 32, 3))
    noisy = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    assert ssim(a, a) == pytest.approx(1.0) and psnr(a, a) == float("inf")
    assert 0 < ssim(a, noisy) < 0.99 and 20 < psnr(a, noisy) < 30  # sigma 0.05 noise: ~26 dB
    assert ssim(a, 1 - a) < 0.1


def test_macs_are_counted_once_per_graph_and_size(tmp_path, monkeypatch):
    """Step counts change how often the graphs run, not their MACs per call: one count serves them all."""
    from edgediff.benchmarks import harness
    from edgediff.models.shipped import default_bundle

    calls = []
    real = harness._worker
    monkeypatch.setattr(harness, "_worker", lambda system, args: calls.append(system) or real(system, args))
    cfg = BenchConfig(
        bundles=[str(default_bundle())],
        steps=[1, 2],
        repeat=1,
        warmup=0,
        rounds=1,
        runtime=RuntimeOptions(threads=2),
        out=str(tmp_path),
    )
    data = run_bench(cfg, progress=False)
    assert calls == ["edgediff", "macs", "edgediff"]  # counted after the first step count, reused for the second
    one, two = (row["systems"][0]["achieved"] for row in data["results"])
    assert {s: a["macs"] for s, a in one.items()} == {s: a["macs"] for s, a in two.items()}


def test_memory_modes_are_run_and_recorded(tmp_path):
    from edgediff.benchmarks.report import row_label
    from edgediff.models.shipped import default_bundle

    cfg = BenchConfig(
        bundles=[str(default_bundle())],
        steps=[1],
        repeat=1,
        warmup=0,
        rounds=1,
        out=str(tmp_path),
        runtime=RuntimeOptions(
            threads=2,
            low_memory=True,
            decoder="tiny",
            decode_tile=8,
            provider_options={"arena_extend_strategy": "kSameAsRequested"},
        ),
    )
    data = run_bench(cfg, progress=False)
    jsonschema.validate(data, _schema())
    row = data["results"][0]
    assert row["mode"] == {
        "low_memory": True,
        "decoder": "tiny",
        "decode_tile": 8,
        "provider_options": {"arena_extend_strategy": "kSameAsRequested"},
        "cuda_graph": False,
        "graph_cache": False,
    }
    report = row["systems"][0]["provider_report"]
    # low-memory mode: only the decoder's session is alive once the image is done
    assert list(report["graphs"]) == ["vae_decoder_tiny"]
    assert report["options"]["arena_extend_strategy"] == "kSameAsRequested"  # the worker ran with the options
    label = "(low memory, tiny decoder, tiles of 8, arena_extend_strategy=kSameAsRequested)"
    assert row_label(row).endswith(label)
    write_outputs(data, tmp_path / "o")
    # the table labels the row by what ran: the bundle, its precision, the decoder, then the modes
    ran = "edgediff bundle-fp32, fp32, tiny decoder, low memory, tiles of 8, arena_extend_strategy=kSameAsRequested"
    assert f"| {ran} |" in (tmp_path / "o" / "results.md").read_text()


def test_peers_run_once_for_bundles_of_one_source(models_root, tmp_path, monkeypatch):
    from edgediff.benchmarks import harness

    calls = []
    real = harness._worker
    monkeypatch.setattr(
        harness, "_worker", lambda system, args: calls.append((system, args["bundle"])) or real(system, args)
    )
    fp32, int8 = tiny_bundle("tiny-sd1", models_root), tiny_bundle("tiny-sd1", models_root, "int8")
    cfg = BenchConfig(
        bundles=[str(fp32), str(int8)],
        steps=[1],
        repeat=1,
        warmup=0,
        rounds=1,
        compare=["diffusers"],
        source=str(tiny_source("tiny-sd1", models_root)),
        runtime=RuntimeOptions(threads=2),
        out=str(tmp_path),
    )
    data = run_bench(cfg, progress=False)
    jsonschema.validate(data, _schema())
    measured = [system for system, _ in calls if system != "macs"]  # MACs are counted in a process of their own
    assert measured == ["edgediff", "diffusers", "edgediff"]
    first, second = (row["systems"][1] for row in data["results"])
    assert "measured_with" not in first and second["measured_with"] == str(fp32)
    assert second["stages"] == first["stages"]


def test_cold_start_reads_each_start_from_a_fresh_process(models_root):
    """No cache: the optimiser runs at every start; the first cached start saves; later ones load what it saved."""
    from edgediff.benchmarks.cold_start import measure

    rows = measure(str(tiny_bundle("tiny-sd-turbo", models_root)), repeat=1, threads=1)
    assert [(r["start"], r["cache"]) for r in rows] == [
        ("no cache", ["off"]),
        ("first start (cache empty)", ["miss"]),
        ("cached", ["hit"]),
    ]
    assert all(r["load_s"] > 0 and r["first_image_s"] > 0 for r in rows)


def test_bench_can_start_from_a_filled_graph_cache(tmp_path):
    """--graph-cache: one unmeasured start fills a cache of the run's own, and every measured start loads from it."""
    from edgediff.benchmarks.report import row_label
    from edgediff.models.shipped import default_bundle

    cfg = BenchConfig(
        bundles=[str(default_bundle())],
        steps=[1],
        repeat=1,
        warmup=0,
        rounds=2,
        runtime=RuntimeOptions(threads=2),
        out=str(tmp_path),
        graph_cache=True,
    )
    data = run_bench(cfg, progress=False)
    jsonschema.validate(data, _schema())
    row = data["results"][0]
    assert row["mode"]["graph_cache"] and row_label(row).endswith("(graph cache)")
    # the first measured process already loads every graph from the cache
    assert {g["cache"] for g in row["systems"][0]["provider_report"]["graphs"].values()} == {"hit"}
    assert list((tmp_path / "graph-cache").glob("unet-*.onnx"))


def test_a_sana_peer_without_its_instruction_encodes_fewer_tokens_and_says_so(models_root):
    """`bench --peer-without-instruction`: diffusers' SANA pipelines encode the prompt alone, padded to
    max_sequence_length, instead of behind the complex-human instruction: less text-encoder work whatever the
    tokenizer makes of the instruction, so a ratio to that peer is a lower bound. Other pipelines take nothing."""
    import torch
    from diffusers import StableDiffusionPipeline

    from edgediff.benchmarks.harness import _ran
    from edgediff.benchmarks.report import system_label
    from edgediff.benchmarks.workers import _instruction
    from edgediff.export.source import load_pipeline
    from edgediff.runtime import Bundle

    pipe = load_pipeline(str(tiny_source("tiny-sana-sprint", models_root)))
    assert _instruction(pipe, {}) == {}
    assert _instruction(pipe, {"peer_instruction": False}) == {"complex_human_instruction": None}
    sd = type("SD", (), {"__call__": StableDiffusionPipeline.__call__})()
    assert _instruction(sd, {"peer_instruction": False}) == {}

    lengths = []
    encode = pipe.text_encoder.forward
    pipe.text_encoder.forward = lambda input_ids, **kw: lengths.append(input_ids.shape[1]) or encode(input_ids, **kw)
    call = dict(num_inference_steps=1, height=64, width=64, max_sequence_length=32, intermediate_timesteps=None)
    call.update(use_resolution_binning=False)  # the tiny transformer's sample size has no aspect-ratio bins
    with torch.inference_mode():
        pipe("a cat", output_type="latent", **call)
        pipe("a cat", output_type="latent", **call, **_instruction(pipe, {"peer_instruction": False}))
    assert lengths[1] == 32 < lengths[0]  # the prompt padded to max_sequence_length, against instruction + prompt

    bundle = Bundle.open(tiny_bundle("tiny-sana-sprint", models_root), verify="size")
    cfg = BenchConfig(bundles=[str(bundle.path)], source="SRC", peer_instruction=False)
    ran = _ran("diffusers", bundle, cfg, half_on_gpu=False)
    assert ran["prompt"] == "without the instruction"
    assert "prompt without the instruction" in system_label({}, {"system": "diffusers", "ran": ran})
    assert "prompt" not in _ran("diffusers", bundle, BenchConfig(bundles=[str(bundle.path)], source="SRC"), False)


def test_a_measurement_that_fails_is_a_row_of_its_own_and_the_bench_goes_on(models_root, tmp_path, monkeypatch):
    """A bundle that cannot run (its UNet graph overwritten, its size kept, so that the bench opens it) fails its
    own row: the other bundle is measured, the table says which failed and why, its worker's log is kept, the failed
    system is not run again in later rounds, and the command exits non-zero after writing every output."""
    import shutil

    from edgediff.benchmarks import harness

    good = tiny_bundle("tiny-sd1", models_root)
    bad = tmp_path / "broken"
    shutil.copytree(good, bad)
    graph = bad / "unet.onnx"
    graph.write_bytes(b"\0" * graph.stat().st_size)
    calls, real = [], harness._worker
    monkeypatch.setattr(
        harness, "_worker", lambda system, args: calls.append((system, args["bundle"])) or real(system, args)
    )
    out = tmp_path / "out"
    args = ["bench", "--model", str(bad), "--model", str(good), "--steps", "1", "--repeat", "1", "--warmup", "0"]
    result = CliRunner().invoke(cli, [*args, "--rounds", "2", "--out", str(out)])
    assert result.exit_code != 0
    assert "1 of 2 measurements failed (broken on auto, edgediff)" in result.output
    data = json.loads((out / "results.json").read_text())
    jsonschema.validate(data, _schema())
    failed, measured = (row["systems"][0] for row in data["results"])
    assert "stages" not in failed and failed["failed"] and measured["stages"]["total"]["n"] == 2
    assert "Traceback" in (out / failed["log"]).read_text()
    runs = [bundle for system, bundle in calls if system == "edgediff"]
    assert runs.count(str(bad)) == 1 and runs.count(str(good)) == 2  # not run again in the second round
    table = (out / "results.md").read_text()
    assert f"failed: {failed['failed']}" in table and (out / "chart.png").exists()
