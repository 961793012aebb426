"""A small desktop app on edgediff's public API: prompt, steps, seed, Generate / Cancel, live previews.

    pip install "edgediff[cpu,app]"      # PySide6 (Qt 6)
    python examples/desktop_app/app.py [--model NAME_OR_FOLDER]
    python examples/desktop_app/app.py --screenshot shot.png --prompt "a large red circle on a blue background"

Generation runs on a worker thread; the window stays responsive, shows each step's preview (the
bundle's tiny decoder) and can cancel mid-run. Runs headless with QT_QPA_PLATFORM=offscreen.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time

from PySide6.QtCore import QObject, Qt, Signal
from PySide6.QtGui import QImage, QPixmap
from PySide6.QtWidgets import (
    QApplication,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from edgediff.runtime import Cancelled, CancelToken, EdgediffError, Pipeline, resolve_bundle

VIEW_SIZE = 320  # pixels on screen; the shipped model draws 64x64, shown enlarged without smoothing


def to_qimage(image) -> QImage:
    rgb = image.convert("RGB")
    data = rgb.tobytes()
    return QImage(data, rgb.width, rgb.height, 3 * rgb.width, QImage.Format.Format_RGB888).copy()  # own the bytes


class _Signals(QObject):
    """Worker-thread events, delivered on the GUI thread by Qt's queued connections."""

    step = Signal(int, int, object)  # step index, total, preview PIL image
    done = Signal(object, int, float)  # image, seed, seconds
    cancelled = Signal(int, int)
    failed = Signal(str)


class GeneratorWindow(QMainWindow):
    def __init__(self, pipeline: Pipeline):
        super().__init__()
        self.pipeline = pipeline
        self.token = CancelToken()
        self.worker: threading.Thread | None = None
        self.last_image = None
        self.signals = _Signals()
        self.signals.step.connect(self._on_step)
        self.signals.done.connect(self._on_done)
        self.signals.cancelled.connect(self._on_cancelled)
        self.signals.failed.connect(self._on_failed)
        self.setWindowTitle("edgediff")

        self.prompt = QLineEdit(placeholderText="a large red circle on a blue background")
        self.steps = QSpinBox(minimum=1, maximum=50, value=pipeline.manifest.defaults["steps"])
        self.seed = QSpinBox(minimum=0, maximum=2**31 - 1, value=0)
        self.generate_button = QPushButton("Generate")
        self.cancel_button = QPushButton("Cancel", enabled=False)
        self.progress = QProgressBar(minimum=0, maximum=1, value=0)
        self.view = QLabel(alignment=Qt.AlignmentFlag.AlignCenter)
        self.view.setFixedSize(VIEW_SIZE, VIEW_SIZE)
        self.view.setStyleSheet("background: #202020;")
        self.status = QLabel("ready")

        form = QFormLayout()
        form.addRow("Prompt", self.prompt)
        form.addRow("Steps", self.steps)
        form.addRow("Seed", self.seed)
        buttons = QHBoxLayout()
        buttons.addWidget(self.generate_button)
        buttons.addWidget(self.cancel_button)
        layout = QVBoxLayout()
        for part in (form, buttons):
            layout.addLayout(part)
        for widget in (self.progress, self.view, self.status):
            layout.addWidget(widget)
        root = QWidget()
        root.setLayout(layout)
        self.setCentralWidget(root)

        self.generate_button.clicked.connect(self.generate)
        self.prompt.returnPressed.connect(self.generate)
        self.cancel_button.clicked.connect(self.cancel)

    @property
    def busy(self) -> bool:
        return self.worker is not None and self.worker.is_alive()

    def generate(self) -> None:
        if self.busy:
            return
        prompt = self.prompt.text() or self.prompt.placeholderText()
        steps, seed = self.steps.value(), self.seed.value()
        self.token.reset()
        self.progress.setMaximum(steps)
        self.progress.setValue(0)
        self.generate_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("generating...")
        self.worker = threading.Thread(target=self._work, args=(prompt, steps, seed), daemon=True)
        self.worker.start()

    def cancel(self) -> None:
        self.token.cancel()

    def _work(self, prompt: str, steps: int, seed: int) -> None:
        # runs on the worker thread: only signals touch the GUI
        start = time.perf_counter()
        try:
            out = self.pipeline(
                prompt,
                num_inference_steps=steps,
                seed=seed,
                cancel=self.token,
                preview=True,
                callback=lambda e: self.signals.step.emit(e.step, e.total, e.preview[0]),
            )
            self.signals.done.emit(out.images[0], seed, time.perf_counter() - start)
        except Cancelled as exc:
            self.signals.cancelled.emit(exc.fields["step"], exc.fields["total"])
        except EdgediffError as exc:
            self.signals.failed.emit(str(exc))

    def _show(self, image) -> None:
        pixmap = QPixmap.fromImage(to_qimage(image))
        self.view.setPixmap(
            pixmap.scaled(
                VIEW_SIZE, VIEW_SIZE, Qt.AspectRatioMode.KeepAspectRatio, Qt.TransformationMode.FastTransformation
            )
        )

    def _idle(self) -> None:
        self.generate_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _on_step(self, step: int, total: int, preview) -> None:
        self.progress.setValue(step + 1)
        self._show(preview)
        self.status.setText(f"step {step + 1} of {total}")

    def _on_done(self, image, seed: int, seconds: float) -> None:
        self.last_image = image
        self._show(image)
        self._idle()
        self.status.setText(f"done in {seconds:.2f} s (seed {seed})")

    def _on_cancelled(self, step: int, total: int) -> None:
        self._idle()
        self.status.setText(f"cancelled at step {step} of {total}")

    def _on_failed(self, message: str) -> None:
        self._idle()
        self.status.setText(f"error: {message}")

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        self.token.cancel()
        if self.worker is not None:
            self.worker.join()
        self.pipeline.close()
        super().closeEvent(event)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="bundle folder or name (default: the shipped model)")
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--screenshot", default=None, help="generate once, save a screenshot of the window, exit")
    args = parser.parse_args(argv)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    window = GeneratorWindow(Pipeline.from_bundle(resolve_bundle(args.model)))
    if args.prompt:
        window.prompt.setText(args.prompt)
    window.show()
    if args.screenshot:
        window.generate()
        while window.busy or window.generate_button.isEnabled() is False:
            app.processEvents()
            time.sleep(0.01)
        window.grab().save(args.screenshot)
        window.close()
        return 0
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
