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
from convert.atomic import atomic_directory
from convert.cli import reported_errors, src_out_parser
from convert.errors import CheckpointError
from convert.loader import add_axes_dim_flag, load_flux
from flux_jax.model import Flux
from flux_jax.ternary import dense_leaves

PROG = "python -m convert.export_diffusers"
_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}


def write_diffusers(model: Flux, directory: Path, *, dtype: str = "bfloat16", progress: bool = False) -> None:
    """Writes config.json and diffusion_pytorch_model.safetensors into the existing `directory`."""
    try:
        config_json = layouts.diffusers_config_dict(model.config)
    except ValueError as err:
        raise CheckpointError(f"cannot export to diffusers: {err}") from None
    tensors = {}
    leaves = dense_leaves(model)
    for name, value in tqdm(leaves, desc="exporting", unit="tensor", disable=not progress):
        value = np.asarray(value, np.float32).astype(_DTYPES[dtype])
        tensors.update(layouts.to_torch_layout(value, layouts.diffusers_source(name), model.config.hidden_size))
    save_file(tensors, str(directory / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")


def export_diffusers(src: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "bfloat16",
                     overwrite: bool = False, progress: bool = True, axes_dim: Sequence[int] | None = None) -> Path:
    with atomic_directory(out, overwrite=overwrite) as tmp:
        write_diffusers(load_flux(src, axes_dim=axes_dim), tmp, dtype=dtype, progress=progress)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = src_out_parser(PROG, __doc__, src_help="our checkpoint (student, packed or full precision), or anything load_flux reads",
                            out_help="output diffusers transformer folder")
    parser.add_argument("--dtype", choices=tuple(_DTYPES), default="bfloat16", help="weight dtype (default bfloat16)")
    add_axes_dim_flag(parser)
    args = parser.parse_args(argv)
    with reported_errors(PROG):
        out = export_diffusers(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                               axes_dim=args.axes_dim)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
