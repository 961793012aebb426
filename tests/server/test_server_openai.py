"""The official `openai` package against a running server: generations, edits, models, errors; every image
equal, pixel for pixel, to what the library's Pipeline gives for the same seed."""

import pytest

pytest.importorskip("uvicorn")
pytest.importorskip("starlette")
openai = pytest.importorskip("openai")

import httpx  # noqa: E402
import numpy as np  # noqa: E402
from server_helpers import (  # noqa: E402
    decode_b64,
    decode_bytes,
    pixels,
    png_bytes,
    running_server,
    sample_image,
    sample_mask,
)

PROMPT = "a large red circle on a blue background"


def _client(server, api_key="unused") -> "openai.OpenAI":
    # the client insists on a key; a server started without one ignores it
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=api_key, max_retries=0, timeout=60)


def test_generate_b64_equals_the_pipeline(server, reference):
    result = _client(server).images.generate(
        prompt=PROMPT, model="shipped", n=2, size="64x64", response_format="b64_json", extra_body={"seed": 7}
    )
    expected = reference(PROMPT, seed=7, num_images_per_prompt=2)
    assert [item.seed for item in result.data] == [7, 8]  # edgediff's extra field, kept by the client
    for item, image in zip(result.data, expected.images):
        assert np.array_equal(decode_b64(item.b64_json), pixels(image))


def test_generate_with_extras_and_url(server, reference):
    extras = {"seed": 11, "steps": 6, "guidance": 3.0, "negative_prompt": "green"}
    result = _client(server).images.generate(
        prompt="a small green star", size="64x48", response_format="url", extra_body=extras
    )
    url = result.data[0].url
    assert url.startswith(f"{server.url}/images/") and url.endswith(".png")
    served = httpx.get(url, timeout=10)
    assert served.status_code == 200 and served.headers["content-type"] == "image/png"
    expected = reference(
        "a small green star", seed=11, num_inference_steps=6, guidance_scale=3.0, negative_prompt="green", width=64,
        height=48,
    ).images[0]  # fmt: skip
    assert np.array_equal(decode_bytes(served.content), pixels(expected))


def test_edit_image_to_image_and_inpainting(server, reference):
    client = _client(server)
    source = sample_image()
    result = client.images.edit(
        image=("in.png", png_bytes(source), "image/png"), prompt=PROMPT, extra_body={"seed": 3, "strength": 0.75}
    )
    expected = reference(PROMPT, seed=3, image=source, strength=0.75).images[0]
    assert np.array_equal(decode_b64(result.data[0].b64_json), pixels(expected))

    # inpainting: a mask without alpha repaints its white half; the other half keeps the original pixels
    mask = sample_mask()
    result = client.images.edit(
        image=("in.png", png_bytes(source), "image/png"),
        mask=("mask.png", png_bytes(mask), "image/png"),
        prompt=PROMPT,
        extra_body={"seed": 5},
    )
    expected = reference(PROMPT, seed=5, image=source, mask_image=mask, keep_unmasked=True).images[0]
    got = decode_b64(result.data[0].b64_json)
    assert np.array_equal(got, pixels(expected))
    assert np.array_equal(got[:, :32], pixels(source)[:, :32])

    # OpenAI's own mask convention: the transparent area is edited
    alpha_mask = source.convert("RGBA")
    alpha_mask.putalpha(mask.point(lambda v: 0 if v else 255))
    result = client.images.edit(
        image=("in.png", png_bytes(source), "image/png"),
        mask=("mask.png", png_bytes(alpha_mask), "image/png"),
        prompt=PROMPT,
        extra_body={"seed": 5},
    )
    assert np.array_equal(decode_b64(result.data[0].b64_json), pixels(expected))


def test_models_are_the_catalogue(server):
    from edgediff.runtime import list_bundles

    client = _client(server)
    listed = [m.id for m in client.models.list()]
    assert listed == [e.name for e in list_bundles() if e.manifest is not None]
    assert client.models.retrieve("shipped").id == "shipped"


def test_errors_reach_the_client_as_its_exceptions(server):
    client = _client(server)
    with pytest.raises(openai.BadRequestError, match="multiples of 16") as caught:
        client.images.generate(prompt=PROMPT, size="100x100")
    assert caught.value.body["param"] == "size"
    with pytest.raises(openai.NotFoundError, match="not served here"):
        client.images.generate(prompt=PROMPT, model="dall-e-3")
    with pytest.raises(openai.BadRequestError, match="between 1 and 8"):
        client.images.generate(prompt=PROMPT, n=9)


def test_api_key_is_required_when_set():
    with running_server(api_key="s3cret") as keyed:
        with pytest.raises(openai.AuthenticationError, match="API key"):
            _client(keyed, api_key="wrong").images.generate(prompt=PROMPT)
        assert httpx.get(f"{keyed.url}/healthz", timeout=10).status_code == 401
        assert httpx.get(f"{keyed.url}/", timeout=10).status_code == 401
        result = _client(keyed, api_key="s3cret").images.generate(prompt=PROMPT, extra_body={"seed": 1})
        assert result.data[0].b64_json
