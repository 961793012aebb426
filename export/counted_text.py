"""SD3 without T5: the zero T5 tokens enter the transformer as one token, counted.

StableDiffusion3Pipeline without text_encoder_3 follows the CLIP tokens with max_sequence_length (256) rows of
zeros. Each of them stays the same vector through every joint block: text tokens get no position embedding, each
block's text-side layers act token by token, and equal queries attend alike. Attention over n equal keys is
attention over one of them with its logit raised by log n (the n equal terms of sum_j exp(s_j) v_j are
exp(s + log n) v). So the bundle's transformer takes the CLIP tokens and one zero token, with `text_log_counts`
(per text token, the log of how many equal tokens it stands for; added to every attention logit toward it). The
output is the same; SD3.5-medium's joint attention at 512 runs over 1,102 tokens instead of 1,357, and the text
stream's layers over 78 rows instead of 333.

Hand-written: no library collapses repeated tokens. The graph is checked against diffusers' transformer on the
expanded sequence (specs._transformer_call), so the check proves the equivalence, not only the trace.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from edgediff.runtime.denoisers.sd3 import TEXT_LOG_COUNTS


def takes_counted_text(pipe, ctx) -> bool:
    """Whether this export's transformer takes the zero T5 tokens counted: SD3 (joint CLIP + T5 text, unpacked
    latents, no text mask) without T5 and without ControlNets (their graphs take the full text sequence)."""
    return (
        getattr(pipe, "transformer", None) is not None
        and hasattr(pipe, "text_encoder_3")
        and pipe.text_encoder_3 is None
        and ctx.packing == 1
        and not ctx.attention_mask
        and not ctx.controlnet_residuals
        and bool(ctx.max_sequence_length)
    )


def expanded(states, log_counts):
    """The sequence a counted one stands for: each token repeated exp(log count) times (torch tensors; every row of
    `log_counts` must be the same)."""
    import torch

    if not bool((log_counts == log_counts[0]).all()):
        raise ValueError("counted text: every batch row must count its tokens alike")
    counts = torch.round(torch.exp(log_counts[0])).to(torch.int64)
    return torch.repeat_interleave(states, counts, dim=1)


def _joint_processor_class():
    import torch
    import torch.nn.functional as F
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    class CountedJointAttnProcessor(JointAttnProcessor2_0):
        """diffusers' JointAttnProcessor2_0 whose attention logits toward each text token are raised by its log
        count (none toward image tokens). The counts come in as `attention_mask` (B, text tokens), the argument
        diffusers' joint blocks pass on to both attention layers (SD3.5's image-only second one ignores it).

        The raise rides in the keys rather than in a mask: queries get one more channel, 1, and keys one more,
        log count / scale, so that scale * (q . k) gains log count. An attention mask would cost onnxruntime's
        MultiHeadAttention its flash path (the whole score matrix, 3.3 GB per SD3.5 layer at 1024) and, before
        onnxruntime 1.22, gave wrong results for a bias shared by the heads at batch > 1."""

        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
            if attention_mask is None or encoder_hidden_states is None:
                return super().__call__(attn, hidden_states, encoder_hidden_states, None, *args, **kwargs)
            # keys are the image tokens, then the text tokens (diffusers' order)
            image = hidden_states.new_zeros(hidden_states.shape[0], hidden_states.shape[1])
            log_counts = torch.cat([image, attention_mask.to(hidden_states.dtype)], dim=1)[:, None, :, None]
            original = F.scaled_dot_product_attention

            def counted(query, key, value, attn_mask=None, scale=None, **options):
                if attn_mask is not None:
                    raise ValueError("counted text: the joint attention took a mask of its own")
                scale = int(query.shape[-1]) ** -0.5 if scale is None else scale  # the unwidened heads' default
                ones = query.new_ones(query.shape[:-1] + (1,))
                extra = (log_counts / scale).expand(-1, key.shape[1], -1, -1)  # (B, heads, keys, 1)
                query, key = torch.cat([query, ones], dim=-1), torch.cat([key, extra], dim=-1)
                return original(query, key, value, scale=scale, **options)

            # the parent's arithmetic, unchanged, with its one attention call widened (it looks the function up on
            # torch.nn.functional when called)
            F.scaled_dot_product_attention = counted
            try:
                return super().__call__(attn, hidden_states, encoder_hidden_states, None, *args, **kwargs)
            finally:
                F.scaled_dot_product_attention = original

    return CountedJointAttnProcessor


@contextmanager
def counted_processors(transformer):
    """The joint attention layers (those with text projections) take the counts for the duration."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    cls = _joint_processor_class()
    layers = [block.attn for block in transformer.transformer_blocks]
    saved = [layer.processor for layer in layers]
    others = {type(p).__name__ for p in saved if type(p) is not JointAttnProcessor2_0}
    if others:  # another processor's arithmetic (IP-Adapter, PAG) is not the one counted here
        raise ValueError(f"counted text: the transformer's joint attention runs {', '.join(sorted(others))}")
    for layer in layers:
        layer.set_processor(cls())
    try:
        yield
    finally:
        for layer, processor in zip(layers, saved):
            layer.set_processor(processor)


def counted_transformer_for_export(transformer, optimum_config, ctx, trace_ctx):
    """(module, optimum config) of the SD3 transformer taking `text_log_counts` beside optimum's inputs (which keep
    their names and axes; the counts share encoder_hidden_states' batch and sequence axes)."""
    from .controlnet import export_config, flat_module
    from .specs import _transformer_inputs

    example = _transformer_inputs(ctx, np.random.default_rng(1))
    names = list(example)
    axes = {name: dict(optimum_config.inputs[name]) for name in names if name != TEXT_LOG_COUNTS}
    axes[TEXT_LOG_COUNTS] = dict(axes["encoder_hidden_states"])

    def call(model, x):
        with counted_processors(model):
            out = model(
                hidden_states=x["hidden_states"],
                encoder_hidden_states=x["encoder_hidden_states"],
                pooled_projections=x["pooled_projections"],
                timestep=x["timestep"],
                joint_attention_kwargs={"attention_mask": x[TEXT_LOG_COUNTS]},
            )
        return [out.sample]

    def dummies():
        return _transformer_inputs(trace_ctx, np.random.default_rng(1))

    module = flat_module(transformer, names, call)
    patcher = type(optimum_config)._MODEL_PATCHER
    return module, export_config(transformer.config, axes, dict(optimum_config.outputs), dummies, patcher)
