"""The GPU kernel, in Pallas' Triton lowering.

Grid over (M, N) tiles; inside, a `fori_loop` over K walks the tiled packed weights one (bkr, bn) block
of bytes at a time, upcasts it to int32, expands its four planes to {-1, 0, 1} in registers and
accumulates four dots in float32, each against the run of x's columns its plane pairs with (x read as
it is); scale and bias are applied once, in the epilogue. The weights travel from memory at 2 bits
each and are never written back expanded.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pl_triton

from pallas_kernels.tiles import block_operands, expand, plane_column


@dataclasses.dataclass(frozen=True)
class TritonBlocks:
    """Tile sizes (powers of two: Triton's rule) and launch shape. bkr counts packed byte rows
    (4 * bkr weights of K per step) and divides TILE_ROWS, so one step stays inside one K tile."""

    bm: int
    bn: int
    bkr: int
    num_warps: int
    num_stages: int


# By the M class of the call: small M streams weights (wide N tiles, deep K steps); large M is
# compute-bound (square-ish tiles feeding the tensor cores).
TRITON_TABLE: tuple[tuple[int, TritonBlocks], ...] = (
    (16, TritonBlocks(bm=16, bn=128, bkr=64, num_warps=4, num_stages=4)),
    (64, TritonBlocks(bm=64, bn=128, bkr=32, num_warps=4, num_stages=4)),
    (256, TritonBlocks(bm=128, bn=128, bkr=32, num_warps=8, num_stages=3)),
    (2**62, TritonBlocks(bm=128, bn=256, bkr=16, num_warps=8, num_stages=3)),
)


def triton_blocks(m: int) -> TritonBlocks:
    return next(blocks for limit, blocks in TRITON_TABLE if m <= limit)


def _kernel(x_ref, w_ref, s_ref, b_ref, o_ref, *, bkr: int, steps: int):
    bm, bn = o_ref.shape

    def step(i, acc):
        first_row = i * bkr
        codes = w_ref[pl.ds(first_row, bkr), :].astype(jnp.int32)  # Triton shifts no 8-bit integers
        for j in range(4):
            columns = pl.ds(plane_column(first_row, j), bkr)
            acc += jnp.dot(x_ref[:, columns], expand(codes, j, x_ref.dtype), preferred_element_type=jnp.float32)
        return acc

    acc = jax.lax.fori_loop(0, steps, step, jnp.zeros((bm, bn), jnp.float32))
    o_ref[...] = (acc * s_ref[...] + b_ref[...]).astype(o_ref.dtype)


def triton_matmul(x: jax.Array, tiled: jax.Array, scale: jax.Array, bias: jax.Array, *,
                  blocks: TritonBlocks | None = None, interpret: bool = False) -> jax.Array:
    """x (M, K), tiled (tiled_rows(K), N) uint8, scale (N,), bias (N,) -> (M, N) in x's dtype."""
    m, n = x.shape[0], tiled.shape[1]
    b = blocks or triton_blocks(m)
    xb, w, s, bias_row = block_operands(x, tiled, scale, bias, bm=b.bm, bn=b.bn)
    (mp, kp), (rp, np_) = xb.shape, w.shape
    out = pl.pallas_call(
        functools.partial(_kernel, bkr=b.bkr, steps=rp // b.bkr),
        out_shape=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        grid=(mp // b.bm, np_ // b.bn),
        in_specs=[
            pl.BlockSpec((b.bm, kp), lambda i, j: (i, 0)),
            pl.BlockSpec((rp, b.bn), lambda i, j: (0, j)),
            pl.BlockSpec((1, b.bn), lambda i, j: (0, j)),
            pl.BlockSpec((1, b.bn), lambda i, j: (0, j)),
        ],
        out_specs=pl.BlockSpec((b.bm, b.bn), lambda i, j: (i, j)),
        compiler_params=pl_triton.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
        interpret=interpret,
        name="ternary_matmul_triton",
    )(xb, w, s, bias_row)
    return out[:m, :n]
