"""The runtime's text-side arguments of the transformer families through every API: prompt_2, prompt_3,
negative_prompt_2, negative_prompt_3, true_cfg_scale, max_sequence_length. A bundle that takes them gives the
library's Pipeline's image for them; one that refuses one, or a bad number, is a 400 naming the field."""

import json

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from server_helpers import (  # noqa: E402
    TEST_LIMITS,
    decode_b64,
    decode_bytes,
    pixels,
    png_bytes,
    running_server,
    sample_image,
)

from edgediff.server import ServerConfig  # noqa: E402

GENERATIONS = "/v1/images/generations"
SD3 = "bundle-sd3-t5"  # the tiny SD3 bundle's folder (tests/tiny_models.py): CLIP-L, CLIP-G and T5
PROMPT = "a red circle"
# what the second and third encoders read instead, and a T5 length below the bundle's 256
TEXT = {
    "negative_prompt": "blurry",
    "prompt_2": "a blue square, flat",
    "prompt_3": "a green triangle: small",
    "negative_prompt_2": "noise",
    "negative_prompt_3": "grain",
    "max_sequence_length": 32,
}
SETTINGS = {"seed": 5, "steps": 2, "guidance": 4.0}


@pytest.fixture(scope="module")
def sd3(models_root):
    """A server with the shipped model (SD 1.x: one CLIP) and the tiny SD3 bundle, and that bundle's Pipeline."""
    pytest.importorskip("torch")
    from tiny_models import tiny_sd3_bundle

    from edgediff.runtime import Pipeline

    bundle = tiny_sd3_bundle(models_root, t5=True)
    assert bundle.parent == models_root and bundle.name == SD3
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EDGEDIFF_MODELS_DIR", str(models_root))  # the catalogue is read when the app is made
        with running_server(ServerConfig(models=("shipped", SD3), limits=TEST_LIMITS)) as served:
            with Pipeline.from_bundle(bundle) as pipe:
                yield served, pipe


def _reference(pipe, **overrides):
    arguments = {**TEXT, **overrides}
    return pipe(
        PROMPT, seed=5, num_inference_steps=2, guidance_scale=4.0, height=64, width=64, **arguments
    ).images[0]  # fmt: skip


def _error(response: httpx.Response, field: str) -> str:
    """The message of a 400 that names `field` (OpenAI's shape, or A1111's under /sdapi)."""
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text
    body = response.json()
    if "detail" in body:  # A1111's
        message = body["detail"]
    else:
        assert body["error"]["param"] == field, body
        message = body["error"]["message"]
    assert field in message, message
    return message


def test_openai_and_job_api_equal_the_pipeline(sd3):
    served, pipe = sd3
    expected = pixels(_reference(pipe))
    with served.client() as http:
        response = http.post(GENERATIONS, json={"prompt": PROMPT, "model": SD3, **SETTINGS, **TEXT})
        assert response.status_code == 200, response.text
        assert np.array_equal(decode_b64(response.json()["data"][0]["b64_json"]), expected)
        # the fields reach the pipeline: without them the image differs
        plain = http.post(GENERATIONS, json={"prompt": PROMPT, "model": SD3, **SETTINGS, "negative_prompt": "blurry"})
        assert not np.array_equal(decode_b64(plain.json()["data"][0]["b64_json"]), expected)

        created = http.post("/v1/jobs", json={"prompt": PROMPT, "model": SD3, **SETTINGS, **TEXT, "preview": False})
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        served.wait_idle(60)
        job = http.get(f"/v1/jobs/{job_id}").json()
        assert job["status"] == "done", job
        assert {k: job["settings"][k] for k in TEXT} == TEXT  # stored with the job, to reproduce it
        assert "true_cfg_scale" not in job["settings"]  # only what was given
        assert np.array_equal(decode_bytes(httpx.get(job["images"][0]["url"], timeout=10).content), expected)


