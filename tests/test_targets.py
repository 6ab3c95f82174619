"""The accelerators' own compilers, deviceless: the TPU compiler (libtpu, in the test extra) and the
CUDA compiler for an H100 (the Mosaic GPU kernel) and an A100 (Triton): the cuda extra; tests marked
`h100_compiler` run in CI's CUDA venvs, with JAX_PLATFORMS=cpu. Kernels, the packed model and a
reduced-depth training step are compiled, not just lowered."""

import dataclasses
import importlib.util
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from flux_jax import Flux, FluxConfig
from flux_jax.layers import attention
from flux_jax.memory_report import compiled_forward, memory_report
from flux_jax.targets import TargetError, get_target, headroom, target_devices
from flux_jax.ternary import QuantPolicy
from pallas_kernels import ternary_matmul
from pallas_kernels.packing import tiled_rows
from tests.test_ternary_matmul import FLUX_DEV_LAYERS, ODD
from train.bench import largest_batch, target_step
from train.config import DistillConfig

h100_compiler = pytest.mark.h100_compiler
TPU_1, TPU_8, GPU_1, GPU_8 = "v5e-1", "v5e-8", "h100", "8xh100"
PLATFORMS = [pytest.param(TPU_1, "tpu_custom_call", id="tpu"),
             pytest.param(GPU_1, "mosaic_gpu", id="h100", marks=h100_compiler),
             pytest.param("a100", "__gpu$xla.gpu.triton", id="a100", marks=h100_compiler)]
# After compilation the Triton kernel is a custom call to its own cubin; either name is the kernel.
COMPILED_MARKERS = {"tpu_custom_call": ("tpu_custom_call",), "mosaic_gpu": ("mosaic_gpu",),
                    "__gpu$xla.gpu.triton": ("__gpu$xla.gpu.triton", "triton")}


def one_chip(name):
    devices = target_devices(get_target(name))[:1]
    return jax.sharding.Mesh(devices, ("x",))


def test_unknown_targets_and_missing_compilers_are_named(monkeypatch):
    with pytest.raises(TargetError, match="unknown target 'v9-1'; known targets: v5e-1"):
        get_target("v9-1")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TargetError, match=r'needs the CUDA compiler: pip install -e "\.\[cuda\]"'):
        target_devices(get_target("8xh100"))
    with pytest.raises(TargetError, match=r'needs the TPU compiler: pip install -e "\.\[tpu\]"'):
        target_devices(get_target("v5p-64"))


@h100_compiler
def test_the_cuda_plugin_without_a_gpu_asks_for_jax_platforms_cpu():
    """Run where there is no GPU (as CI is): without JAX_PLATFORMS=cpu the CUDA plugin fails at cuInit."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    done = subprocess.run([sys.executable, "-m", "train.bench", "--target", GPU_1], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1].startswith("train.bench: the CUDA plugin did not start")
    assert "set JAX_PLATFORMS=cpu before Python starts" in done.stderr


def test_headroom_is_against_one_chip():
    v5e = get_target("v5e-1")
    assert headroom(12 * 10**9, v5e) == "fits with 25% headroom"
    assert headroom(17 * 10**9, v5e) == "does not fit by 1.00 GB"


@pytest.mark.parametrize("name, devices, kind", [("v5p-64", 32, "TPU v5"), ("v5e-8", 8, "TPU v5 lite"),
                                                  pytest.param("8xh100", 8, "NVIDIA H100 80GB HBM3", marks=h100_compiler)])
def test_targets_give_their_topologies(name, devices, kind):
    found = target_devices(get_target(name))
    assert len(found) == devices and found[0].device_kind == kind


@pytest.mark.parametrize("target, marker", PLATFORMS)
def test_kernels_compile_at_flux_shapes(target, marker):
    """The default call on tiled weights (the layout loaders give on accelerators) compiled, not only
    lowered, by the real compiler at every FLUX.1-dev layer shape and odd shapes, for the token counts of
    inference (1, 16), small batches and 1024x1024. At 4608 tokens the kernel reads x as it is: the
    program's temporaries are far below one copy of x (the planar copy it replaced was 141 MB)."""
    mesh = one_chip(target)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    failures, copies = [], []
    for name, (k, n) in {**FLUX_DEV_LAYERS, **ODD}.items():
        for m in (1, 16, 256, 4608):
            specs = [jax.ShapeDtypeStruct(shape, dtype, sharding=replicated) for shape, dtype in (
                ((m, k), jnp.bfloat16), ((tiled_rows(k), n), jnp.uint8), ((n,), jnp.float32), ((n,), jnp.float32))]
            with jax.set_mesh(mesh):
                compiled = jax.jit(lambda x, p, s, b: ternary_matmul(x, p, s, b, layout="tiled")).lower(*specs).compile()
            text = compiled.as_text()
            if not any(kernel in text for kernel in COMPILED_MARKERS[marker]):
                failures.append((name, m))
            if name in FLUX_DEV_LAYERS and m == 4608 and compiled.memory_analysis().temp_size_in_bytes > m * k * 2 / 8:
                copies.append((name, compiled.memory_analysis().temp_size_in_bytes))
            assert compiled.out_info.shape == (m, n)
    assert not failures, f"no kernel in the compiled program for {failures}"
    assert not copies, f"temporaries as large as a copy of x: {copies}"


