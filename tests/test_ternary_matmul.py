"""ternary_matmul: every backend against a NumPy float64 reference (kernels in interpret mode), and
the kernels lowered for cuda (an H100: Mosaic GPU; an A100: Triton) and tpu from this CPU machine
with jax.export."""

import contextlib
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import gpu_lowering_target, pack_ternary, ternary_matmul
from pallas_kernels.lowering import A100, H100
from pallas_kernels.mosaic_gpu import MosaicGPUBlocks
from pallas_kernels.mosaic_tpu import MosaicBlocks
from pallas_kernels.packing import tiled_rows, to_tiled
from pallas_kernels.triton_gpu import TritonBlocks

KERNELS = ["triton", "mosaic_tpu"]
MARKERS = {"mosaic_gpu": "mosaic_gpu", "triton": "__gpu$xla.gpu.triton", "mosaic_tpu": "tpu_custom_call"}  # in lowered text
KERNEL_TARGETS = {  # (platform, GPU lowered for, marker of the kernel "auto" lowers to) by name
    "h100-mosaic_gpu": ("cuda", H100, MARKERS["mosaic_gpu"]),
    "a100-triton": ("cuda", A100, MARKERS["triton"]),
    "tpu": ("tpu", None, MARKERS["mosaic_tpu"]),
}
GPU_INTERPRETER = pytest.mark.skipif(not hasattr(plgpu, "InterpretGPUParams"),
                                     reason="this JAX (0.10.2) has no public GPU interpreter for Mosaic GPU kernels")


H = 3072
FLUX_DEV_LAYERS = {  # (K, N) of FLUX.1-dev's ternary layers
    "qkv": (H, 3 * H), "proj": (H, H), "mlp_in": (H, 4 * H), "mlp_out": (4 * H, H),
    "modulation": (H, 6 * H), "linear1": (H, 7 * H), "linear2": (5 * H, H),
}
ODD = {"odd": (130, 33), "tiny": (5, 7)}


def export_for(platform, fn, *specs, gpu=H100):
    """`fn` lowered for `platform` from this CPU machine (`gpu` as the GPU it is lowered for)."""
    with gpu_lowering_target(gpu) if platform == "cuda" else contextlib.nullcontext():
        return export.export(
            jax.jit(fn), platforms=[platform],
            disabled_checks=[export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
        )(*specs)


def reference(x, codes, scale, bias):
    out = np.asarray(x, np.float64) @ codes.astype(np.float64) * np.asarray(scale, np.float64)
    return out + (0 if bias is None else np.asarray(bias, np.float64))


def operands(m, k, n, *, per_channel=True, with_bias=True, lead=(), seed=0):
    rng = np.random.default_rng(seed + m + k + n)
    codes = rng.integers(-1, 2, (k, n)).astype(np.int8)
    x = rng.standard_normal((*lead, m, k)).astype(np.float32)
    scale = rng.uniform(0.5, 2, n if per_channel else 1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32) if with_bias else None
    return x, codes, scale, bias


def packed_in(layout, codes):
    """The codes packed in `layout`: the kernels read tiled weights as they are, canonical re-laid."""
    packed = pack_ternary(codes)
    return to_tiled(packed, codes.shape[0]) if layout == "tiled" else packed


def check(out, x, codes, scale, bias, dtype):
    assert out.dtype == dtype
    expected = reference(np.asarray(jnp.asarray(x, dtype), np.float32), codes, scale, bias)
    tol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=tol, atol=tol * np.abs(expected).max())


def all_pairs(axes: dict[str, list]) -> set[tuple]:
    """Every ((axis, value index), (axis, value index)) pair across two different axes."""
    names = list(axes)
    return {((a, i), (b, j)) for x, a in enumerate(names) for b in names[x + 1:]
            for i in range(len(axes[a])) for j in range(len(axes[b]))}


def pairs_of(row: tuple, axes: dict[str, list]) -> set[tuple]:
    names = list(axes)
    return {((names[x], row[x]), (names[y], row[y])) for x in range(len(row)) for y in range(x + 1, len(row))}


