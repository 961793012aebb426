"""Head-sliced attention written into the exported graphs (`--attention sliced`).

The default attention materialises every head's (tokens x tokens) score matrix at once: at 512x512
the first UNet block's self-attention is 5 heads x 4096 x 4096 scores, 335 MB in fp32, and it is what
sets the UNet's peak memory (docs/benchmarks.md).
This processor computes one head at a time, so only one head's scores need be alive. Heads are a fixed
count, so batch and image size stay dynamic in the graph. Same arithmetic as diffusers' attention
(checked in tests/export/test_export.py); hand-written because no library processor slices heads with static
bounds (diffusers' SlicedAttnProcessor loops over batch x heads, which would bake the batch size in).

`split_einsum` (Core ML target only) is the same per-head arithmetic in the layout Apple's Neural Engine
favours: q, k and v as (batch, channels, 1, tokens), each head's scores and output one einsum apiece
(https://machinelearning.apple.com/research/neural-engine-transformers). Apple's ml-stable-diffusion also
rewrites the UNet's linear layers as 1x1 convolutions and its layer norms for that layout; here only the
attention is rewritten, and the layers around it stay as diffusers writes them.

`fused` (ONNX, every family) writes each unmasked scaled-dot-product attention as one onnxruntime
MultiHeadAttention node. On CPU onnxruntime runs it as flash attention (MLAS, tiled to the L2 cache;
https://arxiv.org/abs/2205.14135): the (tokens x tokens) scores are never whole. That is what SD3.5 at 1024
needs, whose joint attention over 2 x 4,429 tokens is 3.8 GB of scores per layer unfused. CUDA and DirectML
have their own MultiHeadAttention kernels. Masked or causal attention (the CLIP and Gemma text encoders,
SANA's and PixArt's cross-attention) keeps its plain form.
"""

from __future__ import annotations

from contextlib import contextmanager


class PerHeadAttnProcessor:
    """diffusers' AttnProcessor2_0 with its scaled-dot-product attention computed one head at a time
    (`_heads`, per subclass)."""

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, *args, **kwargs
    ):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = attn.to_k.out_features // attn.heads  # a Python int: the slices below are static
        scale = head_dim**-0.5  # scaled_dot_product_attention's default, as AttnProcessor2_0 uses
        parts = [slice(h * head_dim, (h + 1) * head_dim) for h in range(attn.heads)]
        # scale folded into q (tokens x d) rather than applied to the scores (tokens x tokens): one multiply
        # over tokens x d instead of tokens x tokens, and int8-static graphs go from the score MatMul
        # straight into the (float) Softmax
        hidden_states = self._heads(query * scale, key, value, parts)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


class HeadSlicedAttnProcessor(PerHeadAttnProcessor):
    """Per head: (tokens x d) @ (d x tokens) scores, softmax, @ (tokens x d); tokens-last layout as diffusers'."""

    @staticmethod
    def _heads(query, key, value, parts):
        import torch

        heads = [
            torch.matmul(torch.matmul(query[..., p], key[..., p].transpose(-1, -2)).softmax(dim=-1), value[..., p])
            for p in parts
        ]
        return torch.cat(heads, dim=-1)


class SplitEinsumAttnProcessor(PerHeadAttnProcessor):
    """Per head in the Neural Engine's (batch, channels, 1, tokens) layout: scores indexed (b, key, 1, query),
    softmax over the key axis, then the values weighted back into (b, channels, 1, query)."""

    @staticmethod
    def _heads(query, key, value, parts):
        import torch

        q, v = (t.transpose(1, 2).unsqueeze(2) for t in (query, value))  # (b, c, 1, tokens)
        k = key.unsqueeze(2)  # (b, keys, 1, c): the key operand's layout in Apple's einsum
        heads = [
            torch.einsum("bkhq,bchk->bchq", torch.einsum("bchq,bkhc->bkhq", q[:, p], k[..., p]).softmax(dim=1), v[:, p])
            for p in parts
        ]
        return torch.cat(heads, dim=1).squeeze(2).transpose(1, 2)  # back to (b, tokens, c)


PROCESSORS = {"sliced": HeadSlicedAttnProcessor, "split_einsum": SplitEinsumAttnProcessor}


