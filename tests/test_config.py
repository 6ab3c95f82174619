import dataclasses

import jax
import pytest
import torch
from diffusers import FluxTransformer2DModel
from flax import nnx

from flux_jax import Flux, FluxConfig


def param_count(config: FluxConfig) -> int:
    model = nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0)))
    return sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def diffusers_param_count(**kwargs) -> int:
    with torch.device("meta"):
        model = FluxTransformer2DModel(**kwargs)
    return sum(p.numel() for p in model.parameters())


def test_flux_dev_parameter_count_matches_diffusers():
    ours = param_count(FluxConfig.preset("flux-dev"))
    assert ours == 11_901_408_320
    assert ours == diffusers_param_count(guidance_embeds=True)


def test_flux_schnell_parameter_count_matches_diffusers():
    assert param_count(FluxConfig.preset("flux-schnell")) == diffusers_param_count(guidance_embeds=False)


def test_full_presets_are_bf16_and_tiny_is_float32():
    for name in ("flux-dev", "flux-schnell"):
        config = FluxConfig.preset(name)
        assert (config.param_dtype, config.dtype) == ("bfloat16", "bfloat16")
    assert FluxConfig.preset("tiny").param_dtype == "float32"


def test_config_is_frozen_and_round_trips_through_dict():
    config = FluxConfig.preset("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.depth = 3
    assert FluxConfig.from_dict(config.to_dict()) == config
    assert config.with_dtype("bfloat16").param_dtype == "bfloat16"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"num_heads": 3}, "not divisible"),
        ({"axes_dim": (4, 14, 16)}, "must sum"),
        ({"axes_dim": (5, 13, 14)}, "even"),
    ],
)
def test_inconsistent_config_is_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        FluxConfig.preset("tiny").replace(**changes)


def test_unknown_preset_names_the_known_ones():
    with pytest.raises(ValueError, match="flux-dev"):
        FluxConfig.preset("flux-pro")
