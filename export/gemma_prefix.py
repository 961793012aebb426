"""SANA's Gemma-2 with its instruction prefix computed once, at export.

SanaPipeline puts the same complex-human instruction (hundreds of tokens) before every prompt and runs Gemma-2 over
the instruction, the prompt and the padding up to max_sequence_length. Gemma-2 is causal: the prompt's hidden states
depend on the instruction only through its keys and values, which never change. So the export computes them once in
PyTorch and stores them in the bundle (PREFIX_FILE), and the graph takes them as inputs (`prefix_keys`,
`prefix_values`) beside the prompt's tokens alone. The transformer masks the padding, whose hidden states are then
never computed. The hidden state SanaPipeline keeps from the instruction (its first token's) is stored with them.
Hand-written because no exporter offers it; it makes SANA's text encoder one prompt long instead of
instruction + 300 tokens.

The graph: input_ids (batch, tokens) after the prefix, attention_mask (batch, prefix + tokens), prefix_keys and
prefix_values (layers, 1, key-value heads, prefix, head dim), shared by every row -> last_hidden_state (batch,
tokens, hidden). An empty prefix (0 tokens) makes it plain Gemma-2, for prompts without the instruction (SANA's
negative prompts).
"""

from __future__ import annotations

import numpy as np

PREFIX_FILE = "text_encoder_prefix.npz"
# the prefix ends this many tokens before the instruction's last: tokenizing instruction + prompt may merge the
# instruction's last characters with the prompt's first (the runtime checks the ids and runs without it if they differ)
PREFIX_MARGIN = 1
# check inputs: a prefix and prompt tokens of their own lengths, so that neither axis is baked in
CHECK_PREFIX_TOKENS = 5


def prefix_shape(text_encoder) -> tuple[int, int, int]:
    """(layers, key-value heads, head dim) of Gemma-2's key-value cache."""
    c = text_encoder.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return int(c.num_hidden_layers), int(c.num_key_value_heads), int(head_dim)


def _additive(allowed):
    import torch

    zero = torch.zeros((), dtype=torch.float32)
    return torch.where(allowed, zero, torch.tensor(torch.finfo(torch.float32).min))