def use_attention(module, mode: str) -> int:
    """Gives every plain attention layer of `module` the processor for `mode` ("sliced", "split_einsum");
    returns how many. Layers these processors do not cover (attention masks are not used by UNets; q/k
    norms, added key/value projections) keep their own."""
    from diffusers.models.attention_processor import Attention

    count = 0
    for layer in module.modules():
        if (
            isinstance(layer, Attention)
            and layer.heads > 1
            and layer.norm_q is None
            and layer.norm_k is None
            and getattr(layer, "add_k_proj", None) is None
        ):
            layer.set_processor(PROCESSORS[mode]())
            count += 1
    return count


def _multi_head_attention(original):
    """A torch.autograd.Function computing `original` (PyTorch's scaled_dot_product_attention) whose ONNX
    form is onnxruntime's MultiHeadAttention on (batch, tokens, heads x head_dim) operands (the values' head size
    may differ from the queries' and keys': export/counted_text.py's keys carry one channel more). Heads and head
    sizes come in as Python ints from the traced call: in the exported graph's types they are often unknown (the
    processors reshape with -1), and MultiHeadAttention needs the head count as an attribute."""
    import torch

    class MultiHeadAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, value, heads, head_dim, value_dim, scale):
            return original(query, key, value, scale=scale)

        @staticmethod
        def symbolic(g, query, key, value, heads, head_dim, value_dim, scale):
            def shape(*dims):  # 0 keeps the input's batch, -1 the tokens: both stay dynamic
                return g.op("Constant", value_t=torch.tensor(dims, dtype=torch.int64))

            def tokens_last(x, dim):  # (batch, heads, tokens, dim) -> (batch, tokens, heads x dim)
                return g.op("Reshape", g.op("Transpose", x, perm_i=[0, 2, 1, 3]), shape(0, -1, heads * dim))

            scale_attribute = {} if scale is None else {"scale_f": float(scale)}  # default: 1/sqrt(head_dim)
            out = g.op(
                "com.microsoft::MultiHeadAttention",
                tokens_last(query, head_dim),
                tokens_last(key, head_dim),
                tokens_last(value, value_dim),
                num_heads_i=heads,
                **scale_attribute,
            )
            # typed for onnx's shape inference, which does not know the operator: (batch, tokens, heads x d) in the
            # query's element type (untyped, its value_info read as element type 0 once quantised)
            out.setType(query.type().with_sizes([None, None, heads * value_dim]))
            return g.op("Transpose", g.op("Reshape", out, shape(0, -1, heads, value_dim)), perm_i=[0, 2, 1, 3])

    return MultiHeadAttention


@contextmanager
def fused_attention():
    """While tracing for export, scaled-dot-product attention without mask, dropout or causality, on
    (batch, heads, tokens, d) operands with as many key as query heads (and keys as wide as queries), is written
    as MultiHeadAttention.
    Other calls, and every call outside tracing (the PyTorch reference the graph is checked against), run
    PyTorch's own. diffusers' attention processors and dispatcher look the function up on torch.nn.functional
    at each call; optimum's export puts a wrapper of its own there for its duration, which calls the function
    it found at import: both names are replaced."""
    import torch
    import torch.nn.functional as F
    from optimum.exporters.onnx import model_patcher

    original = F.scaled_dot_product_attention
    fused = _multi_head_attention(original)

    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if (
            torch.jit.is_tracing()
            and attn_mask is None
            and dropout_p == 0.0
            and not is_causal
            and not enable_gqa
            and query.dim() == key.dim() == value.dim() == 4
            and query.shape[1] == key.shape[1] == value.shape[1]
            and query.shape[-1] == key.shape[-1]
        ):
            heads, head_dim, value_dim = int(query.shape[1]), int(query.shape[-1]), int(value.shape[-1])
            return fused.apply(query, key, value, heads, head_dim, value_dim, scale)
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    optimums = model_patcher.original_scaled_dot_product_attention
    F.scaled_dot_product_attention = model_patcher.original_scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention, model_patcher.original_scaled_dot_product_attention = original, optimums


def fused_layers(graph) -> int:
    """How many MultiHeadAttention nodes `graph` (an onnx.ModelProto) holds."""
    return sum(node.op_type == "MultiHeadAttention" and node.domain == "com.microsoft" for node in graph.graph.node)
