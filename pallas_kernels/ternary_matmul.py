"""`ternary_matmul`: x @ (scale * T) + bias with T read from the canonical 2-bit packed format.

The "xla" backend is the reference: unpack to x's dtype, one dot accumulating in float32, scale and
bias in the epilogue. It is differentiable with respect to x (and scale and bias); the packed codes are
integers and carry no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.packing import unpack_ternary

BACKENDS = ("auto", "xla")


def _check(x, packed, scale, bias) -> int:
    k = x.shape[-1]
    if packed.ndim != 2 or packed.dtype != jnp.uint8:
        raise ValueError(f"packed must be 2-D uint8 (ceil(K/4), N), got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != -(-k // 4):
        raise ValueError(f"x has K={k} (shape {tuple(x.shape)}) but packed has {packed.shape[0]} rows "
                         f"(shape {tuple(packed.shape)}); K={k} needs {-(-k // 4)}")
    n = packed.shape[1]
    if scale.shape not in ((n,), (1,)):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; packed has N={n}, so scale must be ({n},) or (1,)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; packed has N={n}, so bias must be ({n},)")
    return k


def _xla(x: jax.Array, packed: jax.Array, scale: jax.Array, bias: jax.Array | None, k: int) -> jax.Array:
    weights = unpack_ternary(packed, k).astype(x.dtype)
    out = jnp.dot(x, weights, preferred_element_type=jnp.float32) * scale.astype(jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)


def ternary_matmul(x, packed, scale, bias=None, *, backend: str = "auto", interpret: bool | None = None) -> jax.Array:
    """x (..., K) bf16/f32, packed (ceil(K/4), N) uint8, scale (N,) or (1,) f32, bias (N,) -> (..., N).

    Accumulates in float32 and returns x's dtype. Shapes that do not fit raise ValueError naming both.
    """
    x, packed, scale = jnp.asarray(x), jnp.asarray(packed), jnp.asarray(scale)
    bias = None if bias is None else jnp.asarray(bias)
    k = _check(x, packed, scale, bias)
    if backend not in BACKENDS:
        raise ValueError(f"unknown ternary_matmul backend {backend!r}; available: {', '.join(BACKENDS)}")
    del interpret  # only kernel backends run in interpret mode
    return _xla(x, packed, scale, bias, k)
