"""The FLUX.1 flow transformer (Black Forest Labs' flux/model.py) as a Flax NNX module."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.blocks import DoubleStreamBlock, SingleStreamBlock
from flux_jax.config import FluxConfig
from flux_jax.layers import LastLayer, LinearFactory, MLPEmbedder, dense, rope, timestep_embedding

_FREQ_DIM = 256  # width of the sinusoidal timestep and guidance embeddings


def _apply(block: nnx.Module, carry, vec: jax.Array, pe):
    """One block on its carry: (img, txt) for a double block, x for a single block."""
    return block(*carry, vec, pe) if isinstance(carry, tuple) else block(carry, vec, pe)


_apply_remat = nnx.remat(_apply)


def run_blocks(blocks: nnx.List, carry, vec: jax.Array, pe, *, remat: bool, scan: bool, keep: bool):
    """`blocks` in turn on `carry`: (last carry, every block's carry when `keep`, else None).

    scan: the blocks' weights are stacked at call time and one `lax.scan` runs them, so XLA compiles
    a block once instead of once per block (minutes instead of a quarter of an hour for the flux-dev
    training step); the stacked copy costs one more copy of the blocks' weights while the call runs.
    The parameters stay a list of blocks under BFL's names, so checkpoints and loaders are unchanged."""
    if not scan or len(blocks) < 2:
        run, outs = (_apply_remat if remat else _apply), []
        for block in blocks:
            carry = run(block, carry, vec, pe)
            outs.append(carry)
        return carry, (outs if keep else None)
    graphdef, first = nnx.split(blocks[0])
    treedef = jax.tree.structure(first)
    stacked = [jnp.stack(layer) for layer in zip(*(jax.tree.leaves(nnx.state(b)) for b in blocks))]

    def body(carry, weights):
        out = _apply(nnx.merge(graphdef, jax.tree.unflatten(treedef, weights)), carry, vec, pe)
        return out, (out if keep else None)

    carry, outs = jax.lax.scan(jax.checkpoint(body, prevent_cse=False) if remat else body, carry, stacked)
    return carry, (None if outs is None else [jax.tree.map(lambda o: o[i], outs) for i in range(len(blocks))])


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

        loop = dict(remat=c.remat, scan=c.scan_blocks, keep=return_features)
        (img, txt), doubles = run_blocks(self.double_blocks, (img, txt), vec, pe, **loop)
        x, singles = run_blocks(self.single_blocks, jnp.concatenate([txt, img], axis=1), vec, pe, **loop)
        out = self.final_layer(x[:, txt.shape[1] :], vec)
        if not return_features:
            return out
        return out, [i for i, _ in doubles] + [s[:, txt.shape[1] :] for s in singles]


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
