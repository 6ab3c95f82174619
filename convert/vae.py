"""A diffusers `vae/` folder (AutoencoderKL) into our NNX autoencoder."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from convert.hf_modules import load_mirrored, stored_dtype
from flux_jax.io.errors import CheckpointError
from flux_jax.vae import AutoencoderConfig, AutoencoderKL


def vae_config(folder: Path, dtype: str) -> AutoencoderConfig:
    config_json = folder / "config.json"
    try:
        data = json.loads(config_json.read_text())
        if data.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            raise ValueError(f"it describes a {data['_class_name']}, not an AutoencoderKL")
        if data.get("use_quant_conv", True) or data.get("use_post_quant_conv", True):
            raise ValueError("quant convs are not part of FLUX's autoencoder (use_quant_conv must be false)")
        if data.get("act_fn", "silu") != "silu":
            raise ValueError(f"act_fn {data['act_fn']!r} is not silu")
        return AutoencoderConfig(
            in_channels=data["in_channels"], out_channels=data["out_channels"], latent_channels=data["latent_channels"],
            block_out_channels=tuple(data["block_out_channels"]), layers_per_block=data["layers_per_block"],
            norm_num_groups=data["norm_num_groups"], mid_block_add_attention=data.get("mid_block_add_attention", True),
            scaling_factor=data["scaling_factor"], shift_factor=data.get("shift_factor") or 0.0,
            param_dtype=dtype, dtype=dtype,
        )
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no config.json (expected a diffusers vae folder)") from None
    except KeyError as err:
        raise CheckpointError(f"{config_json}: missing field {err}") from None
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{config_json}: not a usable AutoencoderKL config ({err})") from None


def load_vae(folder: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> AutoencoderKL:
    """FLUX's autoencoder from a diffusers `vae/` folder; scaling and shift factors from its config."""
    folder = Path(folder)
    config = vae_config(folder, "float32")  # the config first: a folder of something else is named as such
    name = stored_dtype(folder, dtype)
    config = dataclasses.replace(config, param_dtype=name, dtype=name)
    return load_mirrored(folder, lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)), mesh=mesh)
