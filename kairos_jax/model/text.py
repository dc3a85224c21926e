"""The understanding expert: task text for the cross-attention of every world-model layer.

Two encoders (`config.model.text_encoder`):

- "bytes" (default): a small byte-level text transformer. Task text arrives as byte tokens
  (UTF-8 byte + 1, 0 = padding), int32 [B, L].
- "precomputed": embeddings of an external text / vision-language model stored with the data,
  given as a pair (text_embedding float [B, L, D_ext], text_embedding_mask [B, L]) and projected to
  the text width (D_ext = `config.model.text_embedding_dim`).

Both prepend a learned null token, so a sample with no text (or text dropped for classifier-free
guidance) still has one key to attend to; `null_text` gives the dropped form of either input.

Storing precomputed embeddings. The model and `trainer.loss_fn` read batch keys
`text_embedding` float [B, L, D_ext] (one row per token of the external model, zero-padded to a
fixed L) and `text_embedding_mask` [B, L] (1 on real tokens) when
`config.model.text_encoder = "precomputed"` and `config.model.text_embedding_dim = D_ext`. The
converter (`--text_encoder=module:function`) or `python -m data_pipelines.text_embed` stores one
embedding per distinct task text beside a source's shards (data_pipelines/text_embeddings.py); with
`config.data.text_embedding_dim = D_ext` the Grain pipeline looks each clip's episode text up there
and puts both keys into every batch, at L = `data.text_len` rows (truncated or zero-padded). They are
keys of the batch contract (`pipeline.batch_spec`), so `global_batch` shards them like the others. A
run keeps its sources' tables beside its statistics, where rollout, evaluation and serving look texts
up (docs/architecture.md §2, "Precomputed text embeddings").
"""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from kairos_jax.model.attention import masked_attention
from kairos_jax.model.layers import MLP, Linear, RMSNorm, _param
from kairos_jax.parallel.sharding import constrain

BYTE_VOCAB = 257  # 0 = padding, 1..256 = byte value + 1


def encode_text(text: str, length: int):
    """str -> int32 [length] byte tokens (truncated, zero-padded). Numpy, for data and tools."""
    import numpy as np

    b = text.encode("utf-8")[:length]
    out = np.zeros((length,), np.int32)
    out[: len(b)] = np.frombuffer(b, np.uint8).astype(np.int32) + 1
    return out


class TextLayer(nnx.Module):
    def __init__(self, width: int, heads: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = width // heads
        self.norm1 = RMSNorm(width, rngs=rngs, param_dtype=param_dtype)
        self.qkv = Linear((width,), (3, heads, d), ("embed", None, "heads", "kv"), **kw)
        self.o = Linear((heads, d), (width,), ("heads", "kv", "embed"), **kw, scale=0.0)
        self.norm2 = RMSNorm(width, rngs=rngs, param_dtype=param_dtype)
        self.mlp = MLP(width, 4 * width, **kw)

    def __call__(self, x, mask):
        qkv = self.qkv(self.norm1(x))
        x = x + self.o(masked_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], mask))
        return x + self.mlp(self.norm2(x))


class UnderstandingExpert(nnx.Module):
    """Byte tokens [B, L] -> hidden states [B, L + 1, W_text] and key mask [B, L + 1]."""

    def __init__(self, width: int, depth: int, heads: int, max_len: int, *, rngs, dtype, param_dtype):
        if width % heads:
            raise ValueError(f"text_width={width} must be divisible by text_heads={heads}")
        self.embed = _param(rngs, (BYTE_VOCAB, width), ("vocab", "embed"), param_dtype, std=1.0)
        self.pos = _param(rngs, (max_len + 1, width), (None, "embed"), param_dtype, std=0.02)
        self.null = _param(rngs, (width,), ("embed",), param_dtype, std=1.0)
        self.layers = nnx.List([TextLayer(width, heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                                for _ in range(depth)])
        self.norm = RMSNorm(width, rngs=rngs, param_dtype=param_dtype)
        self.dtype = dtype

    def __call__(self, tokens):
        B, L = tokens.shape
        x = jnp.take(self.embed.get_value(), tokens, axis=0)                      # [B, L, W]
        null = jnp.broadcast_to(self.null.get_value(), (B, 1, x.shape[-1]))
        x = jnp.concatenate([null, x], axis=1) + self.pos.get_value()[: L + 1]
        x = constrain(x.astype(self.dtype), ("act_batch", None, "act_embed"))
        mask = jnp.concatenate([jnp.ones((B, 1), bool), tokens > 0], axis=1)
        for layer in self.layers:
            x = layer(x, mask)
        return self.norm(x), mask


class PrecomputedTextEncoder(nnx.Module):
    """(text_embedding [B, L, D_ext], text_embedding_mask [B, L]) -> hidden states [B, L + 1, W_text]
    and key mask [B, L + 1]: a linear projection of the stored embeddings, RMS-normalised, after a
    learned null token."""

    def __init__(self, embedding_dim: int, width: int, *, rngs, dtype, param_dtype):
        self.proj = Linear((embedding_dim,), (width,), (None, "embed"), rngs=rngs, dtype=dtype,
                           param_dtype=param_dtype, use_bias=True)
        self.null = _param(rngs, (width,), ("embed",), param_dtype, std=1.0)
        self.norm = RMSNorm(width, rngs=rngs, param_dtype=param_dtype)
        self.embedding_dim = embedding_dim
        self.dtype = dtype

    def __call__(self, text):
        embedding, mask = text
        B, L, D = embedding.shape
        if self.embedding_dim != D:
            raise ValueError(f"text_embedding has {D} features, config.model.text_embedding_dim="
                             f"{self.embedding_dim}")
        x = self.proj(embedding)
        null = jnp.broadcast_to(self.null.get_value().astype(x.dtype), (B, 1, x.shape[-1]))
        x = constrain(jnp.concatenate([null, x], axis=1), ("act_batch", None, "act_embed"))
        mask = jnp.concatenate([jnp.ones((B, 1), bool), mask > 0], axis=1)
        return self.norm(x), mask


def batch_text(batch, text_encoder: str):
    """The model's text input from a batch: byte tokens batch["text"], or with the "precomputed"
    encoder the pair (batch["text_embedding"], batch["text_embedding_mask"])."""
    if text_encoder == "precomputed":
        return batch["text_embedding"], batch["text_embedding_mask"]
    return batch["text"]


def null_text(text):
    """The text input with the task text dropped (only the null token stays visible): byte tokens
    -> all padding; (embedding, mask) -> mask all zero."""
    if isinstance(text, tuple | list):
        embedding, mask = text
        return embedding, jnp.zeros_like(mask)
    return jnp.zeros_like(text)


def drop_text(text, keep):
    """Classifier-free-guidance dropout: keep bool [B] per sample; dropped samples get `null_text`."""
    if isinstance(text, tuple | list):
        embedding, mask = text
        return embedding, jnp.where(keep[:, None], mask, jnp.zeros_like(mask))
    return jnp.where(keep[:, None], text, 0)


def concat_text(a, b):
    """Batch-concatenate two text inputs of the same kind (for guided sampling)."""
    if isinstance(a, tuple | list):
        return tuple(jnp.concatenate([x, y], axis=0) for x, y in zip(a, b))
    return jnp.concatenate([a, b], axis=0)
