"""FLUX's sampling pieces: 2x2 latent packing, position ids, the shifted flow-matching schedule and the
Euler sampler, whose whole denoising loop is one compiled `lax.fori_loop`.

Shapes: latents (B, C, H, W) with H, W the latent grid (image size / 8); packed (B, H/2 * W/2, 4C).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    """The schedule's settings, named as in diffusers' FlowMatchEulerDiscreteScheduler (a folder's
    scheduler/scheduler_config.json), defaults FLUX.1-dev's. With dynamic shifting, mu grows linearly
    with the token count, from base_shift at base_image_seq_len to max_shift at max_image_seq_len, and
    `shift` is unused; without it every sigma is shifted by the constant `shift` (1.0: none, schnell)."""

    use_dynamic_shifting: bool = True
    base_shift: float = 0.5
    max_shift: float = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    shift: float = 1.0

    def __post_init__(self):
        if self.max_image_seq_len == self.base_image_seq_len:
            raise ValueError(f"max_image_seq_len and base_image_seq_len must differ, both are {self.max_image_seq_len}")
        if not self.shift > 0:
            raise ValueError(f"shift must be positive, got {self.shift}")


SCHNELL_SCHEDULER = SchedulerConfig(use_dynamic_shifting=False)
"""FLUX.1-schnell's schedule: unshifted."""