def pairwise(**axes: list) -> list[tuple]:
    """Rows of values, one per axis, covering every pair of values of any two axes at least once: a
    greedy pick from the full product (deterministic), far fewer rows than the product itself."""
    product = list(itertools.product(*(range(len(v)) for v in axes.values())))
    uncovered, rows = all_pairs(axes), []
    while uncovered:
        best = max(product, key=lambda row: len(pairs_of(row, axes) & uncovered))
        uncovered -= pairs_of(best, axes)
        rows.append(best)
    return [tuple(values[i] for values, i in zip(axes.values(), row)) for row in rows]


# XLA reads both layouts; the kernels read tiled codes (canonical ones are re-laid first: checked once
# per kernel in test_kernels_re_lay_canonical_codes). Interpret mode is slow: every pair of values is
# run, not every combination.
BACKEND_GRID = dict(
    backend_layout=[("xla", "canonical"), ("xla", "tiled"), *((b, "tiled") for b in KERNELS)],
    mkn=[(1, 5, 7), (3, 130, 33), (17, 300, 200)],
    dtype=[jnp.float32, jnp.bfloat16],
    scaling=[(True, True), (False, False)],  # (per_channel, with_bias): per-channel with bias, or per-tensor
)


def test_pairwise_grids_cover_every_pair_of_values():
    for grid in (BACKEND_GRID, LOWERING_GRID):
        rows = pairwise(**grid)
        indices = [tuple(values.index(v) for values, v in zip(grid.values(), row)) for row in rows]
        assert set().union(*(pairs_of(row, grid) for row in indices)) == all_pairs(grid)
        assert len(rows) <= np.prod([len(v) for v in grid.values()]) / 3


def backend_case_id(backend_layout, mkn, dtype, scaling) -> str:
    return "-".join([*backend_layout, "x".join(map(str, mkn)), jnp.dtype(dtype).name, "channel+bias" if scaling[0] else "tensor"])


@pytest.mark.parametrize("backend_layout, mkn, dtype, scaling", pairwise(**BACKEND_GRID),
                         ids=[backend_case_id(*row) for row in pairwise(**BACKEND_GRID)])
def test_backend_matches_numpy(backend_layout, mkn, dtype, scaling):
    (backend, layout), (m, k, n), (per_channel, with_bias) = backend_layout, mkn, scaling
    x, codes, scale, bias = operands(m, k, n, per_channel=per_channel, with_bias=with_bias)
    out = ternary_matmul(jnp.asarray(x, dtype), packed_in(layout, codes), scale, bias, layout=layout,
                         backend=backend, interpret=True)
    check(out, x, codes, scale, bias, dtype)


@pytest.mark.parametrize("backend", KERNELS)
def test_kernels_re_lay_canonical_codes(backend):
    x, codes, scale, bias = operands(17, 300, 200)
    out = ternary_matmul(jnp.asarray(x), packed_in("canonical", codes), scale, bias, backend=backend, interpret=True)
    check(out, x, codes, scale, bias, jnp.float32)


@pytest.mark.parametrize(
    "backend, blocks, k",
    [
        ("triton", TritonBlocks(bm=16, bn=16, bkr=16, num_warps=4, num_stages=2), 1100),  # 8 steps a tile
        ("mosaic_tpu", MosaicBlocks(bm=16, bn=128, bkr=128), 1100),  # one tile a step, the last one partial
        ("mosaic_tpu", MosaicBlocks(bm=16, bn=128, bkr=256), 2000),  # two tiles a step
    ],
)
def test_kernel_walks_several_tiles_and_k_steps(backend, blocks, k):
    x, codes, scale, bias = operands(40, k, 300)  # 3 M tiles, several N tiles, several K steps
    out = ternary_matmul(jnp.asarray(x), packed_in("tiled", codes), scale, bias, layout="tiled", backend=backend,
                         interpret=True, blocks=blocks)
    check(out, x, codes, scale, bias, jnp.float32)


