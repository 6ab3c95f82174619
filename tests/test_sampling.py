"""Sampling pieces against diffusers' FluxPipeline helpers and FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from flax import nnx

from flux_jax import Flux
from flux_jax.sampling import denoise, image_ids, pack_latents, schedule, shift_mu, text_ids, unpack_latents
from tests.torch_reference import TINY_DEV


@pytest.mark.parametrize("h, w", [(8, 12), (16, 6)])
def test_packing_and_ids_match_diffusers(h, w):
    latents = np.random.default_rng(0).standard_normal((2, 16, h, w)).astype(np.float32)
    ref = FluxPipeline._pack_latents(torch.from_numpy(latents), 2, 16, h, w).numpy()
    packed = np.asarray(pack_latents(latents))
    np.testing.assert_array_equal(packed, ref)
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, h, w)), latents)
    ref_unpacked = FluxPipeline._unpack_latents(torch.from_numpy(ref), h * 8, w * 8, 8).numpy()
    np.testing.assert_array_equal(np.asarray(unpack_latents(packed, h, w)), ref_unpacked)
    ref_ids = FluxPipeline._prepare_latent_image_ids(2, h // 2, w // 2, "cpu", torch.float32).numpy()
    np.testing.assert_array_equal(image_ids(2, h, w)[1], ref_ids)
    assert text_ids(2, 5).shape == (2, 5, 3) and not text_ids(2, 5).any()


@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_shifted_schedule_matches_diffusers_scheduler(steps, seq_len):
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert shift_mu(seq_len) == pytest.approx(mu)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = schedule(steps, seq_len)
    np.testing.assert_allclose(ours, scheduler.sigmas.numpy(), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[:-1] * 1000, scheduler.timesteps.numpy(), rtol=1e-5)


def test_schnell_schedule_is_unshifted():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 4, 4))
    np.testing.assert_allclose(schedule(4, 4096, shift=False), scheduler.sigmas.numpy(), rtol=1e-6)


def test_bad_sizes_and_step_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        schedule(-2, 256)
    with pytest.raises(ValueError, match="must be even"):
        pack_latents(np.zeros((1, 16, 7, 8), np.float32))


def test_euler_loop_matches_diffusers_scheduler_steps_and_compiles_once():
    model = Flux(TINY_DEV, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(1)
    h, w, steps = 8, 6, 4
    img = pack_latents(rng.standard_normal((1, 4, h, w)).astype(np.float32))
    txt, y, g = rng.standard_normal((1, 5, 48)).astype(np.float32), rng.standard_normal((1, 32)).astype(np.float32), np.full((1,), 3.5, np.float32)
    iids, tids = image_ids(1, h, w), text_ids(1, 5)
    sigmas = schedule(steps, img.shape[1])

    traces = []

    def run(model, img, sigmas):
        traces.append(1)
        return denoise(model, img, iids, txt, tids, y, sigmas, g)

    out = nnx.jit(run)(model, img, sigmas)
    assert len(traces) == 1

    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=shift_mu(img.shape[1]))
    x = torch.from_numpy(np.asarray(img))
    for t in scheduler.timesteps:
        v = model(x.numpy(), iids, txt, tids, np.full((1,), t.item() / 1000, np.float32), y, g)
        x = scheduler.step(torch.from_numpy(np.array(v)), t, x).prev_sample
    np.testing.assert_allclose(np.asarray(out), x.numpy(), rtol=1e-4, atol=1e-4 * np.abs(x.numpy()).max())
