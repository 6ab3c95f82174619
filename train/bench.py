"""Training-step cost of `train.distill`: measured here, or compiled for a pod you do not have.

    python -m train.bench                                  # mid-size student: time and memory, measured here
    python -m train.bench --target 8xh100                  # flux-dev, 1024x1024, 2 samples per device, 8 H100s
    python -m train.bench --target v5p-64 --batch-per-device 4
    python -m train.bench --target v5p-64 --find-batch     # the largest batch per device that fits (4+ compiles)
    python -m train.bench --target v5p-8 --blocks 2 4      # 2 double + 4 single blocks (quick checks)

Mid-size: width 1024, 4 double + 8 single blocks, 1024 image + 256 text tokens, batch 1, on this
machine's first device; step time is the median of a few real steps, memory is XLA's buffer assignment
of the compiled step (arguments + outputs + temporaries), with and without remat.

--target NAME (see `flux_jax.targets`) compiles the real step of the `--preset` run (default flux-dev:
1024x1024, 512 text tokens, 28-step teacher trajectory, bf16 student, AdamW, remat, fsdp over every
chip) for the target with the accelerator's own compiler, deviceless, and prints per device:
arguments (teacher, student, optimizer state), temporaries, total, the chip's HBM and the headroom,
the step's model FLOPs (`step_model_flops`) and the step time they imply at --mfu, then one JSON line.
A compiler's figure, not a run; no GPU autotuning without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from flux_jax.config import PRESETS as FLUX_PRESETS
from flux_jax.config import FluxConfig
from flux_jax.model import Flux
from flux_jax.targets import (TARGETS, Target, TargetError, get_target, headroom, out_of_memory, target_devices,
                              total_bytes)
from flux_jax.ternary import QuantPolicy, build
from train.config import PRESETS, DistillConfig, MeshConfig
from train.data import expected_sampler_forwards
from train.distill import frozen, make_train_step, optimizer_for
from train.mesh import make_mesh

MID = FluxConfig(hidden_size=1024, num_heads=8, depth=4, depth_single_blocks=8)


def _abstract(flux: FluxConfig, config: DistillConfig):
    policy = QuantPolicy()
    flux = flux.replace(scan_blocks=config.scan_blocks)
    student_config = flux.replace(param_dtype=config.student_dtype, remat=config.remat)
    teacher = nnx.eval_shape(lambda: Flux(flux, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: build(student_config, "student", policy, rngs=nnx.Rngs(0)))
    optimizer = nnx.eval_shape(lambda: nnx.Optimizer(build(student_config, "student", policy, rngs=nnx.Rngs(0)),
                                                     optimizer_for(config), wrt=nnx.Param))
    return teacher, student, optimizer


def compile_step(flux: FluxConfig, config: DistillConfig, mesh):
    """The training step compiled for `mesh` on abstract inputs (nothing allocated; the mesh's devices
    may be a target's compile-only devices), and the seconds that lowering and compiling took."""
    began = time.perf_counter()
    with jax.set_mesh(mesh):
        teacher, student, optimizer = _abstract(flux, config)
        batch = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
        args = (jax.ShapeDtypeStruct((config.batch_size, config.text_length, flux.context_in_dim), jnp.float32, sharding=batch),
                jax.ShapeDtypeStruct((config.batch_size, flux.vec_in_dim), jnp.float32, sharding=batch), None,
                jax.eval_shape(lambda: jax.random.key(0)))
        graph, weights = frozen(teacher)
        step = make_train_step(config, text_length=config.text_length, teacher_graph=graph)
        compiled = step.lower(student, optimizer, weights, *args).compile()
    return compiled, time.perf_counter() - began


def step_memory(flux: FluxConfig, config: DistillConfig, mesh) -> int:
    """Bytes per device XLA assigns to one compiled training step (arguments + outputs + temporaries)."""
    return total_bytes(compile_step(flux, config, mesh)[0].memory_analysis())


def forward_flops(flux: FluxConfig, image_tokens: int, text_tokens: int) -> float:
    """Matmul FLOPs of one forward pass of one sample, counted from the architecture (as MaxText counts
    its model FLOPs): each block's linears on the tokens they see, attention's two L x L products,
    the embedders and the final layer. Compiled cost models cannot give it: they count a loop body
    (attention's query chunks, the sampler) once, and the GPU compiler gives none without a GPU."""
    h, m = flux.hidden_size, int(flux.hidden_size * flux.mlp_ratio)
    length = image_tokens + text_tokens
    side = 3 * h * h + h * h + 2 * h * m  # qkv, proj, MLP in and out: one stream of a double block
    single = h * (3 * h + m) + (h + m) * h  # linear1, linear2
    modulation = flux.depth * 2 * h * 6 * h + flux.depth_single_blocks * h * 3 * h  # on one vector a sample
    blocks = flux.depth * side * length + flux.depth_single_blocks * single * length + modulation
    attention = (flux.depth + flux.depth_single_blocks) * 2 * length * length * h  # q k^T and p v
    vectors = (256 * h + h * h) * (2 if flux.guidance_embed else 1) + flux.vec_in_dim * h + h * h + h * 2 * h
    embed = (flux.in_channels * h * image_tokens + flux.context_in_dim * h * text_tokens
             + h * flux.out_dim * image_tokens + vectors)  # img_in, txt_in, final linear; time, guidance, y, adaLN
    return 2.0 * (blocks + attention + embed)


def step_model_flops(flux: FluxConfig, config: DistillConfig, samples: int) -> float:
    """FLOPs of one training step by the architecture (the numerator of MFU), per sample: with the
    trajectory objective the teacher's sampler runs to the batch's largest k (each sample draws
    k ~ U{0 .. sampler_steps - 1}; `expected_sampler_forwards` of the global batch), the cache objective
    reads its states instead; then the teacher's target forward and the student's forward and backward
    (three forwards' worth; remat's recomputation is not counted)."""
    image_tokens = (config.latent_height // 2) * (config.latent_width // 2)
    sampler = expected_sampler_forwards(config.sampler_steps, config.batch_size) if config.objective == "trajectory" else 0.0
    return samples * (sampler + 1 + 3) * forward_flops(flux, image_tokens, config.text_length)


def target_step(target: Target, flux: FluxConfig, config: DistillConfig, batch_per_device: int, mfu: float) -> dict:
    """One step of `config` with `batch_per_device` samples per chip, compiled for `target` (fsdp over
    every chip): its per-device memory, headroom, FLOPs and the step time those imply at `mfu`."""
    devices = target_devices(target)
    mesh = make_mesh(MeshConfig(data=1, fsdp=len(devices), tensor=1), devices)
    config = dataclasses.replace(config, batch_size=batch_per_device * len(devices))
    flops = step_model_flops(flux, config, batch_per_device)
    result = {"target": target.name, "double_blocks": flux.depth, "single_blocks": flux.depth_single_blocks,
              "batch_per_device": batch_per_device, "image_tokens": (config.latent_height // 2) * (config.latent_width // 2),
              "text_tokens": config.text_length, "sampler_steps": config.sampler_steps, "hbm_bytes": target.hbm_bytes,
              "model_flops_per_device": flops, "mfu": mfu, "step_seconds_at_mfu": flops / (target.peak_flops * mfu)}
    began = time.perf_counter()
    try:
        compiled, seconds = compile_step(flux, config, mesh)
    except jax.errors.JaxRuntimeError as err:  # TPU compilers refuse what does not fit
        if out_of_memory(err) is None:
            raise
        return {**result, "fits": False, "refused": out_of_memory(err), "compile_seconds": time.perf_counter() - began}
    stats = compiled.memory_analysis()
    total = total_bytes(stats)
    return {**result, "argument_bytes": stats.argument_size_in_bytes, "temp_bytes": stats.temp_size_in_bytes,
            "output_bytes_not_aliased": stats.output_size_in_bytes - stats.alias_size_in_bytes,
            "total_bytes": total, "fits": total <= target.hbm_bytes, "headroom": 1 - total / target.hbm_bytes,
            "compile_seconds": seconds}


def largest_batch(measure, *, limit: int = 256) -> tuple[int, list[dict]]:
    """The largest batch per device whose step fits, and every compile's result. Compiles at 1 and 2
    samples, predicts the boundary from the growth per sample (memory is close to linear in the
    batch), then steps one sample at a time from the prediction: four compiles when it is right.
    `measure(batch)` returns a `target_step` dict."""
    results = {}

    def fits(batch: int) -> bool:
        if batch not in results:
            results[batch] = measure(batch)
        return results[batch]["fits"]

    def found(best: int) -> tuple[int, list[dict]]:
        return best, [results[b] for b in sorted(results)]

    if not fits(1) or not fits(2):
        return found(1 if 1 in results and results[1]["fits"] else 0)
    one, two = results[1], results[2]
    per_sample = two["total_bytes"] - one["total_bytes"]
    guess = limit if per_sample <= 0 else int((one["hbm_bytes"] - one["total_bytes"]) // per_sample) + 1
    guess = min(max(guess, 2), limit)
    if fits(guess):
        while guess < limit and fits(guess + 1):
            guess += 1
        return found(guess)
    while not fits(guess - 1):
        guess -= 1
    return found(guess - 1)


def _print_step(r: dict, target: Target) -> None:
    gb = 1e9
    if "refused" in r:
        print(f"  batch {r['batch_per_device']}/device: does not fit; the compiler refused it: {r['refused']} "
              f"(after {r['compile_seconds']:.0f} s)", flush=True)
        return
    print(f"  batch {r['batch_per_device']}/device: arguments {r['argument_bytes'] / gb:6.2f} GB (teacher, student, "
          f"optimizer state) + temporaries {r['temp_bytes'] / gb:6.2f} GB + outputs {r['output_bytes_not_aliased'] / gb:4.2f} GB"
          f" = {r['total_bytes'] / gb:6.2f} GB of {target.hbm_bytes / gb:.1f} GB: {headroom(r['total_bytes'], target)}; "
          f"{r['model_flops_per_device'] / 1e12:,.0f} model TFLOP/device, {r['step_seconds_at_mfu']:.1f} s/step at "
          f"{100 * r['mfu']:.0f}% MFU (compiled in {r['compile_seconds']:.0f} s)", flush=True)


def step_seconds(flux: FluxConfig, config: DistillConfig, repeats: int) -> float:
    """Median wall time of real steps on the first device (random weights)."""
    from flux_jax.ternary import quantize_model

    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1))
    with jax.set_mesh(mesh):
        teacher = Flux(flux, rngs=nnx.Rngs(0))
        student = quantize_model(teacher, config=flux.replace(param_dtype=config.student_dtype, remat=config.remat))
        optimizer = nnx.Optimizer(student, optimizer_for(config), wrt=nnx.Param)
        graph, weights = frozen(teacher)
        step = make_train_step(config, text_length=256, teacher_graph=graph)
        txt = jnp.zeros((config.batch_size, 256, flux.context_in_dim))
        y = jnp.zeros((config.batch_size, flux.vec_in_dim))
        jax.block_until_ready(step(student, optimizer, weights, txt, y, None, jax.random.key(0)))
        times = []
        for i in range(repeats):
            began = time.perf_counter()
            jax.block_until_ready(step(student, optimizer, weights, txt, y, None, jax.random.key(i + 1)))
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", metavar="NAME", help=f"compile for: {', '.join(TARGETS)}")
    parser.add_argument("--preset", default="flux-dev", choices=sorted(PRESETS), help="with --target: the run (train.distill preset)")
    parser.add_argument("--batch-per-device", type=int, default=2, metavar="N", help="with --target: samples per chip")
    parser.add_argument("--find-batch", action="store_true", help="with --target: the largest batch per device that fits")
    parser.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"),
                        help="with --target: this many double and single blocks instead of the model's")
    parser.add_argument("--mfu", type=float, default=0.4, help="with --target: model FLOP utilisation for the step time")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if not args.target and (args.blocks or args.find_batch):
        parser.error("--blocks and --find-batch go with --target")
    if args.batch_per_device < 1 or not 0 < args.mfu <= 1:
        parser.error("--batch-per-device must be at least 1 and --mfu in (0, 1]")
    if args.target:
        try:
            target = get_target(args.target)
            config = PRESETS[args.preset][1]
            flux = _preset_model(config)
            if args.blocks:
                flux = flux.replace(depth=args.blocks[0], depth_single_blocks=args.blocks[1])
            print(f"{args.preset} distillation step ({flux.depth} double + {flux.depth_single_blocks} single blocks), "
                  f"{config.latent_height * 8}x{config.latent_width * 8}, {config.text_length} text tokens, "
                  f"{config.sampler_steps}-step teacher trajectory, {config.student_dtype} student, remat {config.remat}, "
                  f"scan {config.scan_blocks}, "
                  f"fsdp over {target.describe()};")
            print(f"  the {target.platform.upper()} compiler's buffer assignment per device (deviceless: not a run"
                  f"{'; no GPU autotuning' if target.platform == 'cuda' else ''}):", flush=True)
            measure = lambda batch: target_step(target, flux, config, batch, args.mfu)  # noqa: E731
            if args.find_batch:
                best, results = largest_batch(measure)
                for r in results:
                    _print_step(r, target)
                print(f"  largest batch per device that fits on {target.name}: {best}")
                print(json.dumps({"largest_batch_per_device": best, "steps": results}))
            else:
                r = measure(args.batch_per_device)
                _print_step(r, target)
                print(json.dumps(r))
        except TargetError as err:
            parser.exit(1, f"train.bench: {err}\n")
        return
    base = DistillConfig(batch_size=1, latent_height=64, latent_width=64, sampler_steps=4, text_length=256)
    print(f"mid-size distillation step (width 1024, 4 double + 8 single blocks, 1024 + 256 tokens, batch 1, "
          f"bf16 teacher, f32 student) on {jax.devices()[0].device_kind}:")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    for remat in (False, True):
        config = dataclasses.replace(base, remat=remat)
        memory = step_memory(MID, config, mesh) / 2**30
        seconds = step_seconds(MID, config, args.repeats)
        print(f"  remat {str(remat):5}  {seconds:7.2f} s/step  {memory:7.2f} GiB")


def _preset_model(config: DistillConfig) -> FluxConfig:
    """The architecture a preset's teacher has: a FluxConfig preset by name, or FLUX.1-dev's."""
    name = config.teacher if config.teacher in FLUX_PRESETS else "flux-dev"
    return FluxConfig.preset(name)


if __name__ == "__main__":
    main()
