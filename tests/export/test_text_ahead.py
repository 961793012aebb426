"""Text encoders quantised in a process of their own while the UNet is exported (export/text_ahead.py)."""

import multiprocessing
import os
import time

import pytest
from tiny_models import tiny_source

from edgediff.runtime import Bundle

pytest.importorskip("torch")


def _quantised_here(monkeypatch) -> list[str]:
    """The graphs quantize_component quantises in this process, by name (the process ahead is another)."""
    from edgediff.export import quantize

    here, real = [], quantize.quantize_component

    def counted(src, *args, **kwargs):
        here.append(src.stem)
        return real(src, *args, **kwargs)

    monkeypatch.setattr(quantize, "quantize_component", counted)
    return here


def _export(models_root, out, arch, precision, monkeypatch, ahead: bool):
    from edgediff.export import export_bundle, text_ahead

    monkeypatch.setattr(text_ahead, "quantise_ahead", lambda *args: ahead)
    return export_bundle(str(tiny_source(arch, models_root)), out, precision=precision, keep="auto", progress=False)


def _graph(path):
    import onnx

    model = onnx.load(str(path))
    nodes = [(n.op_type, list(n.input), list(n.output)) for n in model.graph.node]
    return nodes, {t.name: onnx.numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


# tiny-sd1: one encoder, guided by default (the empty negative recorded too); tiny-sdxl: two encoders, the first one
# fp32-only in the text conditioner's feeds of the second where only it is quantised
@pytest.mark.parametrize(("arch", "precision"), [("tiny-sd1", "int8-static"), ("tiny-sdxl", "int8")])
def test_text_encoders_quantised_ahead_are_those_quantised_after_the_recording(
    models_root, tmp_path, monkeypatch, arch, precision
):
    """The same graphs and manifest records, the text encoders quantised in another process, feeds made from the
    prompts by the runtime's text conditioner instead of recorded from the pipeline's calls."""
    here = _quantised_here(monkeypatch)
    after = _export(models_root, tmp_path / "after", arch, precision, monkeypatch, ahead=False)
    in_order = list(here)
    here.clear()
    ahead = _export(models_root, tmp_path / "ahead", arch, precision, monkeypatch, ahead=True)
    one, two = Bundle.open(after, verify="full").manifest, Bundle.open(ahead, verify="full").manifest
    encoders = [e["component"] for e in one.text_encoders]
    assert set(encoders) <= set(in_order) and not set(encoders) & set(here) and "unet" in here
    for name in in_order:
        assert two.components[name].attributes["quantization"] == one.components[name].attributes["quantization"]
        assert two.components[name].precision == one.components[name].precision
        assert _graph(ahead / f"{name}.onnx") == _graph(after / f"{name}.onnx"), name
    assert not [p.name for p in ahead.iterdir() if p.name.startswith(".")]  # no work folder left


def _dies(send, *args):
    """A process ahead killed before it could answer (for memory, say)."""
    os._exit(9)


def _fails(send, staging, conditioning, specs, schemes, *rest):
    """The real work, with a scheme the quantiser cannot take: an error inside the process ahead."""
    from edgediff.export import text_ahead

    text_ahead._quantize_ahead(send, staging, conditioning, specs, {name: None for name in schemes}, *rest)


def _hangs(send, *args):
    time.sleep(120)


def test_text_encoders_are_quantised_after_the_recording_when_their_process_dies(models_root, tmp_path, monkeypatch):
    from edgediff.export import text_ahead

    monkeypatch.setattr(text_ahead, "_quantize_ahead", _dies)
    here = _quantised_here(monkeypatch)
    out = _export(models_root, tmp_path / "bundle", "tiny-sd1", "int8", monkeypatch, ahead=True)
    manifest = Bundle.open(out, verify="full").manifest
    assert "text_encoder" in here and manifest.components["text_encoder"].precision == "int8"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]


def test_an_error_in_the_process_ahead_fails_the_export_and_leaves_nothing(models_root, tmp_path, monkeypatch):
    from edgediff.export import text_ahead

    monkeypatch.setattr(text_ahead, "_quantize_ahead", _fails)
    with pytest.raises(AttributeError):
        _export(models_root, tmp_path / "bundle", "tiny-sd1", "int8", monkeypatch, ahead=True)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_ends_the_process_ahead(models_root, tmp_path, monkeypatch):
    """The UNet's check fails while the text encoder's quantisation still runs: the export ends at once, the
    process with it, and nothing is left."""
    from edgediff.export import bundle_writer, text_ahead
    from edgediff.runtime.errors import ExportValidationError

    monkeypatch.setattr(text_ahead, "_quantize_ahead", _hangs)
    real = bundle_writer._validate

    def unet_fails(component, *args, **kwargs):
        if component.name == "unet":
            raise ExportValidationError("unet", {"out_sample": (1.0, 0.0)})
        return real(component, *args, **kwargs)

    monkeypatch.setattr(bundle_writer, "_validate", unet_fails)
    start = time.perf_counter()
    with pytest.raises(ExportValidationError):
        _export(models_root, tmp_path / "bundle", "tiny-sd1", "int8", monkeypatch, ahead=True)
    assert time.perf_counter() - start < 60 and multiprocessing.active_children() == []
    assert list(tmp_path.iterdir()) == []


def test_only_a_unet_familys_text_encoders_go_ahead_once_all_are_written(tmp_path, monkeypatch):
    from edgediff.export import text_ahead
    from edgediff.export.memory_plan import Weights

    started = []
    monkeypatch.setattr(text_ahead, "TextAhead", lambda *args: started.append(args) or "ahead")
    monkeypatch.setattr(text_ahead, "graph_largest", lambda path: 1)
    monkeypatch.setattr(text_ahead, "available_bytes", lambda: 2**40)

    class Spec:
        size, graph_file = 2**20, "text_encoder.onnx"

    sdxl = {"encoders": [{"component": "text_encoder"}, {"component": "text_encoder_2"}]}
    unet = {"unet": Weights(2**30, 2**30)}
    policy = {"text_encoder": "int8-dynamic", "text_encoder_2": "int8-dynamic", "unet": "int8-static"}

    def start(conditioning, written, exports_left, policy=policy):
        return text_ahead.start(tmp_path, conditioning, written, exports_left, policy, ["a"], True, "auto")

    assert start(sdxl, {"text_encoder": Spec()}, unet) is None  # the second encoder not written yet
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, {}) is None  # nothing left to export
    sd3 = {"encoders": sdxl["encoders"], "joint": "sd3"}
    assert start(sd3, {"text_encoder": Spec(), "text_encoder_2": Spec()}, {"transformer": unet["unet"]}) is None
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, unet, {"unet": "int8-static"}) is None
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, unet) == "ahead"
    conditioning, specs, schemes = started[0][1:4]
    assert conditioning is sdxl and set(specs) == set(schemes) == {"text_encoder", "text_encoder_2"}
    monkeypatch.setattr(text_ahead, "available_bytes", lambda: 2**20)  # not beside the UNet's export
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, unet) is None
