"""What a user looks at during a run: the student next to its teacher, same prompts, same seeds."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from flux_jax.io.files import write_file
from flux_jax.sampling import sample, unpack_latents
from train.data import PromptEmbeddings

NUM_SAMPLES = 4


def _preview(latents: np.ndarray) -> np.ndarray:
    """Latents (B, C, h, w) as RGB (B, h, w, 3) in [0, 255]: the first three channels (or one as grey),
    each image stretched to its own range. Without a VAE this is how FLUX latents are usually eyed."""
    channels = latents[:, :3] if latents.shape[1] >= 3 else np.repeat(latents[:, :1], 3, axis=1)
    lo = channels.min(axis=(1, 2, 3), keepdims=True)
    hi = channels.max(axis=(1, 2, 3), keepdims=True)
    return (255 * (channels - lo) / np.maximum(hi - lo, 1e-6)).transpose(0, 2, 3, 1).astype(np.uint8)


def sample_grid(teacher, student, prompts: PromptEmbeddings, *, latent_height: int, latent_width: int,
                sampler_steps: int, guidance: float, seed: int) -> np.ndarray:
    """A (2 rows: teacher, student) x (NUM_SAMPLES prompts) grid of latent previews, uint8 (H, W, 3)."""
    n = min(NUM_SAMPLES, len(prompts.txt))
    tokens = (latent_height // 2) * (latent_width // 2)
    noise = jax.random.normal(jax.random.key(seed), (n, tokens, teacher.config.in_channels))
    rows = []
    for model in (teacher, student):
        x = sample(model, noise, jnp.asarray(prompts.txt[:n]), jnp.asarray(prompts.y[:n]), latent_height=latent_height,
                   latent_width=latent_width, steps=sampler_steps, guidance=guidance)
        x = multihost_utils.process_allgather(x, tiled=True) if jax.process_count() > 1 else x
        rows.append(np.concatenate(list(_preview(np.asarray(unpack_latents(jnp.asarray(x, jnp.float32), latent_height, latent_width)))), axis=1))
    return np.concatenate(rows, axis=0)


def save_png(image: np.ndarray, path: epath.Path, scale: int = 4) -> None:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.kron(image, np.ones((scale, scale, 1), np.uint8))).save(buffer, format="PNG")
    write_file(path, buffer.getvalue())