@pytest.mark.parametrize("target, marker", PLATFORMS)
def test_packed_model_compiles_with_its_kernels_and_less_memory(target, marker):
    config = FluxConfig.preset("tiny").replace(hidden_size=256, num_heads=2, axes_dim=(16, 56, 56))
    compiled = compiled_forward(config.with_dtype("bfloat16"), "packed", QuantPolicy(), get_target(target),
                                image_tokens=256, text_tokens=16)
    assert any(kernel in compiled.as_text() for kernel in COMPILED_MARKERS[marker])
    report = memory_report(config, target=get_target(target), image_tokens=16, text_tokens=8)
    assert report["target"] == target
    # The weights are what shrinks: 2 bits + a scale per output channel against 16 bits.
    assert report["argument_bytes_packed"] < report["argument_bytes_bf16"] / 2.5


@pytest.mark.parametrize("target, kernel", [(TPU_1, "splash"), pytest.param(GPU_1, "__cudnn$fmha", marks=h100_compiler)])
def test_fused_attention_compiles_and_its_backward_keeps_no_whole_softmax(target, kernel):
    """FLUX's attention at 1024x1024 (24 heads, 4608 tokens), differentiated, compiles to the platform's
    fused kernel (splash on TPU, cuDNN flash on H100), and its temporaries stay below a tenth of one
    (H, L, L) float32 matrix. Saving every softmax (the cause of 172 GiB per H100 for the flux-dev
    step) takes 3.5 to 3.7 GB here; the checkpointed XLA chunks 0.5 to 0.7 GB."""
    mesh = one_chip(target)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    b, l, h, d = 1, 4608, 24, 128
    qkv = jax.ShapeDtypeStruct((b, l, h, d), jnp.bfloat16, sharding=replicated)
    pe = (jax.ShapeDtypeStruct((b, l, 1, d // 2), jnp.float32, sharding=replicated),) * 2
    loss = lambda q, k, v, pe: attention(q, k, v, pe).astype(jnp.float32).sum()  # noqa: E731
    with jax.set_mesh(mesh):
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(qkv, qkv, qkv, pe).compile()
    assert kernel in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < h * l * l * 4 / 10


@pytest.mark.parametrize("target", [TPU_8, pytest.param(GPU_8, marks=h100_compiler)])
def test_reduced_depth_training_step_compiles_for_eight_chips(target):
    """The distillation step (2 + 2 blocks through lax.scan, 1024 + 16 tokens, bf16 student, remat, fsdp
    over 8 chips) compiled for the target: teacher, student and both AdamW moments are bf16 and sharded 8 ways, so
    the arguments per chip are an eighth of four bf16 models, plus the small tensors the rules keep
    whole (a third more at this width; 0.4% for flux-dev). Unsharded they would be eight times that."""
    flux = FluxConfig.preset("tiny").replace(hidden_size=256, num_heads=2, axes_dim=(16, 56, 56), depth=2,
                                             depth_single_blocks=2).with_dtype("bfloat16")
    config = DistillConfig(text_length=16, latent_height=64, latent_width=64, sampler_steps=2,
                           student_dtype="bfloat16", remat=True, scan_blocks=True)
    step = target_step(get_target(target), flux, config, batch_per_device=1, mfu=0.4)
    model_bytes = 2 * sum(x.size for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: Flux(flux, rngs=nnx.Rngs(0))))))
    assert model_bytes * 4 / 8 <= step["argument_bytes"] < model_bytes * 4 / 8 * 1.5
    assert step["fits"] and step["headroom"] > 0.99
    assert step["temp_bytes"] > 0 and step["model_flops_per_device"] > 0 and step["step_seconds_at_mfu"] > 0


