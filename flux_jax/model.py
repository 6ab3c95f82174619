"""The FLUX.1 flow transformer (Black Forest Labs' flux/model.py) as a Flax NNX module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.blocks import DoubleStreamBlock, SingleStreamBlock
from flux_jax.config import FluxConfig
from flux_jax.layers import LastLayer, LinearFactory, MLPEmbedder, dense, rope, timestep_embedding

_FREQ_DIM = 256  # width of the sinusoidal timestep and guidance embeddings


def _call_block(block: nnx.Module, *args):
    return block(*args)


_remat_block = nnx.remat(_call_block)


class Flux(nnx.Module):
    """FLUX.1 transformer: velocity for packed latents given text, pooled text vector, time and guidance.

    `linear` builds every linear layer inside the double and single blocks (attention, MLP,
    modulation); embedders and the final layer are always full precision.
    """

    def __init__(self, config: FluxConfig, *, rngs: nnx.Rngs, linear: LinearFactory = dense):
        self.config = config
        c = config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
        self.img_in = dense(c.in_channels, c.hidden_size, axes=("input", "embed"), **kw)
        self.time_in = MLPEmbedder(_FREQ_DIM, c.hidden_size, **kw)
        self.vector_in = MLPEmbedder(c.vec_in_dim, c.hidden_size, **kw)
        self.guidance_in = MLPEmbedder(_FREQ_DIM, c.hidden_size, **kw) if c.guidance_embed else None
        self.txt_in = dense(c.context_in_dim, c.hidden_size, axes=("input", "embed"), **kw)
        self.double_blocks = nnx.List([
            DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias, linear=linear, **kw)
            for _ in range(c.depth)
        ])
        self.single_blocks = nnx.List([
            SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, linear=linear, **kw)
            for _ in range(c.depth_single_blocks)
        ])
        self.final_layer = LastLayer(c.hidden_size, c.out_dim, **kw)

    def __call__(
        self,
        img: jax.Array,
        img_ids: jax.Array,
        txt: jax.Array,
        txt_ids: jax.Array,
        timesteps: jax.Array,
        y: jax.Array,
        guidance: jax.Array | None = None,
        *,
        return_features: bool = False,
    ) -> jax.Array | tuple[jax.Array, list[jax.Array]]:
        """img (B, L, in_channels), img_ids (B, L, 3), txt (B, S, context_in_dim), txt_ids (B, S, 3),
        timesteps (B,) in [0, 1], y (B, vec_in_dim), guidance (B,) raw scale -> (B, L, out_channels).
        return_features: also the image tokens' hidden states (B, L, hidden_size) after every block,
        double then single, which block-feature distillation matches."""
        c = self.config
        img, img_ids, txt, txt_ids, timesteps, y = map(jnp.asarray, (img, img_ids, txt, txt_ids, timesteps, y))
        _check_inputs(c, img, img_ids, txt, txt_ids, timesteps, y, guidance)
        dtype = jnp.dtype(c.dtype)

        img = self.img_in(img.astype(dtype))
        vec = self.time_in(timestep_embedding(timesteps, _FREQ_DIM).astype(dtype))
        if self.guidance_in is not None:
            vec = vec + self.guidance_in(timestep_embedding(jnp.asarray(guidance), _FREQ_DIM).astype(dtype))
        vec = vec + self.vector_in(y.astype(dtype))
        txt = self.txt_in(txt.astype(dtype))
        pe = rope(jnp.concatenate([txt_ids, img_ids], axis=1), c.axes_dim, c.theta)

        run = _remat_block if c.remat else _call_block
        features = []
        for block in self.double_blocks:
            img, txt = run(block, img, txt, vec, pe)
            features.append(img)
        x = jnp.concatenate([txt, img], axis=1)
        for block in self.single_blocks:
            x = run(block, x, vec, pe)
            features.append(x[:, txt.shape[1] :])
        out = self.final_layer(x[:, txt.shape[1] :], vec)
        return (out, features) if return_features else out


def _check_inputs(c: FluxConfig, img, img_ids, txt, txt_ids, timesteps, y, guidance) -> None:
    """Shape errors name the argument at fault instead of failing deep inside a block."""
    b = img.shape[0] if img.ndim == 3 else None
    expected = {
        "img": (img, (b, None, c.in_channels)),
        "img_ids": (img_ids, (b, img.shape[1] if img.ndim == 3 else None, 3)),
        "txt": (txt, (b, None, c.context_in_dim)),
        "txt_ids": (txt_ids, (b, txt.shape[1] if txt.ndim == 3 else None, 3)),
        "timesteps": (timesteps, (b,)),
        "y": (y, (b, c.vec_in_dim)),
    }
    for name, (array, shape) in expected.items():
        if array.ndim != len(shape) or any(s is not None and a != s for a, s in zip(array.shape, shape)):
            want = "(" + ", ".join("?" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"Flux: {name} has shape {tuple(array.shape)}, expected {want}")
    if c.guidance_embed:
        if guidance is None:
            raise ValueError("Flux: this model embeds guidance (guidance_embed=True); pass guidance of shape (B,)")
        if jnp.shape(guidance) != (b,):
            raise ValueError(f"Flux: guidance has shape {tuple(jnp.shape(guidance))}, expected ({b},)")
