"""Filling an abstract model (from `nnx.eval_shape`) with values, leaf by leaf, each into its shards."""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from flux_jax.sharding import SHARDING_TOLERANCE, check_sharded, named_sharding

M = TypeVar("M", bound=nnx.Module)
Path = tuple[Any, ...]
Index = tuple[slice, ...]


class LazyTensor(abc.ABC):
    """A tensor not read yet: its shape, and any rectangular region of it on demand. Given one, `fill`
    asks each process only for the regions its own devices hold, so no host reads a whole sharded
    tensor."""

    shape: tuple[int, ...]

    @abc.abstractmethod
    def read(self, index: Index) -> np.ndarray:
        """The region `index` (one slice per axis, step 1, concrete bounds) as a NumPy array."""


def whole(shape: tuple[int, ...]) -> Index:
    return tuple(slice(0, n) for n in shape)


def _concrete(index: Index, shape: tuple[int, ...]) -> Index:
    return tuple(slice(*s.indices(n)[:2]) for s, n in zip(index, shape))


def _place_lazy(value: LazyTensor, dtype, sharding) -> jax.Array:
    """`value` in `sharding`, built from the regions this process's devices hold: each distinct region
    is read once (devices replicating a region share the read), then cast to `dtype`."""
    shape = tuple(value.shape)
    if sharding is None:
        return jax.device_put(np.asarray(value.read(whole(shape))).astype(dtype, copy=False))
    regions: dict[tuple, np.ndarray] = {}

    def region(index: Index) -> np.ndarray:
        index = _concrete(index, shape)
        key = tuple((s.start, s.stop) for s in index)
        if key not in regions:
            regions[key] = np.asarray(value.read(index)).astype(dtype, copy=False)
        return regions[key]

    return jax.make_array_from_callback(shape, sharding, region)


def leaf_sharding(var: nnx.Variable, mesh: Mesh | None):
    """Where a variable lives on `mesh` by its logical names (None: the default device)."""
    if mesh is None:
        return None
    return named_sharding(var.get_metadata().get("logical_axes", (None,) * len(var.shape)), mesh, var.shape)


def fill(
    abstract: M,
    value_of: Callable[[Path, nnx.Variable], Any],
    *,
    mesh: Mesh | None = None,
    progress: Callable[[Iterable], Iterable] = lambda it: it,
    sharding_tolerance: float = SHARDING_TOLERANCE,
) -> M:
    """A concrete model whose every leaf is `value_of(path, abstract_variable)`, cast to the abstract
    leaf's dtype and placed by its logical sharding. Leaves are produced one at a time, so a caller
    streaming from disk holds one tensor on the host at once; a `LazyTensor` value is read region by
    region, each process reading only what its devices hold. A mesh that would leave more than
    `sharding_tolerance` of the model replicated is refused first (`flux_jax.sharding.check_sharded`)."""
    if mesh is not None:
        check_sharded(abstract, mesh, tolerance=sharding_tolerance)
    graphdef, state = nnx.split(abstract)
    filled = []
    for path, var in progress(list(nnx.to_flat_state(state))):
        value = value_of(path, var)
        sharding = leaf_sharding(var, mesh)
        if isinstance(value, LazyTensor):
            if tuple(value.shape) != tuple(var.shape):
                raise ValueError(f"{'.'.join(map(str, path))}: value of shape {tuple(value.shape)}, expected {tuple(var.shape)}")
            placed = _place_lazy(value, var.dtype, sharding)
        elif isinstance(value, jax.Array) and sharding is None:  # already placed (on any number of hosts)
            placed = value.astype(var.dtype)
        else:
            placed = jax.device_put(np.asarray(value).astype(var.dtype, copy=False) if not isinstance(value, jax.Array)
                                    else value.astype(var.dtype), sharding)
        filled.append((path, var.replace(placed)))
    return nnx.merge(graphdef, nnx.from_flat_state(filled))


def shard(model: M, mesh: Mesh, *, sharding_tolerance: float = SHARDING_TOLERANCE) -> M:
    """`model` with every variable moved to its place on `mesh` by its logical names (a mesh that
    leaves more than `sharding_tolerance` of it replicated is refused: `check_sharded`)."""
    check_sharded(model, mesh, tolerance=sharding_tolerance)
    state = nnx.state(model)
    placed = jax.tree.map(lambda v: v.replace(jax.device_put(v[...], leaf_sharding(v, mesh))), state,
                          is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, placed)
    return model
