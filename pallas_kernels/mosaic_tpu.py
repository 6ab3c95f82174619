"""The TPU kernel, in Pallas' Mosaic lowering.

Grid (M tiles, N tiles, K steps), K last and sequential: each step brings one (4, bm, bkr) planar x
block and one (bkr, bn) block of packed bytes into VMEM, expands the four planes to bf16 {-1, 0, 1}
for the MXU and accumulates into a float32 VMEM scratch; the last step applies scale and bias.
Block shapes respect TPU tiling: bm a multiple of 16, bkr of 128 (uint8 packs (32, 128)), bn of 128.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.planar import expand, planar_operands


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    bm: int
    bn: int
    bkr: int  # packed byte rows per K step (4 * bkr weights)


MOSAIC_TABLE: tuple[tuple[int, MosaicBlocks], ...] = (
    (16, MosaicBlocks(bm=16, bn=512, bkr=256)),
    (64, MosaicBlocks(bm=64, bn=512, bkr=256)),
    (256, MosaicBlocks(bm=256, bn=256, bkr=256)),
    (2**62, MosaicBlocks(bm=512, bn=512, bkr=128)),
)


def mosaic_blocks(m: int) -> MosaicBlocks:
    return next(blocks for limit, blocks in MOSAIC_TABLE if m <= limit)


def _kernel(x_ref, w_ref, s_ref, b_ref, o_ref, acc_ref):
    k = pl.program_id(2)

    @pl.when(k == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    codes = w_ref[...].astype(jnp.int32)
    acc = acc_ref[...]
    for j in range(4):
        acc += jnp.dot(x_ref[j], expand(codes, j, x_ref.dtype), preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = (acc_ref[...] * s_ref[...] + b_ref[...]).astype(o_ref.dtype)


def mosaic_matmul(x: jax.Array, packed: jax.Array, scale: jax.Array, bias: jax.Array, *,
                  blocks: MosaicBlocks | None = None, interpret: bool = False) -> jax.Array:
    """x (M, K), packed (ceil(K/4), N) uint8, scale (N,), bias (N,) -> (M, N) in x's dtype."""
    m, n = x.shape[0], packed.shape[1]
    b = blocks or mosaic_blocks(m)
    planar, w, s, bias_row = planar_operands(x, packed, scale, bias, bm=b.bm, bn=b.bn, bkr=b.bkr)
    _, mp, rp = planar.shape
    np_ = w.shape[1]
    out = pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(mp // b.bm, np_ // b.bn, rp // b.bkr),
        in_specs=[
            pl.BlockSpec((4, b.bm, b.bkr), lambda i, j, k: (0, i, k)),
            pl.BlockSpec((b.bkr, b.bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((1, b.bn), lambda i, j, k: (0, j)),
            pl.BlockSpec((1, b.bn), lambda i, j, k: (0, j)),
        ],
        out_specs=pl.BlockSpec((b.bm, b.bn), lambda i, j, k: (i, j)),
        scratch_shapes=[pltpu.VMEM((b.bm, b.bn), jnp.float32)],
        # The interpreter mis-sizes dimension semantics once vmap adds a grid axis (JAX 0.10.2);
        # they only schedule work across TensorCores, so interpret mode runs without them.
        compiler_params=None if interpret else pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=pltpu.InterpretParams() if interpret else False,
        name="ternary_matmul_mosaic",
    )(planar, w, s, bias_row)
    return out[:m, :n]