@pytest.mark.parametrize("backend", ["xla", *KERNELS])
def test_batched_leading_dimensions_under_jit_and_vmap(backend):
    x, codes, scale, bias = operands(5, 36, 20, lead=(2, 3))
    packed = pack_ternary(codes)
    f = jax.jit(lambda x: ternary_matmul(x, packed, scale, bias, backend=backend, interpret=True))
    check(f(jnp.asarray(x)), x, codes, scale, bias, jnp.float32)
    g = jax.vmap(lambda xi: ternary_matmul(xi, packed, scale, bias, backend=backend, interpret=True))
    check(g(jnp.asarray(x[0])), x[0], codes, scale, bias, jnp.float32)


@pytest.mark.parametrize("backend", ["xla", "triton"])
@pytest.mark.parametrize("layout", ["canonical", "tiled"])
def test_gradients_with_respect_to_x_scale_and_bias(backend, layout):
    x, codes, scale, bias = operands(4, 9, 6)
    g = np.random.default_rng(1).standard_normal((4, 6)).astype(np.float32)
    packed = packed_in(layout, codes)

    def loss(x, scale, bias):
        return jnp.sum(ternary_matmul(x, packed, scale, bias, layout=layout, backend=backend, interpret=True) * g)

    dx, dscale, dbias = jax.grad(loss, argnums=(0, 1, 2))(jnp.asarray(x), jnp.asarray(scale), jnp.asarray(bias))
    np.testing.assert_allclose(np.asarray(dx), (g * scale) @ codes.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dscale), ((x @ codes) * g).sum(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dbias), g.sum(0), rtol=1e-6)


def check_mosaic_gpu(m, k, n):
    """The Mosaic GPU kernel in GPU interpret mode against NumPy: bf16 in, float32 accumulation, bf16
    out, so within the output's rounding (2^-8 relative)."""
    x, codes, scale, bias = operands(m, k, n)
    out = ternary_matmul(jnp.asarray(x, jnp.bfloat16), packed_in("tiled", codes), scale, bias, layout="tiled",
                         backend="mosaic_gpu", interpret=True)
    expected = reference(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), codes, scale, bias)
    np.testing.assert_allclose(np.asarray(out, np.float64), expected, rtol=2**-8, atol=2**-8 * np.abs(expected).max())


@GPU_INTERPRETER
@pytest.mark.parametrize("m, k, n", [(1, 5, 7), (3, 130, 33), (70, 600, 200), (300, 600, 200), (16, 15360, 128)])
def test_mosaic_gpu_matches_numpy_in_gpu_interpret_mode(m, k, n):
    """Odd shapes (every M class of the tile table) and linear2's K (15360, a slice of its N). FLUX's
    own layer shapes take minutes each in interpret mode: the test below, outside the default suite."""
    check_mosaic_gpu(m, k, n)


@GPU_INTERPRETER
@pytest.mark.gpu_interpret_flux_shapes
@pytest.mark.parametrize("name, m", [(name, m) for name in FLUX_DEV_LAYERS for m in (1, 16)] + [("proj", 256)])
def test_mosaic_gpu_matches_numpy_at_every_flux_layer_shape(name, m):
    """The seven FLUX.1-dev layer shapes at the token counts of inference (M = 1, 16; M = 256 at the
    projection only: at every shape the run takes over 15 minutes on 2 cores), within the bf16 output's
    rounding: about 5 minutes, outside the default suite, run by CI."""
    check_mosaic_gpu(m, *FLUX_DEV_LAYERS[name])


