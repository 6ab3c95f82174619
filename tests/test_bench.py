import subprocess
import sys

from benchmarks.transformer import main, run
import jax.numpy as jnp
from flax import nnx

from flux_jax import Flux
from flux_jax.config import FluxConfig


def test_bench_compares_the_same_weights_and_prints_the_ratio_of_its_measurements(capsys, monkeypatch):
    from benchmarks import transformer as bench

    config = FluxConfig(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, context_in_dim=64, vec_in_dim=32,
                        in_channels=16).with_dtype("float32")
    result = run(config, img_tokens=16, txt_tokens=4, repeats=1)
    assert result["max_rel_diff"] < 1e-4  # the two sides ran the same weights
    assert result["speedup"] == result["torch_s"] / result["jax_s"]
    model = Flux(config, rngs=nnx.Rngs(0))
    inputs = dict(img=jnp.zeros((1, 16, 16)), img_ids=jnp.zeros((1, 16, 3)), txt=jnp.zeros((1, 4, 64)), txt_ids=jnp.zeros((1, 4, 3)),
                  timesteps=jnp.ones((1,)), y=jnp.zeros((1, 32)), guidance=jnp.ones((1,)))
    stats = bench.forward.lower(model, inputs).compile().memory_analysis()
    assert stats.output_size_in_bytes == 16 * 16 * 4  # the image alone: the weights are read, not returned
    timed = []
    monkeypatch.setattr(bench, "median_seconds", lambda fns, repeats: timed.append((len(fns), repeats)) or [0.004, 0.011])
    main(["--width", "128", "--double", "1", "--single", "1", "--img-tokens", "16", "--txt-tokens", "4", "--repeats", "3"])
    out = capsys.readouterr().out
    assert timed == [(2, 3)]  # both forwards, timed as often as asked
    assert "width 128, 1 double + 1 single blocks, 16 image + 4 text tokens" in out
    assert "flux_jax (jit)             4.0 ms / forward" in out
    assert "diffusers (PyTorch)       11.0 ms / forward" in out
    assert "ratio PyTorch / JAX       2.75x" in out


def test_library_imports_neither_torch_nor_diffusers():
    code = "import sys, flux_jax, convert, convert.torch_to_flax, flux_jax.generate, train.distill, pallas_kernels; " \
           "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
