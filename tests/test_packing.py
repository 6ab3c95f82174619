"""pallas_kernels: the canonical 2-bit format, the base-3 archive and the XLA ternary_matmul."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import pack_archive, pack_ternary, ternary_matmul, unpack_archive, unpack_ternary


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


def reference_matmul(x, codes, scale, bias):
    out = np.asarray(x, np.float64) @ codes.astype(np.float64) * np.asarray(scale, np.float64)
    return out + (0 if bias is None else np.asarray(bias, np.float64))


@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("k, n", [(5, 7), (64, 48), (130, 33)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
def test_xla_ternary_matmul_matches_numpy(m, k, n, dtype, per_channel, with_bias):
    rng = np.random.default_rng(m + k + n)
    codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
    x = jnp.asarray(rng.standard_normal((2, m, k)), dtype)
    scale = rng.uniform(0.5, 2, n if per_channel else 1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    out = jax.jit(lambda x: ternary_matmul(x, pack_ternary(codes), scale, bias))(x)
    assert out.dtype == dtype and out.shape == (2, m, n)
    expected = reference_matmul(np.asarray(x, np.float32), codes, scale, bias)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=tol, atol=tol * np.abs(expected).max())


def test_ternary_matmul_under_vmap_and_grad():
    rng = np.random.default_rng(0)
    codes = rng.integers(-1, 2, (9, 4)).astype(np.int8)
    packed, scale = pack_ternary(codes), np.full(4, 0.5, np.float32)
    x = jnp.asarray(rng.standard_normal((3, 5, 9)), jnp.float32)
    out = jax.vmap(lambda xi: ternary_matmul(xi, packed, scale))(x)
    np.testing.assert_allclose(np.asarray(out), reference_matmul(np.asarray(x), codes, scale, None), rtol=1e-5)
    grad = jax.grad(lambda x: ternary_matmul(x, packed, scale).sum())(x)
    np.testing.assert_allclose(np.asarray(grad), np.broadcast_to((codes * 0.5).sum(1), x.shape), rtol=1e-6)


@pytest.mark.parametrize(
    "x_shape, packed_shape, scale_shape, message",
    [
        ((2, 9), (2, 4), (4,), r"K=9 .* packed has 2 rows"),
        ((2, 8), (2, 4), (3,), r"scale has shape \(3,\); packed has N=4"),
    ],
)
def test_shapes_that_do_not_fit_name_both(x_shape, packed_shape, scale_shape, message):
    with pytest.raises(ValueError, match=message):
        ternary_matmul(np.zeros(x_shape, np.float32), np.zeros(packed_shape, np.uint8), np.ones(scale_shape, np.float32))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="unknown ternary_matmul backend 'cuda'"):
        ternary_matmul(np.zeros((1, 4), np.float32), np.zeros((1, 2), np.uint8), np.ones(2, np.float32), backend="cuda")
