"""Our own checkpoints: an Orbax tree of every model variable plus a small JSON beside it
(format, version, kind: flux / student / packed, config, quantization policy), written last: a folder
with the JSON is whole. Local paths and `etils.epath` locations (gs://...) alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from flux_jax.config import FluxConfig
from flux_jax.io.errors import CheckpointError
from flux_jax.io.files import atomic_directory, is_remote, location
from flux_jax.model import Flux
from flux_jax.params import fill, leaf_sharding
from flux_jax.ternary import KINDS, QuantPolicy, build, describe, runtime_layout, with_layout

FORMAT = "flux_jax"
FORMAT_VERSION = 1
META_FILE = "flux_jax.json"
PARAMS_DIR = "params"


def is_flux_checkpoint(path: str | os.PathLike) -> bool:
    return (location(path) / META_FILE).is_file()


def write_flux(model: Flux, directory: str | os.PathLike) -> None:
    """Writes `model` (any kind) into the existing, empty `directory`: the parameters, then the JSON."""
    directory = location(directory)
    kind, policy = describe(model)
    if kind == "packed":
        model = with_layout(model, "canonical")  # files hold the canonical layout only
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        # How a run executed the blocks (remat, scan) is its own choice, not the model's: not stored.
        "config": model.config.replace(remat=False, scan_blocks=False).to_dict(),
        "policy": policy.to_dict() if policy else None,
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / PARAMS_DIR, nnx.to_pure_dict(nnx.state(model)))
        checkpointer.wait_until_finished()
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def save_flux(model: Flux, out: str | os.PathLike, *, overwrite: bool = False) -> Path | epath.Path:
    """Saves `model` as an Orbax checkpoint at `out` (local or remote), atomically."""
    with atomic_directory(out, overwrite=overwrite) as directory:
        write_flux(model, directory)
    return epath.Path(out) if is_remote(out) else Path(out)


def read_meta(path: str | os.PathLike) -> tuple[str, FluxConfig, QuantPolicy | None]:
    """(kind, config, policy) of one of our checkpoints."""
    meta_path = location(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: not a {FORMAT} checkpoint description")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{meta_path}: format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    try:
        kind = meta.get("kind", "flux")
        policy = QuantPolicy.from_dict(meta["policy"]) if meta.get("policy") else None
        config = FluxConfig.from_dict(meta["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{meta_path}: bad config or policy ({err})") from None
    if kind not in KINDS:
        raise CheckpointError(f"{meta_path}: unknown model kind {kind!r}")
    return kind, config, policy


def restore_sharding(var: nnx.Variable, mesh: Mesh | None):
    """Where a restored leaf goes: its shards on `mesh`, else this process's first device. Never None,
    which would make Orbax restore the layout the checkpoint was saved with (a multi-device run's
    checkpoint then fails to load on any other device count)."""
    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    return leaf_sharding(var, mesh)


def load_flux_checkpoint(path: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> Flux:
    """Restores one of our checkpoints straight into its shards (each device reads its slices).

    `dtype` changes the float parameters and the compute dtype; packed codes and scales keep theirs."""
    kind, stored, policy = read_meta(path)
    abstract = nnx.eval_shape(lambda: build(stored, kind, policy, rngs=nnx.Rngs(0)))
    targets = nnx.to_pure_dict(jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=restore_sharding(v, mesh)),
        nnx.state(abstract), is_leaf=lambda x: isinstance(x, nnx.Variable),
    ))
    params_dir = location(path) / PARAMS_DIR
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            restored = checkpointer.restore(params_dir, targets)
    except Exception as err:  # Orbax raises many types for missing or damaged files
        raise CheckpointError(f"{params_dir}: cannot restore parameters ({type(err).__name__}: {err})") from None
    state = nnx.state(abstract)
    nnx.replace_by_pure_dict(state, restored)
    values = dict(nnx.to_flat_state(state))
    config = stored.with_dtype(dtype) if dtype is not None else stored
    target = nnx.eval_shape(lambda: build(config, kind, policy, rngs=nnx.Rngs(0)))
    model = fill(target, lambda path, _: values[path][...], mesh=mesh)
    return with_layout(model, runtime_layout(), mesh=mesh) if kind == "packed" else model
