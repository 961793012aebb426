"""The OpenVINO call benchmark's plumbing, on a tiny bundle, with OpenVINO stood in for by onnxruntime plus a known
error (OpenVINO is not installed for the tests): the static shapes it compiles for, the precision hint each compile
gets, and the errors against onnxruntime and against the fp32 reference it reports."""

import importlib.machinery
import json
import sys
import types

import numpy as np
import pytest
from tiny_models import tiny_bundle

from edgediff.benchmarks.openvino_call import main, relative_rms
from edgediff.runtime import Bundle

SKEW = {"f32": 0.0, "bf16": 0.01}  # the stand-in's relative error per precision hint


def _stand_in(compiled_with: list) -> types.ModuleType:
    """An `openvino` module whose CPU runs the graph in onnxruntime, scaled by 1 + SKEW[precision hint]."""
    import onnxruntime as ort

    class Model:
        def __init__(self, path):
            self.path, self.shapes = path, None

        def reshape(self, shapes):
            self.shapes = shapes

    class Compiled:
        def __init__(self, model, config):
            self.session = ort.InferenceSession(model.path, providers=["CPUExecutionProvider"])
            self.scale = 1.0 + SKEW[config["INFERENCE_PRECISION_HINT"]]

        def output(self, index):
            return index

        def create_infer_request(self):
            compiled = self

            class Request:
                def infer(self, feeds):
                    return {0: compiled.session.run(None, feeds)[0] * compiled.scale}

            return Request()

    class Core:
        def read_model(self, path):
            return Model(path)

        def compile_model(self, model, device, config):
            compiled_with.append((device, dict(config), model.shapes and dict(model.shapes)))
            return Compiled(model, config)

    module = types.ModuleType("openvino")
    module.__spec__ = importlib.machinery.ModuleSpec("openvino", None)  # libraries probing for it find a module
    module.Core, module.__version__ = Core, "2026.4.1-test"
    return module


def test_each_precision_is_compiled_for_the_calls_static_shapes_and_measured_against_both(
    models_root, tmp_path, monkeypatch
):
    bundle = tiny_bundle("tiny-sd-turbo", models_root)  # exported before the stand-in is in place
    compiled_with = []
    monkeypatch.setitem(sys.modules, "openvino", _stand_in(compiled_with))
    out = tmp_path / "call.json"
    argv = [str(bundle), "--size", "64", "--threads", "1", "--repeat", "2", "--reference", str(bundle)]
    assert main([*argv, "--precision", "f32", "--precision", "bf16", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "openvino-call" and result["openvino"] == "2026.4.1-test" and "isa" in result["machine"]
    (row,) = result["results"]
    assert row["precision"] == "fp32" and row["onnxruntime_relative_rms_to_reference"] == 0.0
    assert [o["inference_precision"] for o in row["openvino"]] == ["f32", "bf16"]
    for o in row["openvino"]:
        assert o["relative_rms"] == pytest.approx(SKEW[o["inference_precision"]], abs=1e-6)
        assert o["relative_rms_to_reference"] == pytest.approx(o["relative_rms"], abs=1e-6)  # the same graph
    assert [c[1]["INFERENCE_PRECISION_HINT"] for c in compiled_with] == ["f32", "bf16"]
    assert all(c[0] == "CPU" and c[1]["INFERENCE_NUM_THREADS"] == 1 for c in compiled_with)
    shapes = compiled_with[0][2]
    cells = 64 // Bundle.open(bundle).manifest.vae_scale_factor  # the call's latents, batch 1 (no guidance)
    assert shapes["sample"] == [1, 4, cells, cells] and all(isinstance(d, int) for s in shapes.values() for d in s)


def test_dynamic_shapes_are_compiled_beside_static_ones_and_timed_in_turn(models_root, tmp_path, monkeypatch):
    bundle = tiny_bundle("tiny-sd-turbo", models_root)
    compiled_with = []
    monkeypatch.setitem(sys.modules, "openvino", _stand_in(compiled_with))
    out = tmp_path / "call.json"
    argv = [str(bundle), "--size", "64", "--threads", "1", "--repeat", "3", "--precision", "bf16", "--out", str(out)]
    assert main([*argv, "--shapes", "static", "--shapes", "dynamic"]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert [(o["inference_precision"], o["shapes"]) for o in row["openvino"]] == [
        ("bf16", "static"),
        ("bf16", "dynamic"),
    ]
    assert compiled_with[0][2]["sample"][0] == 1 and compiled_with[1][2] is None  # the graph's own dimensions
    assert all(o["relative_rms"] == pytest.approx(SKEW["bf16"], abs=1e-6) for o in row["openvino"])


def test_forms_are_timed_in_turn_each_round_the_reverse_of_the_last():
    from edgediff.benchmarks.openvino_call import _interleaved

    ran = []
    seconds, results = _interleaved([lambda: ran.append("a") or "A", lambda: ran.append("b") or "B"], 1, 3)
    assert ran == ["a", "b", "a", "b", "b", "a", "a", "b"] and results == ["A", "B"] and len(seconds) == 2


def test_relative_rms_is_the_error_over_the_references_size():
    ref = np.array([3.0, 4.0])
    assert relative_rms(ref * 1.1, ref) == pytest.approx(0.1)
    assert relative_rms(ref, ref) == 0.0


def test_without_openvino_it_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)
    with pytest.raises(SystemExit):
        main(["bundle"])
    assert "pip install openvino" in capsys.readouterr().err
