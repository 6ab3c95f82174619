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
    def from_pretrained(cls, path_or_id: str | os.PathLike, *, dtype=None, mesh=None,
                        text_encoder_dtype: str | None = None) -> FluxPipeline:
        """A diffusers pipeline folder (transformer/, vae/, text_encoder/, text_encoder_2/, tokenizer/,
        tokenizer_2/, scheduler/), a hub id in the local Hugging Face cache, or our converted bundle.
        `text_encoder_dtype="int8"`: weight-only int8 text encoders (T5-XXL's 9.5 GB of bf16 weights in
        about 4.9 GB; `flux_jax.text.int8`). Raises convert.CheckpointError naming a missing component."""
        from convert.pipeline_io import load_pipeline_components

        return cls(**load_pipeline_components(path_or_id, dtype=dtype, mesh=mesh, text_encoder_dtype=text_encoder_dtype))

    def encode_prompts(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(pooled CLIP vectors (B, 768), T5 token features (B, S, 4096)); S is `max_sequence_length`
        (default the release's: 512 for dev, 256 for schnell)."""
        return self.text(prompts, max_sequence_length=max_sequence_length)

    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        *,
        height: int = 1024,
        width: int = 1024,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int = 0,
        latents: Any = None,
        output_type: str = "pil",
        progress: Callable[[int], None] | None = None,
        num_images_per_prompt: int = 1,
        max_sequence_length: int | None = None,
        prompt_embeds: Any = None,
        pooled_prompt_embeds: Any = None,
        negative_prompt: str | Sequence[str] | None = None,
        negative_prompt_embeds: Any = None,
        negative_pooled_prompt_embeds: Any = None,
        true_cfg_scale: float = 1.0,
        sigmas: Sequence[float] | None = None,
        callback_on_step_end: Callable[[FluxPipeline, int, float, dict], Any] | None = None,
    ):
        """Images for `prompt` (a string or a list), or for `prompt_embeds` with `pooled_prompt_embeds`
        (T5 features (B, S, D) and pooled CLIP vectors (B, V), as diffusers' encode_prompt gives them).

        `latents`: initial noise, packed (B * num_images_per_prompt, L, 4C) as in diffusers; by default
        drawn from `seed`. output_type "pil" (PIL images), "np" (float arrays in [0, 1], (B, H, W, 3)) or
        "latent" (the packed latents (B, L, 4C), not decoded). `negative_prompt` (or its embeds) with
        `true_cfg_scale` > 1: true classifier-free guidance, two transformer passes a step. `sigmas`:
        the steps' noise levels before the schedule's shift, as diffusers' (their count is the number of
        steps). `progress(step)` and `callback_on_step_end(pipe, step, timestep, {"latents": ...})` are
        called after each denoising step; the callback reads the latents (the loop is compiled: what it
        returns is not fed back)."""
        steps = len(sigmas) if sigmas is not None else self.settings.default_steps if steps is None else steps
        guidance = self.settings.default_guidance if guidance is None else guidance
        multiple = 2 * self.vae_scale_factor
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(f"height and width must be positive multiples of {multiple}, got {height}x{width}")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if output_type not in ("pil", "np", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'latent', got {output_type!r}")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        pooled, features = self._embeddings(prompt, prompt_embeds, pooled_prompt_embeds, max_sequence_length, "")
        negative = None
        if true_cfg_scale > 1 and (negative_prompt is not None or negative_prompt_embeds is not None):
            if isinstance(negative_prompt, str):
                negative_prompt = [negative_prompt] * len(features)
            negative_pooled, negative_features = self._embeddings(
                negative_prompt, negative_prompt_embeds, negative_pooled_prompt_embeds, features.shape[1], "negative_")
            if negative_features.shape != features.shape:
                raise ValueError(f"negative prompt embeddings {negative_features.shape} do not match the prompts' {features.shape}")
            negative = (jnp.repeat(negative_features, num_images_per_prompt, axis=0),
                        jnp.repeat(negative_pooled, num_images_per_prompt, axis=0))
        pooled, features = (jnp.repeat(e, num_images_per_prompt, axis=0) for e in (pooled, features))
        batch = len(features)
        h, w = height // self.vae_scale_factor, width // self.vae_scale_factor
        channels = self.transformer.config.in_channels // 4
        if latents is None:
            latents = pack_latents(jax.random.normal(jax.random.key(seed), (batch, channels, h, w), jnp.float32))
        latents = jnp.asarray(latents, jnp.float32)
        if latents.shape != (batch, (h // 2) * (w // 2), 4 * channels):
            raise ValueError(f"latents have shape {latents.shape}, expected {(batch, (h // 2) * (w // 2), 4 * channels)}")
        listeners = [lambda step, sigma, x: progress(step)] if progress else []
        if callback_on_step_end is not None:
            listeners.append(lambda step, sigma, x: callback_on_step_end(self, step, sigma * 1000, {"latents": x}))
        with _listening(listeners):
            out = np.asarray(_compiled_generate(
                self.transformer, self.vae, latents, features, pooled, jnp.float32(guidance), negative,
                jnp.float32(true_cfg_scale), height=h, width=w, steps=steps, scheduler=self.settings.scheduler,
                sigmas=None if sigmas is None else tuple(float(s) for s in sigmas), report=bool(listeners),
                latents_to_host=callback_on_step_end is not None,
                decode=output_type != "latent"))
        if output_type in ("np", "latent"):
            return out
        from PIL import Image

        return [Image.fromarray((im * 255).round().astype(np.uint8)) for im in out]

    def _embeddings(self, prompt, embeds, pooled, max_sequence_length: int | None, prefix: str) -> tuple[jax.Array, jax.Array]:
        """(pooled, features) of `prompt` (a string or a list) or the given embeddings, which come in pairs;
        `prefix` names the arguments in messages ("" or "negative_")."""
        if embeds is not None or pooled is not None:
            if prompt is not None or embeds is None or pooled is None:
                raise ValueError(f"give either {prefix}prompt or both {prefix}prompt_embeds and {prefix}pooled_prompt_embeds")
            embeds, pooled = jnp.asarray(embeds, jnp.float32), jnp.asarray(pooled, jnp.float32)
            if embeds.ndim != 3 or pooled.ndim != 2 or len(embeds) != len(pooled):
                raise ValueError(f"{prefix}prompt_embeds (B, S, D) and {prefix}pooled_prompt_embeds (B, V) do not fit: "
                                 f"{embeds.shape}, {pooled.shape}")
            return pooled, embeds
        if prompt is None:
            raise ValueError(f"give {prefix}prompt (text) or {prefix}prompt_embeds with {prefix}pooled_prompt_embeds")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("the prompt list is empty")
        return self.encode_prompts(prompts, max_sequence_length)


_step_listeners: list[Callable[[int, float, np.ndarray], None]] = []
"""Who hears of each step of the pipeline call under way (`progress`, `callback_on_step_end`): the
compiled generate function is shared by every pipeline, so its step callback (part of what is compiled)
must be one function for all of them. One call at a time reports steps: calls from two threads at once
would share these listeners."""


def _report_step(step: int, sigma: float, latents: np.ndarray | None) -> None:
    for listener in _step_listeners:
        listener(step, sigma, latents)


@contextlib.contextmanager
def _listening(listeners: list[Callable[[int, float, np.ndarray], None]]):
    _step_listeners[:] = listeners
    try:
        yield
    finally:
        _step_listeners.clear()


def decode_latents(vae: AutoencoderKL, packed: jax.Array, latent_height: int, latent_width: int) -> jax.Array:
    """Packed latents (B, L, 4C) -> images (B, H, W, 3) in [0, 1]: the pipeline's last stage."""
    z = unpack_latents(packed.astype(jnp.float32), latent_height, latent_width)
    z = z / vae.config.scaling_factor + vae.config.shift_factor
    return jnp.clip(vae.decode(jnp.transpose(z, (0, 2, 3, 1))) / 2 + 0.5, 0.0, 1.0)


def denoise_and_decode(transformer, vae, latents, features, pooled, guidance, negative, true_cfg_scale, *, height, width,
                       steps, scheduler, sigmas, report, latents_to_host, decode):
    """Denoise (one compiled loop) and, with `decode`, decode: packed noise -> images (B, H, W, 3) in [0, 1]
    (or the packed latents). What a pipeline call runs after encoding its prompts."""
    dtype = jnp.dtype(transformer.config.dtype)
    if negative is not None:
        negative = tuple(e.astype(dtype) for e in negative)
    x = sample_latents(transformer, latents.astype(dtype), features.astype(dtype), pooled.astype(dtype),
                       latent_height=height, latent_width=width, steps=steps, guidance=guidance, scheduler=scheduler,
                       sigmas=sigmas, negative=negative, true_cfg_scale=true_cfg_scale,
                       callback=_report_step if report else None, callback_latents=latents_to_host)
    return decode_latents(vae, x, height, width) if decode else x.astype(jnp.float32)


_compiled_generate = nnx.jit(denoise_and_decode, graph_updates=False, static_argnames=("height", "width", "steps", "scheduler", "sigmas", "report",
                                                         "latents_to_host", "decode"))
"""`denoise_and_decode` compiled once per model structure and shape, shared by every `FluxPipeline`: a second
pipeline with the same configs reuses the first one's compilation. Without graph_updates the models are
only read: by default nnx.jit returns every weight of its module arguments as outputs, a copy of the
transformer and the VAE on each call (1.37 GB of the CPU benchmark's pipeline)."""
