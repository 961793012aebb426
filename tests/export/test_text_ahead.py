"""Text encoders quantised in a process of their own while the UNet is exported (export/text_ahead.py)."""

import logging
import os
import time
from pathlib import Path

import pytest
from tiny_models import graph_contents, tiny_source

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


def _export(models_root, out, arch, precision, monkeypatch, ahead: bool, **options):
    from edgediff.export import ExportOptions, export, text_ahead

    monkeypatch.setattr(text_ahead, "quantise_ahead", lambda *args: ahead)
    options = ExportOptions(precision=precision, keep="auto", **options)
    return export(str(tiny_source(arch, models_root)), out, options, progress=False)


# tiny-sd1: one encoder, guided by default (the empty negative's feeds recorded too) or not; tiny-sdxl: two encoders,
# guided with zeros for the negative (no negative encoded), or only the second quantised
@pytest.mark.parametrize(
    ("arch", "precision", "options"),
    [
        ("tiny-sd1", "int8-static", {}),
        ("tiny-sd1", "int8", {"default_guidance": 0.0}),
        ("tiny-sdxl", "int8", {}),
        ("tiny-sdxl", "int8", {"quantize_only": ("text_encoder_2", "unet")}),
    ],
)
def test_text_encoders_quantised_ahead_are_those_quantised_after_the_recording(
    models_root, tmp_path, monkeypatch, arch, precision, options
):
    """The same graphs and manifest records, the text encoders quantised in another process, feeds made from the
    prompts by the runtime's text conditioner instead of recorded from the pipeline's calls, and the UNet calibrated
    on their fp32 outputs from there."""
    from edgediff.export import calibration

    here = _quantised_here(monkeypatch)
    replayed, replay = [], calibration.ReplayedSession.run

    def counted(self, *args, **feeds):
        replayed.append(self.name)
        return replay(self, *args, **feeds)

    monkeypatch.setattr(calibration.ReplayedSession, "run", counted)
    after = _export(models_root, tmp_path / "after", arch, precision, monkeypatch, ahead=False, **options)
    in_order = list(here)
    here.clear()
    assert not replayed
    ahead = _export(models_root, tmp_path / "ahead", arch, precision, monkeypatch, ahead=True, **options)
    one, two = Bundle.open(after, verify="full").manifest, Bundle.open(ahead, verify="full").manifest
    encoders = [e["component"] for e in one.text_encoders if one.components[e["component"]].precision != "fp32"]
    assert encoders and set(encoders) <= set(in_order) and not set(encoders) & set(here) and "unet" in here
    # the recording of the UNet's feeds took the quantised encoders' outputs from their process, not from their graphs
    assert set(replayed) == set(encoders)
    for name in in_order:
        assert two.components[name].attributes["quantization"] == one.components[name].attributes["quantization"]
        assert two.components[name].precision == one.components[name].precision
        assert graph_contents(ahead / f"{name}.onnx") == graph_contents(after / f"{name}.onnx"), name
    assert not [p.name for p in ahead.iterdir() if p.name.startswith(".")]  # no work folder left


MARKER_ENV = "EDGEDIFF_TEST_AHEAD_MARKER"  # where the stand-ins below say they ran: this process's pid


def _started() -> None:
    Path(os.environ[MARKER_ENV]).write_text(str(os.getpid()))


def _dies(staging, *args):
    """A process ahead killed half way (for memory, say)."""
    _started()
    (Path(staging) / ".quantized-text_encoder").mkdir()
    os._exit(9)


def _fails(staging, conditioning, specs, schemes, *rest):
    """The real work, with a scheme the quantiser cannot take: an error inside the process ahead."""
    from edgediff.export import text_ahead

    _started()
    return text_ahead._quantize_ahead(staging, conditioning, specs, {name: None for name in schemes}, *rest)


def _hangs(*args):
    _started()
    time.sleep(120)


def _answers_then_lingers(*args):
    """Work done, with an interpreter teardown that would take two minutes."""
    import atexit

    _started()
    atexit.register(time.sleep, 120)
    return "done", ({}, {})


def test_the_process_ahead_ends_once_it_has_answered(tmp_path, monkeypatch):
    """Its answer taken, the process ends at once (no teardown at its lower priority while the export runs on), and
    the records are read from the answer, not from its exit."""
    from edgediff.export import text_ahead

    monkeypatch.setattr(text_ahead, "_quantize_ahead", _answers_then_lingers)
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "ran"))
    with text_ahead.TextAhead(tmp_path, {}, {}, {}, [], False, "none", None) as ahead:
        assert ahead.records() == {} and ahead.text_runs == {}
        assert ahead._process.wait(timeout=60) == 0  # not killed, and not after its atexit's two minutes
    assert (tmp_path / "ran").read_text() == str(ahead._process.pid)


