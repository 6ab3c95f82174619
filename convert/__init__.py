"""Checkpoint conversion: PyTorch FLUX checkpoints into Flax, and our own Orbax checkpoints."""

from convert.errors import CheckpointError
from convert.loader import load_flux
from convert.orbax_io import save_flux

__all__ = ["CheckpointError", "load_flux", "save_flux"]