def _prefixed_module(text_encoder):
    import torch
    from transformers import DynamicCache

    layers = prefix_shape(text_encoder)[0]
    window = int(getattr(text_encoder.config, "sliding_window", None) or 2**30)

    class PrefixedGemma2(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            self.config = model.config  # optimum's exporter reads and sets it

        def forward(self, input_ids, attention_mask, prefix_keys, prefix_values):
            batch = input_ids.shape[0]
            cache = DynamicCache()  # plain layers: the sliding window is in the masks below
            for i in range(layers):
                cache.update(prefix_keys[i].expand(batch, -1, -1, -1), prefix_values[i].expand(batch, -1, -1, -1), i)
            # positions from the mask's length (prefix + tokens), without arange over traced sizes
            key_positions = torch.cumsum(torch.ones_like(attention_mask[0]), 0) - 1
            query_positions = key_positions[prefix_keys.shape[3] :]
            causal = key_positions[None, :] <= query_positions[:, None]
            visible = causal[None, None] & attention_mask[:, None, None, :].bool()
            near = (query_positions[:, None] - key_positions[None, :]) < window
            masks = {"full_attention": _additive(visible), "sliding_attention": _additive(visible & near[None, None])}
            out = self.model(
                input_ids=input_ids,
                attention_mask=masks,  # transformers takes prepared masks as they are
                position_ids=query_positions[None],
                cache_position=query_positions,
                past_key_values=cache,
                use_cache=False,
            )
            return {"last_hidden_state": out.last_hidden_state}

    return PrefixedGemma2(text_encoder)


def prefixed_text_encoder(text_encoder):
    """(module, optimum export config) for the graph described above."""
    import torch
    from optimum.exporters.onnx.model_configs import Gemma2TextEncoderOnnxConfig

    layers, heads, head_dim = prefix_shape(text_encoder)
    vocab = int(text_encoder.config.vocab_size)

    class PrefixedGemma2Config(Gemma2TextEncoderOnnxConfig):
        @property
        def inputs(self):
            return {
                "input_ids": {0: "batch_size", 1: "sequence_length"},
                "attention_mask": {0: "batch_size", 1: "prefix_length + sequence_length"},
                "prefix_keys": {3: "prefix_length"},
                "prefix_values": {3: "prefix_length"},
            }

        @property
        def outputs(self):
            return {"last_hidden_state": {0: "batch_size", 1: "sequence_length"}}

        def generate_dummy_inputs(self, framework="pt", **shapes):
            rng = np.random.default_rng(1)
            dummies = random_prefixed_inputs(rng, 2, 7, (layers, heads, head_dim), vocab)
            return {k: torch.from_numpy(v) for k, v in dummies.items()} if framework == "pt" else dummies

    return _prefixed_module(text_encoder), PrefixedGemma2Config(text_encoder.config, task="feature-extraction")


def random_prefixed_inputs(rng, batch: int, tokens: int, shape: tuple[int, int, int], vocab: int) -> dict:
    """Check inputs: a random prefix of CHECK_PREFIX_TOKENS, `tokens` ids, right-padded rows of differing lengths."""
    layers, heads, head_dim = shape
    kv = (layers, 1, heads, CHECK_PREFIX_TOKENS, head_dim)
    kept = np.concatenate([[tokens], rng.integers(1, tokens + 1, batch - 1)])
    mask = (np.arange(tokens)[None, :] < kept[:, None]).astype(np.int64)
    return {
        "input_ids": rng.integers(0, vocab, (batch, tokens), dtype=np.int64),
        "attention_mask": np.concatenate([np.ones((batch, CHECK_PREFIX_TOKENS), np.int64), mask], axis=1),
        "prefix_keys": rng.standard_normal(kv).astype(np.float32),
        "prefix_values": rng.standard_normal(kv).astype(np.float32),
    }


def prefixed_call(text_encoder, x: dict):
    """The PyTorch reference for the graph: the same module on the same inputs."""
    return _prefixed_module(text_encoder)(**x)["last_hidden_state"]


def prefix_arrays(text_encoder, ids: list[int]) -> dict[str, np.ndarray]:
    """Gemma-2's keys and values for the prefix `ids` (PREFIX_MARGIN short of the instruction's), and the hidden
    state of its first token, in fp32."""
    import torch
    from transformers import DynamicCache

    tokens = torch.tensor([ids], dtype=torch.int64)
    with torch.no_grad():
        out = text_encoder(input_ids=tokens, past_key_values=DynamicCache(), use_cache=True)
    cache = out.past_key_values
    keys = torch.stack([layer.keys for layer in cache.layers]).float().numpy()
    values = torch.stack([layer.values for layer in cache.layers]).float().numpy()
    return {
        "ids": np.asarray(ids, dtype=np.int64),
        "keys": np.ascontiguousarray(keys),
        "values": np.ascontiguousarray(values),
        "first_hidden_state": out.last_hidden_state[0, 0].float().numpy(),
    }


def write_prefix(pipe, instruction: str, staging) -> dict | None:
    """Writes PREFIX_FILE for SANA's instruction; returns the manifest's `prefix` entry (None without one)."""
    from ..runtime.bundle import sha256_file

    ids = pipe.tokenizer(instruction).input_ids if instruction else []
    if len(ids) <= PREFIX_MARGIN + 1:  # nothing left worth caching
        return None
    arrays = prefix_arrays(pipe.text_encoder, ids[: len(ids) - PREFIX_MARGIN])
    np.savez(staging / PREFIX_FILE, **arrays)
    path = staging / PREFIX_FILE
    return {"file": PREFIX_FILE, "tokens": len(arrays["ids"]), "size": path.stat().st_size, "sha256": sha256_file(path)}
