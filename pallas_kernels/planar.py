"""What both kernels share: padding to whole blocks and the planar view of x.

Byte row r of the canonical format holds K entries 4r, 4r+1, 4r+2, 4r+3 at bits 0, 2, 4, 6. Instead
of interleaving the unpacked codes (a shuffle GPUs and TPUs do badly), the kernels split x the same
way: x_j = x[:, j::4], so x @ T = sum_j x_j @ T_j with T_j = ((packed >> 2j) & 3) - 1, each T_j a
plain (rows, N) tile. Splitting x costs one pass over the activations; the weights stay packed.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

PAD_CODE = 0b01010101  # four zero weights


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def planar_operands(x: jax.Array, packed: jax.Array, scale: jax.Array, bias: jax.Array, *, bm: int, bn: int, bkr: int):
    """x (M, K), packed (ceil(K/4), N), scale (N,), bias (N,) padded to whole blocks:
    x -> (4, Mp, Rp) planar, packed -> (Rp, Np), scale and bias -> (1, Np) float32."""
    m, k = x.shape
    rows, n = packed.shape
    mp, rp, np_ = round_up(m, bm), round_up(rows, bkr), round_up(n, bn)
    xp = jnp.pad(x, ((0, mp - m), (0, 4 * rp - k)))
    planar = jnp.moveaxis(xp.reshape(mp, rp, 4), 2, 0)
    packed = jnp.pad(packed, ((0, rp - rows), (0, np_ - n)), constant_values=PAD_CODE)
    scale = jnp.pad(scale.astype(jnp.float32), (0, np_ - n), constant_values=1.0)[None, :]
    bias = jnp.pad(bias.astype(jnp.float32), (0, np_ - n))[None, :]
    return planar, packed, scale, bias


def expand(codes_i32: jax.Array, j: int, dtype) -> jax.Array:
    """Plane j of an int32 tile of packed bytes as weights {-1, 0, 1} in `dtype`."""
    return (((codes_i32 >> (2 * j)) & 3) - 1).astype(dtype)
