"""Convert a PyTorch FLUX transformer checkpoint into one of our Orbax checkpoints.

    python -m convert.torch_to_flax black-forest-labs/FLUX.1-dev ~/ckpt/flux-dev
    python -m convert.torch_to_flax flux1-schnell.safetensors ~/ckpt/flux-schnell --dtype bfloat16

    python -m convert.torch_to_flax --pipeline black-forest-labs/FLUX.1-dev ckpt/flux-dev-bundle
    python -m convert.torch_to_flax --pipeline black-forest-labs/FLUX.1-dev ckpt/dev-int8 --text-encoder-dtype int8

SRC is anything `convert.load_flux` takes; with --pipeline, a whole pipeline folder (or hub id), which
becomes one bundle for `flux_jax.FluxPipeline`: the transformer converted, the other components copied
(the text encoders stored with int8 weights under --text-encoder-dtype int8: T5-XXL in 4.9 GB, not 9.5).
OUT appears only when the whole conversion succeeded.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from convert.cli import src_out_parser
from convert.loader import add_axes_dim_flag, load_flux
from convert.orbax_io import write_flux
from convert.pipeline_io import write_bundle
from flux_jax.io.cli import reported_errors
from flux_jax.io.files import atomic_directory

PROG = "python -m convert.torch_to_flax"


def convert_checkpoint(
    src: str | os.PathLike, out: str | os.PathLike, *, dtype: str | None = None, overwrite: bool = False,
    progress: bool = True, pipeline: bool = False, axes_dim: Sequence[int] | None = None,
    text_encoder_dtype: str | None = None,
) -> Path:
    """Streams SRC's tensors into a Flax model (one model copy plus one tensor in host memory) and
    writes it to OUT as Orbax + flux_jax.json, through a temporary folder renamed at the end.
    `axes_dim`: SRC's RoPE axes where it stores none (see `load_flux`)."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if pipeline:
            write_bundle(src, tmp, dtype=dtype, progress=progress, text_encoder_dtype=text_encoder_dtype)
        else:
            write_flux(load_flux(src, dtype=dtype, progress=progress, axes_dim=axes_dim), tmp)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = src_out_parser(PROG, __doc__, src_help="BFL .safetensors file, diffusers transformer or pipeline folder, cached hub id, or our checkpoint",
                            out_help="output folder")
    parser.add_argument("--pipeline", action="store_true", help="SRC is a whole pipeline folder: write a FluxPipeline bundle")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="parameter and compute dtype (default: float32 stays float32, anything else becomes bfloat16)")
    parser.add_argument("--text-encoder-dtype", choices=("int8",), default=None,
                        help="with --pipeline: store the text encoders' linear weights as int8 (absmax per output channel)")
    add_axes_dim_flag(parser)
    args = parser.parse_args(argv)
    if args.pipeline and args.axes_dim:
        parser.error("--axes-dim is for a single transformer checkpoint; a pipeline's config.json holds its axes")
    if args.text_encoder_dtype and not args.pipeline:
        parser.error("--text-encoder-dtype is for a pipeline bundle (--pipeline)")
    with reported_errors(PROG):
        out = convert_checkpoint(args.src, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.no_progress,
                                 pipeline=args.pipeline, axes_dim=args.axes_dim, text_encoder_dtype=args.text_encoder_dtype)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
