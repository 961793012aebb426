"""Load on loopback, bounded: 8 concurrent clients, 200 requests, the shipped model, a server started by
the CLI in its own process. Every request is answered with its own image (checked pixel for pixel against
the Pipeline for its seed), memory stays flat, and 429 comes only past the queue bound.

`python -m pytest tests/server/test_server_load.py -s` prints the figures docs/server.md quotes.
"""

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
psutil = pytest.importorskip("psutil")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from server_helpers import LONG_JOB, decode_b64, pixels, running_server  # noqa: E402

CLIENTS, REQUESTS, WARMUP = 8, 200, 20
WORKERS = 2  # two jobs at a time on the one pipeline: what could swap images, if anything did
PROMPTS = [
    "a large red circle on a blue background",
    "a small green star at the top on a black background",
    "a blue square on a white background",
    "a yellow triangle on a purple background",
]
MAX_GROWTH_MIB = 24  # resident growth allowed from request 20 to request 200 (measured: a few MiB)
START_SECONDS = 60


def _start_cli_server(tmp_path: Path):
    """`edgediff serve --port 0` in its own process; its first line says where it listens."""
    log = tmp_path / "serve.log"
    command = [sys.executable, "-m", "edgediff.cli", "serve", "--port", "0", "--queue-size", str(CLIENTS)]
    command += ["--workers", str(WORKERS)]
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ))
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        for line in log.read_text().splitlines():
            if line.startswith("edgediff serve: http://127.0.0.1:"):
                url = line.split()[2].rstrip("/")
                try:
                    if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                        return process, url
                except httpx.TransportError:
                    pass
        assert process.poll() is None, log.read_text()
        time.sleep(0.1)
    process.kill()
    raise AssertionError(f"the server did not start:\n{log.read_text()}")


def test_200_requests_from_8_clients(tmp_path, reference):
    process, url = _start_cli_server(tmp_path)
    server_process = psutil.Process(process.pid)
    results: dict[int, tuple] = {}
    latencies: dict[int, float] = {}
    statuses: list[int] = []
    rss_at_warmup = []
    lock = threading.Lock()
    next_index = iter(range(REQUESTS))

    def client():
        with httpx.Client(base_url=url, timeout=60) as http:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                body = {"prompt": PROMPTS[index % len(PROMPTS)], "seed": 5000 + index}
                began = time.perf_counter()
                response = http.post("/v1/images/generations", json=body)
                elapsed = time.perf_counter() - began
                with lock:
                    statuses.append(response.status_code)
                    if response.status_code == 200:
                        item = response.json()["data"][0]
                        results[index] = (item["seed"], decode_b64(item["b64_json"]))
                        latencies[index] = elapsed
                    if len(statuses) == WARMUP:
                        rss_at_warmup.append(server_process.memory_info().rss)

    try:
        began = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        wall = time.perf_counter() - began
        rss_end = server_process.memory_info().rss
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        process.terminate()
        process.wait(30)

    assert statuses.count(200) == REQUESTS, {s: statuses.count(s) for s in set(statuses)}  # no 429: queue >= clients
    assert "edgediff_requests_rejected_total 0" in metrics
    assert f'edgediff_images_served_total{{model="shipped"}} {REQUESTS}' in metrics
    for index, (seed, image) in sorted(results.items()):
        assert seed == 5000 + index
        expected = reference(PROMPTS[index % len(PROMPTS)], seed=seed).images[0]
        assert np.array_equal(image, pixels(expected)), f"request {index} got another image"

    growth = (rss_end - rss_at_warmup[0]) / 2**20
    times = np.array(sorted(latencies.values())) * 1000
    print(
        f"\nload: {CLIENTS} clients, {REQUESTS} requests, {WORKERS} workers, shipped model 64x64 4 steps: "
        f"p50 {np.percentile(times, 50):.0f} ms, p95 {np.percentile(times, 95):.0f} ms, "
        f"{REQUESTS / wall:.1f} images/s ({wall:.1f} s); server resident {rss_end / 2**20:.0f} MiB, "
        f"growth from request {WARMUP} to {REQUESTS}: {growth:+.1f} MiB"
    )
    assert growth < MAX_GROWTH_MIB


def test_429_only_past_the_queue_bound():
    """8 long jobs at once against 1 worker and a queue of 2: at most 3 accepted, the rest refused with
    Retry-After; the accepted ones are cancelled when their clients give up."""
    with running_server(queue_size=2, workers=1) as small:
        answers = []
        lock = threading.Lock()

        def ask():
            try:
                response = httpx.post(
                    f"{small.url}/v1/images/generations",
                    json={"prompt": "x", **LONG_JOB},
                    timeout=httpx.Timeout(10, read=1.5),
                )
                answer = (response.status_code, response.headers.get("retry-after"), response.json())
                if response.status_code == 200:  # accepted and done within the timeout (a fast machine)
                    answer = ("accepted", None, None)
            except httpx.ReadTimeout:  # accepted and still running or queued: the client gives up
                answer = ("accepted", None, None)
            with lock:
                answers.append(answer)

        threads = [threading.Thread(target=ask) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        refused = [a for a in answers if a[0] == 429]
        accepted = [a for a in answers if a[0] == "accepted"]
        assert len(refused) + len(accepted) == 8, answers
        assert len(accepted) <= 1 + 2 and len(refused) >= 8 - 3
        for _, retry_after, body in refused:
            assert int(retry_after) >= 1
            assert body["error"]["code"] == "queue_full" and "(2 jobs waiting, at most 2)" in body["error"]["message"]
        small.wait_idle(5)  # the clients that gave up cancelled their jobs, queued or running
        assert small.metric("edgediff_requests_rejected_total") == len(refused)
