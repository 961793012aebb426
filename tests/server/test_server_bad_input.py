"""Bad input, one test each: a clear JSON error with the right status, never a traceback or a 500."""

import json
import shutil

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from PIL import Image  # noqa: E402
from server_helpers import TEST_LIMITS, png_bytes, running_server, sample_image  # noqa: E402

from edgediff.server import ServerConfig, ServerConfigError, check_bind, create_app  # noqa: E402

GENERATIONS = "/v1/images/generations"


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert "Traceback" not in response.text
    return body["error"]


def test_malformed_json(server):
    with server.client() as http:
        for path in (GENERATIONS, "/v1/jobs"):
            error = _error(http.post(path, content=b'{"prompt": "x",'), 400)
            assert error["code"] == "invalid_json" and "not valid JSON" in error["message"]
        assert _error(http.post(GENERATIONS, json=["a", "list"]), 400)["message"].endswith("a JSON object")
        sdapi = http.post("/sdapi/v1/txt2img", content=b"{nope")
        assert sdapi.status_code == 400 and "not valid JSON" in sdapi.json()["detail"]


def test_unknown_model(server):
    with server.client() as http:
        error = _error(http.post(GENERATIONS, json={"prompt": "x", "model": "dall-e-3"}), 404)
        assert error["code"] == "model_not_found" and "shipped" in error["message"] and error["param"] == "model"
        assert _error(http.get("/v1/models/nope"), 404)["code"] == "model_not_found"


@pytest.mark.parametrize("name", ["../x", "a/b", "..\\x", "/etc", ".hidden", ".."])
def test_a_model_name_that_is_a_path(server, name):
    with server.client() as http:
        error = _error(http.post(GENERATIONS, json={"prompt": "x", "model": name}), 400)
        assert error["code"] == "invalid_model" and "path" in error["message"]
        sdapi = http.post("/sdapi/v1/txt2img", json={"override_settings": {"sd_model_checkpoint": name}})
        assert sdapi.status_code == 400


def test_models_come_only_from_the_catalogue(tmp_path, monkeypatch):
    """A bundle in the models folder is served by its name; a folder beside the server's working
    directory with a served name is never what the name means."""
    from edgediff.models.shipped import SHIPPED_MODELS
    from edgediff.runtime import resolve_bundle

    models = tmp_path / "models"
    shutil.copytree(resolve_bundle("shipped"), models / "copy")
    (models / "broken").mkdir()
    (models / "broken" / "manifest.json").write_text("{not json")
    monkeypatch.setenv("EDGEDIFF_MODELS_DIR", str(models))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "shipped").mkdir()  # a decoy: resolve_bundle would look here before the models folder
    with pytest.raises(ServerConfigError, match="no readable bundle named 'broken'"):
        create_app(ServerConfig(models=("broken",)))
    with pytest.raises(ServerConfigError, match="is a path"):
        create_app(ServerConfig(models=("../models/copy",)))
    with running_server(ServerConfig(limits=TEST_LIMITS)) as served:
        with served.client() as http:
            served_names = [m["id"] for m in http.get("/v1/models").json()["data"]]
            assert served_names == [*SHIPPED_MODELS, "copy"]
            assert http.post(GENERATIONS, json={"prompt": "x", "model": "copy"}).status_code == 200
            assert http.post(GENERATIONS, json={"prompt": "x"}).status_code == 200
            assert _error(http.post(GENERATIONS, json={"prompt": "x", "model": "broken"}), 404)


@pytest.mark.parametrize("size", ["100x100", "64x60", "4x4", "4096x4096", "big", "64", 512])
def test_size_off_the_models_grid_or_malformed(server, size):
    with server.client() as http:
        error = _error(http.post(GENERATIONS, json={"prompt": "x", "size": size}), 400)
        assert error["param"] == "size"
    sdapi = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"width": 100, "height": 64}, timeout=10)
    assert sdapi.status_code == 400 and "multiples of 16" in sdapi.json()["detail"]


@pytest.mark.parametrize("n", [9, 1000, 0, "2", True, 1.5])
def test_n_too_large_or_not_an_integer(server, n):
    with server.client() as http:
        assert _error(http.post(GENERATIONS, json={"prompt": "x", "n": n}), 400)["param"] == "n"
    sdapi = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"batch_size": 4, "n_iter": 4}, timeout=10)
    assert sdapi.status_code == 400 and "at most 8" in sdapi.json()["detail"]


