"""The one table that maps logical axis names to mesh axes.

Parameters and activations carry logical names only ("embed", "mlp", ...). Which mesh axis each name
lands on is decided here, so FSDP, tensor parallelism or plain data parallelism is a change to this
table, never to model code.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flux_jax.io.errors import UserError

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

SHARDING_TOLERANCE = 0.02
"""How much more than the rules' layout a device may hold because mesh axes were dropped (a fraction)."""


class ShardingError(UserError, ValueError):
    """A mesh that leaves too much of a model unsharded."""


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
    sizes = _mesh_sizes(mesh)
    spec = [_dim_axes(name, sizes, None if shape is None else shape[dim]) for dim, name in enumerate(names)]
    return PartitionSpec(*(axes[0] if len(axes) == 1 else (axes or None) for axes in spec))


def _mesh_sizes(mesh: Mesh | jax.sharding.AbstractMesh | None) -> dict[str, int]:
    mesh = mesh if mesh is not None else active_mesh()
    return dict(mesh.shape) if mesh is not None else {a: 1 for a in MESH_AXES}


def _dim_axes(name: str | None, sizes: dict[str, int], size: int | None) -> tuple[str, ...]:
    """The mesh axes one dimension named `name` is split over: its rule's axes that the mesh has and,
    given the dimension's `size`, that divide it together."""
    if name is not None and name not in _RULES:
        raise KeyError(f"logical axis {name!r} has no rule in flux_jax.sharding.LOGICAL_AXIS_RULES")
    axes = _RULES.get(name) if name is not None else None
    axes = (axes,) if isinstance(axes, str) else (axes or ())
    kept, parts = [], 1
    for axis in axes:
        if axis in sizes and (size is None or size % (parts * sizes[axis]) == 0):
            kept.append(axis)
            parts *= sizes[axis]
    return tuple(kept)


@dataclasses.dataclass(frozen=True)
class Unsharded:
    """A parameter that mesh axes of its rules could not split (they did not divide its dimensions)."""

    path: str
    shape: tuple[int, ...]
    dropped: tuple[str, ...]
    excess_bytes: float  # per device, above what the rules' layout would hold

    def __str__(self) -> str:
        return f"{self.path} {self.shape}: {', '.join(self.dropped)} dropped (+{self.excess_bytes / 2**20:.3g} MiB a device)"


def unsharded(model: Any, mesh: Mesh | jax.sharding.AbstractMesh) -> tuple[list[Unsharded], float]:
    """The variables of `model` (any NNX graph node, abstract or not) that lost mesh axes on `mesh`,
    largest excess first, and the bytes a device holds of all variables under the rules' layout."""
    sizes, found, planned = _mesh_sizes(mesh), [], 0.0
    for path, var in nnx.to_flat_state(nnx.state(model)):
        shape = tuple(var.shape)
        names = var.get_metadata().get("logical_axes") or (None,) * len(shape)
        wanted = [_dim_axes(name, sizes, None) for name in names]
        kept = [_dim_axes(name, sizes, n) for name, n in zip(names, shape)]
        share = math.prod(shape) * var.dtype.itemsize / _ways(wanted, sizes)
        planned += share
        dropped = tuple(a for want, have in zip(wanted, kept) for a in want if a not in have and sizes[a] > 1)
        if dropped:
            found.append(Unsharded(".".join(map(str, path)), shape, dropped, share * (_ways(wanted, sizes) / _ways(kept, sizes) - 1)))
    return sorted(found, key=lambda u: -u.excess_bytes), planned


def _ways(axes_per_dim: list[tuple[str, ...]], sizes: dict[str, int]) -> int:
    """Into how many pieces a leaf split over these mesh axes is cut."""
    return math.prod(sizes[a] for axes in axes_per_dim for a in axes)


def check_sharded(model: Any, mesh: Mesh | jax.sharding.AbstractMesh, *, tolerance: float = SHARDING_TOLERANCE) -> None:
    """Refuses a mesh whose axes do not divide the model's big dimensions: `partition_spec` replicates
    such a dimension rather than fail, so each device would silently hold more than the rules lay out.
    Above `tolerance` (the excess over the rules' per-device bytes, MaxText's sharding_tolerance) it
    raises naming the largest offenders; small replicated leaves (biases, norms) stay below it."""
    found, planned = unsharded(model, mesh)
    excess = sum(u.excess_bytes for u in found)
    if planned and excess / planned > tolerance:
        mesh_text = " ".join(f"{axis}={size}" for axis, size in _mesh_sizes(mesh).items())
        raise ShardingError(
            f"mesh {mesh_text} leaves each device {excess / planned:.1%} more of the model than the sharding rules "
            f"lay out (tolerance {tolerance:.1%}): mesh axes that do not divide a dimension are dropped. Largest: "
            + "; ".join(map(str, found[:5])) + ". Choose mesh axis sizes that divide these dimensions.")


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
