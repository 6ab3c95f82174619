"""The one table that maps logical axis names to mesh axes.

Parameters and activations carry logical names only ("embed", "mlp", ...). Which mesh axis each name
lands on is decided here, so FSDP, tensor parallelism or plain data parallelism is a change to this
table, never to model code.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # parameters
    ("embed", "fsdp"),  # the model width: FSDP shards every weight along it
    ("mlp", "tensor"),  # MLP hidden units (and the MLP part of single-block linear2's input)
    ("qkv", "tensor"),  # fused q, k, v outputs
    ("heads", "tensor"),  # concatenated attention heads feeding the output projection
    ("fused", "tensor"),  # single-block linear1 output: q, k, v and MLP in one
    ("modulation", "tensor"),  # adaLN shift/scale/gate outputs
    ("input", None),  # features arriving from outside (latent channels, text width, frequencies)
    ("output", None),  # latent channels leaving the model
    ("head_dim", None),  # QK-norm scales
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
)
_RULES = dict(LOGICAL_AXIS_RULES)


def active_mesh() -> Mesh | jax.sharding.AbstractMesh | None:
    """The mesh set by `jax.set_mesh`, or None outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def partition_spec(
    names: tuple[str | None, ...],
    mesh: Mesh | jax.sharding.AbstractMesh | None = None,
    shape: tuple[int, ...] | None = None,
) -> PartitionSpec:
    """Mesh partition spec for logical `names`. Mesh axes the mesh does not have are dropped, and so,
    given `shape`, are axes that would not divide their dimension evenly (batch 1 on 8 devices)."""
    mesh = mesh if mesh is not None else active_mesh()
    sizes = dict(mesh.shape) if mesh is not None else {a: 1 for a in MESH_AXES}
    spec = []
    for dim, name in enumerate(names):
        if name is not None and name not in _RULES:
            raise KeyError(f"logical axis {name!r} has no rule in flux_jax.sharding.LOGICAL_AXIS_RULES")
        axes = _RULES.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else (axes or ())
        kept, parts = [], 1
        for axis in axes:
            if axis in sizes and (shape is None or shape[dim] % (parts * sizes[axis]) == 0):
                kept.append(axis)
                parts *= sizes[axis]
        spec.append(kept[0] if len(kept) == 1 else (tuple(kept) or None))
    return PartitionSpec(*spec)


def param_metadata(names: tuple[str, ...], shape: tuple[int, ...]) -> dict[str, Any]:
    """Variable metadata: logical names always; a concrete sharding when built under a mesh."""
    metadata: dict[str, Any] = {"logical_axes": names}
    mesh = active_mesh()
    if mesh is not None:
        metadata["out_sharding"] = partition_spec(names, mesh, shape)
    return metadata


def named_sharding(names: tuple[str | None, ...], mesh: Mesh, shape: tuple[int, ...] | None = None) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(names, mesh, shape))


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Pins an activation's sharding at a block boundary; a no-op outside a mesh."""
    mesh = active_mesh()
    if mesh is None:
        return x
    spec = partition_spec(names, mesh, x.shape)
    if mesh.are_all_axes_explicit:
        return jax.sharding.reshard(x, spec)
    return jax.lax.with_sharding_constraint(x, spec)
