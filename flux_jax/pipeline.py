"""`FluxPipeline`: prompts in, images out, all in JAX (text encoders, transformer, sampler, VAE).

    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-dev")   # or a folder, or our bundle
    images = pipe("a red fox in the snow", height=1024, width=1024, steps=28, guidance=3.5, seed=0)

The transformer may be full precision, a ternary student or a packed model: whatever
`convert.load_flux` reads from the folder's `transformer/`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax.model import Flux
from flux_jax.pipeline_settings import PipelineSettings
from flux_jax.sampling import pack_latents, sample_latents, unpack_latents
from flux_jax.text import CLIPTextEncoder, T5Encoder
from flux_jax.text.prompts import PromptEncoder
from flux_jax.vae import AutoencoderKL


class FluxPipeline:
    def __init__(self, transformer: Flux, vae: AutoencoderKL, clip: CLIPTextEncoder, t5: T5Encoder,
                 clip_tokenizer, t5_tokenizer, settings: PipelineSettings = PipelineSettings()):
        self.transformer, self.vae = transformer, vae
        self.text = PromptEncoder(clip, t5, clip_tokenizer, t5_tokenizer, settings.max_sequence_length)
        self.settings = settings
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, dtype=None, mesh=None) -> FluxPipeline:
        """A diffusers pipeline folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
        tokenizer_2/, scheduler/), a hub id in the local Hugging Face cache, or our converted bundle.
        Raises convert.CheckpointError naming a missing component."""
        from convert.pipeline_io import load_pipeline_components

        return cls(**load_pipeline_components(path_or_id, dtype=dtype, mesh=mesh))

    def encode_prompts(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """(pooled CLIP vectors (B, 768), T5 token features (B, S, 4096))."""
        return self.text(prompts)

    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        latents: Any = None,
        output_type: str = "pil",
        progress: Callable[[int], None] | None = None,
    ):
        """Images for `prompt` (a string or a list). `latents`: initial noise, packed (B, L, 4C) as in
        diffusers; by default drawn from `seed`. output_type "pil" (PIL images), "np" (float arrays in
        [0, 1], (B, H, W, 3)). `progress(step)` is called after each denoising step."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        steps = self.settings.default_steps if steps is None else steps
        guidance = self.settings.default_guidance if guidance is None else guidance
        multiple = 2 * self.vae_scale_factor
        if not prompts:
            raise ValueError("the prompt list is empty")
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if output_type not in ("pil", "np"):
            raise ValueError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        pooled, features = self.encode_prompts(prompts)
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        channels = self.transformer.config.in_channels // 4
        if latents is None:
            latents = pack_latents(jax.random.normal(jax.random.key(seed), (len(prompts), channels, h, w), jnp.float32))
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (len(prompts), (h // 2) * (w // 2), 4 * channels):
            raise ValueError(f"latents have shape {latents.shape}, expected {(len(prompts), (h // 2) * (w // 2), 4 * channels)}")
        with _listening(progress):
            images = np.asarray(_compiled_generate(self.transformer, self.vae, latents, features, pooled, jnp.float32(guidance),
                                                   height=h, width=w, steps=steps, scheduler=self.settings.scheduler,
                                                   progress=progress is not None))
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in images]


_step_listener: list[Callable[[int], None]] = []
"""The `progress` of the pipeline call under way: the compiled generate function is shared by every
pipeline, so its step callback (part of what is compiled) must be one function for all of them. One
call at a time reports progress: calls from two threads at once would share this listener."""


def _report_step(step: int) -> None:
    for listener in _step_listener:
        listener(step)


@contextlib.contextmanager
def _listening(progress: Callable[[int], None] | None):
    _step_listener[:] = [progress] if progress else []
    try:
        yield
    finally:
        _step_listener.clear()


def _generate(transformer, vae, latents, features, pooled, guidance, *, height, width, steps, scheduler, progress):
    """Denoise (one compiled loop) and decode: packed noise -> images (B, H, W, 3) in [0, 1]."""
    dtype = jnp.dtype(transformer.config.dtype)
    x = sample_latents(transformer, latents.astype(dtype), features.astype(dtype), pooled.astype(dtype),
                       latent_height=height, latent_width=width, steps=steps, guidance=guidance, scheduler=scheduler,
                       callback=_report_step if progress else None)
    z = unpack_latents(x.astype(jnp.float32), height, width)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    images = vae.decode(jnp.transpose(z, (0, 2, 3, 1)))
    return jnp.clip(images / 2 + 0.5, 0.0, 1.0)


_compiled_generate = nnx.jit(_generate, static_argnames=("height", "width", "steps", "scheduler", "progress"))
"""`_generate` compiled once per model structure and shape, shared by every `FluxPipeline`: a second
pipeline with the same configs reuses the first one's compilation."""
