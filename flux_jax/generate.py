"""Text to image from the shell.

    python -m flux_jax.generate --model black-forest-labs/FLUX.1-dev --prompt "a red fox in the snow"
    python -m flux_jax.generate --model ckpt/flux-dev-bundle --prompt "a cat" --steps 28 --batch 2 --out images/

MODEL is anything `FluxPipeline.from_pretrained` reads (a diffusers pipeline folder, a cached hub id,
or our bundle with a full-precision or packed ternary transformer). Writes OUT/<seed>-<i>.png, shows a
progress bar over the denoising steps and prints the seconds per step (compilation excluded when
there are at least two steps).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from tqdm.auto import tqdm

from flux_jax.io.cli import reported_errors

PROG = "python -m flux_jax.generate"


def generate(model: str, prompt: str, *, out: str | os.PathLike, steps: int | None = None, guidance: float | None = None,
             height: int = 1024, width: int = 1024, seed: int = 0, batch: int = 1, dtype: str | None = None,
             negative_prompt: str | None = None, true_cfg_scale: float = 1.0, max_sequence_length: int | None = None,
             text_encoder_dtype: str | None = None, vae_tile_rows: int | None = None,
             progress: bool = True) -> tuple[list[Path], float]:
    """Writes `batch` PNGs for `prompt` into `out`; returns their paths and the seconds per step. The other
    arguments are FluxPipeline's (diffusers' names); `vae_tile_rows` decodes in exact tiles of that many
    rows (`AutoencoderKL.enable_tiling`)."""
    from flux_jax.io.files import atomic_file
    from flux_jax.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(model, dtype=dtype, text_encoder_dtype=text_encoder_dtype)
    if vae_tile_rows is not None:
        pipe.vae.enable_tiling(vae_tile_rows)
    steps = pipe.settings.default_steps if steps is None else steps
    kwargs = dict(height=height, width=width, steps=steps, guidance=guidance, seed=seed, num_images_per_prompt=batch,
                  negative_prompt=negative_prompt, true_cfg_scale=true_cfg_scale, max_sequence_length=max_sequence_length)
    bar = tqdm(total=steps, desc="denoising", unit="step", disable=not progress)
    stamps = []

    def on_step(step: int) -> None:
        stamps.append(time.perf_counter())
        bar.update(1)

    start = time.perf_counter()
    images = pipe(prompt, **kwargs, progress=on_step)
    bar.close()
    # Between the first and the last step's end: compilation and decoding are not counted.
    seconds_per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else stamps[0] - start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        path = out / f"{seed}-{i}.png"
        with atomic_file(path) as tmp:
            image.save(tmp, format="PNG")
        paths.append(path)
    return paths, seconds_per_step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="pipeline folder, cached hub id, or our bundle")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 28 for dev, 4 for schnell)")
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale for dev (default 3.5)")
    parser.add_argument("--height", type=int, default=1024)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=1, help="images per run")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    parser.add_argument("--negative-prompt", default=None, help="with --true-cfg-scale above 1: true classifier-free guidance")
    parser.add_argument("--true-cfg-scale", type=float, default=1.0, help="(two transformer passes a step; default 1: off)")
    parser.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens per prompt (default 512 dev, 256 schnell)")
    parser.add_argument("--text-encoder-dtype", choices=("int8",), default=None,
                        help="int8: weight-only int8 T5 and CLIP (default: as stored)")
    parser.add_argument("--vae-tile-rows", type=int, default=None, metavar="ROWS",
                        help="decode in exact tiles of ROWS image rows: a lower memory peak for more decoding work")
    parser.add_argument("--out", default="outputs", help="folder for the PNGs (default ./outputs)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error("--batch must be at least 1")
    if args.vae_tile_rows is not None and args.vae_tile_rows < 1:
        parser.error("--vae-tile-rows must be at least 1")
    with reported_errors(PROG, also=(ValueError,)):  # the pipeline checks its arguments with ValueError
        paths, seconds = generate(args.model, args.prompt, out=args.out, steps=args.steps, guidance=args.guidance,
                                  height=args.height, width=args.width, seed=args.seed, batch=args.batch, dtype=args.dtype,
                                  negative_prompt=args.negative_prompt, true_cfg_scale=args.true_cfg_scale,
                                  max_sequence_length=args.max_sequence_length, text_encoder_dtype=args.text_encoder_dtype,
                                  vae_tile_rows=args.vae_tile_rows)
    print(f"{seconds:.3f} s/step")
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
