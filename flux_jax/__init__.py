"""FLUX.1 in JAX/Flax NNX, with ternary (1.58-bit) weights."""

from flux_jax.config import FluxConfig
from flux_jax.model import Flux
from flux_jax.pipeline import FluxPipeline

__all__ = ["Flux", "FluxConfig", "FluxPipeline"]