@GPU_INTERPRETER
def test_mosaic_gpu_is_exact_on_integer_products_over_several_blocks_and_steps():
    """x in {-1, 0, 1}, unit scale, no bias: every product and sum is an integer below 256, exact in
    bf16, so the kernel must equal the reference exactly, here with several M and N blocks and K steps."""
    rng = np.random.default_rng(3)
    codes = rng.integers(-1, 2, (1100, 200)).astype(np.int8)
    x = rng.integers(-1, 2, (130, 1100)).astype(np.float32) * (rng.random((130, 1100)) < 0.2)
    blocks = MosaicGPUBlocks(bm=64, bn=64, stages=2)
    out = ternary_matmul(jnp.asarray(x, jnp.bfloat16), packed_in("tiled", codes), np.ones(200, np.float32), layout="tiled",
                         backend="mosaic_gpu", interpret=True, blocks=blocks)
    np.testing.assert_array_equal(np.asarray(out, np.float32), x @ codes)


def test_mosaic_gpu_refuses_float32_activations():
    with pytest.raises(ValueError, match="Mosaic GPU kernel takes bf16 or f16 activations, got float32"):
        ternary_matmul(np.zeros((2, 8), np.float32), np.zeros((128, 4), np.uint8), np.ones(4, np.float32),
                       layout="tiled", backend="mosaic_gpu")


@pytest.mark.parametrize(
    "platform, gpu, dtype, kernel",
    [
        ("cpu", None, jnp.float32, None),
        ("cpu", None, jnp.bfloat16, None),
        ("cuda", "NVIDIA B200", jnp.bfloat16, "mosaic_gpu"),  # compute capability 10.0
        ("cuda", H100, jnp.bfloat16, "mosaic_gpu"),  # 9.0
        ("cuda", H100, jnp.float32, "triton"),  # Mosaic GPU takes 16-bit activations only
        ("cuda", "NVIDIA L4", jnp.bfloat16, "triton"),  # 8.9
        ("cuda", A100, jnp.bfloat16, "triton"),  # 8.0
        ("tpu", None, jnp.float32, "mosaic_tpu"),
        ("tpu", None, jnp.bfloat16, "mosaic_tpu"),
    ],
)
def test_auto_dispatches_by_platform_and_compute_capability(platform, gpu, dtype, kernel):
    """"auto" lowers to exactly one kernel per platform (none on cpu: the XLA unpack-and-dot), and the
    program exported for cpu computes x @ (scale * T) + bias."""
    x, codes, scale, bias = operands(3, 130, 33)
    specs = (jax.ShapeDtypeStruct(x.shape, dtype), jax.ShapeDtypeStruct((tiled_rows(130), 33), jnp.uint8),
             jax.ShapeDtypeStruct(scale.shape, jnp.float32), jax.ShapeDtypeStruct(bias.shape, jnp.float32))
    exported = export_for(platform, lambda x, p, s, b: ternary_matmul(x, p, s, b, layout="tiled"), *specs, gpu=gpu)
    text = exported.mlir_module()
    assert {name for name, marker in MARKERS.items() if marker in text} == ({kernel} if kernel else set())
    if platform == "cpu":
        check(exported.call(jnp.asarray(x, dtype), packed_in("tiled", codes), scale, bias), x, codes, scale, bias, dtype)


LOWERING_GRID = dict(target=list(KERNEL_TARGETS), name=[*FLUX_DEV_LAYERS, *ODD], m=[1, 4608], layout=["canonical", "tiled"])


@pytest.mark.parametrize("target, name, m, layout", pairwise(**LOWERING_GRID),
                         ids=["-".join(map(str, row)) for row in pairwise(**LOWERING_GRID)])
