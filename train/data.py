"""What the student learns from, with no images: prompt embeddings, and states along the teacher's own
trajectories from noise. Every batch is a pure function of (seed, step), so a resumed run draws the
same batches as an uninterrupted one."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.config import FluxConfig
from flux_jax.sampling import denoise, image_ids, schedule, text_ids


class DataError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PromptEmbeddings:
    txt: np.ndarray  # (N, S, context_in_dim)
    y: np.ndarray  # (N, vec_in_dim)

    @classmethod
    def load(cls, path: str, config: FluxConfig) -> PromptEmbeddings:
        """From an .npz with arrays `txt` and `y` (one row per prompt)."""
        if not Path(path).is_file():
            raise DataError(f"{path}: no such prompt embeddings file")
        try:
            with np.load(path) as data:
                txt, y = np.asarray(data["txt"], np.float32), np.asarray(data["y"], np.float32)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: not an .npz with arrays 'txt' and 'y' ({err})") from None
        if len(txt) == 0:
            raise DataError(f"{path}: holds no prompts")
        if txt.ndim != 3 or txt.shape[2] != config.context_in_dim or y.shape != (len(txt), config.vec_in_dim):
            raise DataError(f"{path}: txt {txt.shape} and y {y.shape} do not fit the teacher "
                            f"(context_in_dim {config.context_in_dim}, vec_in_dim {config.vec_in_dim})")
        return cls(txt, y)

    @classmethod
    def random(cls, n: int, length: int, config: FluxConfig, seed: int) -> PromptEmbeddings:
        """Gaussian stand-ins for encoded prompts, for smoke runs of the trainer itself."""
        rng = np.random.default_rng(seed)
        return cls(rng.standard_normal((n, length, config.context_in_dim)).astype(np.float32),
                   rng.standard_normal((n, config.vec_in_dim)).astype(np.float32))


def batch_indices(num_prompts: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Prompts of one step: the step's slice of a per-epoch permutation."""
    per_epoch = max(num_prompts // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    return np.resize(np.roll(order, -position * batch_size), batch_size)


def trajectory_state(teacher, noise, img_ids, txt, txt_ids, y, guidance, key, *, sampler_steps: int):
    """A training state from the teacher alone: run its Euler sampler from noise for a random number of
    steps k < sampler_steps and return (x at sigma_k, sigma_k (B,)). Nothing here is differentiated.
    The schedule is shifted for guidance-distilled teachers (dev), not for schnell."""
    batch, length, _ = noise.shape
    sigmas = jnp.asarray(schedule(sampler_steps, length, shift=teacher.config.guidance_embed))
    k = jax.random.randint(key, (), 0, sampler_steps)
    x = denoise(teacher, noise, img_ids, txt, txt_ids, y, sigmas, guidance, steps=k)
    return jax.lax.stop_gradient(x), jnp.full((batch,), sigmas[k], jnp.float32)


def position_ids(batch: int, latent_height: int, latent_width: int, text_length: int) -> tuple[jax.Array, jax.Array]:
    return jnp.asarray(image_ids(batch, latent_height, latent_width)), jnp.asarray(text_ids(batch, text_length))
