"""Architecture configuration of the FLUX transformer (Black Forest Labs' FluxParams, plus dtypes)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Shape of a FLUX transformer. Field names follow BFL's `FluxParams`.

    `param_dtype` stores the weights, `dtype` is the compute dtype of activations. `remat` recomputes
    each block's activations in the backward pass (training memory), and changes no numbers.
    `scan_blocks` runs the blocks of each kind through one `lax.scan` (one compiled block instead of
    57: compile time), at the cost of a stacked copy of the blocks' weights during the call.
    """

    in_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    qkv_bias: bool = True
    guidance_embed: bool = True
    out_channels: int | None = None
    param_dtype: str = "bfloat16"
    dtype: str = "bfloat16"
    remat: bool = False
    scan_blocks: bool = False

    def __post_init__(self):
        object.__setattr__(self, "axes_dim", tuple(int(a) for a in self.axes_dim))
        if self.out_channels == self.in_channels:  # one canonical form: None means "same as in"
            object.__setattr__(self, "out_channels", None)
        for name in ("param_dtype", "dtype"):
            object.__setattr__(self, name, jnp.dtype(getattr(self, name)).name)
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(f"axes_dim {self.axes_dim} must sum to the head dim {self.head_dim}")
        if any(a % 2 for a in self.axes_dim):
            raise ValueError(f"every entry of axes_dim {self.axes_dim} must be even (rotary pairs)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def out_dim(self) -> int:
        return self.out_channels or self.in_channels

    def replace(self, **changes: Any) -> FluxConfig:
        return dataclasses.replace(self, **changes)

    def with_dtype(self, dtype: Any) -> FluxConfig:
        """Same architecture with parameter and compute dtype both set to `dtype` (a name or a dtype)."""
        name = jnp.dtype(dtype).name
        return self.replace(param_dtype=name, dtype=name)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["axes_dim"] = list(self.axes_dim)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FluxConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown FluxConfig fields: {', '.join(unknown)}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str) -> FluxConfig:
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown FluxConfig preset {name!r}; known: {', '.join(PRESETS)}") from None


PRESETS: dict[str, FluxConfig] = {
    # black-forest-labs/FLUX.1-dev: guidance-distilled, 11,901,408,320 parameters.
    "flux-dev": FluxConfig(),
    # black-forest-labs/FLUX.1-schnell: timestep-distilled, no guidance embedding.
    "flux-schnell": FluxConfig(guidance_embed=False),
    # A few-hundred-thousand-parameter model with every part of the architecture, for tests.
    "tiny": FluxConfig(
        in_channels=16,
        vec_in_dim=32,
        context_in_dim=48,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(4, 14, 14),
        param_dtype="float32",
        dtype="float32",
    ),
    # The digits world (train/worlds/digits.py): 16x16 one-channel images packed to 64 tokens of 4,
    # conditioned on its 64-wide CLIP and T5; trained by flow matching, no guidance embedding.
    "digits": FluxConfig(
        in_channels=4,
        vec_in_dim=64,
        context_in_dim=64,
        hidden_size=64,
        num_heads=2,
        depth=2,
        depth_single_blocks=2,
        axes_dim=(8, 12, 12),
        guidance_embed=False,
        param_dtype="float32",
        dtype="float32",
    ),
}
