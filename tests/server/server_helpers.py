"""Shared by the server tier's tests: a real server in a thread, and images to compare."""

from __future__ import annotations

import base64
import io
import socket
import threading
import time
from contextlib import contextmanager

import httpx
import numpy as np
from PIL import Image

from edgediff.server import Limits, ServerConfig, create_app

START_SECONDS = 30  # a start opens no model (that waits for the first request); generous for a loaded machine
# uploads capped low to test the cap (the test images are a few KiB)
TEST_LIMITS = Limits(max_upload_bytes=256 * 1024)
# the shipped model's longest job: 50 steps (its LCM grid) at 256x256, about 0.1 s a step on a laptop core,
# so that progress is seen and a cancel lands mid-way
LONG_JOB = {"steps": 50, "size": "256x256"}


class RunningServer:
    def __init__(self, app, url: str):
        self.app = app
        self.url = url

    @property
    def state(self):
        return self.app.state.server

    def client(self, **kwargs) -> "httpx.Client":
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60), **kwargs)

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. metric("edgediff_jobs_total", 'model="shipped",state="cancelled"')."""
        wanted = f"{name}{{{labels}}}" if labels else name
        headers = {"Authorization": f"Bearer {self.state.config.api_key}"} if self.state.config.api_key else {}
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        for line in text.splitlines():
            key, _, value = line.rpartition(" ")
            if key == wanted:
                return float(value)
        return 0.0

    def wait_idle(self, seconds: float = 10.0) -> None:
        """Until nothing runs or waits (a cancelled job ends within one denoiser call)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if not self.state.queue.running() and self.state.queue.depth == 0:
                return
            time.sleep(0.02)
        raise AssertionError("the server still has jobs running")


@contextmanager
def running_server(config: ServerConfig | None = None, **overrides):
    """uvicorn serving create_app(config) on 127.0.0.1, on a socket bound before the thread starts."""
    import uvicorn

    config = (config or ServerConfig(limits=TEST_LIMITS)).replace(**overrides)
    app = create_app(config)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + START_SECONDS
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield RunningServer(app, f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(START_SECONDS)
        sock.close()


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def decode_b64(text: str) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(base64.b64decode(text))))


def decode_bytes(data: bytes) -> np.ndarray:
    return pixels(Image.open(io.BytesIO(data)))


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def sample_image(size: int = 64) -> Image.Image:
    """A picture to edit: a red disc on blue."""
    yy, xx = np.mgrid[0:size, 0:size]
    disc = (xx - size / 2) ** 2 + (yy - size / 2) ** 2 < (size / 3) ** 2
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[..., 2] = 200
    array[disc] = (220, 30, 30)
    return Image.fromarray(array)


def sample_mask(size: int = 64) -> Image.Image:
    """White (repaint) on the right half, black (keep) on the left."""
    array = np.zeros((size, size), dtype=np.uint8)
    array[:, size // 2 :] = 255
    return Image.fromarray(array, mode="L")
