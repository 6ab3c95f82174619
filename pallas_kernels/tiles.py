"""What both kernels share: operands in whole blocks and the tiled layout's view of x.

The kernels read weights in the tiled layout (`pallas_kernels.packing`): byte row r of K tile g holds
the entries 512g + 128j + r at bits 2j. So x @ T over one run of byte rows is sum_j x_j @ T_j, where
T_j = ((bytes >> 2j) & 3) - 1 is a plain tile and x_j a contiguous run of x's columns: x is read as
it is, no planar copy. Weights travel at 2 bits each and are expanded only in registers or VMEM.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.packing import TILE_ROWS

PAD_CODE = 0b01010101  # four zero weights


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def block_operands(x: jax.Array, tiled: jax.Array, scale: jax.Array, bias: jax.Array, *, bm: int, bn: int):
    """x (M, K), tiled (R, N), scale (N,), bias (N,) in whole blocks: x -> (Mp, 4R), tiled -> (R, Np),
    scale and bias -> (1, Np) float32. Nothing is copied where the shapes are whole already (FLUX's
    layers at its token counts)."""
    m, k = x.shape
    rows, n = tiled.shape
    mp, np_ = round_up(m, bm), round_up(n, bn)
    if (mp, 4 * rows) != (m, k):
        x = jnp.pad(x, ((0, mp - m), (0, 4 * rows - k)))
    if np_ != n:
        tiled = jnp.pad(tiled, ((0, 0), (0, np_ - n)), constant_values=PAD_CODE)
        scale = jnp.pad(scale, (0, np_ - n), constant_values=1.0)
        bias = jnp.pad(bias, (0, np_ - n))
    return x, tiled, scale.astype(jnp.float32)[None, :], bias.astype(jnp.float32)[None, :]


def plane_column(row: jax.Array | int, j: int) -> jax.Array | int:
    """The column of x that plane j of byte row `row` multiplies; runs of rows inside one tile map to
    runs of columns. (lax.div/rem for traced rows: Triton lowers Python's floor division badly.)"""
    if isinstance(row, int):
        return (row // TILE_ROWS) * 4 * TILE_ROWS + j * TILE_ROWS + row % TILE_ROWS
    return jax.lax.div(row, TILE_ROWS) * (4 * TILE_ROWS) + j * TILE_ROWS + jax.lax.rem(row, TILE_ROWS)


def expand(codes_i32: jax.Array, j: int, dtype) -> jax.Array:
    """Plane j of an int32 tile of packed bytes as weights {-1, 0, 1} in `dtype`."""
    return (((codes_i32 >> (2 * j)) & 3) - 1).astype(dtype)
