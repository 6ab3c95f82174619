"""Checkpoints written by a run on several devices load in a fresh process with another device count."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from flax import nnx

from convert import save_flux
from flux_jax import Flux
from flux_jax.params import shard
from flux_jax.ternary import pack_model, quantize_model
from tests import helpers
from tests.torch_reference import TINY_DEV

REPO = Path(__file__).resolve().parents[1]

# Runs in a process that sees ONE device: loads the student and the packed model, packs the student
# with the pack_ternary CLI, and writes every parameter of each model.
ONE_DEVICE_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    import numpy as np
    from flax import nnx
    from convert import load_flux
    from convert.pack_ternary import main as pack_main

    assert jax.device_count() == 1, jax.devices()
    root = sys.argv[1]
    pack_main([f"{root}/student", f"{root}/repacked", "--no-progress"])
    for name in ("student", "packed", "repacked"):
        flat = nnx.to_flat_state(nnx.state(load_flux(f"{root}/{name}")))
        np.savez(f"{root}/{name}.npz", **{".".join(map(str, path)): np.asarray(var[...]) for path, var in flat})
""")


def _parameters(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(var[...]) for path, var in nnx.to_flat_state(nnx.state(model))}


def test_an_eight_device_student_and_packed_model_load_and_pack_in_a_one_device_process(tmp_path):
    mesh = helpers.mesh()
    student = shard(quantize_model(Flux(TINY_DEV, rngs=nnx.Rngs(4))), mesh)  # as the trainer holds it
    assert len(student.double_blocks[0].img_attn.qkv.kernel[...].sharding.device_set) == 8
    packed = pack_model(student)
    save_flux(student, tmp_path / "student")
    save_flux(packed, tmp_path / "packed")

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    done = subprocess.run([sys.executable, "-c", ONE_DEVICE_SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # Loads are exact; packing again on one device sums each scale's mean in another order.
    for name, model, rtol in (("student", student, 0), ("packed", packed, 0), ("repacked", packed, 1e-6)):
        expected, loaded = _parameters(model), np.load(tmp_path / f"{name}.npz")
        assert sorted(loaded.files) == sorted(expected), name
        for key, value in expected.items():
            np.testing.assert_allclose(loaded[key], value, rtol=rtol, atol=0, err_msg=f"{name}: {key}")
