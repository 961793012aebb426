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
"""

from __future__ import annotations


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
