"""Packed ternary models as single safetensors files, for use outside JAX and for downloads.

Keys are our parameter paths (BFL names), values as the packed model holds them: `*.codes` uint8 in
the canonical 2-bit format (ceil(in/4), out), `*.scale` float32, full-precision kernels in Flax
layout (in, out). The archive variant stores each `*.codes` as `*.codes_base3`, five weights per byte
(1.6 bits a weight). The metadata carries format, config and quantization policy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from convert.safetensors_io import SafetensorsFiles, StoredTensor
from flux_jax.config import FluxConfig
from flux_jax.io.errors import CheckpointError
from flux_jax.model import Flux
from flux_jax.params import fill
from flux_jax.ternary import QuantPolicy, build, describe, packed_widths, runtime_layout, with_layout
from pallas_kernels import pack_archive, pack_ternary, unpack_archive, unpack_ternary

PACKED = "flux_jax.packed"
ARCHIVE = "flux_jax.archive"
_BASE3 = "codes_base3"


def file_format(path: Path) -> str | None:
    """PACKED or ARCHIVE for our files, None for any other safetensors file."""
    try:
        found = _metadata(path).get("format")
    except SafetensorError:  # unreadable files are reported by the regular loader
        return None
    return found if found in (PACKED, ARCHIVE) else None


def write_packed_safetensors(model: Flux, path: Path, *, archive: bool = False) -> None:
    kind, policy = describe(model)
    if kind != "packed":
        raise CheckpointError(f"{path}: only packed models are written as packed safetensors, got a {kind} model")
    model = with_layout(model, "canonical")  # files hold the canonical layout only
    widths = packed_widths(model)
    tensors = {}
    for leaf_path, var in nnx.to_flat_state(nnx.state(model)):
        value = np.asarray(var[...])
        name = ".".join(map(str, leaf_path))
        if archive and leaf_path[-1] == "codes":
            value = pack_archive(unpack_ternary(value, widths[leaf_path[:-1]]))
            name = name[: -len("codes")] + _BASE3
        tensors[name] = np.ascontiguousarray(value)
    metadata = {"format": ARCHIVE if archive else PACKED, "format_version": "1",
                "config": json.dumps(model.config.to_dict()), "policy": json.dumps(policy.to_dict())}
    save_file(tensors, str(path), metadata=metadata)


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="numpy") as handle:
        return handle.metadata() or {}


def read_packed_meta(path: Path) -> tuple[FluxConfig, QuantPolicy]:
    """(config, policy) stored in the metadata of one of our packed files."""
    metadata = _metadata(path)
    try:
        return FluxConfig.from_dict(json.loads(metadata["config"])), QuantPolicy.from_dict(json.loads(metadata["policy"]))
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: bad config or policy in the metadata ({err})") from None


def load_packed_safetensors(path: Path, *, dtype=None, mesh: Mesh | None = None) -> Flux:
    config, policy = read_packed_meta(path)
    if dtype is not None:
        config = config.with_dtype(dtype)
    abstract = nnx.eval_shape(lambda: build(config, "packed", policy, rngs=nnx.Rngs(0)))
    widths = packed_widths(abstract)
    tensors = SafetensorsFiles([path])
    archive = file_format(path) == ARCHIVE

    def value_of(leaf_path, var):
        name = ".".join(map(str, leaf_path))
        if archive and leaf_path[-1] == "codes":
            k = widths[leaf_path[:-1]]
            data = tensors.read(name[: -len("codes")] + _BASE3)
            try:
                return pack_ternary(unpack_archive(data, (k, var.shape[1])))
            except ValueError as err:
                raise CheckpointError(f"{path}: tensor {name[: -len('codes')] + _BASE3!r}: {err}") from None
        if name not in tensors:
            raise CheckpointError(f"{path}: missing key {name!r}")
        value = StoredTensor(tensors, (name,))  # read shard by shard on a mesh
        if value.shape != tuple(var.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {value.shape}, expected {tuple(var.shape)}")
        return value

    return with_layout(fill(abstract, value_of, mesh=mesh), runtime_layout(), mesh=mesh)
