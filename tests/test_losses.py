"""The distillation losses against NumPy, on the tiny model's real hidden states."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flux_jax import Flux, FluxConfig
from flux_jax.layers import timestep_embedding
from flux_jax.ternary import quantize_model
from train.data import position_ids
from train.losses import distill_loss


def _inputs(config, batch=2, size=8, text=4):
    rng = np.random.default_rng(0)
    img_ids, txt_ids = position_ids(batch, size, size, text)
    x = rng.standard_normal((batch, (size // 2) ** 2, config.in_channels)).astype(np.float32)
    txt = rng.standard_normal((batch, text, config.context_in_dim)).astype(np.float32)
    y = rng.standard_normal((batch, config.vec_in_dim)).astype(np.float32)
    return x, jnp.array([0.3, 0.8]), img_ids, txt, txt_ids, y, jnp.array([2.0, 4.0])


def test_features_are_the_hidden_states_the_output_is_made_from():
    model = Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0))
    x, t, img_ids, txt, txt_ids, y, g = _inputs(model.config)
    out, features = model(x, img_ids, txt, txt_ids, t, y, g, return_features=True)
    assert len(features) == model.config.depth + model.config.depth_single_blocks
    assert all(f.shape == (2, 16, model.config.hidden_size) for f in features)
    np.testing.assert_array_equal(out, model(x, img_ids, txt, txt_ids, t, y, g))
    vec = (model.time_in(timestep_embedding(t, 256)) + model.guidance_in(timestep_embedding(g, 256))
           + model.vector_in(jnp.asarray(y)))
    np.testing.assert_allclose(model.final_layer(features[-1], vec), out, rtol=1e-5, atol=1e-6)
    assert not np.allclose(features[0], features[-1])


def test_losses_match_numpy():
    teacher = Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0))
    student = quantize_model(teacher)
    x, t, img_ids, txt, txt_ids, y, g = _inputs(teacher.config)
    target, teacher_features = teacher(x, img_ids, txt, txt_ids, t, y, g, return_features=True)
    out, features = student(x, img_ids, txt, txt_ids, t, y, g, return_features=True)
    velocity = np.mean((np.asarray(out, np.float64) - np.asarray(target, np.float64)) ** 2)
    relative = np.mean([np.mean((np.asarray(s, np.float64) - np.asarray(f, np.float64)) ** 2) / np.mean(np.asarray(f, np.float64) ** 2)
                        for s, f in zip(features, teacher_features)])
    loss, parts = distill_loss(student, teacher, x, t, img_ids, txt, txt_ids, y, g, feature_weight=0.25)
    np.testing.assert_allclose(parts["velocity_loss"], velocity, rtol=1e-5)
    np.testing.assert_allclose(parts["feature_loss"], relative, rtol=1e-4)
    np.testing.assert_allclose(loss, velocity + 0.25 * relative, rtol=1e-5)
    plain, plain_parts = distill_loss(student, teacher, x, t, img_ids, txt, txt_ids, y, g)
    np.testing.assert_allclose(plain, velocity, rtol=1e-5)
    assert float(plain_parts["feature_loss"]) == 0.0
    same, _ = distill_loss(teacher, teacher, x, t, img_ids, txt, txt_ids, y, g, feature_weight=1.0)
    assert float(same) == 0.0


def test_no_gradient_reaches_the_teacher():
    teacher = Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0))
    student = quantize_model(teacher)
    inputs = _inputs(teacher.config)
    grads = nnx.grad(lambda t_, s: distill_loss(s, t_, *inputs, feature_weight=1.0)[0])(teacher, student)
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(grads))


def test_feature_matching_reaches_the_student():
    """With equal outputs the velocity term gives no gradient; the feature term still does."""
    teacher = Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0))
    student = quantize_model(teacher)
    inputs = _inputs(teacher.config)

    def gradient_norm(weight):
        grads = nnx.grad(lambda s: distill_loss(s, teacher, *inputs, feature_weight=weight)[1]["feature_loss"])(student)
        return float(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))

    assert gradient_norm(1.0) > 0.0
    assert gradient_norm(0.0) == 0.0  # the logged zero carries no gradient either
