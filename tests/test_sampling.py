"""Sampling pieces against diffusers' FluxPipeline helpers and FlowMatchEulerDiscreteScheduler."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline, calculate_shift
from flax import nnx

from flux_jax import Flux
from flux_jax.sampling import (
    SCHNELL_SCHEDULER,
    SchedulerConfig,
    denoise,
    image_ids,
    pack_latents,
    sample,
    schedule,
    shift_mu,
    text_ids,
    unpack_latents,
)
from tests.pipeline_reference import FLUX_DEV_SCHEDULER, diffusers_schedule
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


SCHEDULERS = {
    "dev": FLUX_DEV_SCHEDULER,
    "other dynamic": dict(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.0, base_image_seq_len=64,
                          max_image_seq_len=1024),
    "static shift": dict(use_dynamic_shifting=False, shift=2.0),
    "schnell": dict(use_dynamic_shifting=False, shift=1.0),
}


@pytest.mark.parametrize("name", SCHEDULERS)
@pytest.mark.parametrize("steps", [1, 4, 28])
@pytest.mark.parametrize("seq_len", [24, 4096])
def test_schedule_matches_diffusers_flux_pipeline_and_scheduler(name, steps, seq_len):
    sigmas, timesteps = diffusers_schedule(FlowMatchEulerDiscreteScheduler(**SCHEDULERS[name]), steps, seq_len)
    ours = schedule(steps, seq_len, SchedulerConfig(**SCHEDULERS[name]))
    np.testing.assert_allclose(ours, sigmas, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ours[:-1] * 1000, timesteps, rtol=1e-5)


def test_shift_mu_is_diffusers_calculate_shift():
    settings = SCHEDULERS["other dynamic"]
    expected = calculate_shift(300, settings["base_image_seq_len"], settings["max_image_seq_len"], settings["base_shift"],
                               settings["max_shift"])
    assert shift_mu(300, SchedulerConfig(**settings)) == pytest.approx(expected)
    assert shift_mu(300) == pytest.approx(calculate_shift(300, 256, 4096, 0.5, 1.15))


def test_old_call_forms_keep_dev_and_schnell_schedules():
    """train/ still calls `schedule(n, tokens, shift=guidance_embed)`."""
    np.testing.assert_array_equal(schedule(4, 1024, shift=True), schedule(4, 1024, SchedulerConfig()))
    np.testing.assert_array_equal(schedule(4, 1024, shift=False), schedule(4, 1024, SCHNELL_SCHEDULER))
    np.testing.assert_allclose(schedule(4, 1024, shift=False), np.linspace(1, 0, 5), rtol=1e-6)


def test_bad_sizes_and_step_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1"):
        schedule(-2, 256)
    with pytest.raises(ValueError, match="shift must be positive"):
        SchedulerConfig(use_dynamic_shifting=False, shift=0.0)
    with pytest.raises(ValueError, match="must differ"):
        SchedulerConfig(base_image_seq_len=256, max_image_seq_len=256)
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

    # the one entry point every caller uses builds the same ids and (dev's) schedule itself
    entry = sample(model, img, txt, y, latent_height=h, latent_width=w, steps=steps, guidance=3.5)
    np.testing.assert_allclose(np.asarray(entry), x.numpy(), rtol=1e-4, atol=1e-4 * np.abs(x.numpy()).max())
    # a folder's schedule, here schnell's (unshifted)
    unshifted = denoise(model, img, iids, txt, tids, y, np.linspace(1, 0, steps + 1).astype(np.float32), g)
    entry = sample(model, img, txt, y, latent_height=h, latent_width=w, steps=steps, guidance=3.5, scheduler=SCHNELL_SCHEDULER)
    np.testing.assert_allclose(np.asarray(entry), np.asarray(unshifted), rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(entry), x.numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="guidance-distilled"):
        sample(model, img, txt, y, latent_height=h, latent_width=w, steps=steps)
