"""AUTOMATIC1111 clients' flow, replayed with httpx: list models, pick one, txt2img while polling progress,
interrupt, then txt2img and img2img whose images equal the Pipeline's for the same seed."""

import json
import threading
import time

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from server_helpers import decode_b64, pixels, sample_image, sample_mask  # noqa: E402

from edgediff.server.images import b64  # noqa: E402

PROMPT = "a large red circle on a blue background"
# the shipped model's longest job: 50 steps (its LCM grid) at 256x256, about 0.1 s a step here, so that
# progress is seen and the interrupt lands mid-way
LONG_STEPS, LONG_SIDE = 50, 256


def test_recorded_client_flow_progress_and_interrupt(server):
    with server.client() as http:
        models = http.get("/sdapi/v1/sd-models").json()
        assert [m["title"] for m in models][0] == "shipped"
        assert http.post("/sdapi/v1/options", json={"sd_model_checkpoint": "shipped"}).status_code == 200
        assert http.get("/sdapi/v1/options").json()["sd_model_checkpoint"] == "shipped"
        assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0

        answer = {}

        def generate():
            body = {"prompt": PROMPT, "steps": LONG_STEPS, "seed": 42, "width": LONG_SIDE, "height": LONG_SIDE}
            answer["response"] = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)

        worker = threading.Thread(target=generate)
        worker.start()
        seen = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            progress = http.get("/sdapi/v1/progress").json()
            if progress["current_image"] and progress["progress"] > 0:
                seen.append(progress)
                if len(seen) >= 3:
                    break
            time.sleep(0.05)
        assert len(seen) >= 3, "no progress seen"
        fractions = [p["progress"] for p in seen]
        assert fractions == sorted(fractions) and 0 < fractions[0] < 1
        last = seen[-1]
        assert last["state"]["sampling_steps"] == LONG_STEPS and last["state"]["job_count"] == 1
        assert last["eta_relative"] > 0
        assert decode_b64(last["current_image"]).shape == (LONG_SIDE, LONG_SIDE, 3)
        skipped = http.get("/sdapi/v1/progress", params={"skip_current_image": "true"}).json()
        assert skipped["current_image"] is None

        interrupted_at = time.monotonic()
        assert http.post("/sdapi/v1/interrupt").status_code == 200
        worker.join(30)
        assert time.monotonic() - interrupted_at < 5
        response = answer["response"]
        assert response.status_code == 200, response.text
        info = json.loads(response.json()["info"])
        assert info["interrupted"] is True and info["seed"] == 42
        assert len(response.json()["images"]) == 1  # the latest preview, as A1111 returns what it has
        assert http.get("/sdapi/v1/progress").json()["state"]["job_count"] == 0


def test_txt2img_equals_the_pipeline(server, reference):
    body = {
        "prompt": PROMPT,
        "negative_prompt": "green",
        "seed": 9,
        "steps": 5,
        "cfg_scale": 3.5,
        "width": 64,
        "height": 64,
        "batch_size": 2,
        "n_iter": 1,
        "sampler_name": "Euler a",  # A1111 clients send one; the bundle's sampler runs and is reported
        "override_settings": {"sd_model_checkpoint": "shipped"},
    }
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    data = response.json()
    info = json.loads(data["info"])
    assert info["all_seeds"] == [9, 10] and info["sd_model_name"] == "shipped" and info["sampler_name"] == "lcm"
    assert info["infotexts"][1].endswith("Seed: 10, Size: 64x64, Model: shipped, Version: edgediff")
    assert data["parameters"]["cfg_scale"] == 3.5
    expected = reference(
        PROMPT, negative_prompt="green", seed=9, num_inference_steps=5, guidance_scale=3.5, num_images_per_prompt=2
    )
    for text, image in zip(data["images"], expected.images):
        assert np.array_equal(decode_b64(text), pixels(image))


def test_img2img_and_inpainting_equal_the_pipeline(server, reference):
    source, mask = sample_image(), sample_mask()
    from server_helpers import png_bytes

    body = {"prompt": PROMPT, "seed": 4, "init_images": ["data:image/png;base64," + b64(png_bytes(source))]}
    response = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert response.json()["parameters"]["init_images"] is None
    expected = reference(PROMPT, seed=4, image=source, strength=0.75).images[0]
    assert np.array_equal(decode_b64(response.json()["images"][0]), pixels(expected))

    body.update(mask=b64(png_bytes(mask)), denoising_strength=1.0)
    response = httpx.post(f"{server.url}/sdapi/v1/img2img", json=body, timeout=60)
    expected = reference(PROMPT, seed=4, image=source, mask_image=mask, strength=1.0, keep_unmasked=True).images[0]
    assert np.array_equal(decode_b64(response.json()["images"][0]), pixels(expected))


def test_sdapi_errors_are_a1111_shaped(server):
    response = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 100}, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"] == "BadRequest" and "multiples of 16" in response.json()["detail"]
    response = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": ["not base64!"]}, timeout=10)
    assert response.status_code == 400 and "base64" in response.json()["detail"]
    response = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "../x"}, timeout=10)
    assert response.status_code == 400 and "path" in response.json()["detail"]
