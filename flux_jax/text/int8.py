"""Weight-only int8 text encoders: T5-XXL is 4.76 B parameters (9.5 GB in bf16) beside a 3.1 GB packed
transformer, so its linear weights are what keeps FLUX.1-dev's pipeline from fitting small chips.

Each linear layer keeps int8 weights with one absmax scale per output channel (w ~ scale * q, q in
[-127, 127]); activations and the matmul stay in the encoder's compute dtype (integers up to 127 are
exact in bf16). Embeddings and norms are left as they are."""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx

Encoder = TypeVar("Encoder", bound=nnx.Module)


class Int8Linear(nnx.Module):
    """An nnx.Linear's weights as int8 `kernel` (in, out) and float32 `weight_scale` (out,)."""

    def __init__(self, linear: nnx.Linear):
        w = linear.kernel[...].astype(jnp.float32)
        scale = jnp.max(jnp.abs(w), axis=0) / 127.0
        self.kernel = nnx.Param(jnp.round(w / jnp.where(scale > 0, scale, 1.0)).astype(jnp.int8),
                                **linear.kernel.get_metadata())
        self.weight_scale = nnx.Param(scale)
        self.bias = linear.bias
        self.dtype = linear.dtype or linear.param_dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = (x.astype(self.dtype) @ self.kernel[...].astype(self.dtype)) * self.weight_scale[...].astype(self.dtype)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


def int8_text_encoder(encoder: Encoder) -> Encoder:
    """Every nnx.Linear of `encoder` replaced by its Int8Linear, in place; returns the encoder. Layers
    already int8 are left as they are."""
    for path, linear in [(p, m) for p, m in nnx.iter_graph(encoder) if isinstance(m, nnx.Linear)]:
        parent = encoder
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        if isinstance(path[-1], int):
            parent[path[-1]] = Int8Linear(linear)
        else:
            setattr(parent, path[-1], Int8Linear(linear))
    return encoder
