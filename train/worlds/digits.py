"""The digits world: scikit-learn's handwritten digits (shipped with the package, no download) as
16x16 single-channel "latents" (no VAE), prompts in words, and small CLIP and T5 encoders of our own
code with fixed seeds, so a FLUX-shaped teacher can be trained, distilled and judged in minutes.

A latent is the digit image scaled to [-1, 1]; packed 2x2 it is 64 tokens of 4 channels, which the
`digits` FluxConfig preset takes. Prompts come in several phrasings per digit; some phrasings are
never seen in training (held out) and only used to judge the models.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import numpy as np
from flax import nnx

from flux_jax.config import FluxConfig
from flux_jax.sampling import pack_latents, unpack_latents
from flux_jax.text import CLIPTextEncoder, CLIPTextEncoderConfig, PromptEncoder, T5Encoder, T5EncoderConfig
from flux_jax.text.tokenizers import clip_word_tokenizer, t5_word_tokenizer

NAME = "digits"
SIZE = 16
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TRAIN_PHRASINGS = (
    "a handwritten {word}",
    "the digit {digit}",
    "number {word}, written by hand",
    "the number {word}",
    "a {word} drawn by hand",
    "digit {word}",
    "a handwritten {digit}",
    "the digit {word}",
    "number {digit}",
)
HELD_OUT_PHRASINGS = (
    "a handwritten digit {digit}",
    "the number {digit}, drawn by hand",
)
TEXT_LENGTH = 10
"""T5 tokens per prompt: the longest phrasing is 8 words and punctuation plus </s>"""
ENCODER_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Prompt:
    text: str
    digit: int
    held_out: bool


def prompts(split: str = "train") -> list[Prompt]:
    """Every digit in every phrasing of `split`: "train", "held_out" or "all" (digit-major order)."""
    phrasings = {"train": TRAIN_PHRASINGS, "held_out": HELD_OUT_PHRASINGS, "all": TRAIN_PHRASINGS + HELD_OUT_PHRASINGS}[split]
    return [Prompt(p.format(word=NUMBER_WORDS[d], digit=d), d, p in HELD_OUT_PHRASINGS)
            for d in range(10) for p in phrasings]


def paired_prompts(phrasings: list[Prompt], labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For images of `labels`, the index in `phrasings` of a random phrasing of each one's digit."""
    by_digit = np.array([[i for i, p in enumerate(phrasings) if p.digit == d] for d in range(10)])
    return by_digit[labels, rng.integers(0, by_digit.shape[1], len(labels))]


def _vocabulary() -> list[str]:
    from tokenizers.pre_tokenizers import Whitespace

    words = {w for p in prompts("all") for w, _ in Whitespace().pre_tokenize_str(p.text)}
    return sorted(words)


@functools.cache
def prompt_encoder() -> PromptEncoder:
    """CLIP (pooled 64-d) and T5 (64-d tokens) with random weights from a fixed seed: the same
    embeddings on every machine, with no download. What they encode is learnt by the teacher."""
    words = _vocabulary()
    clip_tokenizer = clip_word_tokenizer(words, model_max_length=16)
    t5_tokenizer = t5_word_tokenizer(words, model_max_length=TEXT_LENGTH)
    clip = CLIPTextEncoder(CLIPTextEncoderConfig(
        vocab_size=len(clip_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, eos_token_id=clip_tokenizer.eos_token_id, param_dtype="float32", dtype="float32"),
        rngs=nnx.Rngs(ENCODER_SEED))
    t5 = T5Encoder(T5EncoderConfig(
        vocab_size=len(t5_tokenizer), d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=16, param_dtype="float32", dtype="float32"),
        rngs=nnx.Rngs(ENCODER_SEED + 1))
    return PromptEncoder(clip, t5, clip_tokenizer, t5_tokenizer, max_sequence_length=TEXT_LENGTH)


def flux_config() -> FluxConfig:
    return FluxConfig.preset(NAME)


@functools.cache
def _dataset() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # (N, 8, 8) in [0, 1]
    # bilinear 8 -> 16: each pixel centre keeps its value, the pixels between are interpolated
    grid = np.clip((np.arange(SIZE) + 0.5) / 2 - 0.5, 0, 7)
    lo = np.floor(grid).astype(int)
    hi = np.minimum(lo + 1, 7)
    frac = (grid - lo).astype(np.float32)
    rows = images[:, lo] * (1 - frac)[None, :, None] + images[:, hi] * frac[None, :, None]
    scaled = rows[:, :, lo] * (1 - frac)[None, None, :] + rows[:, :, hi] * frac[None, None, :]
    return (2.0 * scaled - 1.0).astype(np.float32), digits.target.astype(np.int32)


def images(split: str = "all") -> tuple[np.ndarray, np.ndarray]:
    """Digit images (N, 16, 16) in [-1, 1] and their labels; "train" (80%) and "test" (20%) are a
    fixed split the classifier's held-out accuracy and the Frechet reference use."""
    x, labels = _dataset()
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    rows = {"all": np.arange(len(x)), "train": np.sort(order[:cut]), "test": np.sort(order[cut:])}[split]
    return x[rows], labels[rows]


def to_latents(images: np.ndarray) -> np.ndarray:
    """(N, 16, 16) images -> packed latents (N, 64, 4)."""
    return np.asarray(pack_latents(images[:, None]))


def to_images(latents) -> np.ndarray:
    """Packed latents (N, 64, 4) -> images (N, 16, 16), clipped to [-1, 1]."""
    return np.clip(np.asarray(unpack_latents(latents, SIZE, SIZE))[:, 0], -1.0, 1.0)


def cache_dir() -> Path:
    """Where the trained digits teacher lives: $FLUX_JAX_CACHE/digits (default ~/.cache/flux_jax/digits)."""
    root = os.environ.get("FLUX_JAX_CACHE") or Path.home() / ".cache" / "flux_jax"
    return Path(root).expanduser() / NAME


def teacher_path() -> Path:
    return cache_dir() / "teacher"