def test_sdapi_takes_them_as_extras_and_reports_them(sd3):
    served, pipe = sd3
    body = {"prompt": PROMPT, "seed": 5, "steps": 2, "cfg_scale": 4.0, **TEXT}
    body["override_settings"] = {"sd_model_checkpoint": SD3}
    with served.client() as http:
        response = http.post("/sdapi/v1/txt2img", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert np.array_equal(decode_b64(answer["images"][0]), pixels(_reference(pipe)))
    info = json.loads(answer["info"])
    assert info["prompt_2"] == TEXT["prompt_2"] and info["max_sequence_length"] == 32
    infotext = info["infotexts"][0]
    assert infotext.splitlines()[1] == "Negative prompt: blurry"
    assert (
        ', Prompt 2: "a blue square, flat", Prompt 3: "a green triangle: small", Negative prompt 2: noise' in infotext
    )
    assert infotext.endswith(", Negative prompt 3: grain, Max sequence length: 32, Version: edgediff")


def test_edits_take_them_as_form_fields(sd3):
    served, pipe = sd3
    form = {"prompt": PROMPT, "model": SD3, "strength": "0.5", **{k: str(v) for k, v in {**SETTINGS, **TEXT}.items()}}
    with served.client() as http:
        response = http.post("/v1/images/edits", data=form, files={"image": ("in.png", png_bytes(sample_image()))})
    assert response.status_code == 200, response.text
    expected = _reference(pipe, image=sample_image(), strength=0.5, keep_unmasked=False)
    assert np.array_equal(decode_b64(response.json()["data"][0]["b64_json"]), pixels(expected))


def test_a_field_the_bundle_refuses_is_a_400_naming_it(sd3):
    served, _ = sd3
    with served.client() as http:
        for field in ("prompt_2", "prompt_3", "negative_prompt_2", "negative_prompt_3"):  # SD 1.x: one CLIP
            for path in (GENERATIONS, "/v1/jobs"):  # the job API refuses it at once too, not in a failed job
                message = _error(http.post(path, json={"prompt": PROMPT, field: "x"}), field)
                assert "which this bundle does not have (its text encoders: text_encoder)" in message
            _error(http.post("/sdapi/v1/txt2img", json={"prompt": PROMPT, field: "x"}), field)
        for model in ("shipped", SD3):  # FLUX's true CFG only
            message = _error(
                http.post(GENERATIONS, json={"prompt": PROMPT, "model": model, "true_cfg_scale": 2}), "true_cfg_scale"
            )
            assert "FluxPipeline's true CFG" in message
        # empty encoder prompts fall back to the prompt, as the runtime's (diffusers' `prompt_2 or prompt`)
        assert (
            http.post(GENERATIONS, json={"prompt": PROMPT, "prompt_2": "", "steps": 1, "size": "64x64"}).status_code
            == 200
        )


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("true_cfg_scale", 0.5, "between 1 and 50"),
        ("true_cfg_scale", 51, "between 1 and 50"),
        ("true_cfg_scale", "2", "must be a number"),
        ("true_cfg_scale", True, "must be a number"),
        ("max_sequence_length", 0, "between 1 and 512"),
        ("max_sequence_length", 513, "between 1 and 512"),
        ("max_sequence_length", 16.5, "must be an integer"),
        ("max_sequence_length", "77", "must be an integer"),
        ("prompt_2", 3, "must be a string"),
        ("negative_prompt_3", "x" * (TEST_LIMITS.max_prompt_chars + 1), "characters; at most"),
    ],
)
def test_bad_values_are_a_400_naming_the_field(server, field, value, words):
    with server.client() as http:
        for path in (GENERATIONS, "/v1/jobs", "/sdapi/v1/txt2img"):
            assert words in _error(http.post(path, json={"prompt": PROMPT, field: value}), field)


def test_non_finite_numbers_and_bad_form_values(server):
    with server.client() as http:
        for raw in (b"Infinity", b"NaN", b"-Infinity"):  # Python's JSON reader takes these
            body = b'{"prompt": "x", "true_cfg_scale": ' + raw + b"}"
            assert "must be a number" in _error(http.post(GENERATIONS, content=body), "true_cfg_scale")
        form = {"prompt": PROMPT, "max_sequence_length": "many"}
        response = http.post("/v1/images/edits", data=form, files={"image": ("in.png", png_bytes(sample_image()))})
        assert "must be an integer, got 'many'" in _error(response, "max_sequence_length")
        form = {"prompt": PROMPT, "true_cfg_scale": "inf"}
        response = http.post("/v1/images/edits", data=form, files={"image": ("in.png", png_bytes(sample_image()))})
        assert "must be a number" in _error(response, "true_cfg_scale")


def test_settings_and_infotext_carry_only_what_is_set():
    from edgediff.server.params import GenerationRequest

    plain = GenerationRequest("m", "p", None, 1, 64, 64, 2, 1.0, 3, "euler")
    assert plain.text_arguments() == {} and "prompt_2" not in plain.settings()
    assert plain.infotext().endswith("Model: m, Version: edgediff")
    given = GenerationRequest(
        "m", "p", "n", 1, 64, 64, 2, 1.0, 3, "euler", prompt_2='say "hi"', true_cfg_scale=3.5, max_sequence_length=77
    )
    assert given.settings()["prompt_2"] == 'say "hi"' and given.settings()["true_cfg_scale"] == 3.5
    assert given.infotext().endswith(
        'Model: m, Prompt 2: "say \\"hi\\"", True CFG scale: 3.5, Max sequence length: 77, Version: edgediff'
    )


def test_a_runtime_refusal_names_its_field():
    """What the worker maps from the runtime's InputError, should a refusal get past the request checks."""
    from edgediff.runtime import InputError
    from edgediff.server.jobs import _input_field

    error = InputError("prompt_encoder", argument="prompt_3", component="text_encoder_3", have="text_encoder")
    assert _input_field(error) == "prompt_3"
    assert _input_field(InputError("true_cfg_family", family="sd1")) == "true_cfg_scale"
    assert _input_field(InputError("max_sequence_length", limit=512, value=0)) == "max_sequence_length"
    assert _input_field(InputError("steps", value=0)) is None and _input_field(ValueError("x")) is None
