import subprocess
import sys

from flux_jax.bench import main, run
from flux_jax.config import FluxConfig


def test_bench_compares_the_same_weights_and_prints_the_ratio(capsys):
    config = FluxConfig(hidden_size=128, num_heads=1, depth=1, depth_single_blocks=1, context_in_dim=64, vec_in_dim=32,
                        in_channels=16).with_dtype("float32")
    result = run(config, img_tokens=16, txt_tokens=4, repeats=1)
    assert result["max_rel_diff"] < 1e-4
    assert result["jax_s"] > 0 and result["torch_s"] > 0
    main(["--width", "128", "--double", "1", "--single", "1", "--img-tokens", "16", "--txt-tokens", "4", "--repeats", "1"])
    assert "ratio PyTorch / JAX" in capsys.readouterr().out


def test_library_imports_neither_torch_nor_diffusers():
    code = "import sys, flux_jax, convert, convert.torch_to_flax, flux_jax.bench, train.distill, pallas_kernels; " \
           "bad = [m for m in ('torch', 'diffusers') if m in sys.modules]; assert not bad, bad"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
