"""FLUX building blocks with Black Forest Labs' attribute names (flux/modules/layers.py).

Einsum letters: B batch, L sequence, H heads, D head dim, C channels.
"""

from __future__ import annotations

import functools
import math
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax import cpu_matmul
from flux_jax.attention import dot_product_attention
from flux_jax.sharding import param_metadata

Dtype = jnp.dtype | str


class LinearFactory(Protocol):
    """Builds every linear layer of the transformer blocks, so a ternary layer can replace them all."""

    def __call__(
        self,
        in_features: int,
        out_features: int,
        *,
        use_bias: bool,
        axes: tuple[str, str],
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ) -> nnx.Module: ...


def dense(
    in_features: int,
    out_features: int,
    *,
    use_bias: bool = True,
    axes: tuple[str, str],
    dtype: Dtype,
    param_dtype: Dtype,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """A full-precision linear layer: `kernel` (in, out) and `bias` (out,), logically named `axes`; on a
    one-device CPU backend its float32 product runs on MKL where installed (`flux_jax.cpu_matmul`)."""
    return nnx.Linear(
        in_features,
        out_features,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=param_dtype,
        dot_general=cpu_matmul.dot_general,
        kernel_metadata=param_metadata(axes, (in_features, out_features)),
        bias_metadata=param_metadata(axes[1:], (out_features,)),
        rngs=rngs,
    )


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, computed in float32 (BFL: elementwise_affine=False)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


gelu_tanh = functools.partial(jax.nn.gelu, approximate=True)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, *, param_dtype: Dtype, rngs: nnx.Rngs):
        del rngs
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **param_metadata(("head_dim",), (dim,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        rrms = jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + 1e-6)
        return (xf * rrms).astype(x.dtype) * self.scale[...]


class QKNorm(nnx.Module):
    def __init__(self, dim: int, *, param_dtype: Dtype, rngs: nnx.Rngs):
        self.query_norm = RMSNorm(dim, param_dtype=param_dtype, rngs=rngs)
        self.key_norm = RMSNorm(dim, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
        return self.query_norm(q).astype(v.dtype), self.key_norm(k).astype(v.dtype)


class MLPEmbedder(nnx.Module):
    def __init__(self, in_dim: int, hidden_dim: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.in_layer = dense(in_dim, hidden_dim, axes=("input", "mlp"), **kw)
        self.out_layer = dense(hidden_dim, hidden_dim, axes=("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10_000.0, time_factor: float = 1000.0) -> jax.Array:
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000), cosines first: (B,) -> (B, dim) float32."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (time_factor * t.astype(jnp.float32))[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def rope(ids: jax.Array, axes_dim: tuple[int, ...], theta: int) -> tuple[jax.Array, jax.Array]:
    """Rotary angles for 3-axis position ids (B, L, 3): cos and sin, each (B, L, 1, D/2).

    Materialized once (an optimization barrier): otherwise XLA fuses the cos and sin into each RoPE
    fusion of every block and recomputes them for every head of q and k (0.9% of the CPU time of
    benchmarks.transformer's forward, in `perf`)."""
    angles = []
    for i, dim in enumerate(axes_dim):
        omega = 1.0 / (theta ** (jnp.arange(0, dim, 2, dtype=jnp.float32) / dim))
        angles.append(ids[..., i].astype(jnp.float32)[..., None] * omega)
    angle = jnp.concatenate(angles, axis=-1)[:, :, None, :]
    return jax.lax.optimization_barrier((jnp.cos(angle), jnp.sin(angle)))


def apply_rope(x: jax.Array, pe: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotates consecutive pairs (x[2i], x[2i+1]) of x (B, L, H, D) by the angles in `pe`."""
    cos, sin = pe
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    even, odd = xf[..., 0], xf[..., 1]
    out = jnp.stack([cos * even - sin * odd, sin * even + cos * odd], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, pe: tuple[jax.Array, jax.Array], *,
              implementation: str = "auto", interpret: bool = False) -> jax.Array:
    """RoPE then scaled dot-product attention: q, k, v (B, L, H, D) -> (B, L, H*D).

    The 1/sqrt(D) scale is folded into q's rotation (computed in float32, rounded once). The attention
    itself is `flux_jax.attention.dot_product_attention`: splash on TPU, cuDNN on GPU, chunked XLA
    elsewhere, chosen by the platform the program is lowered for (or forced: `implementation`,
    `interpret` as in `dot_product_attention`)."""
    b, l, h, d = q.shape
    cos, sin = pe
    scale = 1.0 / math.sqrt(d)
    q, k = apply_rope(q, (cos * scale, sin * scale)), apply_rope(k, pe)
    return dot_product_attention(q, k, v, implementation=implementation, interpret=interpret).reshape(b, l, h * d)


def split_heads(qkv: jax.Array, num_heads: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(B, L, 3*H*D) -> three (B, L, H, D): BFL's "B L (K H D) -> K B H L D" in BLHD order."""
    b, l, _ = qkv.shape
    q, k, v = jnp.moveaxis(qkv.reshape(b, l, 3, num_heads, -1), 2, 0)
    return q, k, v


class SelfAttention(nnx.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        *,
        linear: LinearFactory,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads = num_heads
        self.qkv = linear(dim, 3 * dim, use_bias=qkv_bias, axes=("embed", "qkv"), **kw)
        self.norm = QKNorm(dim // num_heads, param_dtype=param_dtype, rngs=rngs)
        self.proj = linear(dim, dim, use_bias=True, axes=("heads", "embed"), **kw)


class Modulation(nnx.Module):
    """adaLN: silu(vec) -> (shift, scale, gate) once, or twice for a double block; each (B, 1, C)."""

    def __init__(self, dim: int, double: bool, *, linear: LinearFactory, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        self.multiplier = 6 if double else 3
        self.lin = linear(
            dim, self.multiplier * dim, use_bias=True, axes=("embed", "modulation"),
            dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        )

    def __call__(self, vec: jax.Array) -> tuple[jax.Array, ...]:
        out = self.lin(jax.nn.silu(vec))[:, None, :]
        return tuple(jnp.split(out, self.multiplier, axis=-1))


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return (1 + scale) * layer_norm(x) + shift


class LastLayer(nnx.Module):
    def __init__(self, hidden_size: int, out_channels: int, *, dtype: Dtype, param_dtype: Dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear = dense(hidden_size, out_channels, axes=("embed", "output"), **kw)
        self.adaLN_modulation = nnx.List([jax.nn.silu, dense(hidden_size, 2 * hidden_size, axes=("embed", "modulation"), **kw)])

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN_modulation[1](jax.nn.silu(vec)), 2, axis=-1)
        return self.linear(modulate(x, shift[:, None, :], scale[:, None, :]))
