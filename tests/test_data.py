"""Training data: prompt files a user writes, and the teacher-trajectory states the student learns on."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flux_jax import Flux, FluxConfig
from flux_jax.sampling import schedule
from train.data import DataError, expected_sampler_forwards, position_ids, read_prompts, trajectory_state


def test_a_prompt_file_that_is_not_utf8_names_the_file_line_and_byte(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\nun caf\u00e9 au lait\n".encode("latin-1"))  # the é is byte 0xe9 at offset 12
    with pytest.raises(DataError) as err:
        read_prompts(str(path))
    assert str(err.value) == f"{path}:2: not UTF-8 text (byte b'\\xe9' at offset 12); save the file as UTF-8"


def test_a_utf8_prompt_file_with_a_byte_order_mark_reads_clean(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("un caf\u00e9\n\nun th\u00e9\n".encode("utf-8-sig"))
    assert read_prompts(str(path)) == ["un caf\u00e9", "un th\u00e9"]


def _sigma_index(t, sigmas):
    """The step k of each sample from its sigma_k (the schedule is strictly decreasing)."""
    k = np.abs(np.asarray(t)[:, None] - sigmas[None, :-1]).argmin(1)
    np.testing.assert_array_equal(np.asarray(t), sigmas[k])
    return k


def test_each_sample_sits_where_its_own_euler_run_of_k_steps_puts_it():
    config = FluxConfig.preset("tiny").replace(depth=1, depth_single_blocks=1)  # every part, compiled quickly
    teacher = Flux(config, rngs=nnx.Rngs(0))
    batch, steps, text_length = 6, 4, 3
    img_ids, txt_ids = position_ids(batch, 4, 4, text_length)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((batch, 4, config.in_channels)).astype(np.float32)
    txt = rng.standard_normal((batch, text_length, config.context_in_dim)).astype(np.float32)
    y = rng.standard_normal((batch, config.vec_in_dim)).astype(np.float32)
    guidance = np.linspace(1.0, 5.0, batch).astype(np.float32)
    state = nnx.jit(functools.partial(trajectory_state, sampler_steps=steps))
    x, t = state(teacher, noise, img_ids, txt, txt_ids, y, guidance, jax.random.key(3))
    sigmas = schedule(steps, 4, shift=True)  # dev-style teacher: shifted schedule
    k = _sigma_index(t, sigmas)
    assert t.shape == (batch,) and len(set(k)) > 1, k
    forward = nnx.jit(lambda model, *inputs: model(*inputs))  # the teacher on one sample
    for i in range(batch):  # that sample alone, a plain Euler loop in NumPy around the teacher
        one = lambda a: a[i:i + 1]  # noqa: E731
        xi = one(noise)
        for j in range(k[i]):
            v = forward(teacher, xi, one(img_ids), one(txt), one(txt_ids), np.full((1,), sigmas[j], np.float32), one(y), one(guidance))
            xi = xi + (sigmas[j + 1] - sigmas[j]) * np.asarray(v)
        np.testing.assert_allclose(np.asarray(x[i:i + 1]), xi, rtol=1e-5, atol=1e-5, err_msg=f"sample {i}, k {k[i]}")


class CountingTeacher:
    """A stand-in velocity field v = -x that counts its forwards (each over the whole batch)."""

    config = types.SimpleNamespace(guidance_embed=False)

    def __init__(self):
        self.forwards = 0

    def __call__(self, x, img_ids, txt, txt_ids, t, y, guidance):
        jax.debug.callback(self._count)
        return -x

    def _count(self):
        self.forwards += 1


def _draw(teacher, batch, steps, key):
    noise = jnp.ones((batch, 2, 1), jnp.float32)
    state = jax.jit(lambda key: trajectory_state(teacher, noise, None, None, None, None, None, key, sampler_steps=steps))
    teacher.forwards = 0
    x, t = state(key)
    jax.effects_barrier()
    return np.asarray(x), _sigma_index(t, schedule(steps, 2, shift=False))


def test_k_is_drawn_per_sample_uniformly_and_the_teacher_runs_to_the_largest_once():
    teacher, steps = CountingTeacher(), 5
    x, k = _draw(teacher, 5000, steps, jax.random.key(0))
    counts = np.bincount(k, minlength=steps)
    assert np.all(np.abs(counts - 1000) < 120), counts  # 1000 +- 32 each
    assert teacher.forwards == k.max() == steps - 1
    sigmas = schedule(steps, 2, shift=False)  # dx/dsigma = -x from x = 1: x = prod(1 - dsigma)
    np.testing.assert_allclose(x[:, 0, 0], np.cumprod(np.r_[1.0, 1.0 - np.diff(sigmas)])[k], rtol=1e-6)
    for seed in range(4):
        _, k = _draw(teacher, 3, steps, jax.random.key(seed))
        assert teacher.forwards == k.max(), (seed, k)


@pytest.mark.parametrize("steps, batch", [(28, 16), (28, 1), (8, 32), (4, 3)])
def test_expected_sampler_forwards_is_the_mean_largest_k_of_a_batch(steps, batch):
    simulated = np.random.default_rng(0).integers(0, steps, (200_000, batch)).max(1).mean()
    assert expected_sampler_forwards(steps, batch) == pytest.approx(simulated, abs=0.02)
    assert expected_sampler_forwards(steps, batch) <= steps * batch / (batch + 1)
