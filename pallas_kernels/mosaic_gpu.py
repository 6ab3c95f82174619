"""The Hopper kernel (sm_90 and newer), in Pallas' Mosaic GPU lowering.

A grid of (bm, bn) output blocks, one warpgroup each. Inside, `plgpu.emit_pipeline` walks K half a
tile (64 byte rows of the tiled layout) at a time, `stages` steps in flight: TMA brings the 64 x bn
packed bytes and, for each plane j, the 64 contiguous columns of x that plane pairs with (x read as
it is) into shared memory. The warpgroup loads the bytes into registers, expands plane j exactly (no
8-bit shifts on GPUs: mask the plane in place, cast, multiply by 4^-j, subtract 1) into a swizzled
bf16 tile in shared memory, and issues wgmma(acc, x_j, plane_j), two planes' tiles alternating so one
expansion overlaps the previous wgmma. The epilogue applies scale and bias in float32 and writes the
block back through shared memory with TMA. bf16/f16 only (wgmma's 16-bit path); M and N are padded to
whole blocks (nothing is copied at FLUX's shapes).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.packing import TILE_ROWS
from pallas_kernels.tiles import block_operands

STEP_ROWS = TILE_ROWS // 2  # packed byte rows per K step: 64 columns of x per plane, one 128-byte swizzle
SWIZZLE = 128  # bytes: 64 bf16 elements, wgmma's K per step and the minor size of every tile here
DTYPES = (jnp.bfloat16, jnp.float16)


@dataclasses.dataclass(frozen=True)
class MosaicGPUBlocks:
    """bm: rows of x per block (a multiple of 64, wgmma's M per warpgroup); bn: output columns (a
    multiple of 64); stages: K steps in flight. Shared memory per block: stages * (512 bm + 64 bn) +
    256 bn + 2 bm bn bytes, within the H100's 227 KB."""

    bm: int
    bn: int
    stages: int


# By the M class of the call: small M streams weights (wide N, deep pipeline); large M is
# compute-bound (a square block, double-buffered).
MOSAIC_GPU_TABLE: tuple[tuple[int, MosaicGPUBlocks], ...] = (
    (64, MosaicGPUBlocks(bm=64, bn=128, stages=4)),
    (256, MosaicGPUBlocks(bm=64, bn=256, stages=2)),
    (2**62, MosaicGPUBlocks(bm=128, bn=128, stages=2)),
)


def mosaic_gpu_blocks(m: int) -> MosaicGPUBlocks:
    return next(blocks for limit, blocks in MOSAIC_GPU_TABLE if m <= limit)


def _load(ref, layout, optimized: bool = True):
    """`plgpu.load` of a whole ref: JAX 0.10.2 takes an index, 0.12 does not."""
    if "idx" in inspect.signature(plgpu.load).parameters:
        return plgpu.load(ref, (), layout=layout, optimized=optimized)
    return plgpu.load(ref, layout=layout, optimized=optimized)


def _kernel(x_gmem, w_gmem, s_gmem, b_gmem, o_gmem, o_smem, planes, *, blocks: MosaicGPUBlocks, steps: int):
    bm, bn = blocks.bm, blocks.bn
    pid_m, pid_n = jax.lax.axis_index("m"), jax.lax.axis_index("n")
    tiles = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))
    code_swizzle = min(SWIZZLE, bn)  # bytes: uint8 codes, tiled so they load straight into wgmma's layout
    code_tiles = (plgpu.TilingTransform((8, code_swizzle)), plgpu.SwizzleTransform(code_swizzle))

    def x_spec(j):
        # plane j of byte rows [64 h, 64 h + 64) of K tile g pairs with x's columns 512 g + 128 j + 64 h + [0, 64)
        return plgpu.BlockSpec((bm, STEP_ROWS), lambda g, h: (pid_m, 8 * g + 2 * j + h), transforms=tiles)

    def run(acc):
        def step(_, x0, x1, x2, x3, w_smem):
            codes = _load(w_smem, plgpu.Layout.WGMMA)  # the layout a swizzled bf16 tile is stored from
            for j, x_plane in enumerate((x0, x1, x2, x3)):
                slot = planes.at[j % 2]  # free: the wgmma that read it two planes ago has been awaited
                slot[...] = ((codes & jnp.uint8(3 << 2 * j)).astype(planes.dtype) * (4.0 ** -j) - 1).astype(planes.dtype)
                plgpu.commit_smem()
                plgpu.wgmma(acc, x_plane, slot)
                plgpu.wgmma_wait(1)
            plgpu.wgmma_wait(0)

        plgpu.emit_pipeline(
            step,
            grid=(steps // 2, 2),
            in_specs=[*(x_spec(j) for j in range(4)), plgpu.BlockSpec((STEP_ROWS, bn), lambda g, h: (2 * g + h, pid_n),
                                                                     transforms=code_tiles)],
            max_concurrent_steps=blocks.stages,
        )(x_gmem, x_gmem, x_gmem, x_gmem, w_gmem)
        columns = pl.ds(pid_n * bn, bn)
        row = plgpu.Layout.WGMMA.reduce(0)
        # bn floats each, read once per block straight from global memory (no pattern to optimize)
        scale = jax.lax.broadcast_in_dim(_load(s_gmem.at[0, columns], row, optimized=False), (bm, bn), [1])
        bias = jax.lax.broadcast_in_dim(_load(b_gmem.at[0, columns], row, optimized=False), (bm, bn), [1])
        o_smem[...] = (acc[...] * scale + bias).astype(o_smem.dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(pid_m * bm, bm), columns])
        plgpu.wait_smem_to_gmem(0)

    pl.run_scoped(run, plgpu.ACC((bm, bn), jnp.float32))


def mosaic_gpu_matmul(x: jax.Array, tiled: jax.Array, scale: jax.Array, bias: jax.Array, *,
                      blocks: MosaicGPUBlocks | None = None, interpret: bool = False) -> jax.Array:
    """x (M, K) bf16/f16, tiled (tiled_rows(K), N) uint8, scale (N,), bias (N,) -> (M, N) in x's dtype."""
    if x.dtype not in DTYPES:
        raise ValueError(f"the Mosaic GPU kernel takes bf16 or f16 activations, got {x.dtype}")
    m, n = x.shape[0], tiled.shape[1]
    b = blocks or mosaic_gpu_blocks(m)
    xb, w, s, bias_row = block_operands(x, tiled, scale, bias, bm=b.bm, bn=b.bn)
    (mp, _), (rows, np_) = xb.shape, w.shape
    tiles = (plgpu.TilingTransform((8, SWIZZLE // 2)), plgpu.SwizzleTransform(SWIZZLE))
    out = plgpu.kernel(
        functools.partial(_kernel, blocks=b, steps=rows // STEP_ROWS),
        out_type=jax.ShapeDtypeStruct((mp, np_), x.dtype),
        scratch_types=dict(o_smem=plgpu.SMEM((b.bm, b.bn), x.dtype),
                           planes=plgpu.SMEM((2, STEP_ROWS, b.bn), x.dtype, transforms=tiles)),
        grid=(mp // b.bm, np_ // b.bn),
        grid_names=("m", "n"),
        **({"interpret": plgpu.InterpretGPUParams()} if interpret else {}),
    )(xb, w, s, bias_row)
    return out[:m, :n]
