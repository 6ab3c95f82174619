"""Float32 linears on MKL through XLA's FFI (flux_jax.cpu_matmul): values and gradients against NumPy,
the whole model against XLA's own dots in a one-device process, and where the call must not appear."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flux_jax import cpu_matmul

pytestmark = pytest.mark.skipif(not cpu_matmul.mkl_available(), reason="needs the mkl extra (x86-64 Linux/Windows)")

TARGET = "flux_jax_mkl_sgemm"
NN = (((1,), (0,)), ((), ()))


def _operands(m: int, k: int, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)


@pytest.mark.parametrize("shape", [(1, 1, 1), (7, 13, 5), (130, 257, 65), (1280, 64, 3)])
def test_values_and_gradients_match_numpy(shape):
    """x @ w and both gradients (the nt and tn products) against float64 NumPy."""
    x, w = _operands(*shape)
    g = np.random.default_rng(1).standard_normal((shape[0], shape[2]), np.float32)
    out, vjp = jax.vjp(jax.jit(cpu_matmul.mkl_matmul), x, w)
    dx, dw = vjp(jnp.asarray(g))
    x64, w64, g64 = x.astype(np.float64), w.astype(np.float64), g.astype(np.float64)
    for got, ref in ((out, x64 @ w64), (dx, g64 @ w64.T), (dw, x64.T @ g64)):
        assert got.dtype == jnp.float32 and got.shape == ref.shape
        np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.sqrt(shape[1] + shape[2]))


def test_vmap_runs_each_slice():
    x, w = _operands(6, 9, 4)
    batched = np.stack([x, 2 * x, -x])
    out = jax.jit(jax.vmap(cpu_matmul.mkl_matmul, in_axes=(0, None)))(batched, w)
    np.testing.assert_allclose(np.asarray(out), batched.astype(np.float64) @ w, rtol=1e-5, atol=1e-5)


def test_xla_dot_on_a_backend_of_several_devices_and_for_other_dtypes():
    """This process has 8 CPU devices (conftest), where the partitioner could not split the call."""
    assert len(jax.devices("cpu")) == 8
    x, w = _operands(4, 8, 2)
    for dtype in (jnp.float32, jnp.bfloat16):
        text = jax.jit(lambda a, b: cpu_matmul.dot_general(a, b, NN)).lower(x.astype(dtype), w.astype(dtype)).as_text()
        assert TARGET not in text and "dot_general" in text


# A one-device process: a small FLUX (every linear through `dense`), its loss and gradient, and a CLIP
# encoder (its own linear builder), with the MKL path and with FLUX_JAX_CPU_MATMUL=xla.
_ONE_DEVICE = textwrap.dedent('''
    import json, os, sys
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from flux_jax import Flux, FluxConfig, cpu_matmul
    from flux_jax.text.clip import CLIPTextEncoder, CLIPTextEncoderConfig

    assert len(jax.devices("cpu")) == 1
    config = FluxConfig(in_channels=16, vec_in_dim=32, context_in_dim=48, hidden_size=128, mlp_ratio=2.0,
                        num_heads=2, depth=1, depth_single_blocks=2, axes_dim=(16, 24, 24), guidance_embed=True,
                        dtype="float32", param_dtype="float32")
    model = Flux(config, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    inputs = dict(img=rng.standard_normal((1, 16, 16), np.float32), img_ids=np.zeros((1, 16, 3), np.float32),
                  txt=rng.standard_normal((1, 8, 48), np.float32), txt_ids=np.zeros((1, 8, 3), np.float32),
                  timesteps=np.array([0.5], np.float32), y=rng.standard_normal((1, 32), np.float32),
                  guidance=np.array([3.5], np.float32))
    graphdef, params = nnx.split(model)
    def loss(params, inputs):
        return jnp.mean(nnx.merge(graphdef, params)(**inputs) ** 2)
    step = jax.jit(jax.value_and_grad(loss))
    (value, grads) = step(params, inputs)
    out = jax.jit(lambda p, i: nnx.merge(graphdef, p)(**i))(params, inputs)
    clip = CLIPTextEncoder(CLIPTextEncoderConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16,
                                                 eos_token_id=63, dtype="float32", param_dtype="float32"),
                           rngs=nnx.Rngs(1))
    tokens = np.arange(16, dtype=np.int32)[None] % 64
    encoded = jax.jit(lambda m, t: m(t)[0])(clip, tokens)
    tpu = jax.export.export(jax.jit(lambda p, i: nnx.merge(graphdef, p)(**i)), platforms=["tpu"])(params, inputs)
    np.savez(sys.argv[1], out=out, value=value, encoded=encoded,
             grads=np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]))
    print(json.dumps(dict(mkl=cpu_matmul.mkl_available(), blocktime=os.environ.get("KMP_BLOCKTIME"),
                          calls=step.lower(params, inputs).as_text().count("flux_jax_mkl_sgemm"),
                          tpu_calls=tpu.mlir_module().count("flux_jax_mkl_sgemm"))))
''')


def _run_one_device(tmp_path, **env) -> tuple[dict, dict]:
    import json
    out = tmp_path / f"{env.get('FLUX_JAX_CPU_MATMUL', 'mkl')}.npz"
    environ = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **env}
    environ.pop("KMP_BLOCKTIME", None)
    result = subprocess.run([sys.executable, "-c", _ONE_DEVICE, str(out)], env=environ, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1]), dict(np.load(out))


def test_one_device_model_runs_its_linears_on_mkl_and_matches_xla(tmp_path):
    with_mkl, ours = _run_one_device(tmp_path)
    without, xla = _run_one_device(tmp_path, FLUX_JAX_CPU_MATMUL="xla")
    assert with_mkl["mkl"] and not without["mkl"] and without["calls"] == 0
    assert with_mkl["blocktime"] == "0", "MKL's OpenMP threads must not spin between products"
    # The model's 26 linears, each forward (nn) and both gradients (nt, tn), less the input gradients
    # of the five embedders of data, which jit's dead-code elimination drops.
    assert with_mkl["calls"] == 3 * 26 - 5, with_mkl
    assert with_mkl["tpu_calls"] == 0, "a TPU program must never hold the CPU call"
    for key in ("out", "value", "encoded", "grads"):
        scale = max(float(np.abs(xla[key]).max()), 1e-6)
        assert float(np.abs(ours[key] - xla[key]).max()) / scale < 2e-5, key
