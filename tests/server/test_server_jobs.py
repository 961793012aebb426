"""edgediff's own API: a job's event stream, cancelling within one denoiser call, a disconnecting client
cancelling its job, the metrics, the health check, and models closed after an idle time."""

import json
import threading
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from server_helpers import LONG_JOB, decode_b64, decode_bytes, pixels, running_server  # noqa: E402

PROMPT = "a large red circle on a blue background"


def events(http: httpx.Client, job_id: str):
    """(event name, data) pairs of a job's server-sent event stream, as they arrive."""
    with http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                yield name, json.loads(line[len("data: ") :])


def test_event_stream_steps_previews_and_result(server, reference):
    with server.client() as http:
        created = http.post("/v1/jobs", json={"prompt": PROMPT, "seed": 21, "steps": 8})
        assert created.status_code == 202, created.text
        job = created.json()
        assert job["status"] in ("queued", "running") and job["settings"]["steps"] == 8
        received = list(events(http, job["id"]))
    names = [name for name, _ in received]
    assert names[0] == "status" and names[-1] == "done"
    progress = [data for name, data in received if name == "progress"]
    # every step is reported unless the stream coalesced some (it sends the latest state when it wakes)
    steps = [p["step"] for p in progress]
    assert steps == sorted(set(steps)) and steps[-1] == 8 and all(p["total"] == 8 for p in progress)
    assert progress[-1]["preview"].startswith("data:image/png;base64,")
    assert decode_b64(progress[-1]["preview"].partition(",")[2]).shape == (64, 64, 3)
    done = received[-1][1]
    assert done["status"] == "done" and done["progress"] == 1.0 and done["images"][0]["seed"] == 21
    image = httpx.get(done["images"][0]["url"], timeout=10)
    expected = reference(PROMPT, seed=21, num_inference_steps=8).images[0]
    assert np.array_equal(decode_bytes(image.content), pixels(expected))
    with server.client() as http:
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "done"


def test_cancel_stops_within_one_denoiser_call(server):
    with server.client() as http:
        job = http.post("/v1/jobs", json={"prompt": PROMPT, **LONG_JOB}).json()
        for name, data in events(http, job["id"]):
            if name == "progress" and data["step"] >= 2:
                break
        started = time.monotonic()
        cancelled = http.delete(f"/v1/jobs/{job['id']}")
        assert cancelled.status_code == 202
        step_at_cancel = cancelled.json()["step"]
        final = list(events(http, job["id"]))[-1]
        assert final[0] == "cancelled"
        # the denoiser call in flight is aborted (or finishes): at most one more step is counted
        assert final[1]["step"] <= step_at_cancel + 1 < LONG_JOB["steps"]
        assert time.monotonic() - started < 5
        assert final[1]["error"]["code"] == "cancelled"
        # the pipeline is fine afterwards
        again = http.post("/v1/images/generations", json={"prompt": PROMPT, "seed": 1})
        assert again.status_code == 200


def test_cancel_of_a_queued_job_and_of_an_unknown_one(server):
    with server.client() as http:
        first = http.post("/v1/jobs", json={"prompt": PROMPT, **LONG_JOB}).json()
        second = http.post("/v1/jobs", json={"prompt": PROMPT, **LONG_JOB}).json()
        assert http.delete(f"/v1/jobs/{second['id']}").json()["status"] == "cancelled"  # never started
        http.delete(f"/v1/jobs/{first['id']}")
        server.wait_idle()
        missing = http.delete("/v1/jobs/0123456789abcdef")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
        assert http.get("/v1/jobs/nope/events").status_code == 404


def test_a_client_that_disconnects_cancels_its_job(server):
    cancelled_before = server.metric("edgediff_jobs_total", 'model="shipped",state="cancelled"')
    body = {"prompt": PROMPT, **LONG_JOB}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        httpx.post(f"{server.url}/v1/images/generations", json=body, timeout=httpx.Timeout(10, read=0.5))
    server.wait_idle(5)
    assert server.metric("edgediff_jobs_total", 'model="shipped",state="cancelled"') == cancelled_before + 1

    # the same for a web page that closes its event stream
    with server.client() as http:
        job = http.post("/v1/jobs", json=body).json()
        for name, data in events(http, job["id"]):
            if name == "progress":
                break  # leaving the with-block closes the stream
    server.wait_idle(5)
    with server.client() as http:
        assert http.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"


def test_metrics_and_health(server):
    with server.client() as http:
        served_before = server.metric("edgediff_images_served_total", 'model="shipped"')
        assert http.post("/v1/images/generations", json={"prompt": PROMPT, "n": 2}).status_code == 200
        text = http.get("/metrics").text
        health = http.get("/healthz").json()
    assert server.metric("edgediff_images_served_total", 'model="shipped"') == served_before + 2
    for name in ("edgediff_queue_depth", "edgediff_seconds_per_image", "edgediff_jobs_running"):
        assert f"# TYPE {name} " in text
    assert 0 < server.metric("edgediff_seconds_per_image", 'model="shipped"') < 10
    assert health["status"] == "ok" and health["models"][0] == "shipped" and "shipped" in health["loaded"]


def test_idle_models_are_closed_and_reopened():
    with running_server(idle_seconds=0.2) as idle:
        with idle.client() as http:
            assert http.post("/v1/images/generations", json={"prompt": PROMPT}).status_code == 200
            deadline = time.monotonic() + 5
            while idle.metric("edgediff_model_loaded", 'model="shipped"') and time.monotonic() < deadline:
                time.sleep(0.05)
            assert idle.metric("edgediff_model_loaded", 'model="shipped"') == 0
            assert http.post("/v1/images/generations", json={"prompt": PROMPT}).status_code == 200
            assert idle.metric("edgediff_model_opens_total", 'model="shipped"') == 2


def test_two_workers_share_one_pipeline_and_keep_every_image_its_own(reference):
    """Concurrent jobs on one pipeline: each image is the one its seed gives alone."""
    with running_server(workers=2) as both:
        results = {}

        def ask(seed):
            response = httpx.post(
                f"{both.url}/v1/images/generations", json={"prompt": PROMPT, "seed": seed}, timeout=60
            )
            results[seed] = decode_b64(response.json()["data"][0]["b64_json"])

        threads = [threading.Thread(target=ask, args=(seed,)) for seed in range(100, 106)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert both.state.cache.opened["shipped"] == 1
    for seed, got in results.items():
        assert np.array_equal(got, pixels(reference(PROMPT, seed=seed).images[0])), seed
    assert len(results) == 6