def pack_latents(latents: jax.Array) -> jax.Array:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): each 2x2 patch becomes one token, channels major."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even, got {h}x{w}")
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: jax.Array, height: int, width: int) -> jax.Array:
    """Inverse of `pack_latents` for a latent grid of `height` x `width`."""
    b, n, c4 = packed.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not make a {height}x{width} latent grid")
    x = packed.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def image_ids(batch: int, height: int, width: int) -> np.ndarray:
    """Position ids (B, H/2 * W/2, 3) of the packed tokens: (0, row, column)."""
    ids = np.zeros((height // 2, width // 2, 3), np.float32)
    ids[..., 1] = np.arange(height // 2)[:, None]
    ids[..., 2] = np.arange(width // 2)[None, :]
    return np.broadcast_to(ids.reshape(1, -1, 3), (batch, ids.shape[0] * ids.shape[1], 3)).copy()


def text_ids(batch: int, length: int) -> np.ndarray:
    """Text tokens all sit at position (0, 0, 0)."""
    return np.zeros((batch, length, 3), np.float32)


def shift_mu(image_seq_len: int, config: SchedulerConfig = SchedulerConfig()) -> float:
    """FLUX's resolution-dependent shift: linear in the token count through (base_image_seq_len,
    base_shift) and (max_image_seq_len, max_shift), (256, 0.5) and (4096, 1.15) for dev."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    return config.base_shift + slope * (image_seq_len - config.base_image_seq_len)


def shift_sigmas(sigmas, image_seq_len: int, config: SchedulerConfig = SchedulerConfig()):
    """sigma -> s / (s + 1/sigma - 1) with s = e^mu (mu from the token count) under dynamic shifting,
    s = config.shift otherwise; 0 stays 0 (NumPy or jnp)."""
    s = math.exp(shift_mu(image_seq_len, config)) if config.use_dynamic_shifting else config.shift
    xp = np if isinstance(sigmas, np.ndarray) else jnp
    safe = xp.maximum(sigmas, 1e-30)
    return xp.where(sigmas > 0, s / (s + (1.0 / safe - 1.0)), 0.0)


def schedule(num_steps: int, image_seq_len: int, config: SchedulerConfig = SchedulerConfig(), *,
             shift: bool = True, sigmas: Sequence[float] | None = None) -> np.ndarray:
    """Noise levels sigma_0 = 1 > ... > sigma_n = 0 (num_steps + 1 values), each shifted as `config`
    says (`shift_sigmas`). `sigmas` (diffusers' argument of that name: num_steps values) replaces the
    evenly spaced levels before the shift; 0 is appended. `shift=False`, the older way to ask for
    schnell's schedule, leaves them unshifted whatever `config`."""
    if num_steps < 1:
        raise ValueError(f"the number of steps must be at least 1, got {num_steps}")
    if sigmas is None:
        sigmas = np.linspace(1.0, 0.0, num_steps + 1)
    else:
        sigmas = np.append(np.asarray(sigmas, np.float64), 0.0)
        if sigmas.shape != (num_steps + 1,) or not np.all(sigmas[:-1] > 0) or not np.all(sigmas[:-1] <= 1):
            raise ValueError(f"sigmas must be {num_steps} noise levels in (0, 1], got {list(sigmas[:-1])}")
    if shift:
        sigmas = shift_sigmas(sigmas, image_seq_len, config)
    return sigmas.astype(np.float32)


def denoise(
    model: nnx.Module,
    img: jax.Array,
    img_ids: jax.Array,
    txt: jax.Array,
    txt_ids: jax.Array,
    y: jax.Array,
    sigmas: jax.Array,
    guidance: jax.Array | None = None,
    callback: Callable[[int, float, np.ndarray], None] | None = None,
    steps: int | jax.Array | None = None,
    negative: tuple[jax.Array, jax.Array] | None = None,
    true_cfg_scale: float | jax.Array = 1.0,
    callback_latents: bool = True,
) -> jax.Array:
    """Euler integration of the flow from sigma_0 to sigma_n: x <- x + (sigma_{i+1} - sigma_i) * v(x, sigma_i).

    One `fori_loop` over the steps, so under jit the model is traced once whatever the step count.
    `callback(i, sigma_i, x)` runs on the host after step i with the latents it made (previews), or
    with None for them when not `callback_latents` (progress bars: no copy of the latents to the host). `steps` (may be traced) stops after that many steps, at sigma_steps, instead of at the
    end. `negative` (its txt and y) turns on true classifier-free guidance, as diffusers' `true_cfg_scale`:
    v = v_negative + true_cfg_scale * (v - v_negative), two model passes a step.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    batch = img.shape[0]

    def step(i, x):
        t = jnp.full((batch,), sigmas[i], jnp.float32)
        v = model(x, img_ids, txt, txt_ids, t, y, guidance)
        if negative is not None:
            v_negative = model(x, img_ids, negative[0], txt_ids, t, negative[1], guidance)
            v = v_negative + true_cfg_scale * (v - v_negative)
        x = (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)).astype(img.dtype)
        if callback is not None:
            jax.debug.callback(lambda step, sigma, latents: callback(int(step), float(sigma),
                                                                     np.asarray(latents) if callback_latents else None),
                               i, sigmas[i], x if callback_latents else x[0, 0, 0])  # after the step either way
        return x

    return jax.lax.fori_loop(0, sigmas.shape[0] - 1 if steps is None else steps, step, img)


def sample_latents(
    model: nnx.Module,
    noise: jax.Array,
    txt: jax.Array,
    y: jax.Array,
    *,
    latent_height: int,
    latent_width: int,
    steps: int,
    guidance: float | jax.Array | None = None,
    scheduler: SchedulerConfig | None = None,
    sigmas: tuple[float, ...] | None = None,
    negative: tuple[jax.Array, jax.Array] | None = None,
    true_cfg_scale: float | jax.Array = 1.0,
    callback: Callable[[int, float, np.ndarray | None], None] | None = None,
    callback_latents: bool = True,
) -> jax.Array:
    """FLUX's text-to-latent sampler, the one every caller uses (the pipeline, the trainer's sample
    grids, its latent cache, the evaluation): packed noise (B, L, 4C) and encoded prompts (T5 features
    `txt` (B, S, D), pooled CLIP `y` (B, V)) -> the packed latents at sigma = 0 after `steps` Euler steps.

    It builds the position ids of a `latent_height` x `latent_width` grid and the schedule (`scheduler`:
    a folder's settings; None: the release's own, dev's shifted schedule for a guidance-distilled model,
    schnell's unshifted one otherwise; `sigmas`: other levels to shift, as diffusers' argument), then runs
    `denoise`. `guidance` (a scale, or one per sample) goes to guidance-distilled models and is ignored
    by others; `negative` and `true_cfg_scale` are true classifier-free guidance (see `denoise`)."""
    batch, tokens = noise.shape[:2]
    guided = model.config.guidance_embed
    levels = schedule(steps, tokens, scheduler or SchedulerConfig(), shift=scheduler is not None or guided, sigmas=sigmas)
    if guided and guidance is None:
        raise ValueError("a guidance-distilled model (guidance_embed) samples with a guidance scale; got none")
    g = jnp.broadcast_to(jnp.asarray(guidance, jnp.float32), (batch,)) if guided else None
    return denoise(model, noise, image_ids(batch, latent_height, latent_width), txt, text_ids(batch, txt.shape[1]), y,
                   levels, g, callback=callback, negative=negative, true_cfg_scale=true_cfg_scale,
                   callback_latents=callback_latents)


sample = nnx.jit(sample_latents, graph_updates=False, static_argnames=("latent_height", "latent_width", "steps", "scheduler", "sigmas", "callback",
                                                 "callback_latents"))
"""`sample_latents` compiled (models as arguments): one cache of compiled samplers for every caller.
Without graph_updates a model is only read: by default nnx.jit returns every weight of its module
arguments as outputs, which copied the model on each call."""
