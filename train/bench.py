"""Training-step cost of `train.distill`: time and memory per device, with and without remat.

    python -m train.bench                        # mid-size student, measured here
    python -m train.bench --flux-dev 8           # flux-dev per-device memory on an 8-device mesh (abstract)
    XLA_FLAGS=--xla_force_host_platform_device_count=32 python -m train.bench --flux-dev 32   # on CPU
    python -m train.bench --flux-dev 8 --blocks 2 4   # the same step with 2 double + 4 single blocks

Mid-size: width 1024, 4 double + 8 single blocks, 1024 image + 256 text tokens, batch 1, on this
machine's first device; step time is the median of a few real steps, memory is XLA's buffer assignment
of the compiled step (arguments + outputs + temporaries). --flux-dev N compiles the real flux-dev step
(1024x1024, batch N, 28-step teacher trajectory, bf16 student) for N devices (fsdp) on abstract
inputs, nothing allocated, and prints the buffer assignment split into arguments (teacher, student
and optimizer state: what the step keeps resident between steps), temporaries, and the total, with the
compile time; run it where N devices exist, or on CPU with XLA_FLAGS=--xla_force_host_platform_device_count=N
(one CPU compile of the full model takes about 4 minutes on an idle core; there are two, remat on
and off). The CPU backend's temporaries are not an accelerator's, and most likely far above them: they
hold float32 copies of the bf16 weights (its dots run in float32) and come from a schedule with no
memory limit (no rematerialisation, weights all-gathered early and held). The arguments are the same
on every backend. --blocks compiles the step with fewer blocks (compile-time and linearity checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.config import FluxConfig
from flux_jax.model import Flux
from flux_jax.ternary import QuantPolicy, build
from train.config import DistillConfig, MeshConfig
from train.distill import frozen, make_train_step, optimizer_for
from train.mesh import make_mesh

MID = FluxConfig(hidden_size=1024, num_heads=8, depth=4, depth_single_blocks=8)


def _abstract(flux: FluxConfig, config: DistillConfig):
    policy = QuantPolicy()
    student_config = flux.replace(param_dtype=config.student_dtype, remat=config.remat)
    teacher = nnx.eval_shape(lambda: Flux(flux, rngs=nnx.Rngs(0)))
    student = nnx.eval_shape(lambda: build(student_config, "student", policy, rngs=nnx.Rngs(0)))
    optimizer = nnx.eval_shape(lambda: nnx.Optimizer(build(student_config, "student", policy, rngs=nnx.Rngs(0)),
                                                     optimizer_for(config), wrt=nnx.Param))
    return teacher, student, optimizer


def step_analysis(flux: FluxConfig, config: DistillConfig, mesh):
    """XLA's per-device buffer assignment of one compiled training step (`memory_analysis()`), and the
    seconds that lowering and compiling took."""
    text = 256
    began = time.perf_counter()
    with jax.set_mesh(mesh):
        teacher, student, optimizer = _abstract(flux, config)
        batch = config.batch_size
        args = (jax.ShapeDtypeStruct((batch, text, flux.context_in_dim), jnp.float32),
                jax.ShapeDtypeStruct((batch, flux.vec_in_dim), jnp.float32), None, jax.random.key(0))
        graph, weights = frozen(teacher)
        step = make_train_step(config, text_length=text, teacher_graph=graph)
        stats = step.lower(student, optimizer, weights, *args).compile().memory_analysis()
    return stats, time.perf_counter() - began


def total_bytes(stats) -> int:
    """Arguments + outputs (less those aliased to donated arguments) + temporaries."""
    return stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes + stats.temp_size_in_bytes


def step_memory(flux: FluxConfig, config: DistillConfig, mesh) -> int:
    """Bytes per device XLA assigns to one compiled training step (arguments + outputs + temporaries)."""
    return total_bytes(step_analysis(flux, config, mesh)[0])


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
    parser.add_argument("--flux-dev", type=int, metavar="N", help="flux-dev per-device memory on N devices instead")
    parser.add_argument("--blocks", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"),
                        help="with --flux-dev: this many double and single blocks instead of 19 and 38")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    base = DistillConfig(batch_size=1, latent_height=64, latent_width=64, sampler_steps=4)
    if args.blocks and not args.flux_dev:
        parser.error("--blocks goes with --flux-dev")
    if args.flux_dev:
        if len(jax.devices()) < args.flux_dev:
            parser.error(f"{args.flux_dev} devices asked for, {len(jax.devices())} present")
        mesh = make_mesh(MeshConfig(data=1, fsdp=args.flux_dev, tensor=1), jax.devices()[: args.flux_dev])
        config = dataclasses.replace(base, batch_size=args.flux_dev, latent_height=128, latent_width=128,
                                     student_dtype="bfloat16", remat=True, sampler_steps=28)
        flux = FluxConfig.preset("flux-dev")
        if args.blocks:
            flux = flux.replace(depth=args.blocks[0], depth_single_blocks=args.blocks[1])
        device = jax.devices()[0]
        print(f"flux-dev distillation step ({flux.depth} double + {flux.depth_single_blocks} single blocks), "
              f"1024x1024, batch {config.batch_size}, {config.sampler_steps}-step teacher trajectory, bf16 student, "
              f"fsdp={args.flux_dev}, {device.platform} ({device.device_kind}) buffer assignment per device:")
        for remat in (True, False):
            stats, seconds = step_analysis(flux, dataclasses.replace(config, remat=remat), mesh)
            gib = 2**30
            print(f"  remat {str(remat):5}  total {total_bytes(stats) / gib:8.2f} GiB  = arguments "
                  f"{stats.argument_size_in_bytes / gib:6.2f} (teacher, student, optimizer state) + temporaries "
                  f"{stats.temp_size_in_bytes / gib:8.2f} + outputs not aliased "
                  f"{(stats.output_size_in_bytes - stats.alias_size_in_bytes) / gib:5.2f}   (compiled in {seconds:.0f} s)",
                  flush=True)
        if device.platform == "cpu":
            print("  CPU backend: temporaries include float32 copies of bf16 weights and a schedule with no memory limit; "
                  "not an accelerator's figure; compile there for that (see docs/benchmarks.md)")
        return
    print(f"mid-size distillation step (width 1024, 4 double + 8 single blocks, 1024 + 256 tokens, batch 1, "
          f"bf16 teacher, f32 student) on {jax.devices()[0].device_kind}:")
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    flux = MID
    for remat in (False, True):
        config = dataclasses.replace(base, remat=remat)
        memory = step_memory(flux, config, mesh) / 2**30
        seconds = step_seconds(flux, config, args.repeats)
        print(f"  remat {str(remat):5}  {seconds:7.2f} s/step  {memory:7.2f} GiB")


if __name__ == "__main__":
    main()
