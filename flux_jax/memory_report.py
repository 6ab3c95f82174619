"""Storage and inference memory of a FLUX transformer, bf16 against packed ternary, without allocating it.

    python -m flux_jax.memory_report --config flux-dev --target h100     # the H100 compiler's figure
    python -m flux_jax.memory_report --config flux-dev --target v5e-1    # the TPU compiler's figure
    python -m flux_jax.memory_report --config flux-dev                   # this machine's backend, by stage
    python -m flux_jax.memory_report --config flux-dev --json            # last line: one JSON object
    python -m flux_jax.memory_report --pipeline --target v5e-1           # the whole text-to-image pipeline

Storage comes from `ternary_report` (exact counts). With `--target` (see `flux_jax.targets`), the whole
forward program is compiled for one chip of the target by the accelerator's own compiler, deviceless,
and its buffer assignment (`memory_analysis()`: arguments + outputs + temporaries) is the peak: a
compiler's figure, not a run. Without it, on this machine's backend, the peak is every weight resident
plus the largest transient of any stage (embedders + final layer, one double block, one single
block), each stage compiled alone: on CPU, XLA converts every bf16 weight to float32 for its dots and
schedules those conversions early, so a whole-program CPU figure would measure that artifact.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.config import PRESETS, FluxConfig
from flux_jax.pipeline_memory import PipelineShapes, pipeline_memory_report
from flux_jax.targets import (TARGETS, Target, TargetError, compile_abstract, get_target, headroom, one_chip_mesh,
                              out_of_memory, total_bytes, tree_bytes)
from flux_jax.ternary import QuantPolicy, build, runtime_layout, ternary_report

PAPER_STORAGE_RATIO = 7.7
PAPER_MEMORY_RATIO = 5.1


def _stage_transient_bytes(module: nnx.Module, fn, *activations: jax.ShapeDtypeStruct) -> int:
    """Bytes one stage needs beyond its weights: activations in, activations out, temporaries,
    from XLA's buffer assignment of that stage compiled alone."""
    stats = compile_abstract([module], fn, activations).memory_analysis()
    return total_bytes(stats) - tree_bytes(nnx.state(module))


def forward_inputs(config: FluxConfig, batch: int, image_tokens: int, text_tokens: int, sharding=None):
    """Abstract arguments of `Flux.__call__` (img, img_ids, txt, txt_ids, timesteps, y, guidance)."""
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)  # noqa: E731
    dt, f32 = config.dtype, jnp.float32
    return (
        sds((batch, image_tokens, config.in_channels), dt), sds((batch, image_tokens, 3), f32),
        sds((batch, text_tokens, config.context_in_dim), dt), sds((batch, text_tokens, 3), f32),
        sds((batch,), f32), sds((batch, config.vec_in_dim), dt),
        sds((batch,), f32) if config.guidance_embed else None,
    )


