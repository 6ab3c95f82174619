"""The canonical packed ternary format, in NumPy and jnp (the same code serves both).

A ternary kernel T of shape (K, N), entries in {-1, 0, 1} (Flax layout: in, out), is stored as uint8
of shape (ceil(K / 4), N): code = t + 1 in {0, 1, 2}, four consecutive K entries per byte, entry k at
bits 2 * (k % 4). Padding rows hold code 1 (a zero weight).

The archive format, for downloads, stores five weights per byte in base 3 (1.6 bits a weight):
byte = sum(code_j * 3**j, j < 5) over the row-major flattened codes, padded with code 1.

The tiled layout is how the kernels want the codes in device memory (files stay canonical): K is cut
into tiles of 4 * TILE_ROWS = 512 entries, and byte row r of tile g holds entries 512g + 128j + r at
bits 2j. Plane j of a run of byte rows then pairs with a contiguous run of x's columns, so a kernel
reads x as it is. Rows are padded to whole tiles (code 1).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_SHIFTS = (0, 2, 4, 6)
_POWERS = (1, 3, 9, 27, 81)


def _xp(x):
    return np if isinstance(x, np.ndarray | np.generic) else jnp


def _check_codes(codes) -> None:
    if codes.ndim != 2:
        raise ValueError(f"ternary codes must be 2-D (K, N), got shape {tuple(codes.shape)}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"ternary codes must be integers in {{-1, 0, 1}}, got dtype {codes.dtype}")
    if isinstance(codes, np.ndarray) and codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"ternary codes must lie in {{-1, 0, 1}}, got values in [{codes.min()}, {codes.max()}]")


def pack_ternary(codes):
    """(K, N) integers in {-1, 0, 1} -> (ceil(K/4), N) uint8, canonical format."""
    _check_codes(codes)
    xp = _xp(codes)
    k, n = codes.shape
    rows = -(-k // 4)
    biased = xp.pad((codes + 1).astype(xp.uint8), ((0, rows * 4 - k), (0, 0)), constant_values=1)
    groups = biased.reshape(rows, 4, n)
    packed = groups[:, 0]
    for j in range(1, 4):
        packed = packed | (groups[:, j] << _SHIFTS[j])
    return packed


def unpack_ternary(packed, k: int):
    """(ceil(K/4), N) uint8 -> (K, N) int8 in {-1, 0, 1}."""
    xp = _xp(packed)
    if packed.ndim != 2 or packed.dtype != np.uint8:
        raise ValueError(f"packed ternary weights must be 2-D uint8, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[0] != -(-k // 4):
        raise ValueError(f"packed weights have {packed.shape[0]} rows; K={k} needs {-(-k // 4)}")
    shifts = xp.asarray(_SHIFTS, dtype=xp.uint8)[None, :, None]
    codes = (packed[:, None, :] >> shifts) & xp.uint8(3)
    return (codes.reshape(-1, packed.shape[1])[:k].astype(xp.int8) - xp.int8(1)).astype(xp.int8)


LAYOUTS = ("canonical", "tiled")
TILE_ROWS = 128


def tiled_rows(k: int) -> int:
    """Byte rows of the tiled layout for K entries: whole tiles of TILE_ROWS."""
    return -(-k // (4 * TILE_ROWS)) * TILE_ROWS


def _swap_planes(codes, tiles: int, from_rows: int, to_rows: int):
    """(tiles * 512, N) codes with entry (g, a, b) -> (g, b, a), a/b of sizes from_rows x to_rows."""
    xp = _xp(codes)
    n = codes.shape[1]
    return xp.swapaxes(codes.reshape(tiles, from_rows, to_rows, n), 1, 2).reshape(tiles * 4 * TILE_ROWS, n)


def pack_tiled(codes):
    """(K, N) integers in {-1, 0, 1} -> tiled (tiled_rows(K), N) uint8."""
    _check_codes(codes)
    xp = _xp(codes)
    k = codes.shape[0]
    tiles = tiled_rows(k) // TILE_ROWS
    codes = xp.pad(codes, ((0, tiles * 4 * TILE_ROWS - k), (0, 0)))
    # canonical byte r, plane j holds entry 4r + j: put entry 128j + r of each tile there instead
    return pack_ternary(_swap_planes(codes, tiles, 4, TILE_ROWS))


def to_tiled(packed, k: int):
    """Canonical (ceil(K/4), N) -> tiled (tiled_rows(K), N) uint8."""
    return pack_tiled(unpack_ternary(packed, k))


def from_tiled(tiled, k: int):
    """Tiled (tiled_rows(K), N) -> canonical (ceil(K/4), N) uint8."""
    return pack_ternary(unpack_layout(tiled, k, "tiled"))


def unpack_layout(packed, k: int, layout: str):
    """(rows, N) uint8 in `layout` -> (K, N) int8 codes in {-1, 0, 1}."""
    if layout == "canonical":
        return unpack_ternary(packed, k)
    if layout != "tiled":
        raise ValueError(f"unknown packed layout {layout!r}; available: {', '.join(LAYOUTS)}")
    if packed.ndim != 2 or packed.shape[0] != tiled_rows(k):
        raise ValueError(f"tiled packed weights have {packed.shape[0]} rows; K={k} needs {tiled_rows(k)}")
    tiles = packed.shape[0] // TILE_ROWS
    codes = unpack_ternary(packed, tiles * 4 * TILE_ROWS)
    return _swap_planes(codes, tiles, TILE_ROWS, 4)[:k]


def pack_archive(codes):
    """Integers in {-1, 0, 1} of any shape -> 1-D uint8, five base-3 digits per byte."""
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"ternary codes must be integers in {{-1, 0, 1}}, got dtype {codes.dtype}")
    if isinstance(codes, np.ndarray) and codes.size and (codes.min() < -1 or codes.max() > 1):
        raise ValueError(f"ternary codes must lie in {{-1, 0, 1}}, got values in [{codes.min()}, {codes.max()}]")
    xp = _xp(codes)
    flat = (codes.reshape(-1) + 1).astype(xp.uint8)
    groups = -(-flat.size // 5)
    digits = xp.pad(flat, (0, groups * 5 - flat.size), constant_values=1).reshape(groups, 5)
    return (digits * xp.asarray(_POWERS, dtype=xp.uint8)).sum(axis=1, dtype=xp.uint8)


def unpack_archive(data, shape: tuple[int, ...]):
    """Inverse of `pack_archive`: 1-D uint8 -> int8 codes of `shape`."""
    xp = _xp(data)
    size = int(np.prod(shape))
    if data.ndim != 1 or data.dtype != np.uint8 or data.size != -(-size // 5):
        raise ValueError(f"archive data must be 1-D uint8 of {-(-size // 5)} bytes for shape {tuple(shape)}, "
                         f"got {data.dtype} {tuple(data.shape)}")
    digits = (data[:, None] // xp.asarray(_POWERS, dtype=xp.uint8)[None, :]) % xp.uint8(3)
    return (digits.reshape(-1)[:size].astype(xp.int8) - xp.int8(1)).reshape(shape)
