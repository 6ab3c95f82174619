"""Ternary layers, students and packed models against NumPy and a PyTorch reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from convert import load_flux, save_flux
from flux_jax import Flux, FluxConfig
from flux_jax.ternary import (
    PackedTernaryLinear,
    QuantPolicy,
    TernaryLinear,
    build,
    pack_model,
    packed_layout,
    quantize_model,
    runtime_layout,
    ternarize,
    ternary_report,
    with_layout,
)
from pallas_kernels.packing import tiled_rows
from tests.torch_reference import TINY_DEV, assert_close, diffusers_model, random_inputs, run_diffusers, run_ours


def numpy_absmean(w: np.ndarray, per_channel: bool):
    w = w.astype(np.float64)
    s = np.abs(w).mean(axis=0 if per_channel else None, keepdims=True)
    s = np.maximum(s, 1e-5)
    return np.clip(np.round(w / s), -1, 1), s.reshape(-1)


@pytest.mark.parametrize("per_channel", [True, False])
def test_ternarize_matches_numpy(per_channel):
    w = np.random.default_rng(0).standard_normal((37, 11)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero channel takes the 1e-5 floor
    codes, scale = ternarize(w, 0 if per_channel else None)
    ref_codes, ref_scale = numpy_absmean(w, per_channel)
    assert codes.dtype == jnp.int8 and scale.shape == ((11,) if per_channel else (1,))
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_allclose(np.asarray(scale), ref_scale, rtol=1e-6)
    if per_channel:
        assert float(scale[3]) == pytest.approx(1e-5)


def _layer(policy=QuantPolicy(), k=24, n=10, dtype="float32"):
    return TernaryLinear(k, n, use_bias=True, axes=("embed", "mlp"), dtype=dtype, param_dtype="float32", policy=policy, rngs=nnx.Rngs(0))


def test_straight_through_gradient_is_the_identity_on_the_latent_kernel():
    layer = _layer()
    rng = np.random.default_rng(1)
    x, g = jnp.asarray(rng.standard_normal((5, 24)), jnp.float32), jnp.asarray(rng.standard_normal((5, 10)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x) * g))(layer)
    # d/dW of sum((x @ W_q) * g) taken as if W_q were W: x^T g
    np.testing.assert_allclose(np.asarray(grads.kernel[...]), np.asarray(x.T @ g), rtol=1e-5, atol=1e-6)
    codes, scale = ternarize(layer.kernel[...])
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(x @ (codes * scale) + layer.bias[...]), rtol=1e-5, atol=1e-6)


def test_learnable_scale_gets_its_gradient():
    layer = _layer(QuantPolicy(learnable_scale=True))
    x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 24)), jnp.float32)
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(layer)
    codes, _ = ternarize(layer.kernel[...])
    np.testing.assert_allclose(np.asarray(grads.scale[...]), np.asarray((x @ codes.astype(jnp.float32)).sum(0)), rtol=1e-5)


def torch_ternarized(model):
    """diffusers' model with every linear of its blocks ternarized in PyTorch (absmean, per output row)."""
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks.", "single_transformer_blocks.")):
                w = module.weight
                s = w.abs().mean(dim=1, keepdim=True).clamp(min=1e-5)
                w.copy_((w / s).round().clamp(-1, 1) * s)
    return model


@pytest.fixture(scope="module")
def teacher_and_reference(tmp_path_factory):
    reference = diffusers_model(TINY_DEV, seed=4)
    folder = tmp_path_factory.mktemp("teacher")
    reference.save_pretrained(folder)
    return load_flux(folder), torch_ternarized(reference)


def test_student_equals_diffusers_with_ternarized_block_linears(teacher_and_reference):
    teacher, reference = teacher_and_reference
    student = quantize_model(teacher)
    inputs = random_inputs(TINY_DEV)
    assert_close(run_ours(student, inputs), run_diffusers(reference, inputs))
    assert_close(run_ours(pack_model(student), inputs), run_diffusers(reference, inputs))


def test_quantize_leaves_the_teacher_untouched_and_copies_its_weights(teacher_and_reference):
    teacher, _ = teacher_and_reference
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(teacher)))
    student = quantize_model(teacher)
    assert isinstance(student.double_blocks[0].img_attn.qkv, TernaryLinear)
    assert isinstance(student.img_in, nnx.Linear) and isinstance(student.final_layer.linear, nnx.Linear)
    student.double_blocks[0].img_attn.qkv.kernel[...] = jnp.zeros_like(student.double_blocks[0].img_attn.qkv.kernel[...])
    after = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(teacher)))
    jax.tree.map(np.testing.assert_array_equal, before, after)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("policy", [QuantPolicy(), QuantPolicy(per_channel=False, learnable_scale=True, lowrank_rank=3)],
                         ids=["paper", "extras"])
