"""`load_flux`: any FLUX transformer checkpoint people have -> our `Flux` module.

One generic loader: build the abstract model (`nnx.eval_shape`), walk its flat state, and fill each
leaf from the source through the key map (`convert.layouts`), one tensor at a time. Source keys the
model does not use and leaves the source cannot fill are errors, named before anything is read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from etils import epath
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from convert import layouts
from convert.orbax_io import is_flux_checkpoint, load_flux_checkpoint, read_meta
from convert.packed_io import file_format, load_packed_safetensors, read_packed_meta
from convert.safetensors_io import SafetensorsFiles, StoredTensor
from flux_jax.config import FluxConfig
from flux_jax.io.errors import CheckpointError
from flux_jax.io.files import is_remote
from flux_jax.model import Flux
from flux_jax.params import fill

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_flux(
    path: str | os.PathLike,
    *,
    dtype=None,
    mesh: Mesh | None = None,
    progress: bool = False,
    config: FluxConfig | None = None,
    axes_dim: Sequence[int] | None = None,
) -> Flux:
    """Loads a FLUX transformer from a BFL .safetensors file, a diffusers transformer folder, a
    diffusers pipeline root, a hub id in the local Hugging Face cache, one of our Orbax checkpoints
    (full precision, ternary student or packed), or our packed / archive safetensors files.

    dtype: a name ("float32", "bfloat16") or dtype for parameters and compute; by default float32
    checkpoints stay float32 and everything else (bf16, fp16, fp8) becomes bfloat16.
    mesh: place each parameter straight into its shards (logical rules of `flux_jax.sharding`);
    without one, everything goes to this process's first device, whatever devices saved it.
    config / axes_dim (one of them): the architecture, or only the RoPE axes, of a checkpoint that
    stores none (a BFL file, a diffusers folder without config.json), where they are needed for
    head dims other than FLUX's 128. A checkpoint that stores its config must agree with them.
    The config's dtypes and execution choices (remat, scan_blocks) are not used: `dtype` decides.
    Raises CheckpointError naming the file, folder or key at fault.
    """
    given = _given_architecture(config, axes_dim)
    location = locate(path)
    if location.is_dir() and is_flux_checkpoint(location):
        _check_given(location, read_meta(location)[1], given)
        return load_flux_checkpoint(location, dtype=dtype, mesh=mesh)
    if is_remote(path):
        raise CheckpointError(f"{os.fspath(path)}: only our Orbax checkpoints are read from remote locations; copy "
                              "safetensors files to a local disk (or convert them with python -m convert.torch_to_flax)")
    if location.is_file() and location.suffix == ".safetensors" and file_format(location):
        _check_given(location, read_packed_meta(location)[0], given)
        return load_packed_safetensors(location, dtype=dtype, mesh=mesh)
    tensors, config_json = find_tensor_files(location)
    return _load_safetensors(tensors, config_json, given, dtype=dtype, mesh=mesh, progress=progress)


def _given_architecture(config: FluxConfig | None, axes_dim: Sequence[int] | None) -> dict:
    """What the caller said about the architecture, as FluxConfig fields (empty: nothing)."""
    if config is not None and axes_dim is not None:
        raise CheckpointError("load_flux: pass config= or axes_dim=, not both (a config carries its axes_dim)")
    if config is not None:
        return config.to_dict()
    return {"axes_dim": [int(a) for a in axes_dim]} if axes_dim is not None else {}


def _check_given(name: str | os.PathLike, found: FluxConfig, given: dict) -> None:
    """A config or RoPE axes the caller gave must describe the checkpoint; the differing fields are named."""
    wrong = layouts.disagreements(found, given)
    if wrong:
        raise CheckpointError(f"{name}: the given config disagrees with the checkpoint: {'; '.join(wrong)}")


def add_axes_dim_flag(parser: argparse.ArgumentParser) -> None:
    """`--axes-dim A,B,C`, the command line's `load_flux(axes_dim=...)`."""
    parser.add_argument("--axes-dim", type=_axes_dim_value, default=None, metavar="A,B,C",
                        help="RoPE axes of a BFL file with a head dim other than 128 (such files do not store them)")


