"""One loader for modules whose attribute names mirror their PyTorch counterpart (T5, CLIP, the VAE).

The map from our parameter paths to PyTorch keys: a `kernel` is the PyTorch `weight`, transposed
(Linear: (out, in) -> (in, out); Conv: (out, in, kh, kw) -> (kh, kw, in, out)); an Embed's `embedding`
and a norm's `scale` are `weight`; `weight`, `bias` and `weight_scale` (int8 layers) keep their names; a bare parameter `x` is
`x.weight`. Tensors stream one at a time from safetensors (one file or sharded with an index).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from convert.loader import check_keys, default_dtype, find_tensor_files
from convert.safetensors_io import StoredTensor
from flux_jax.io.errors import CheckpointError
from flux_jax.params import fill

_TO_FLAX = {2: (1, 0), 4: (2, 3, 1, 0)}


def torch_key(path: tuple) -> tuple[str, bool]:
    """(PyTorch key, transpose?) of one of our parameter paths."""
    *module, leaf = map(str, path)
    prefix = ".".join(module)
    if leaf == "kernel":
        return f"{prefix}.weight", True
    if leaf in ("embedding", "scale"):
        return f"{prefix}.weight", False
    if leaf in ("weight", "bias", "weight_scale"):
        return ".".join(map(str, path)), False
    return f"{'.'.join(map(str, path))}.weight", False


def stored_dtype(folder: Path, dtype) -> str:
    """`dtype` as a name; by default float32 checkpoints stay float32, others become bfloat16."""
    if dtype is not None:
        return jnp.dtype(dtype).name
    tensors, _ = find_tensor_files(folder)
    return default_dtype(tensors, tensors.keys()[0])


def load_mirrored(folder: Path, model_fn: Callable[[], nnx.Module], *, mesh: Mesh | None = None, strip: str = "",
                  ignored: tuple[str, ...] = ()) -> nnx.Module:
    """Builds `model_fn()` abstractly and fills every leaf from the safetensors in `folder`.

    `strip` drops a key prefix some files carry ("text_model."); `ignored` keys may be present and
    unused (tied copies, buffers). Missing or unexpected keys and misshapen tensors raise
    CheckpointError naming them."""
    tensors, _ = find_tensor_files(folder)
    abstract = nnx.eval_shape(model_fn)
    wanted = {torch_key(path)[0] for path, _ in nnx.to_flat_state(nnx.state(abstract))}
    names = {k[len(strip):] if k.startswith(strip) else k: k for k in tensors.keys()}
    check_keys(tensors.name, set(names), wanted, set(ignored))

    def value_of(path, var):
        key, transpose = torch_key(path)
        axes = _TO_FLAX[len(tensors.shape(names[key]))] if transpose else None
        value = StoredTensor(tensors, (names[key],), axes=axes)  # read shard by shard on a mesh
        if value.shape != tuple(var.shape):
            raise CheckpointError(f"{tensors.file_of(names[key])}: tensor {names[key]!r} does not fit {'.'.join(map(str, path))} "
                                  f"(shape {value.shape} after layout change, expected {tuple(var.shape)})")
        return value

    return fill(abstract, value_of, mesh=mesh)


def save_mirrored(module: nnx.Module, path: Path) -> None:
    """`module`'s weights as one safetensors file under the PyTorch keys `load_mirrored` reads back."""
    from safetensors.numpy import save_file

    tensors = {}
    for leaf_path, var in nnx.to_flat_state(nnx.state(module)):
        key, transpose = torch_key(leaf_path)
        value = np.asarray(var[...])
        tensors[key] = np.ascontiguousarray(value.transpose(np.argsort(_TO_FLAX[value.ndim])) if transpose else value)
    save_file(tensors, str(path), metadata={"format": "pt"})
