"""Our own checkpoints: an Orbax tree of parameters plus a small JSON (format, version, config)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from convert.atomic import atomic_directory
from convert.errors import CheckpointError
from flux_jax.config import FluxConfig
from flux_jax.model import Flux
from flux_jax.sharding import named_sharding

FORMAT = "flux_jax"
FORMAT_VERSION = 1
META_FILE = "flux_jax.json"
PARAMS_DIR = "params"


def is_flux_checkpoint(path: Path) -> bool:
    return (path / META_FILE).is_file()


def write_flux(model: Flux, directory: Path) -> None:
    """Writes `model` into the existing, empty `directory`."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "kind": "flux", "config": model.config.to_dict()}
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(Path(directory).absolute() / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()
    (Path(directory) / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_flux(model: Flux, out: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Saves `model` as an Orbax checkpoint at `out`, atomically."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_flux(model, tmp)
    return Path(out)


def read_meta(path: Path) -> dict:
    meta_path = path / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


def load_flux_checkpoint(path: Path, *, dtype=None, mesh: Mesh | None = None) -> Flux:
    """Restores one of our checkpoints straight into its shards (each device reads its slices)."""
    meta = read_meta(path)
    try:
        stored = FluxConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path / META_FILE}: bad config ({err})") from None
    config = stored.with_dtype(dtype) if dtype is not None else stored
    abstract = nnx.eval_shape(lambda: Flux(stored, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)

    def target(var):
        sharding = named_sharding(var.get_metadata()["logical_axes"], mesh, var.shape) if mesh is not None else None
        return jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding)

    targets = nnx.to_pure_dict(jax.tree.map(target, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
    params_dir = (path / PARAMS_DIR).absolute()
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir, targets)
    except Exception as err:  # Orbax raises many types for missing or damaged files
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(err).__name__}: {err})") from None
    nnx.replace_by_pure_dict(state, restored)
    model = nnx.merge(graphdef, state)
    if config != stored:
        model = _cast(model, config)
    return model


def _cast(model: Flux, config: FluxConfig) -> Flux:
    """The same weights under `config` (a dtype change)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0))))
    dtype = jax.numpy.dtype(config.param_dtype)
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(nnx.state(model, nnx.Param))))
    return nnx.merge(graphdef, state)
