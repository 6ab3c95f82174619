"""pallas_kernels: the canonical 2-bit format, the kernels' tiled layout and the base-3 archive."""

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pack_archive, pack_ternary, unpack_archive, unpack_ternary
from pallas_kernels.packing import from_tiled, pack_tiled, tiled_rows, to_tiled, unpack_layout


def reference_pack(codes: np.ndarray) -> np.ndarray:
    """The format written out entry by entry: byte (k // 4, n) holds t + 1 at bits 2 * (k % 4)."""
    k, n = codes.shape
    out = np.full((-(-k // 4), n), 0b01010101, np.uint8)  # padding code 1 everywhere
    for i in range(k):
        for j in range(n):
            shift = 2 * (i % 4)
            out[i // 4, j] = (out[i // 4, j] & ~np.uint8(3 << shift)) | np.uint8((codes[i, j] + 1) << shift)
    return out


def reference_archive(codes: np.ndarray) -> np.ndarray:
    digits = list(codes.reshape(-1) + 1) + [1] * (-codes.size % 5)
    return np.array([sum(int(d) * 3**j for j, d in enumerate(digits[i : i + 5])) for i in range(0, len(digits), 5)], np.uint8)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 7, 13, 64])
@pytest.mark.parametrize("n", [1, 6])
def test_pack_matches_the_format_and_round_trips(k, n):
    codes = np.random.default_rng(k * 10 + n).integers(-1, 2, (k, n)).astype(np.int8)
    packed = pack_ternary(codes)
    np.testing.assert_array_equal(packed, reference_pack(codes))
    np.testing.assert_array_equal(np.asarray(pack_ternary(jnp.asarray(codes))), packed)
    np.testing.assert_array_equal(unpack_ternary(packed, k), codes)
    np.testing.assert_array_equal(np.asarray(unpack_ternary(jnp.asarray(packed), k)), codes)


def reference_tiled(codes: np.ndarray) -> np.ndarray:
    """The tiled layout entry by entry: byte (128 g + r, n) holds entry 512 g + 128 j + r at bits 2j."""
    k, n = codes.shape
    out = np.full((tiled_rows(k), n), 0b01010101, np.uint8)
    for i in range(k):
        g, j, r = i // 512, (i % 512) // 128, i % 128
        row = 128 * g + r
        out[row] = (out[row] & ~np.uint8(3 << 2 * j)) | ((codes[i] + 1).astype(np.uint8) << 2 * j)
    return out


@pytest.mark.parametrize("k", [5, 130, 512, 1100])
def test_tiled_layout_matches_its_definition_and_round_trips(k):
    codes = np.random.default_rng(k).integers(-1, 2, (k, 3)).astype(np.int8)
    packed = pack_ternary(codes)
    tiled = to_tiled(packed, k)
    np.testing.assert_array_equal(tiled, reference_tiled(codes))
    np.testing.assert_array_equal(pack_tiled(codes), tiled)
    np.testing.assert_array_equal(np.asarray(to_tiled(jnp.asarray(packed), k)), tiled)
    np.testing.assert_array_equal(unpack_layout(tiled, k, "tiled"), codes)
    np.testing.assert_array_equal(unpack_layout(packed, k, "canonical"), codes)
    np.testing.assert_array_equal(from_tiled(tiled, k), packed)
    with pytest.raises(ValueError, match=f"K={k} needs {tiled_rows(k)}"):
        unpack_layout(tiled[:-1], k, "tiled")


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (5, 5), (7, 3), (13, 11)])
def test_archive_round_trips_exactly_for_any_size(shape):
    codes = np.random.default_rng(sum(shape)).integers(-1, 2, shape).astype(np.int8)
    data = pack_archive(codes)
    assert data.shape == (-(-codes.size // 5),)
    np.testing.assert_array_equal(data, reference_archive(codes))
    np.testing.assert_array_equal(unpack_archive(data, shape), codes)
    np.testing.assert_array_equal(np.asarray(unpack_archive(jnp.asarray(data), shape)), codes)


@pytest.mark.parametrize(
    "bad, message",
    [
        (np.zeros((4, 4), np.float32), "dtype float32"),
        (np.full((4, 4), 2, np.int8), r"values in \[2, 2\]"),
        (np.zeros(4, np.int8), "2-D"),
    ],
)
def test_pack_refuses_what_is_not_ternary(bad, message):
    with pytest.raises(ValueError, match=message):
        pack_ternary(bad)


def test_unpack_refuses_a_row_count_that_does_not_fit():
    with pytest.raises(ValueError, match="K=9 needs 3"):
        unpack_ternary(np.zeros((2, 4), np.uint8), 9)
