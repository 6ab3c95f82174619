"""FLUX's attention: splash (interpret mode on CPU) and the chunked XLA path against a NumPy softmax,
values and gradients, with and without a mesh; the platform choice itself is compiled by the real
compilers in test_targets.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import attention as attention_module
from flux_jax.attention import dot_product_attention
from flux_jax.layers import attention, rope
from tests import helpers


def reference(q, k, v):
    """softmax(q k^T) v in float64, q pre-scaled; (B, L, H, D)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    logits = np.einsum("blhd,bmhd->bhlm", q, k)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhlm,bmhd->blhd", weights, v)


def operands(length, dtype, heads=3, dim=64, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (jax.random.normal(key, (batch, length, heads, dim), jnp.float32) for key in keys)
    return (q / np.sqrt(dim)).astype(dtype), k.astype(dtype), v.astype(dtype)


def assert_close(out, expected, dtype):
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, atol=tol * np.abs(expected).max(), rtol=tol)


# 40 and 200: padded to whole 128-blocks inside splash (padded keys in their own segment); 256: none.
# For XLA the logits' budget is made small: 40 and 256 run whole, 200 in two query blocks of 100, 1030
# in three of 344 (two padded rows).
@pytest.mark.parametrize("length", [40, 200, 256, 1030])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("implementation", ["xla", "splash"])
def test_attention_matches_numpy(implementation, dtype, length, monkeypatch):
    rows = {40: 40, 200: 100, 256: 256, 1030: 400}[length]
    monkeypatch.setattr(attention_module, "LOGITS_BLOCK_BYTES", 2 * 3 * rows * length * 4)
    q, k, v = operands(length, dtype)
    if implementation == "xla":
        jaxpr = str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"))(q, k, v))
        assert ("scan" in jaxpr) == (rows < length)
    out = dot_product_attention(q, k, v, implementation=implementation, interpret=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert_close(out, reference(q, k, v), dtype)


@pytest.mark.parametrize("xla_rows", [200, 100], ids=["xla-whole", "xla-blocks"])
def test_splash_gradients_equal_the_xla_gradients(xla_rows, monkeypatch):
    monkeypatch.setattr(attention_module, "LOGITS_BLOCK_BYTES", 2 * 3 * xla_rows * 200 * 4)
    q, k, v = operands(200, jnp.float32)

    def grads(implementation):
        loss = lambda q, k, v: (dot_product_attention(q, k, v, implementation=implementation, interpret=True) ** 2).sum()  # noqa: E731
        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    for fused, xla in zip(grads("splash"), grads("xla")):
        np.testing.assert_allclose(np.asarray(fused), np.asarray(xla), atol=1e-5 * np.abs(np.asarray(xla)).max())


def test_splash_under_a_mesh_runs_per_shard_and_matches():
    """Batch over data x fsdp, heads over tensor: each device runs the kernel on its own shard."""
    q, k, v = operands(136, jnp.float32, heads=2, batch=4)
    mesh = helpers.mesh()
    with jax.set_mesh(mesh):
        spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
        placed = [jax.device_put(x, spec) for x in (q, k, v)]
        f = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="splash", interpret=True))
        out = f(*placed)
        assert "shard_map" in str(jax.make_jaxpr(f)(*placed))
    assert_close(out, reference(q, k, v), jnp.float32)


def test_auto_runs_xla_on_cpu_and_unknown_names_are_refused():
    q, k, v = operands(64, jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda q, k, v: dot_product_attention(q, k, v))(q, k, v))
    assert "platform_index" in jaxpr and "pallas_call" in jaxpr  # every platform's branch is staged out
    xla = jax.jit(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla"))
    np.testing.assert_array_equal(np.asarray(jax.jit(dot_product_attention)(q, k, v)), np.asarray(xla(q, k, v)))
    with pytest.raises(ValueError, match="unknown attention implementation 'flash'.*splash"):
        dot_product_attention(q, k, v, implementation="flash")


def test_layer_attention_scales_through_rope():
    """`layers.attention` = RoPE on q and k, 1/sqrt(D) on q, softmax, heads joined: against NumPy."""
    b, l, h, d = 1, 24, 2, 32
    q, k, v = (jax.random.normal(key, (b, l, h, d)) for key in jax.random.split(jax.random.key(1), 3))
    ids = jnp.stack([jnp.zeros(l), jnp.arange(l) // 6, jnp.arange(l) % 6], -1)[None]
    cos, sin = rope(ids, (8, 12, 12), 10_000)

    def rotate(x):
        x = np.asarray(x, np.float64).reshape(b, l, h, d // 2, 2)
        c, s = np.asarray(cos, np.float64), np.asarray(sin, np.float64)
        return np.stack([c * x[..., 0] - s * x[..., 1], s * x[..., 0] + c * x[..., 1]], -1).reshape(b, l, h, d)

    expected = reference(rotate(q) / np.sqrt(d), rotate(k), v).reshape(b, l, h * d)
    for implementation in ("xla", "splash"):
        out = attention(q, k, v, (cos, sin), implementation=implementation, interpret=True)
        assert_close(out, expected, jnp.float32)
