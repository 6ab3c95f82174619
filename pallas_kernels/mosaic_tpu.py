"""The TPU kernel, in Pallas' Mosaic lowering.

Grid (M tiles, N tiles, K steps), K last and sequential: each step brings one (bm, 4 * bkr) block of x
as it is and one (bkr, bn) block of tiled packed bytes into VMEM; for each 128-row tile in the block it
expands the four planes to {-1, 0, 1} in x's dtype for the MXU, each against its own 128 columns of x,
and accumulates into a float32 VMEM scratch; the last step applies scale and bias. Block shapes
respect TPU tiling: bm a multiple of 16, bkr of 128 (uint8 packs (32, 128)), bn of 128.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.packing import TILE_ROWS
from pallas_kernels.tiles import block_operands, expand, plane_column


@dataclasses.dataclass(frozen=True)
class MosaicBlocks:
    bm: int
    bn: int
    bkr: int  # packed byte rows per K step (4 * bkr weights), whole tiles of TILE_ROWS


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

    acc = acc_ref[...]
    for tile in range(w_ref.shape[0] // TILE_ROWS):
        codes = w_ref[tile * TILE_ROWS:(tile + 1) * TILE_ROWS, :].astype(jnp.int32)
        for j in range(4):
            first = plane_column(tile * TILE_ROWS, j)
            acc += jnp.dot(x_ref[:, first:first + TILE_ROWS], expand(codes, j, x_ref.dtype),
                           preferred_element_type=jnp.float32)
    acc_ref[...] = acc

    @pl.when(k == pl.num_programs(2) - 1)
    def _():
        o_ref[...] = (acc_ref[...] * s_ref[...] + b_ref[...]).astype(o_ref.dtype)


def mosaic_matmul(x: jax.Array, tiled: jax.Array, scale: jax.Array, bias: jax.Array, *,
                  blocks: MosaicBlocks | None = None, interpret: bool = False) -> jax.Array:
    """x (M, K), tiled (tiled_rows(K), N) uint8, scale (N,), bias (N,) -> (M, N) in x's dtype."""
    m, n = x.shape[0], tiled.shape[1]
    b = blocks or mosaic_blocks(m)
    bkr = b.bkr if tiled.shape[0] % b.bkr == 0 else TILE_ROWS  # K steps of whole tiles
    xb, w, s, bias_row = block_operands(x, tiled, scale, bias, bm=b.bm, bn=b.bn)
    mp, np_ = xb.shape[0], w.shape[1]
    out = pl.pallas_call(
        _kernel,
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(mp // b.bm, np_ // b.bn, w.shape[0] // bkr),
        in_specs=[
            pl.BlockSpec((b.bm, 4 * bkr), lambda i, j, k: (i, k)),
            pl.BlockSpec((bkr, b.bn), lambda i, j, k: (k, j)),
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
    )(xb, w, s, bias_row)
    return out[:m, :n]
