"""The device mesh of a run: named axes (data, fsdp, tensor), sizes from the config."""

from __future__ import annotations

import math

import jax
from jax.sharding import AxisType, Mesh

from flux_jax.io.errors import UserError
from flux_jax.sharding import MESH_AXES
from train.config import MeshConfig


class MeshError(UserError, ValueError):
    pass


def make_mesh(config: MeshConfig, devices=None) -> Mesh:
    """A GSPMD (Auto axes) mesh over `devices` (default: all); its size must divide the device count,
    and a smaller mesh takes the first devices."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = [config.data, config.fsdp, config.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise MeshError(f"mesh {sizes} (data, fsdp, tensor): sizes must be positive, with at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise MeshError(f"mesh {sizes} does not divide the {len(devices)} devices")
        sizes[sizes.index(-1)] = len(devices) // known
    total = math.prod(sizes)
    if len(devices) % total:
        raise MeshError(f"mesh {dict(zip(MESH_AXES, sizes))} ({total} devices) does not divide the {len(devices)} devices")
    return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices[:total])
