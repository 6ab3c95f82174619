"""What several test modules need: random PyTorch reference weights and device meshes."""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import Mesh

from train.config import MeshConfig
from train.mesh import make_mesh


def is_norm_weight(name: str) -> bool:
    return "norm" in name and name.endswith("weight")


def randomize_torch(module, *, scale: float = 0.2, seed: int | None = None,
                    near_one: Callable[[str], bool] = is_norm_weight):
    """Every parameter of a PyTorch module drawn from N(0, scale^2), those `near_one` names (norm scales)
    from N(1, scale^2), so the reference computes something non-trivial; returns it in eval mode."""
    import torch

    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn_like(p) * scale + (1.0 if near_one(name) else 0.0))
    return module.eval()


def mesh(data: int = 2, fsdp: int = 2, tensor: int = 2) -> Mesh:
    """The trainer's mesh (Auto axes) over the first data * fsdp * tensor devices."""
    return make_mesh(MeshConfig(data=data, fsdp=fsdp, tensor=tensor), jax.devices()[: data * fsdp * tensor])