def _axes_dim_value(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(a) for a in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated integers, e.g. 16,56,56") from None


def locate(path: str | os.PathLike) -> Path:
    """A local path, a remote one (gs://...; through etils.epath), or the snapshot folder of a hub id
    found in the local Hugging Face cache."""
    if is_remote(path):
        remote = epath.Path(path)
        if remote.exists():
            return remote
        raise CheckpointError(f"{os.fspath(path)}: no such file or folder")
    local = Path(path).expanduser()
    if local.exists():
        return local
    text = os.fspath(path)
    if _HUB_ID.match(text) and not text.startswith("."):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return Path(snapshot_download(text, local_files_only=True))
        except (LocalEntryNotFoundError, OSError, ValueError):
            raise CheckpointError(
                f"{text}: no such file or folder, and no snapshot of that hub id in the local Hugging Face cache "
                "(download it first, e.g. `hf download " + text + "`)"
            ) from None
    raise CheckpointError(f"{text}: no such file or folder")


def find_tensor_files(location: Path) -> tuple[SafetensorsFiles, Path | None]:
    """The safetensors files of a checkpoint and its diffusers config.json, if it has one."""
    if location.is_file():
        if location.suffix != ".safetensors":
            raise CheckpointError(f"{location}: not a .safetensors file (PyTorch pickles are not read; convert to safetensors)")
        config_json = location.parent / "config.json"
        return SafetensorsFiles([location]), config_json if config_json.is_file() else None
    if (location / "transformer").is_dir() and not (location / "config.json").is_file():
        return find_tensor_files(location / "transformer")
    indexes = sorted(location.glob("*.safetensors.index.json"))
    files = sorted(location.glob("*.safetensors"))
    config_json = location / "config.json" if (location / "config.json").is_file() else None
    if len(indexes) > 1:
        raise CheckpointError(f"{location}: several safetensors indexes ({', '.join(i.name for i in indexes)})")
    if indexes:
        return SafetensorsFiles.from_index(indexes[0]), config_json
    if config_json is None:
        # A BFL repository root: flux1-dev.safetensors beside the autoencoder's ae.safetensors.
        files = [f for f in files if not f.name.startswith("ae.")]
        if len(files) > 1:
            raise CheckpointError(f"{location}: several safetensors files and no index or config.json; name one")
    if not files:
        what = "empty folder" if not any(location.iterdir()) else "no safetensors files"
        raise CheckpointError(f"{location}: {what} (expected weights in safetensors files)")
    return SafetensorsFiles(files, name=str(location) if len(files) > 1 else None), config_json


def _read_diffusers_config(config_json: Path) -> FluxConfig:
    try:
        data = json.loads(config_json.read_text())
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return layouts.config_from_diffusers(data)
    except KeyError as err:
        raise CheckpointError(f"{config_json}: missing field {err}") from None
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{config_json}: not a usable FluxTransformer2DModel config ({err})") from None


def default_dtype(tensors: SafetensorsFiles, key: str) -> str:
    """float32 checkpoints stay float32; everything else (bf16, fp16, fp8) becomes bfloat16."""
    return "float32" if tensors.dtype_name(key) == "F32" else "bfloat16"


def _load_safetensors(tensors: SafetensorsFiles, config_json: Path | None, given: dict, *, dtype, mesh, progress) -> Flux:
    keys = tensors.keys()
    prefix = next((p for p in layouts.BFL_PREFIXES if keys and all(k.startswith(p) for k in keys)), "")
    layout = layouts.detect_layout([k[len(prefix) :] for k in keys])
    if layout is None:
        sample = ", ".join(sorted(keys)[:3])
        raise CheckpointError(f"{tensors.name}: not a FLUX transformer checkpoint (its keys look like {sample})")
    source_of = layouts.SOURCES[layout]

    def shape_of(path: str) -> tuple[int, ...] | None:
        try:
            source = source_of(path)
        except KeyError:
            return None
        names = [prefix + k for k in source.keys]
        if not all(n in tensors for n in names):
            return None
        shapes = [tensors.shape(n) for n in names]
        shape = (sum(s[0] for s in shapes), *shapes[0][1:])
        return shape[::-1] if source.transpose else shape

    if layout == layouts.DIFFUSERS and config_json is not None:
        config = _read_diffusers_config(config_json)
        _check_given(config_json, config, given)
    else:
        config = _inferred_config(tensors.name, shape_of, given)
    first_key = prefix + source_of("img_in.kernel").keys[0]
    config = config.with_dtype(dtype if dtype is not None else default_dtype(tensors, first_key))

    abstract = nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0)))
    sources = {path: source_of(".".join(map(str, path))) for path, _ in nnx.to_flat_state(nnx.state(abstract))}
    check_keys(tensors.name, set(tensors.keys()), {prefix + k for s in sources.values() for k in s.keys},
               what=" for a FLUX transformer of this config")

    def value_of(path, var):
        return _read_leaf(tensors, sources[path], prefix, ".".join(map(str, path)), var.shape)

    bar = lambda leaves: tqdm(leaves, desc="converting", unit="tensor", disable=not progress)  # noqa: E731
    return fill(abstract, value_of, mesh=mesh, progress=bar)


