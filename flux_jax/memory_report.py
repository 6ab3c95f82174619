"""Storage and inference memory of a FLUX transformer, bf16 against packed ternary, without allocating it.

    python -m flux_jax.memory_report --config flux-dev
    python -m flux_jax.memory_report --config flux-dev --json     # last line: one JSON object

Storage comes from `ternary_report` (exact counts). Peak device memory of one forward pass is every
weight resident plus the largest transient of any stage (embedders + final layer, one double block,
one single block), each from XLA's buffer assignment of that stage compiled on abstract inputs
(`jax.jit(...).lower(...).compile().memory_analysis()`) on this machine's backend. Stages, not the
whole program: on CPU, XLA converts every bf16 weight to float32 for its dots and schedules those
conversions early, so a whole-program figure measures that CPU artifact rather than the model.
"""

from __future__ import annotations

import argparse
import json
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.config import PRESETS, FluxConfig
from flux_jax.ternary import QuantPolicy, build, ternary_report

PAPER_STORAGE_RATIO = 7.7
PAPER_MEMORY_RATIO = 5.1


def _bytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _stage_transient_bytes(module: nnx.Module, fn, *activations: jax.ShapeDtypeStruct) -> int:
    """Bytes one stage needs beyond its weights: activations in, activations out, temporaries,
    from XLA's buffer assignment of that stage compiled alone."""
    graphdef, state = nnx.split(module)
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
    stats = jax.jit(lambda s, *a: fn(nnx.merge(graphdef, s), *a)).lower(state, *activations).compile().memory_analysis()
    return (stats.argument_size_in_bytes - _bytes(state) + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)


def peak_forward_bytes(config: FluxConfig, kind: str, policy: QuantPolicy | None = None, *,
                       image_tokens: int = 4096, text_tokens: int = 512, batch: int = 1) -> int:
    """Peak bytes of one forward pass run stage by stage: every weight resident (bf16, or packed codes
    and scales) plus the largest transient of any stage: the embedders and final layer together, one
    double block, one single block. Each transient comes from `memory_analysis()` of that stage
    compiled on abstract inputs, so nothing is allocated and flux-dev fits on a laptop."""
    model = nnx.eval_shape(lambda: build(config, kind, policy, rngs=nnx.Rngs(0)))
    dt, f32, h = config.dtype, jnp.float32, config.hidden_size
    sds = jax.ShapeDtypeStruct
    length = image_tokens + text_tokens
    pe = (sds((batch, length, 1, config.head_dim // 2), f32),) * 2
    vec = sds((batch, h), dt)
    inputs = (
        sds((batch, image_tokens, config.in_channels), dt), sds((batch, image_tokens, 3), f32),
        sds((batch, text_tokens, config.context_in_dim), dt), sds((batch, text_tokens, 3), f32),
        sds((batch,), f32), sds((batch, config.vec_in_dim), dt),
        sds((batch,), f32) if config.guidance_embed else None,
    )
    outer = nnx.eval_shape(lambda: build(config.replace(depth=0, depth_single_blocks=0), kind, policy, rngs=nnx.Rngs(0)))
    transients = [_stage_transient_bytes(outer, lambda m, *x: m(*x), *inputs)]
    if config.depth:
        transients.append(_stage_transient_bytes(
            model.double_blocks[0], lambda b, img, txt, v, p: b(img, txt, v, p),
            sds((batch, image_tokens, h), dt), sds((batch, text_tokens, h), dt), vec, pe))
    if config.depth_single_blocks:
        transients.append(_stage_transient_bytes(
            model.single_blocks[0], lambda b, x, v, p: b(x, v, p), sds((batch, length, h), dt), vec, pe))
    return _bytes(nnx.state(model)) + max(transients)


def memory_report(config: FluxConfig, policy: QuantPolicy = QuantPolicy(), *, image_tokens: int = 4096,
                  text_tokens: int = 512) -> dict[str, float]:
    """`ternary_report` plus peak forward memory of the bf16 and packed models and their ratio."""
    config = config.with_dtype("bfloat16")
    report = ternary_report(config, policy)
    peak_bf16 = peak_forward_bytes(config, "flux", image_tokens=image_tokens, text_tokens=text_tokens)
    peak_packed = peak_forward_bytes(config, "packed", policy, image_tokens=image_tokens, text_tokens=text_tokens)
    return {**report, "image_tokens": image_tokens, "text_tokens": text_tokens,
            "peak_bytes_bf16": peak_bf16, "peak_bytes_packed": peak_packed, "memory_ratio": peak_bf16 / peak_packed}


def _gb(n: float) -> str:
    return f"{n / 1e9:8.3f} GB"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flux_jax.memory_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, choices=sorted(PRESETS), help="architecture preset")
    parser.add_argument("--per-tensor", action="store_true", help="one scale per tensor instead of per output channel")
    parser.add_argument("--image-tokens", type=int, default=4096, help="4096 = a 1024x1024 image")
    parser.add_argument("--text-tokens", type=int, default=512)
    parser.add_argument("--json", action="store_true", help="end with one JSON line of every figure")
    args = parser.parse_args(argv)
    if min(args.image_tokens, args.text_tokens) < 1:
        parser.error("--image-tokens and --text-tokens must be at least 1")
    r = memory_report(FluxConfig.preset(args.config), QuantPolicy(per_channel=not args.per_tensor),
                      image_tokens=args.image_tokens, text_tokens=args.text_tokens)
    print(f"{args.config}: {r['params_total']:,} parameters, {r['params_ternary']:,} ternary ({100 * r['ternary_fraction']:.2f}%)")
    print(f"storage  bf16 {_gb(r['bytes_bf16'])}   packed {_gb(r['bytes_packed'])}   archive {_gb(r['bytes_archive'])}")
    print(f"         packed {r['storage_ratio_packed']:.2f}x smaller (paper {PAPER_STORAGE_RATIO}x), "
          f"archive {r['storage_ratio_archive']:.2f}x")
    print(f"memory   one forward, {args.image_tokens} image + {args.text_tokens} text tokens, batch 1, "
          f"{jax.devices()[0].platform} buffer assignment:")
    print(f"         bf16 {_gb(r['peak_bytes_bf16'])}   packed {_gb(r['peak_bytes_packed'])}   "
          f"{r['memory_ratio']:.2f}x less (paper {PAPER_MEMORY_RATIO}x)")
    if args.json:
        print(json.dumps(r))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