def test_text_encoders_are_quantised_after_the_recording_when_their_process_dies(
    models_root, tmp_path, monkeypatch, caplog
):
    from edgediff.export import text_ahead

    monkeypatch.setattr(text_ahead, "_quantize_ahead", _dies)
    monkeypatch.setenv(MARKER_ENV, str(tmp_path / "ran"))
    here = _quantised_here(monkeypatch)
    with caplog.at_level(logging.WARNING, logger="edgediff.export"):
        out = _export(models_root, tmp_path / "bundle", "tiny-sd1", "int8", monkeypatch, ahead=True)
    assert (tmp_path / "ran").is_file() and "ended with code 9" in caplog.text
    manifest = Bundle.open(out, verify="full").manifest
    assert "text_encoder" in here and manifest.components["text_encoder"].precision == "int8"
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # its half-done work removed


def test_an_error_in_the_process_ahead_fails_the_export_and_leaves_nothing(models_root, tmp_path, monkeypatch):
    from edgediff.export import text_ahead

    monkeypatch.setattr(text_ahead, "_quantize_ahead", _fails)
    marker = tmp_path.parent / f"{tmp_path.name}-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    with pytest.raises(AttributeError) as raised:
        _export(models_root, tmp_path / "bundle", "tiny-sd1", "int8", monkeypatch, ahead=True)
    assert marker.is_file() and any("quantisation process" in note for note in raised.value.__notes__)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_ends_the_process_ahead(models_root, tmp_path, monkeypatch):
    """The UNet's check fails while the text encoder's quantisation still runs: the export ends at once, the
    process with it, and nothing is left."""
    from edgediff.export import bundle_writer, text_ahead
    from edgediff.runtime.errors import ExportValidationError

    monkeypatch.setattr(text_ahead, "_quantize_ahead", _hangs)
    marker = tmp_path.parent / f"{tmp_path.name}-ran"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    real = bundle_writer._validate

    def unet_fails(component, *args, **kwargs):
        if component.name == "unet":
            for _ in range(600):  # once the process is at work
                if marker.is_file():
                    break
                time.sleep(0.05)
            raise ExportValidationError("unet", {"out_sample": (1.0, 0.0)})
        return real(component, *args, **kwargs)

    monkeypatch.setattr(bundle_writer, "_validate", unet_fails)
    start = time.perf_counter()
    with pytest.raises(ExportValidationError):
        _export(models_root, tmp_path / "bundle", "tiny-sd1", "int8", monkeypatch, ahead=True)
    assert time.perf_counter() - start < 60 and list(tmp_path.iterdir()) == []
    with pytest.raises(ProcessLookupError):  # ended, and waited for
        os.kill(int(marker.read_text()), 0)


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
        return text_ahead.start(tmp_path, conditioning, written, exports_left, policy, ["a"], True, "auto", 0.0)

    assert start(sdxl, {"text_encoder": Spec()}, unet) is None  # the second encoder not written yet
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, {}) is None  # nothing left to export
    sd3 = {"encoders": sdxl["encoders"], "joint": "sd3"}
    assert start(sd3, {"text_encoder": Spec(), "text_encoder_2": Spec()}, {"transformer": unet["unet"]}) is None
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, unet, {"unet": "int8-static"}) is None
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, unet) == "ahead"
    conditioning, specs, schemes = started[0][1:4]
    assert conditioning is sdxl and set(specs) == set(schemes) == {"text_encoder", "text_encoder_2"}
    # only the quantised encoders' graphs are opened by the process
    only_second = {"text_encoder_2": "int8-dynamic", "unet": "int8-static"}
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, unet, only_second) == "ahead"
    assert set(started[1][2]) == set(started[1][3]) == {"text_encoder_2"}
    monkeypatch.setattr(text_ahead, "available_bytes", lambda: 2**20)  # not beside the UNet's export
    assert start(sdxl, {"text_encoder": Spec(), "text_encoder_2": Spec()}, unet) is None


def test_a_replayed_text_encoder_gives_back_the_runs_it_was_given_and_refuses_others():
    import numpy as np

    from edgediff.export.calibration import ReplayedSession, TextRuns

    runs = TextRuns(["last_hidden_state", "pooler_output"], {"last_hidden_state", None})
    hidden = np.arange(6, dtype=np.float32).reshape(1, 2, 3)
    run = runs.capture(lambda run_options=None, **feeds: [hidden + feeds["input_ids"].sum(), np.ones((1, 3))])
    run(input_ids=np.array([[1, 2]], np.int32))
    session = ReplayedSession("text_encoder", runs)
    got = session.run(input_ids=np.array([[1, 2]], np.int64))  # the tokens, whatever their integer type
    assert np.array_equal(got[0], hidden + 3) and got[1] is None  # an output the conditioner does not read: not kept
    with pytest.raises(RuntimeError, match="did not run"):
        session.run(input_ids=np.array([[2, 1]], np.int64))


def test_an_error_that_cannot_cross_processes_is_told_in_words():
    import threading

    from edgediff.export.text_ahead import _sendable

    class Unpicklable(Exception):
        def __init__(self):
            super().__init__("held a lock")
            self.lock = threading.Lock()

    try:
        raise Unpicklable()
    except Unpicklable as exc:
        sent = _sendable(exc)
    assert isinstance(sent, RuntimeError) and "held a lock" in str(sent) and "Unpicklable" in str(sent)
    try:
        raise ValueError("bad scheme")
    except ValueError as exc:
        sent = _sendable(exc)
    assert isinstance(sent, ValueError) and "quantisation process" in sent.__notes__[0]