def test_packed_forward_equals_the_training_forward(teacher_and_reference, policy, dtype):
    teacher, _ = teacher_and_reference
    student = quantize_model(load_flux_like(teacher, dtype), policy)
    packed = pack_model(student)
    assert isinstance(packed.single_blocks[1].linear1, PackedTernaryLinear)
    assert packed.single_blocks[1].linear1.codes[...].dtype == jnp.uint8
    inputs = random_inputs(TINY_DEV)
    out_student, out_packed = run_ours(student, inputs), run_ours(packed, inputs)
    if dtype == "float32":
        assert_close(out_packed, out_student, rel=1e-5)
        for model, out in ((student, out_student), (packed, out_packed)):  # blocks through one lax.scan
            model.config = model.config.replace(scan_blocks=True)
            assert_close(run_ours(model, inputs), out, rel=1e-5)
    else:
        assert_close(out_packed, out_student, rel=2e-2)


def load_flux_like(model, dtype):
    """The same weights with parameter and compute dtype `dtype`."""
    config = model.config.with_dtype(dtype)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, jax.tree.map(lambda x: x.astype(dtype), nnx.to_pure_dict(nnx.state(model))))
    return nnx.merge(graphdef, state)


def test_lowrank_residual_starts_from_the_svd_of_the_error(teacher_and_reference):
    teacher, _ = teacher_and_reference
    w = np.asarray(teacher.double_blocks[0].img_mlp[0].kernel[...])
    codes, scale = ternarize(w)
    base = np.linalg.norm(w - np.asarray(codes) * np.asarray(scale))
    errors = []
    for rank in (2, 16, 64):
        layer = quantize_model(teacher, QuantPolicy(lowrank_rank=rank)).double_blocks[0].img_mlp[0]
        errors.append(np.linalg.norm(w - np.asarray(layer.effective_kernel())))
    assert base > errors[0] > errors[1] > errors[2] and errors[2] < 1e-4 * base  # rank 64 = full rank of a 64-row kernel


def test_pack_model_refuses_what_is_not_a_student(teacher_and_reference):
    teacher, _ = teacher_and_reference
    with pytest.raises(ValueError, match="needs a ternary student"):
        pack_model(teacher)
    with pytest.raises(ValueError, match="needs a ternary student"):
        pack_model(pack_model(quantize_model(teacher)))


def test_tiled_packed_model_computes_the_same_and_is_saved_canonical(teacher_and_reference, tmp_path):
    """The kernels' layout is a property of the model in memory: same outputs (XLA reads either layout
    on CPU), the files hold the canonical layout, and loading lays codes out for this platform."""
    teacher, _ = teacher_and_reference
    student = quantize_model(teacher)
    canonical, tiled = pack_model(student, layout="canonical"), pack_model(student, layout="tiled")
    assert runtime_layout() == "canonical" and packed_layout(pack_model(student)) == "canonical"
    assert runtime_layout("tpu") == runtime_layout("gpu") == "tiled"
    layer = tiled.single_blocks[0].linear2
    assert packed_layout(tiled) == "tiled" and layer.codes[...].shape[0] == tiled_rows(layer.in_features)
    inputs = random_inputs(TINY_DEV)
    assert_close(run_ours(tiled, inputs), run_ours(canonical, inputs), rel=1e-6)
    round_trip = with_layout(tiled, "canonical")
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(round_trip)), nnx.to_pure_dict(nnx.state(canonical)))
    save_flux(tiled, tmp_path / "packed")
    loaded = load_flux(tmp_path / "packed")
    assert packed_layout(loaded) == "canonical" and packed_layout(tiled) == "tiled"
    np.testing.assert_array_equal(np.asarray(loaded.single_blocks[0].linear2.codes[...]),
                                  np.asarray(canonical.single_blocks[0].linear2.codes[...]))
    with pytest.raises(ValueError, match="needs a packed model"):
        with_layout(student, "tiled")


def test_report_counts_tiny_by_hand_and_flux_dev_exactly():
    h = 64
    per_double = 2 * (6 + 3 + 1 + 4 + 4) * h * h
    per_single = (7 + 5 + 3) * h * h
    tiny = ternary_report(TINY_DEV)
    assert tiny["params_ternary"] == 2 * per_double + 2 * per_single
    assert tiny["params_total"] == 484_496
    dev = ternary_report(FluxConfig.preset("flux-dev"))
    assert (dev["params_ternary"], dev["params_total"]) == (11_834_228_736, 11_901_408_320)
    assert round(100 * dev["ternary_fraction"], 2) == 99.44
    assert round(dev["storage_ratio_packed"], 1) == 7.7


def test_report_counts_the_extras_honestly():
    extras = ternary_report(TINY_DEV, QuantPolicy(learnable_scale=True, lowrank_rank=2))
    plain = ternary_report(TINY_DEV)
    model = nnx.eval_shape(lambda: build(TINY_DEV, "student", QuantPolicy(learnable_scale=True, lowrank_rank=2), rngs=nnx.Rngs(0)))
    lowrank = sum(m.lowrank_a.size + m.lowrank_b.size for _, m in nnx.iter_graph(model) if isinstance(m, TernaryLinear))
    scales = sum(m.scale.size for _, m in nnx.iter_graph(model) if isinstance(m, TernaryLinear))
    assert extras["params_extra"] == lowrank + scales
    assert extras["bytes_packed"] == plain["bytes_packed"] + 2 * lowrank

