"""--attention fused: unmasked scaled-dot-product attention exported as onnxruntime's MultiHeadAttention (flash
attention on CPU). The operator against PyTorch's attention; whole bundles of each attention-bearing family
against the same family's plain bundle (itself held to diffusers' pipeline by the family's own tests)."""

import io

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from references import PROMPTS  # noqa: E402
from tiny_models import TINY_SIZE, tiny_bundle, tiny_source  # noqa: E402

from edgediff.export import ExportOptions, export  # noqa: E402
from edgediff.runtime import Bundle, Pipeline  # noqa: E402

FUSED_ATOL = 1e-5  # flash attention sums its tiles' softmax in another order than one whole softmax
IMAGE_ATOL = 1 / 255  # fused against plain bundles: one 8-bit step


class _Attention(torch.nn.Module):
    def __init__(self, **call):
        super().__init__()
        self.call = call

    def forward(self, query, key, value):
        return torch.nn.functional.scaled_dot_product_attention(query, key, value, **self.call)


def _graph(module, *inputs):
    """`module` exported under fused_attention with batch and token counts dynamic."""
    import onnx

    from edgediff.export.attention import fused_attention

    axes = {"query": {0: "batch", 2: "tokens"}, "key": {0: "batch", 2: "keys"}, "value": {0: "batch", 2: "keys"}}
    buffer = io.BytesIO()
    with fused_attention():
        torch.onnx.export(
            module, inputs, buffer, input_names=list(axes), dynamic_axes=axes, opset_version=18, dynamo=False
        )
    return onnx.load_from_string(buffer.getvalue())


def _run(graph, *inputs):
    import onnxruntime as ort

    session = ort.InferenceSession(graph.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, dict(zip(("query", "key", "value"), (x.numpy() for x in inputs))))[0]


@pytest.mark.parametrize("scale", [None, 0.3])
def test_unmasked_attention_becomes_one_operator_with_pytorchs_result(scale):
    """Traced at one batch and token count, run at others (cross-attention: fewer keys than queries)."""
    from edgediff.export.attention import fused_layers

    call = {} if scale is None else {"scale": scale}
    rng = torch.Generator().manual_seed(0)
    graph = _graph(_Attention(**call), *(torch.randn(2, 3, n, 8, generator=rng) for n in (50, 70, 70)))
    assert fused_layers(graph) == 1
    assert not {"Softmax", "MatMul"} & {n.op_type for n in graph.graph.node}
    inputs = [torch.randn(1, 3, n, 8, generator=rng) for n in (33, 20, 20)]
    ours = _run(graph, *inputs)
    theirs = torch.nn.functional.scaled_dot_product_attention(*inputs, **call).numpy()
    assert ours.shape == theirs.shape == (1, 3, 33, 8)
    assert np.abs(ours - theirs).max() <= FUSED_ATOL


def test_masked_and_causal_attention_keep_their_form():
    """onnxruntime's flash path takes no mask: such calls (text encoders, masked cross-attention) stay as
    PyTorch writes them, with their result."""
    from edgediff.export.attention import fused_layers

    inputs = [torch.randn(1, 2, 6, 4) for _ in range(3)]
    mask = torch.tensor([True] * 4 + [False] * 2).expand(6, 6)  # (queries, keys): the last two keys hidden
    for call in ({"is_causal": True}, {"attn_mask": mask}):
        graph = _graph(_Attention(**call), *inputs)
        assert fused_layers(graph) == 0
        expected = torch.nn.functional.scaled_dot_product_attention(*inputs, **call).numpy()
        assert np.abs(_run(graph, *inputs) - expected).max() <= FUSED_ATOL


def test_values_of_another_head_size_fuse_with_pytorchs_result():
    """Keys one channel wider than the values (SD3's counted text, export/counted_text.py) still make one operator,
    with PyTorch's result at other batch and token counts."""
    from edgediff.export.attention import fused_layers

    rng = torch.Generator().manual_seed(0)
    call = {"scale": 0.25}
    graph = _graph(_Attention(**call), *(torch.randn(2, 3, 9, d, generator=rng) for d in (9, 9, 8)))
    assert fused_layers(graph) == 1 and "Softmax" not in {n.op_type for n in graph.graph.node}
    inputs = [torch.randn(1, 3, 13, d, generator=rng) for d in (9, 9, 8)]
    ours = _run(graph, *inputs)
    theirs = torch.nn.functional.scaled_dot_product_attention(*inputs, **call).numpy()
    assert ours.shape == theirs.shape == (1, 3, 13, 8)
    assert np.abs(ours - theirs).max() <= FUSED_ATOL


