"""Write any of our models (full precision, ternary student, packed) as a diffusers transformer folder.

    python -m convert.export_diffusers ckpt/flux-dev-packed exported/transformer

Ternary layers are written as their effective weight s * T (plus the low-rank residual, if any) in
bf16 by default, so `FluxTransformer2DModel.from_pretrained(OUT)` runs the student in PyTorch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from convert import layouts
from convert.cli import src_out_parser
from convert.loader import add_axes_dim_flag, load_flux
from flux_jax.io.cli import reported_errors
from flux_jax.io.errors import CheckpointError
from flux_jax.io.files import atomic_directory
from flux_jax.model import Flux
from flux_jax.ternary import dense_leaves

PROG = "python -m convert.export_diffusers"
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


WEIGHTS = "diffusion_pytorch_model"
MAX_SHARD_BYTES = 10 * 10**9  # diffusers' save_pretrained default ("10GB")


def write_diffusers(model: Flux, directory: Path, *, dtype: str = "bfloat16", max_shard_bytes: int = MAX_SHARD_BYTES,
                    progress: bool = False) -> None:
    """Writes config.json and the weights into the existing `directory` as diffusers' save_pretrained does:
    one diffusion_pytorch_model.safetensors, or numbered shards of at most `max_shard_bytes` (a larger
    tensor alone in its shard) and a safetensors index. Tensors are converted one at a time and each
    shard is written as soon as it is full, so the host holds one shard, not the model (24 GB for flux-dev)."""
    try:
        config_json = layouts.diffusers_config_dict(model.config)
    except ValueError as err:
        raise CheckpointError(f"cannot export to diffusers: {err}") from None
    shards: list[list[str]] = []  # the keys of each shard written
    pending: dict[str, np.ndarray] = {}
    total = 0

    def write_shard() -> None:
        save_file(pending, str(directory / f"{WEIGHTS}-{len(shards) + 1:05d}.safetensors"), metadata={"format": "pt"})
        shards.append(list(pending))
        pending.clear()

    for name, value in tqdm(dense_leaves(model), desc="exporting", unit="tensor", disable=not progress):
        value = np.asarray(value, np.float32).astype(_DTYPES[dtype])
        for key, tensor in layouts.to_torch_layout(value, layouts.diffusers_source(name), model.config.hidden_size).items():
            if pending and sum(t.nbytes for t in pending.values()) + tensor.nbytes > max_shard_bytes:
                write_shard()
            pending[key] = tensor
            total += tensor.nbytes
    write_shard()
    if len(shards) == 1:
        (directory / f"{WEIGHTS}-00001.safetensors").rename(directory / f"{WEIGHTS}.safetensors")
    else:
        weight_map = {}
        for i, keys in enumerate(shards, 1):
            file = f"{WEIGHTS}-{i:05d}-of-{len(shards):05d}.safetensors"
            (directory / f"{WEIGHTS}-{i:05d}.safetensors").rename(directory / file)
            weight_map.update(dict.fromkeys(keys, file))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / f"{WEIGHTS}.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")


def export_diffusers(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
                     max_shard_bytes: int = MAX_SHARD_BYTES, overwrite: bool = False, progress: bool = True,
                     axes_dim: Sequence[int] | None = None) -> Path:
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_diffusers(load_flux(src, axes_dim=axes_dim), tmp, dtype=dtype, max_shard_bytes=max_shard_bytes,
                        progress=progress)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = src_out_parser(PROG, __doc__, src_help="our checkpoint (student, packed or full precision), or anything load_flux reads",
                            out_help="output diffusers transformer folder")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="bfloat16", help="weight dtype (default bfloat16)")
    parser.add_argument("--max-shard-gb", type=float, default=MAX_SHARD_BYTES / 10**9,
                        help="largest weights file in GB (default 10, as diffusers); larger models are sharded with an index")
    add_axes_dim_flag(parser)
    args = parser.parse_args(argv)
    if not args.max_shard_gb > 0:
        parser.error(f"--max-shard-gb must be positive, got {args.max_shard_gb}")
    with reported_errors(PROG):
        out = export_diffusers(args.src, args.out, dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 10**9),
                               overwrite=args.overwrite, progress=not args.no_progress, axes_dim=args.axes_dim)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
