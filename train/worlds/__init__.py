"""Small real worlds the whole method runs on end to end on a laptop (the main job's default).

A world is a module that fits `World`; `find_world` turns a --teacher or --text-encoders value into
one (or None for a checkpoint or preset), once per run, and the trainer asks the world, never its name."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from flux_jax.config import FluxConfig
from flux_jax.text import PromptEncoder
from train.worlds import digits


@runtime_checkable
class World(Protocol):
    """What the trainer and the teacher's training take from a world."""

    NAME: str
    SIZE: int
    """latent height and width"""
    TEXT_LENGTH: int
    """T5 tokens per prompt of the world's encoders"""

    def prompts(self, split: str = "train") -> list:
        """Its prompts (objects with a `text`) of a split: "train", "held_out" or "all"."""

    def prompt_encoder(self) -> PromptEncoder: ...

    def flux_config(self) -> FluxConfig: ...

    def images(self, split: str = "all") -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of a split."""

    def to_latents(self, images: np.ndarray) -> np.ndarray: ...

    def paired_prompts(self, phrasings: list, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each label, the index of a phrasing of it."""

    def teacher_path(self) -> Path:
        """Where its trained teacher is cached."""


WORLDS: dict[str, World] = {digits.NAME: digits}


def find_world(spec: str | None) -> World | None:
    """The world a --teacher (or --text-encoders, --world) value names, or None for anything else."""
    return WORLDS.get(spec) if spec else None