@pytest.mark.parametrize("limit, compiles", [
    (11, [1, 2, 11, 12]),  # the prediction from 1 and 2 samples is the boundary
    (13, [1, 2, 11, 12, 13, 14]),  # more fits than predicted: step up
    (8, [1, 2, 8, 9, 10, 11]),  # less: step down
    (1, [1, 2]),
    (0, [1]),
])
def test_largest_batch_predicts_then_steps(limit, compiles):
    """A fake compiler: 5 + 10 GB per sample against 120 GB predicts 11 samples; it refuses past
    `limit` samples, which the search must find, compiling each batch once."""
    measured = []

    def measure(batch):
        measured.append(batch)
        return {"batch_per_device": batch, "fits": batch <= limit, "total_bytes": 5 + 10 * batch, "hbm_bytes": 120}

    best, results = largest_batch(measure)
    assert best == limit
    assert sorted(measured) == compiles
    assert [r["batch_per_device"] for r in results] == compiles


def test_bench_cli_names_bad_flags(capsys):
    from train.bench import main

    with pytest.raises(SystemExit):
        main(["--find-batch"])
    assert "go with --target" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--target", "v9-1"])
    assert exit_info.value.code == 1
    assert "unknown target 'v9-1'" in capsys.readouterr().err


def test_step_model_flops_count_every_forward_of_the_step():
    """The architecture's matmul count against XLA's cost analysis of the lowered forward, at a size
    where attention runs in one chunk (cost models count a loop body once) and matmuls dominate."""
    from flux_jax.memory_report import forward_inputs
    from train.bench import forward_flops, step_model_flops

    flux = FluxConfig.preset("tiny").replace(hidden_size=512, num_heads=4, axes_dim=(16, 56, 56))
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flux(flux, rngs=nnx.Rngs(0))))
    state = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
    lowered = jax.jit(lambda s, *a: nnx.merge(graphdef, s)(*a)).lower(state, *forward_inputs(flux, 1, 256, 32))
    cost = lowered.cost_analysis()
    counted = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])
    assert forward_flops(flux, 256, 32) <= counted < 1.1 * forward_flops(flux, 256, 32)
    config = DistillConfig(latent_height=128, latent_width=128, text_length=512, sampler_steps=28, batch_size=16)
    dev = FluxConfig.preset("flux-dev")
    # the sampler runs to the largest of 16 draws of k in 0..27: E = sum_{m=1}^{27} 1 - (m/28)^16
    sampler = sum(1 - (m / 28) ** 16 for m in range(1, 28))
    assert sampler == pytest.approx(25.81, abs=0.01)
    assert step_model_flops(dev, config, samples=2) == pytest.approx(2 * (sampler + 4) * forward_flops(dev, 4096, 512))
    cached = dataclasses.replace(config, objective="cache")
    assert step_model_flops(dev, cached, samples=2) == pytest.approx(2 * 4 * forward_flops(dev, 4096, 512))


def test_a_model_too_large_for_the_chip_is_reported_as_refused(capsys):
    """9 B parameters: bf16 (18 GB) cannot fit one 16 GB v5e chip and the TPU compiler refuses it at
    compile time; packed (2.4 GB) fits. The report says so instead of failing."""
    from flux_jax.memory_report import main

    config = FluxConfig.preset("flux-dev").replace(depth=0, depth_single_blocks=20, hidden_size=6144, num_heads=48,
                                                   scan_blocks=True)
    report = memory_report(config, target=get_target(TPU_1), image_tokens=64, text_tokens=16)
    assert report["peak_bytes_bf16"] is None and "RESOURCE_EXHAUSTED" in report["refused_bf16"]
    assert report["memory_ratio"] is None
    assert 2e9 < report["peak_bytes_packed"] < 16e9
    main(["--config", "tiny", "--target", TPU_1, "--image-tokens", "16", "--text-tokens", "8"])
    out = capsys.readouterr().out
    assert "whole program compiled for one chip of v5e-1" in out and "fits with 100% headroom" in out