def test_other_fields_out_of_range(server):
    cases = [
        ({}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": "x" * (TEST_LIMITS.max_prompt_chars + 1)}, "prompt"),
        ({"prompt": "x", "steps": 51}, "steps"),  # past the shipped model's LCM grid
        ({"prompt": "x", "steps": 0}, "steps"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "guidance": "high"}, "guidance"),
        ({"prompt": "x", "response_format": "gif"}, "response_format"),
        ({"prompt": "x", "stream": True}, "stream"),
    ]
    with server.client() as http:
        for body, param in cases:
            assert _error(http.post(GENERATIONS, json=body), 400)["param"] == param, body
        # Python's JSON reader takes NaN; a guidance of NaN is still refused
        nan = http.post(GENERATIONS, content=b'{"prompt": "x", "guidance": NaN}')
        assert _error(nan, 400)["param"] == "guidance"


def test_oversized_upload(server):
    noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))  # noise does not compress: about 770 KiB
    assert len(data) > TEST_LIMITS.max_upload_bytes
    with server.client() as http:
        files = {"image": ("big.png", data, "image/png")}
        error = _error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 413)
        assert error["code"] == "upload_too_large" and error["param"] == "image"
        # a whole body past the limit is refused from its Content-Length, before it is read
        body = b"x" * (TEST_LIMITS.max_body_bytes + 1)
        error = _error(http.post(GENERATIONS, content=body), 413)
        assert error["code"] == "request_too_large"

        # and a chunked one (no Content-Length) as its bytes arrive
        def chunks():
            for _ in range(TEST_LIMITS.max_body_bytes // 65536 + 2):
                yield b"x" * 65536

        assert _error(http.post(GENERATIONS, content=chunks()), 413)["code"] == "request_too_large"


def test_uploads_that_are_not_images(server):
    with server.client() as http:
        files = {"image": ("x.png", b"not an image", "image/png")}
        assert (
            "not a readable image"
            in _error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400)["message"]
        )
        # a small file claiming a huge picture is refused from its header
        huge = png_bytes(Image.new("L", (4096, 8)))
        files = {"image": ("huge.png", huge, "image/png")}
        assert (
            "pixels a side" in _error(http.post("/v1/images/edits", data={"prompt": "x"}, files=files), 400)["message"]
        )
        only_mask = {"mask": ("m.png", png_bytes(sample_image()), "image/png")}
        assert _error(http.post("/v1/images/edits", data={"prompt": "x"}, files=only_mask), 400)["param"] == "image"
        assert _error(http.post("/v1/images/edits", data={"prompt": "x"}), 400)["code"] == "invalid_content_type"
        assert _error(http.post("/v1/images/edits", json={"prompt": "x"}), 400)["code"] == "invalid_content_type"
        good = {"image": ("x.png", png_bytes(sample_image()), "image/png")}
        assert _error(http.post("/v1/images/edits", data={"prompt": "x", "strength": "0"}, files=good), 400)


def test_missing_api_key_on_a_non_local_bind():
    for host in ("0.0.0.0", "192.168.1.5", "::", "example.com"):
        with pytest.raises(ServerConfigError, match="--api-key"):
            check_bind(host, None)
        check_bind(host, "k")  # with a key it may start
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        check_bind(host, None)

    from edgediff.cli.main import cli

    result = CliRunner().invoke(cli, ["serve", "--host", "0.0.0.0", "--port", "0"], env={"EDGEDIFF_API_KEY": None})
    assert result.exit_code == 1
    assert "refusing to listen on 0.0.0.0" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(cli, ["serve", "--model", "../x", "--port", "0"])
    assert result.exit_code == 1 and "is a path" in result.output


def test_no_key_no_entry_when_a_key_is_set():
    with running_server(api_key="k3y") as keyed:
        for path in ("/", "/healthz", "/metrics", "/v1/models", "/sdapi/v1/progress"):
            response = httpx.get(f"{keyed.url}{path}", timeout=10)
            assert response.status_code == 401 and response.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(f"{keyed.url}/healthz", headers={"Authorization": "Bearer nope"}, timeout=10)
        assert wrong.status_code == 401
        right = httpx.get(f"{keyed.url}/healthz", headers={"Authorization": "Bearer k3y"}, timeout=10)
        assert right.status_code == 200


def test_cancel_of_an_unknown_job(server):
    with server.client() as http:
        error = _error(http.delete("/v1/jobs/does-not-exist"), 404)
        assert error["code"] == "job_not_found"
        assert _error(http.get("/v1/jobs/does-not-exist"), 404)["code"] == "job_not_found"


def test_unknown_routes_methods_and_hosts(server):
    with server.client() as http:
        assert _error(http.get("/v1/nothing"), 404)["code"] == "not_found"
        assert _error(http.get(GENERATIONS), 405)["code"] == "method_not_allowed"
        # DNS rebinding: a page on another site that resolves its name to 127.0.0.1 is turned away
        assert _error(http.get("/healthz", headers={"Host": "attacker.example"}), 403)["code"] == "host_not_allowed"
        assert http.get("/healthz", headers={"Host": "localhost:7860"}).status_code == 200
        assert json.loads(http.get("/sdapi/v1/nothing").text)["error"] == "NotFound"
