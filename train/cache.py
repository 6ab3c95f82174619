"""The teacher latent cache: one final latent per prompt, sampled once by the teacher's own sampler.

Training then draws x_t = (1 - t) x0 + t noise around these latents, with t from FLUX's shifted
logit-normal distribution: still no image from any data set, only what the teacher generates.
Chunks are written atomically and skipped when present, so an interrupted build resumes.
"""

from __future__ import annotations

import io
import math

import jax
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from flux_jax.io.files import write_file
from flux_jax.sampling import sample, shift_sigmas
from train.config import DistillConfig
from train.data import DataError, PromptEmbeddings

CHUNK = 64


def cache_dir(config: DistillConfig) -> epath.Path:
    return epath.Path(config.workdir) / "latent_cache"


def _chunk_path(config: DistillConfig, index: int) -> epath.Path:
    return cache_dir(config) / f"chunk-{index:05d}.npy"


def build_cache(config: DistillConfig, teacher, prompts: PromptEmbeddings, batch_sharding) -> epath.Path:
    """Samples the final latent of every prompt with the teacher (`sampler_steps` Euler steps, guidance
    drawn per prompt from the config's range). Every process takes part in every chunk (the batch is
    split over the mesh); process 0 writes it."""
    n = len(prompts.txt)
    tokens = (config.latent_height // 2) * (config.latent_width // 2)
    chunk = math.lcm(CHUNK, config.batch_size)
    for index in range(math.ceil(n / chunk)):
        if _chunk_path(config, index).exists():
            continue
        rows = np.resize(np.arange(index * chunk, min((index + 1) * chunk, n)), chunk)
        key = jax.random.fold_in(jax.random.key(config.seed + 1), index)
        noise = jax.device_put(np.asarray(jax.random.normal(key, (chunk, tokens, teacher.config.in_channels))), batch_sharding)
        guidance = None
        if teacher.config.guidance_embed:
            guidance = jax.random.uniform(jax.random.fold_in(key, 1), (chunk,), minval=config.guidance_min, maxval=config.guidance_max)
        x0 = sample(teacher, noise, jax.device_put(prompts.txt[rows], batch_sharding), jax.device_put(prompts.y[rows], batch_sharding),
                    latent_height=config.latent_height, latent_width=config.latent_width, steps=config.sampler_steps,
                    guidance=guidance)
        x0 = multihost_utils.process_allgather(x0, tiled=True) if jax.process_count() > 1 else np.asarray(x0)
        if jax.process_index() == 0:
            write_file(_chunk_path(config, index), _npy(np.asarray(x0, np.float32)[: min(chunk, n - index * chunk)]))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("latent cache written")
    return cache_dir(config)


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def load_cache(config: DistillConfig, num_prompts: int) -> np.ndarray:
    """The cached latents (N, tokens, channels); a missing or misshapen chunk is named."""
    chunk = math.lcm(CHUNK, config.batch_size)
    parts = []
    for index in range(math.ceil(num_prompts / chunk)):
        path = _chunk_path(config, index)
        if not path.exists():
            raise DataError(f"{path}: missing from the latent cache; build it with `python -m train.distill cache` "
                            "and the same flags")
        with path.open("rb") as f:
            parts.append(np.load(f))
    latents = np.concatenate(parts)
    tokens = (config.latent_height // 2) * (config.latent_width // 2)
    if latents.shape[:2] != (num_prompts, tokens):
        raise DataError(f"{cache_dir(config)}: holds latents of shape {latents.shape}, expected {num_prompts} of {tokens} tokens")
    return latents


def cached_state(x0: jax.Array, noise: jax.Array, key: jax.Array, *, shift: bool) -> tuple[jax.Array, jax.Array]:
    """x_t = (1 - t) x0 + t noise, t = sigmoid(normal): FLUX's logit-normal, resolution-shifted for dev."""
    batch, tokens, _ = x0.shape
    t = jax.nn.sigmoid(jax.random.normal(key, (batch,)))
    if shift:
        t = shift_sigmas(t, tokens)
    return (1.0 - t)[:, None, None] * x0 + t[:, None, None] * noise, t
