"""The independent reference: diffusers' FluxTransformer2DModel in PyTorch, at our tiny configs."""

from __future__ import annotations

import inspect
import textwrap

import numpy as np
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx

from convert import layouts
from flux_jax.config import FluxConfig
from tests.helpers import randomize_torch

# Tiny configs covering both FLUX variants; head dim 32 gives the inferable rotary split (4, 14, 14).
TINY_DEV = FluxConfig.preset("tiny")
TINY_SCHNELL = TINY_DEV.replace(guidance_embed=False, depth=1, depth_single_blocks=3)


def diffusers_model(config: FluxConfig, seed: int = 0) -> FluxTransformer2DModel:
    """A float32 diffusers model with every parameter random (norm scales and biases too)."""
    torch.manual_seed(seed)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=config.in_channels,
        out_channels=config.out_channels,
        num_layers=config.depth,
        num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim,
        num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim,
        pooled_projection_dim=config.vec_in_dim,
        guidance_embeds=config.guidance_embed,
        axes_dims_rope=config.axes_dim,
    ).eval()
    return randomize_torch(model, near_one=lambda name: "norm_" in name)  # QK-norm scales near one


def random_inputs(config: FluxConfig, *, batch: int = 2, height: int = 4, width: int = 6, txt_len: int = 7, seed: int = 0) -> dict:
    """BFL-shaped inputs for a non-square latent grid (height x width patches)."""
    rng = np.random.default_rng(seed)
    img_ids = np.zeros((height, width, 3), np.float32)
    img_ids[..., 1] = np.arange(height)[:, None]
    img_ids[..., 2] = np.arange(width)[None, :]
    img_ids = img_ids.reshape(-1, 3)
    txt_ids = np.zeros((txt_len, 3), np.float32)
    return {
        "img": rng.standard_normal((batch, height * width, config.in_channels)).astype(np.float32),
        "img_ids": np.broadcast_to(img_ids, (batch, *img_ids.shape)).copy(),
        "txt": rng.standard_normal((batch, txt_len, config.context_in_dim)).astype(np.float32),
        "txt_ids": np.broadcast_to(txt_ids, (batch, *txt_ids.shape)).copy(),
        "timesteps": rng.uniform(0.05, 1.0, batch).astype(np.float32),
        "y": rng.standard_normal((batch, config.vec_in_dim)).astype(np.float32),
        "guidance": rng.uniform(1.0, 5.0, batch).astype(np.float32) if config.guidance_embed else None,
    }


def run_diffusers(model: FluxTransformer2DModel, inputs: dict) -> np.ndarray:
    t = lambda a: torch.from_numpy(np.asarray(a))  # noqa: E731
    with torch.no_grad():
        out = model(
            hidden_states=t(inputs["img"]),
            encoder_hidden_states=t(inputs["txt"]),
            pooled_projections=t(inputs["y"]),
            timestep=t(inputs["timesteps"]),
            img_ids=t(inputs["img_ids"][0]),
            txt_ids=t(inputs["txt_ids"][0]),
            guidance=None if inputs["guidance"] is None else t(inputs["guidance"]),
            return_dict=False,
        )[0]
    return out.numpy()


def run_ours(model, inputs: dict) -> np.ndarray:
    return np.asarray(model(**inputs), dtype=np.float32)


def assert_close(ours: np.ndarray, ref: np.ndarray, rel: float = 1e-4) -> None:
    """DESIGN's parity bar: max |ours - ref| <= rel * max |ref|."""
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    err, scale = float(np.abs(ours - ref).max()), float(np.abs(ref).max())
    assert scale > 0.1, "reference output is degenerate"
    assert err <= rel * scale, f"max |ours - ref| = {err:.3g} > {rel} * {scale:.3g}"


def bfl_state_dict(model) -> dict[str, np.ndarray]:
    """Our model's weights in Black Forest Labs' layout (weight (out, in), BFL names)."""
    state = {}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(map(str, path))
        state.update(layouts.to_torch_layout(np.asarray(var[...]), layouts.bfl_source(name), model.config.hidden_size))
    return state


def diffusers_bfl_converter(inner_dim: int):
    """diffusers' own BFL -> diffusers converter, with its hard-coded FLUX width (3072) set to ours."""
    from diffusers.loaders import single_file_utils

    source = textwrap.dedent(inspect.getsource(single_file_utils.convert_flux_transformer_checkpoint_to_diffusers))
    assert source.count("inner_dim = 3072") == 1, "diffusers' converter changed; revisit this helper"
    namespace = dict(vars(single_file_utils))
    exec(source.replace("inner_dim = 3072", f"inner_dim = {inner_dim}"), namespace)  # noqa: S102
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"]
