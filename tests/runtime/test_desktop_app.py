"""The example desktop app, driven headless (Qt's offscreen platform): type, click, wait, look."""

import importlib.util
import os
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("PySide6")
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from PySide6.QtCore import Qt  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402
from PySide6.QtWidgets import QApplication  # noqa: E402

APP_PATH = Path(__file__).resolve().parents[2] / "examples" / "desktop_app" / "app.py"
WAIT_SECONDS = 60  # a 4-step 64x64 image takes well under a second; generous for a loaded CI machine
BLANK_STD = 5.0  # a screenshot whose pixel values vary less than this is blank


def _load_app():
    spec = importlib.util.spec_from_file_location("edgediff_desktop_app", APP_PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _wait_idle(app, window):
    deadline = time.monotonic() + WAIT_SECONDS
    while (window.busy or not window.generate_button.isEnabled()) and time.monotonic() < deadline:
        app.processEvents()
        time.sleep(0.01)
    app.processEvents()
    assert window.generate_button.isEnabled(), "generation did not finish"


@pytest.fixture(scope="module")
def app_and_window():
    module = _load_app()
    from edgediff.runtime import Pipeline, resolve_bundle

    app = QApplication.instance() or QApplication([])
    window = module.GeneratorWindow(Pipeline.from_bundle(resolve_bundle(None)))
    window.show()
    yield module, app, window
    window.close()


def test_type_click_generate_and_screenshot(app_and_window, tmp_path):
    from training import checker

    module, app, window = app_and_window
    steps_seen = []
    window.signals.step.connect(lambda step, total, preview: steps_seen.append((step, total)))
    QTest.keyClicks(window.prompt, "a large red circle on a blue background")
    window.seed.setValue(0)
    QTest.mouseClick(window.generate_button, Qt.MouseButton.LeftButton)
    _wait_idle(app, window)
    assert window.status.text().startswith("done in"), window.status.text()
    assert steps_seen == [(i, window.steps.value()) for i in range(window.steps.value())]
    assert window.progress.value() == window.progress.maximum()
    reading = checker.read(window.last_image)
    assert (reading.colour, reading.background) == ("red", "blue")

    shot = tmp_path / "window.png"
    assert window.grab().save(str(shot))
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.std() > BLANK_STD
    view = window.view.pixmap()
    assert not view.isNull() and view.width() == module.VIEW_SIZE


def test_cancel_button_stops_and_the_app_recovers(app_and_window):
    _, app, window = app_and_window
    window.steps.setValue(50)
    QTest.mouseClick(window.generate_button, Qt.MouseButton.LeftButton)
    QTest.mouseClick(window.cancel_button, Qt.MouseButton.LeftButton)
    _wait_idle(app, window)
    assert window.status.text().startswith("cancelled at step"), window.status.text()
    window.steps.setValue(2)
    QTest.mouseClick(window.generate_button, Qt.MouseButton.LeftButton)
    _wait_idle(app, window)
    assert window.status.text().startswith("done in"), window.status.text()