def test_default_call_lowers_to_the_kernel(target, name, m, layout):
    platform, gpu, marker = KERNEL_TARGETS[target]
    k, n = {**FLUX_DEV_LAYERS, **ODD}[name]
    args = (
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((tiled_rows(k) if layout == "tiled" else -(-k // 4), n), jnp.uint8),
        jax.ShapeDtypeStruct((n,), jnp.float32),
        jax.ShapeDtypeStruct((n,), jnp.float32),
    )
    exported = export_for(platform, lambda x, p, s, b: ternary_matmul(x, p, s, b, layout=layout), *args, gpu=gpu)
    text = exported.mlir_module()
    assert marker in text
    assert exported.out_avals[0].shape == (m, n)


def test_packed_flux_lowers_its_layers_to_kernels_for_both_platforms():
    from flax import nnx

    from flux_jax import FluxConfig
    from flux_jax.ternary import build
    from tests.torch_reference import random_inputs

    config = FluxConfig.preset("tiny").with_dtype("bfloat16")  # Mosaic GPU serves 16-bit activations
    model = nnx.eval_shape(lambda: build(config, "packed", layout="tiled", rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    inputs = random_inputs(config, batch=1)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), inputs)

    def forward(state, inputs):
        return nnx.merge(graphdef, state)(**inputs)

    state_specs = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), state)
    for platform, gpu, marker in KERNEL_TARGETS.values():
        exported = export_for(platform, forward, state_specs, specs, gpu=gpu)
        per_block = 10 * config.depth + 3 * config.depth_single_blocks
        assert exported.mlir_module().count(marker) >= per_block


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(backend="cuda"), "unknown ternary_matmul backend 'cuda'"),
        (dict(backend="xla", blocks=MosaicBlocks(16, 128, 128)), "do not belong to backend 'xla'"),
        (dict(backend="triton", blocks=MosaicBlocks(16, 128, 128)), "do not belong to backend 'triton'"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ternary_matmul(np.zeros((1, 4), np.float32), np.zeros((1, 2), np.uint8), np.ones(2, np.float32), **kwargs)


@pytest.mark.parametrize(
    "x_shape, packed_shape, scale_shape, message",
    [
        ((2, 9), (2, 4), (4,), r"K=9 .* packed has 2 rows.*needs 3 in the canonical layout"),
        ((2, 8), (2, 4), (3,), r"scale has shape \(3,\); packed has N=4"),
    ],
)
def test_shapes_that_do_not_fit_name_both(x_shape, packed_shape, scale_shape, message):
    with pytest.raises(ValueError, match=message):
        ternary_matmul(np.zeros(x_shape, np.float32), np.zeros(packed_shape, np.uint8), np.ones(scale_shape, np.float32))


def test_tiled_weights_of_the_wrong_height_and_unknown_layouts_are_named():
    with pytest.raises(ValueError, match=r"K=600 .* packed has 150 rows.*needs 256 in the tiled layout"):
        ternary_matmul(np.zeros((2, 600), np.float32), np.zeros((150, 4), np.uint8), np.ones(4, np.float32), layout="tiled")
    with pytest.raises(ValueError, match="unknown packed layout 'planar'"):
        ternary_matmul(np.zeros((2, 8), np.float32), np.zeros((2, 4), np.uint8), np.ones(4, np.float32), layout="planar")


def test_kernel_bench_runs_and_says_it_is_interpret_mode_on_cpu(capsys, monkeypatch):
    from pallas_kernels import bench

    timed = []
    # kernel, XLA backend, bf16 dense: the order `measure` times them, side by side in one call
    monkeypatch.setattr(bench, "median_seconds", lambda fns, repeats: timed.append((len(fns), repeats)) or [0.002, 0.004, 0.003])
    bench.main(["--layers", "proj", "--m", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "interpret mode" in out and "no performance figure" in out
    assert timed == [(3, 1)]
    row = next(line for line in out.splitlines() if line.strip().startswith("proj"))
    shape, timings, ratios, err = (part.split() for part in row.split("|"))
    assert shape == ["proj", "triton", "3072", "3072", "3"]
    assert timings == ["2.000", "4.000", "3.000"]
    # the ratios come from the times, the weight stream from the packed size: 2 bits a weight, an
    # eighth of the bf16 weights' bytes (3072 * 3072 * 2 / 8 bytes in 2 ms)
    assert ratios == ["1.50x", "2.00x", f"{3072 * 3072 * 2 / 8 / 0.002 / 1e9:.1f}", "n/a"]
    assert float(err[0]) < 2e-2  # the kernel's bf16 output agrees with the bf16 dense matmul
