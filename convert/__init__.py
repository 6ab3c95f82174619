"""Checkpoint conversion: PyTorch FLUX checkpoints into Flax, and our own Orbax checkpoints."""

from convert.loader import load_flux
from convert.orbax_io import save_flux
from flux_jax.io.errors import CheckpointError

__all__ = ["CheckpointError", "load_flux", "save_flux"]