def peak_forward_bytes(config: FluxConfig, kind: str, policy: QuantPolicy | None = None, *,
                       image_tokens: int = 4096, text_tokens: int = 512, batch: int = 1) -> int:
    """Peak bytes of one forward pass run stage by stage on this machine's backend: every weight
    resident (bf16, or packed codes and scales) plus the largest transient of any stage: the embedders
    and final layer together, one double block, one single block. Each transient comes from
    `memory_analysis()` of that stage compiled on abstract inputs, so nothing is allocated."""
    model = nnx.eval_shape(lambda: build(config, kind, policy, rngs=nnx.Rngs(0)))
    dt, f32, h = config.dtype, jnp.float32, config.hidden_size
    sds = jax.ShapeDtypeStruct
    length = image_tokens + text_tokens
    pe = (sds((batch, length, 1, config.head_dim // 2), f32),) * 2
    vec = sds((batch, h), dt)
    inputs = forward_inputs(config, batch, image_tokens, text_tokens)
    outer = nnx.eval_shape(lambda: build(config.replace(depth=0, depth_single_blocks=0), kind, policy, rngs=nnx.Rngs(0)))
    transients = [_stage_transient_bytes(outer, lambda m, *x: m(*x), *inputs)]
    if config.depth:
        transients.append(_stage_transient_bytes(
            model.double_blocks[0], lambda b, img, txt, v, p: b(img, txt, v, p),
            sds((batch, image_tokens, h), dt), sds((batch, text_tokens, h), dt), vec, pe))
    if config.depth_single_blocks:
        transients.append(_stage_transient_bytes(
            model.single_blocks[0], lambda b, x, v, p: b(x, v, p), sds((batch, length, h), dt), vec, pe))
    return tree_bytes(nnx.state(model)) + max(transients)


def compiled_forward(config: FluxConfig, kind: str, policy: QuantPolicy | None, target: Target, *,
                     image_tokens: int = 4096, text_tokens: int = 512, batch: int = 1):
    """One forward pass, the whole program, compiled for one chip of `target` by its own compiler
    (deviceless: nothing allocated, no such chip needed). Returns the compiled executable."""
    mesh = one_chip_mesh(target)
    one_chip = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with jax.set_mesh(mesh):
        # packed codes in the layout the loaders give on that platform (tiled: kernels read x as it is)
        layout = runtime_layout(target.platform)
        model = nnx.eval_shape(lambda: build(config, kind, policy, layout=layout, rngs=nnx.Rngs(0)))
        inputs = forward_inputs(config, batch, image_tokens, text_tokens, one_chip)
        return compile_abstract([model], lambda m, *a: m(*a), inputs, one_chip)


def memory_report(config: FluxConfig, policy: QuantPolicy = QuantPolicy(), *, image_tokens: int = 4096,
                  text_tokens: int = 512, target: Target | None = None) -> dict:
    """`ternary_report` plus peak forward memory of the bf16 and packed models and their ratio: compiled
    whole for one chip of `target`, or stage by stage on this machine's backend when it is None."""
    config = config.with_dtype("bfloat16")
    report = ternary_report(config, policy)
    tokens = dict(image_tokens=image_tokens, text_tokens=text_tokens)
    if target is None:
        peak_bf16 = peak_forward_bytes(config, "flux", **tokens)
        peak_packed = peak_forward_bytes(config, "packed", policy, **tokens)
        measured = {"backend": jax.devices()[0].platform}
    else:
        measured = {"target": target.name, "hbm_bytes": target.hbm_bytes}
        peaks = {}
        for kind, name in (("flux", "bf16"), ("packed", "packed")):
            try:
                stats = compiled_forward(config, kind, policy, target, **tokens).memory_analysis()
            except jax.errors.JaxRuntimeError as err:
                if out_of_memory(err) is None:
                    raise
                peaks[name], measured[f"refused_{name}"] = None, out_of_memory(err)
                continue
            peaks[name] = total_bytes(stats)
            measured.update({f"{part}_bytes_{name}": getattr(stats, f"{part}_size_in_bytes") for part in ("argument", "temp")})
        peak_bf16, peak_packed = peaks["bf16"], peaks["packed"]
    ratio = peak_bf16 / peak_packed if peak_bf16 and peak_packed else None
    return {**report, **tokens, **measured, "peak_bytes_bf16": peak_bf16, "peak_bytes_packed": peak_packed,
            "memory_ratio": ratio}


def _gb(n: float) -> str:
    return f"{n / 1e9:8.3f} GB"


def _print_pipeline(r: dict, config: str, target: Target, as_json: bool) -> None:
    tiles = f"in exact tiles of {r['vae_tile_rows']} rows" if r["vae_tile_rows"] else "whole"
    print(f"text to image, {config} components, {r['height']}x{r['width']}, {r['steps']} steps, batch 1: encode, "
          f"denoise, decode ({tiles}) compiled as one program for one chip of {target.describe()}")
    print(f"(the {target.platform.upper()} compiler's buffer assignment, deviceless: not a run; every weight resident)")
    for v in r["variants"]:
        weights = " + ".join(f"{name} {v[f'{name}_weight_bytes'] / 1e9:.2f}" for name in ("transformer", "t5", "clip", "vae"))
        print(f"{v['variant']:24} weights {_gb(v['weight_bytes'])} ({weights})")
        if v["peak_bytes"] is None:
            print(f"{'':24} does not fit one chip; the compiler refused it: {v['refused']}")
            continue
        print(f"{'':24} peak    {_gb(v['peak_bytes'])}: {headroom(v['peak_bytes'], target)} in {target.hbm_bytes / 1e9:.1f} GB")
        beyond = ", ".join(f"{s} {v[f'{s}_beyond_weights_bytes'] / 1e9:.3f}" for s in ("encode", "denoise", "decode"))
        print(f"{'':24} beyond the weights, each stage alone (GB): {beyond}; the peak is in {v['peak_stage']}")
        if "decode_whole_beyond_weights_bytes" in v:
            print(f"{'':24} (decoding whole instead of in tiles: {v['decode_whole_beyond_weights_bytes'] / 1e9:.3f})")
    if as_json:
        print(json.dumps(r))
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_jax.memory_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="flux-dev", choices=sorted(PRESETS), help="architecture preset (flux-dev)")
    parser.add_argument("--target", metavar="NAME", help=f"compile for one chip of: {', '.join(TARGETS)}")
    parser.add_argument("--per-tensor", action="store_true", help="one scale per tensor instead of per output channel")
    parser.add_argument("--image-tokens", type=int, default=4096, help="4096 = a 1024x1024 image")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--pipeline", action="store_true",
                        help="the whole text-to-image pipeline (T5-XXL, CLIP, transformer, VAE) instead of one "
                             "forward; needs --target")
    parser.add_argument("--height", type=int, default=1024, help="with --pipeline: image height")
    parser.add_argument("--width", type=int, default=1024, help="with --pipeline: image width")
    parser.add_argument("--steps", type=int, default=28, help="with --pipeline: denoising steps")
    parser.add_argument("--vae-tile-rows", type=int, default=128, metavar="ROWS",
                        help="with --pipeline: decode in exact tiles of ROWS rows (default 128; 0: whole)")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every figure")
    args = parser.parse_args(argv)
    if min(args.image_tokens, args.text_tokens) < 1:
        parser.error("--image-tokens and --text-tokens must be at least 1")
    if args.pipeline and not args.target:
        parser.error("--pipeline needs --target: the pipeline's figure comes from an accelerator's compiler")
    if args.pipeline and (args.height % 16 or args.width % 16 or min(args.height, args.width, args.steps) < 1):
        parser.error("--height and --width must be positive multiples of 16, --steps at least 1")
    if args.vae_tile_rows < 0:
        parser.error("--vae-tile-rows must be 0 (decode whole) or more")
    try:
        target = get_target(args.target) if args.target else None
        if args.pipeline:
            shapes = PipelineShapes(transformer=FluxConfig.preset(args.config), height=args.height, width=args.width,
                                    steps=args.steps, vae_tile_rows=args.vae_tile_rows or None)
            _print_pipeline(pipeline_memory_report(target, shapes, policy=QuantPolicy(per_channel=not args.per_tensor)),
                            args.config, target, args.json)
            return
        r = memory_report(FluxConfig.preset(args.config), QuantPolicy(per_channel=not args.per_tensor),
                          image_tokens=args.image_tokens, text_tokens=args.text_tokens, target=target)
    except TargetError as err:
        parser.exit(1, f"memory_report: {err}\n")
    print(f"{args.config}: {r['params_total']:,} parameters, {r['params_ternary']:,} ternary ({100 * r['ternary_fraction']:.2f}%)")
    print(f"storage  bf16 {_gb(r['bytes_bf16'])}   packed {_gb(r['bytes_packed'])}   archive {_gb(r['bytes_archive'])}")
    print(f"         packed {r['storage_ratio_packed']:.2f}x smaller (paper {PAPER_STORAGE_RATIO}x), "
          f"archive {r['storage_ratio_archive']:.2f}x")
    tokens = f"one forward, {args.image_tokens} image + {args.text_tokens} text tokens, batch 1"
    if target is None:
        print(f"memory   {tokens}, {r['backend']} buffer assignment, stage by stage:")
    else:
        print(f"memory   {tokens}, whole program compiled for one chip of {target.describe()}")
        print(f"         (the {target.platform.upper()} compiler's buffer assignment, deviceless: not a run"
              f"{'; no GPU autotuning' if target.platform == 'cuda' else ''})")
    if r["memory_ratio"] is not None:
        print(f"         bf16 {_gb(r['peak_bytes_bf16'])}   packed {_gb(r['peak_bytes_packed'])}   "
              f"{r['memory_ratio']:.2f}x less (paper {PAPER_MEMORY_RATIO}x)")
    if target is not None:
        for name in ("bf16", "packed"):
            if r[f"peak_bytes_{name}"] is None:
                print(f"         {name:6} does not fit one chip; the compiler refused it: {r[f'refused_{name}']}")
                continue
            print(f"         {name:6} {_gb(r[f'peak_bytes_{name}'])} = arguments {_gb(r[f'argument_bytes_{name}'])} + "
                  f"temporaries {_gb(r[f'temp_bytes_{name}'])}: {headroom(r[f'peak_bytes_{name}'], target)} "
                  f"in {target.hbm_bytes / 1e9:.1f} GB")
    if args.json:
        print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