def test_pytorchs_attention_is_back_after_the_export_and_untouched_outside_tracing():
    from edgediff.export.attention import fused_attention

    original = torch.nn.functional.scaled_dot_product_attention
    inputs = [torch.randn(1, 2, 5, 4) for _ in range(3)]
    with fused_attention():
        inside = torch.nn.functional.scaled_dot_product_attention(*inputs)  # the PyTorch reference's call
    assert torch.nn.functional.scaled_dot_product_attention is original
    assert torch.equal(inside, original(*inputs))


def _unmasked_calls(module, *args, **kwargs) -> int:
    """How many scaled-dot-product attention calls without a mask or causality one forward of `module` makes."""
    original = torch.nn.functional.scaled_dot_product_attention
    calls = []

    def counting(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **rest):
        calls.append(attn_mask is None and not is_causal)
        return original(query, key, value, attn_mask, dropout_p, is_causal, **rest)

    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        with torch.no_grad():
            module(*args, **kwargs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return sum(calls)


# family -> its denoiser's bundle component (and pipeline attribute), and what its diffusers call needs
DENOISERS = {
    "tiny-sd-turbo": ("unet", {}),
    "tiny-sd3": ("transformer", {}),
    "tiny-flux-schnell": ("transformer", {}),
    "tiny-pixart-sigma": ("transformer", {"use_resolution_binning": False}),  # its bins start at 256 px
}


def _denoiser_calls(source, component: str, size: int, **call) -> int:
    """The unmasked attention calls one forward of the source's denoiser makes, in diffusers' own pipeline."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(source))
    pipe.set_progress_bar_config(disable=True)
    original = torch.nn.functional.scaled_dot_product_attention
    calls, inside = [], []

    def counting(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **rest):
        if inside == [True]:
            calls.append(attn_mask is None and not is_causal)
        return original(query, key, value, attn_mask, dropout_p, is_causal, **rest)

    denoiser = getattr(pipe, component)
    denoiser.register_forward_pre_hook(lambda *_: inside.append(True))  # the first forward only
    denoiser.register_forward_hook(lambda *_: inside.append(False))
    torch.nn.functional.scaled_dot_product_attention = counting
    try:
        pipe("a red circle", num_inference_steps=1, height=size, width=size, output_type="latent", **call)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    return sum(calls)


@pytest.mark.parametrize("arch", list(DENOISERS))
def test_fused_bundles_draw_the_plain_bundles_images(models_root, tmp_path, arch):
    """Every unmasked attention layer of the denoiser and of the VAE's mid block is fused; the images equal the
    plain bundle's from the same seed."""
    source = tiny_source(arch, models_root)
    size = TINY_SIZE.get(arch)
    fused = Bundle.open(
        export(str(source), tmp_path / "fused", ExportOptions(attention="fused", height=size, width=size), False)
    )
    plain = Bundle.open(tiny_bundle(arch, models_root))
    component, call = DENOISERS[arch]
    layers = fused.manifest.components[component].attributes["attention"]
    assert layers["mode"] == "fused" and layers["fused_layers"] > 0
    assert layers["fused_layers"] == _denoiser_calls(source, component, plain.manifest.defaults["height"], **call)
    assert fused.manifest.components["vae_decoder"].attributes["attention"] == {"mode": "fused", "fused_layers": 1}

    call = dict(seed=3, num_inference_steps=2, output_type="np")
    ours = Pipeline(fused, provider="cpu")(PROMPTS, **call).images
    theirs = Pipeline(plain, provider="cpu")(PROMPTS, **call).images
    assert ours.shape == theirs.shape
    assert np.abs(ours - theirs).max() <= IMAGE_ATOL


@pytest.mark.parametrize(
    "precision,streamed",
    [("int8", False), ("int8", True), ("int4", False), ("int4", True)],
    ids=["int8", "int8-a-weight-at-a-time", "int4", "int4-a-weight-at-a-time"],
)
def test_quantised_fused_bundles_draw_the_plain_quantised_bundles_images(
    models_root, tmp_path, monkeypatch, precision, streamed
):
    """The quantisers take fused graphs, the large-graph ones (a weight at a time, past 2 GB) too: onnx's shape
    inference does not know MultiHeadAttention, so its output carries its type from the export."""
    from edgediff.export import quantize as quantize_module

    if streamed:
        monkeypatch.setattr(quantize_module, "LARGE_GRAPH_BYTES", 0)
    source = tiny_source("tiny-sd3", models_root)
    fused = export(str(source), tmp_path / "fused", ExportOptions(attention="fused", precision=precision), False)
    call = dict(seed=3, num_inference_steps=2, output_type="np")
    ours = Pipeline.from_bundle(fused, provider="cpu")(PROMPTS, **call).images
    theirs = Pipeline.from_bundle(tiny_bundle("tiny-sd3", models_root, precision), provider="cpu")(
        PROMPTS, **call
    ).images
    assert np.abs(ours - theirs).max() <= IMAGE_ATOL
