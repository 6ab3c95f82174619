"""The CLIP text transformer FLUX takes its pooled vector from: causal self-attention, quick-GELU,
pre-layer-norm blocks, a final layer norm, pooled at the first end-of-text token. Attribute names
mirror Hugging Face's CLIPTextModel."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.layers import dense
from flux_jax.sharding import constrain


@dataclasses.dataclass(frozen=True)
class CLIPTextEncoderConfig:
    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    hidden_act: str = "quick_gelu"
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"


_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def _linear(i: int, o: int, axes: tuple[str, str], c: CLIPTextEncoderConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return dense(i, o, axes=axes, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)


def _layer_norm(dim: int, c: CLIPTextEncoderConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=c.layer_norm_eps, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)


class CLIPEmbeddings(nnx.Module):
    def __init__(self, c: CLIPTextEncoderConfig, *, rngs: nnx.Rngs):
        self.token_embedding = nnx.Embed(c.vocab_size, c.hidden_size, param_dtype=c.param_dtype, rngs=rngs)
        self.position_embedding = nnx.Embed(c.max_position_embeddings, c.hidden_size, param_dtype=c.param_dtype, rngs=rngs)


class CLIPAttention(nnx.Module):
    def __init__(self, c: CLIPTextEncoderConfig, *, rngs: nnx.Rngs):
        h = c.hidden_size
        self.num_heads = c.num_attention_heads
        self.q_proj = _linear(h, h, ("embed", "heads"), c, rngs)
        self.k_proj = _linear(h, h, ("embed", "heads"), c, rngs)
        self.v_proj = _linear(h, h, ("embed", "heads"), c, rngs)
        self.out_proj = _linear(h, h, ("heads", "embed"), c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, l, h = x.shape
        q, k, v = (p(x).reshape(b, l, self.num_heads, -1) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(out.reshape(b, l, h))


class CLIPMLP(nnx.Module):
    def __init__(self, c: CLIPTextEncoderConfig, *, rngs: nnx.Rngs):
        self.act = _ACTIVATIONS[c.hidden_act]
        self.fc1 = _linear(c.hidden_size, c.intermediate_size, ("embed", "mlp"), c, rngs)
        self.fc2 = _linear(c.intermediate_size, c.hidden_size, ("mlp", "embed"), c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    def __init__(self, c: CLIPTextEncoderConfig, *, rngs: nnx.Rngs):
        self.self_attn = CLIPAttention(c, rngs=rngs)
        self.layer_norm1 = _layer_norm(c.hidden_size, c, rngs)
        self.mlp = CLIPMLP(c, rngs=rngs)
        self.layer_norm2 = _layer_norm(c.hidden_size, c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    def __init__(self, c: CLIPTextEncoderConfig, *, rngs: nnx.Rngs):
        self.layers = nnx.List([CLIPEncoderLayer(c, rngs=rngs) for _ in range(c.num_hidden_layers)])


class CLIPTextEncoder(nnx.Module):
    """input_ids (B, L) int -> (last hidden states (B, L, hidden), pooled (B, hidden))."""

    def __init__(self, config: CLIPTextEncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embeddings = CLIPEmbeddings(config, rngs=rngs)
        self.encoder = CLIPEncoder(config, rngs=rngs)
        self.final_layer_norm = _layer_norm(config.hidden_size, config, rngs)

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        input_ids = jnp.asarray(input_ids)
        length = input_ids.shape[1]
        if length > self.config.max_position_embeddings:
            raise ValueError(f"CLIP takes at most {self.config.max_position_embeddings} tokens, got {length}")
        x = self.embeddings.token_embedding(input_ids) + self.embeddings.position_embedding(jnp.arange(length))[None]
        x = x.astype(self.config.dtype)
        for layer in self.encoder.layers:
            x = constrain(layer(x), "activation_batch", "activation_length", "activation_embed")
        x = self.final_layer_norm(x)
        # Hugging Face's rule: configs with the old eos id 2 pool at the largest token id.
        eos = jnp.argmax(input_ids, -1) if self.config.eos_token_id == 2 else jnp.argmax(input_ids == self.config.eos_token_id, -1)
        return x, x[jnp.arange(x.shape[0]), eos]
