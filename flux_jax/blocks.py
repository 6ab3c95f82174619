"""FLUX's two transformer blocks: double stream (separate image and text weights, joint attention) and
single stream (one fused linear for attention and MLP). Every linear comes from the `linear` factory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.layers import Dtype, LinearFactory, Modulation, QKNorm, SelfAttention, attention, gelu_tanh, modulate, split_heads
from flux_jax.sharding import constrain


def _mlp(hidden: int, mlp_hidden: int, *, linear: LinearFactory, **kw) -> nnx.List:
    """BFL's Sequential(Linear, GELU(tanh), Linear): weights at indices 0 and 2."""
    return nnx.List([
        linear(hidden, mlp_hidden, use_bias=True, axes=("embed", "mlp"), **kw),
        gelu_tanh,
        linear(mlp_hidden, hidden, use_bias=True, axes=("mlp", "embed"), **kw),
    ])


def _run_mlp(mlp: nnx.List, x: jax.Array) -> jax.Array:
    return mlp[2](mlp[1](mlp[0](x)))


def _stream_boundary(x: jax.Array) -> jax.Array:
    return constrain(x, "activation_batch", "activation_length", "activation_embed")


class DoubleStreamBlock(nnx.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        *,
        linear: LinearFactory,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(linear=linear, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.img_mod = Modulation(hidden_size, double=True, **kw)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias, **kw)
        self.img_mlp = _mlp(hidden_size, mlp_hidden, **kw)
        self.txt_mod = Modulation(hidden_size, double=True, **kw)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias, **kw)
        self.txt_mlp = _mlp(hidden_size, mlp_hidden, **kw)

    def __call__(self, img: jax.Array, txt: jax.Array, vec: jax.Array, pe: tuple[jax.Array, jax.Array]):
        img_shift1, img_scale1, img_gate1, img_shift2, img_scale2, img_gate2 = self.img_mod(vec)
        txt_shift1, txt_scale1, txt_gate1, txt_shift2, txt_scale2, txt_gate2 = self.txt_mod(vec)

        img_q, img_k, img_v = split_heads(self.img_attn.qkv(modulate(img, img_shift1, img_scale1)), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv(modulate(txt, txt_shift1, txt_scale1)), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        joint = [jnp.concatenate(pair, axis=1) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
        attn = attention(*joint, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * _run_mlp(self.img_mlp, modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * _run_mlp(self.txt_mlp, modulate(txt, txt_shift2, txt_scale2))
        return _stream_boundary(img), _stream_boundary(txt)


class SingleStreamBlock(nnx.Module):
    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        *,
        linear: LinearFactory,
        dtype: Dtype,
        param_dtype: Dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = linear(hidden_size, 3 * hidden_size + self.mlp_hidden_dim, use_bias=True, axes=("embed", "fused"), **kw)
        self.linear2 = linear(hidden_size + self.mlp_hidden_dim, hidden_size, use_bias=True, axes=("mlp", "embed"), **kw)
        self.norm = QKNorm(hidden_size // num_heads, param_dtype=param_dtype, rngs=rngs)
        self.modulation = Modulation(hidden_size, double=False, linear=linear, **kw)

    def __call__(self, x: jax.Array, vec: jax.Array, pe: tuple[jax.Array, jax.Array]) -> jax.Array:
        shift, scale, gate = self.modulation(vec)
        fused = self.linear1(modulate(x, shift, scale))
        qkv, mlp = fused[..., : 3 * self.hidden_size], fused[..., 3 * self.hidden_size :]
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        out = self.linear2(jnp.concatenate([attention(q, k, v, pe=pe), gelu_tanh(mlp)], axis=-1))
        return _stream_boundary(x + gate * out)
