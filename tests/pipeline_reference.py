"""A tiny, complete diffusers FluxPipeline built offline: random components and word-level tokenizers."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from flux_jax.text.tokenizers import clip_word_tokenizer, t5_word_tokenizer
from tests.helpers import randomize_torch
from tests.torch_reference import TINY_DEV, diffusers_model

FLUX_DEV_SCHEDULER = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                          max_image_seq_len=4096, shift=3.0)  # FLUX.1-dev's scheduler_config.json
WORDS = "a an the red blue green fox cat dog in on snow grass digit seven three handwritten photo of small big".split()


def tiny_pipeline(seed: int = 0) -> FluxPipeline:
    torch.manual_seed(seed)
    clip_tokenizer = clip_word_tokenizer(WORDS, model_max_length=16)
    t5_tokenizer = t5_word_tokenizer(WORDS)
    clip = randomize_torch(CLIPTextModel(CLIPTextConfig(
        vocab_size=len(clip_tokenizer), hidden_size=TINY_DEV.vec_in_dim, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=16, bos_token_id=2, eos_token_id=3, pad_token_id=3)))
    t5 = randomize_torch(T5EncoderModel(T5Config(
        vocab_size=len(t5_tokenizer), d_model=TINY_DEV.context_in_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu")))
    vae = randomize_torch(AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=TINY_DEV.in_channels // 4, block_out_channels=(8, 16, 16),
        layers_per_block=1, norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=0.3611, shift_factor=0.1159))
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER), vae=vae, text_encoder=clip, tokenizer=clip_tokenizer, text_encoder_2=t5,
                        tokenizer_2=t5_tokenizer, transformer=diffusers_model(TINY_DEV, seed))


def packed_noise(batch: int, height: int, width: int, vae_scale: int = 4, seed: int = 0) -> np.ndarray:
    h, w = height // vae_scale, width // vae_scale
    return np.random.default_rng(seed).standard_normal((batch, (h // 2) * (w // 2), TINY_DEV.in_channels)).astype(np.float32)


def diffusers_schedule(scheduler: FlowMatchEulerDiscreteScheduler, steps: int, image_seq_len: int) -> tuple:
    """(sigmas, timesteps) as diffusers' FluxPipeline.__call__ sets them: calculate_shift from the
    scheduler's config, then retrieve_timesteps."""
    mu = calculate_shift(image_seq_len, scheduler.config.get("base_image_seq_len", 256),
                         scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                         scheduler.config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    return scheduler.sigmas.numpy(), timesteps.numpy()
