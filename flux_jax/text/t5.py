"""The T5 v1.1 encoder as FLUX uses it: RMS layer norm, relative position bias, gated-GELU
feed-forward, no biases. Attribute names mirror Hugging Face's T5EncoderModel, so its checkpoint maps
by "weight -> transposed kernel" alone. Letters: B batch, L length, H heads, D head dim."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.layers import Dtype, dense, gelu_tanh
from flux_jax.sharding import constrain, param_metadata


@dataclasses.dataclass(frozen=True)
class T5EncoderConfig:
    vocab_size: int = 32128
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"


def _linear(i: int, o: int, axes: tuple[str, str], c: T5EncoderConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return dense(i, o, use_bias=False, axes=axes, dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias, computed in float32."""

    def __init__(self, dim: int, eps: float, param_dtype: Dtype):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **param_metadata(("embed",), (dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), -1, keepdims=True) + self.eps)
        return (xf * self.weight[...].astype(jnp.float32)).astype(x.dtype)


def relative_position_bucket(relative_position: jax.Array, num_buckets: int, max_distance: int) -> jax.Array:
    """T5's bidirectional buckets: half for each direction, exact up to num_buckets/4, log-spaced after."""
    num_buckets //= 2
    bucket = (relative_position > 0).astype(jnp.int32) * num_buckets
    n = jnp.abs(relative_position)
    max_exact = num_buckets // 2
    large = max_exact + (
        jnp.log(jnp.maximum(n, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
    ).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return bucket + jnp.where(n < max_exact, n, large)


class T5Attention(nnx.Module):
    def __init__(self, c: T5EncoderConfig, has_relative_attention_bias: bool, *, rngs: nnx.Rngs):
        inner = c.num_heads * c.d_kv
        self.config = c
        self.q = _linear(c.d_model, inner, ("embed", "heads"), c, rngs)
        self.k = _linear(c.d_model, inner, ("embed", "heads"), c, rngs)
        self.v = _linear(c.d_model, inner, ("embed", "heads"), c, rngs)
        self.o = _linear(inner, c.d_model, ("heads", "embed"), c, rngs)
        shape = (c.relative_attention_num_buckets, c.num_heads)
        self.relative_attention_bias = (
            nnx.Param(jnp.zeros(shape, c.param_dtype), **param_metadata((None, None), shape)) if has_relative_attention_bias else None
        )

    def position_bias(self, length: int) -> jax.Array:
        """(1, H, L, L) additive bias from the relative position of key to query."""
        c = self.config
        pos = jnp.arange(length)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias[...][buckets], (2, 0, 1))[None].astype(jnp.float32)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        b, l, _ = x.shape
        c = self.config
        q, k, v = (proj(x).reshape(b, l, c.num_heads, c.d_kv) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias  # T5: no 1/sqrt(D)
        weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.o(jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, l, -1))


class T5LayerSelfAttention(nnx.Module):
    def __init__(self, c: T5EncoderConfig, has_relative_attention_bias: bool, *, rngs: nnx.Rngs):
        self.SelfAttention = T5Attention(c, has_relative_attention_bias, rngs=rngs)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon, c.param_dtype)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nnx.Module):
    def __init__(self, c: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.wi_0 = _linear(c.d_model, c.d_ff, ("embed", "mlp"), c, rngs)
        self.wi_1 = _linear(c.d_model, c.d_ff, ("embed", "mlp"), c, rngs)
        self.wo = _linear(c.d_ff, c.d_model, ("mlp", "embed"), c, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nnx.Module):
    def __init__(self, c: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.DenseReluDense = T5DenseGatedActDense(c, rngs=rngs)
        self.layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon, c.param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nnx.Module):
    def __init__(self, c: T5EncoderConfig, has_relative_attention_bias: bool, *, rngs: nnx.Rngs):
        self.layer = nnx.List([T5LayerSelfAttention(c, has_relative_attention_bias, rngs=rngs), T5LayerFF(c, rngs=rngs)])

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        return self.layer[1](self.layer[0](x, bias))


class T5Stack(nnx.Module):
    def __init__(self, c: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.block = nnx.List([T5Block(c, i == 0, rngs=rngs) for i in range(c.num_layers)])
        self.final_layer_norm = T5LayerNorm(c.d_model, c.layer_norm_epsilon, c.param_dtype)


class T5Encoder(nnx.Module):
    """input_ids (B, L) int -> last hidden states (B, L, d_model) in the compute dtype."""

    def __init__(self, config: T5EncoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        shape = (config.vocab_size, config.d_model)
        self.shared = nnx.Param(jax.random.normal(rngs.params(), shape, config.param_dtype), **param_metadata((None, "embed"), shape))
        self.encoder = T5Stack(config, rngs=rngs)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        input_ids = jnp.asarray(input_ids)
        x = self.shared[...][input_ids].astype(self.config.dtype)
        blocks = self.encoder.block
        bias = blocks[0].layer[0].SelfAttention.position_bias(input_ids.shape[1])
        if attention_mask is not None:
            bias = bias + jnp.where(jnp.asarray(attention_mask)[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        for block in blocks:
            x = constrain(block(x, bias), "activation_batch", "activation_length", "activation_embed")
        return self.encoder.final_layer_norm(x)
