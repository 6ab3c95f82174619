"""Pack a ternary model: 2-bit codes + float32 scales, loadable by `convert.load_flux`.

    python -m convert.pack_ternary runs/distill/student ckpt/flux-dev-packed          # a trained student
    python -m convert.pack_ternary black-forest-labs/FLUX.1-dev ckpt/flux-dev-ptq     # PTQ baseline
    python -m convert.pack_ternary ckpt/student ckpt/packed --archive --safetensors
    python -m convert.pack_ternary small-flux.safetensors ckpt/small-ptq --axes-dim 8,28,28       # head dim 64

SRC is a trained student (our checkpoint), or any full-precision checkpoint `load_flux` reads, which
is then ternarized without training (post-training quantization, the baseline the paper beats).
OUT is an Orbax checkpoint of the packed model; `--safetensors` adds OUT/packed.safetensors (the same
weights, for use outside JAX) and `--archive` OUT/archive.safetensors (base-3 codes, 1.6 bits a weight).
A BFL file stores no RoPE axes: one whose head dim is not FLUX's 128 needs `--axes-dim`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from convert.cli import src_out_parser
from convert.loader import add_axes_dim_flag, load_flux
from convert.orbax_io import write_flux
from convert.packed_io import write_packed_safetensors
from flux_jax.io.cli import reported_errors
from flux_jax.io.errors import CheckpointError
from flux_jax.io.files import atomic_directory
from flux_jax.ternary import QuantPolicy, describe, pack_model, quantize_model

PROG = "python -m convert.pack_ternary"


def pack_checkpoint(
    src: str | os.PathLike,
    out: str | os.PathLike,
    *,
    policy: QuantPolicy = QuantPolicy(),
    archive: bool = False,
    safetensors: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    axes_dim: Sequence[int] | None = None,
) -> Path:
    """Packs SRC (a student, or a full-precision model quantized with `policy`) into OUT, atomically.
    `axes_dim`: SRC's RoPE axes where it stores none (see `load_flux`)."""
    with atomic_directory(out, overwrite=overwrite) as tmp:
        model = load_flux(src, progress=progress, axes_dim=axes_dim)
        kind, _ = describe(model)
        if kind == "packed":
            raise CheckpointError(f"{src}: already a packed model")
        student = model if kind == "student" else quantize_model(model, policy)
        packed = pack_model(student)
        write_flux(packed, tmp)
        if safetensors:
            write_packed_safetensors(packed, tmp / "packed.safetensors")
        if archive:
            write_packed_safetensors(packed, tmp / "archive.safetensors", archive=True)
    return Path(out)


def main(argv: list[str] | None = None) -> None:
    parser = src_out_parser(PROG, __doc__, src_help="a ternary student checkpoint, or a full-precision checkpoint (PTQ)",
                            out_help="output folder")
    parser.add_argument("--per-tensor", action="store_true", help="PTQ only: one scale per tensor instead of per output channel")
    parser.add_argument("--archive", action="store_true", help="also write OUT/archive.safetensors (base-3 codes)")
    parser.add_argument("--safetensors", action="store_true", help="also write OUT/packed.safetensors")
    add_axes_dim_flag(parser)
    args = parser.parse_args(argv)
    with reported_errors(PROG):
        out = pack_checkpoint(args.src, args.out, policy=QuantPolicy(per_channel=not args.per_tensor), archive=args.archive,
                              safetensors=args.safetensors, overwrite=args.overwrite, progress=not args.no_progress,
                              axes_dim=args.axes_dim)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
