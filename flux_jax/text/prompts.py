"""Prompts in words -> FLUX's two conditioning inputs: T5 token features and a pooled CLIP vector.

One encoder serves the pipeline (prompts at generation time) and the trainer (prompts of a
distillation run, encoded once before training)."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx

from flux_jax.text.clip import CLIPTextEncoder
from flux_jax.text.t5 import T5Encoder


def tokenize(tokenizer, prompts: Sequence[str], max_length: int, name: str) -> np.ndarray:
    """Token ids (B, max_length), padded; a prompt longer than max_length is truncated with a warning."""
    for prompt in prompts:
        length = len(tokenizer(prompt, truncation=False)["input_ids"])
        if length > max_length:
            warnings.warn(f"{name}: prompt {prompt!r} has {length} tokens; only the first {max_length} are used", stacklevel=3)
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="np")
    return np.asarray(out["input_ids"], np.int32)


@nnx.jit(graph_updates=False)  # the encoders are only read: no copy of their weights as outputs
def encode_tokens(clip: CLIPTextEncoder, t5: T5Encoder, clip_ids: jax.Array, t5_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Token ids -> (pooled CLIP vectors, T5 features): the pipeline's compiled text stage."""
    return clip(clip_ids)[1], t5(t5_ids)


class PromptEncoder:
    """CLIP (pooled vector y) and T5 (token features txt) with their tokenizers; `max_sequence_length`
    T5 tokens per prompt (512 for dev, 256 for schnell in diffusers)."""

    def __init__(self, clip: CLIPTextEncoder, t5: T5Encoder, clip_tokenizer, t5_tokenizer, max_sequence_length: int = 512):
        self.clip, self.t5 = clip, t5
        self.clip_tokenizer, self.t5_tokenizer = clip_tokenizer, t5_tokenizer
        self.max_sequence_length = max_sequence_length

    def __call__(self, prompts: Sequence[str], max_sequence_length: int | None = None) -> tuple[jax.Array, jax.Array]:
        """(pooled CLIP vectors (B, clip hidden), T5 token features (B, max_sequence_length, d_model));
        `max_sequence_length` overrides the encoder's for this call."""
        prompts = list(prompts)
        if not prompts:
            raise ValueError("the prompt list is empty")
        clip_length = min(self.clip_tokenizer.model_max_length, self.clip.config.max_position_embeddings)
        clip_ids = tokenize(self.clip_tokenizer, prompts, clip_length, "CLIP")
        t5_ids = tokenize(self.t5_tokenizer, prompts, max_sequence_length or self.max_sequence_length, "T5")
        return encode_tokens(self.clip, self.t5, clip_ids, t5_ids)