def _inferred_config(name: str, shape_of: Callable[[str], tuple[int, ...] | None], given: dict) -> FluxConfig:
    """The config of a checkpoint that stores none: from its tensor shapes, with the caller's RoPE
    axes and theta (which no tensor shape shows) and the rest checked against theirs."""
    axes_dim = given.get("axes_dim")
    try:
        found = layouts.infer_config(shape_of, tuple(axes_dim) if axes_dim is not None else None)
    except (TypeError, ValueError, IndexError, ZeroDivisionError) as err:
        raise CheckpointError(f"{name}: cannot infer the FLUX config from tensor shapes ({err})") from None
    _check_given(name, found, {k: v for k, v in given.items() if k != "theta"})
    return found.replace(theta=given.get("theta", found.theta))


def check_keys(name: str, have: set[str], needed: set[str], ignored: set[str] = frozenset(), what: str = "") -> None:
    """Missing and unexpected keys, named before anything is read (`ignored` may be present, unused)."""
    for problem, found in (("missing key", needed - have), ("unexpected key", have - needed - ignored)):
        if found:
            first, more = sorted(found)[0], len(found) - 1
            suffix = f" (and {more} more)" if more else ""
            raise CheckpointError(f"{name}: {problem} {first!r}{suffix}{what}")


def _read_leaf(tensors: SafetensorsFiles, source: layouts.Source, prefix: str, name: str, shape) -> StoredTensor:
    """Leaf `name` as a region reader over its source tensors, its shape checked from the headers."""
    keys = tuple(prefix + k for k in source.keys)
    shapes = [tensors.shape(k) for k in keys]
    if len(keys) > 1 and (any(not s for s in shapes) or len({s[1:] for s in shapes}) > 1):
        detail = ", ".join(f"{k} {s}" for k, s in zip(source.keys, shapes))
        raise CheckpointError(f"{tensors.name}: tensors that make up {name} do not fit together: {detail}")
    ndim = len(shapes[0])
    value = StoredTensor(tensors, keys, swap_halves=source.swap_halves,
                         axes=tuple(reversed(range(ndim))) if source.transpose else None)
    if value.shape != tuple(shape):
        want = tuple(shape)[::-1] if source.transpose else tuple(shape)
        raise CheckpointError(
            f"{tensors.file_of(keys[0])}: tensor {prefix + '+'.join(source.keys)!r} has shape {value.stored_shape}, "
            f"expected {want} for {name}"
        )
    return value
