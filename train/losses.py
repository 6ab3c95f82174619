"""What the student is trained to match: the frozen teacher's velocity at the same state, and
optionally its hidden states after every block (block-feature matching)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _relative_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
    """MSE over the teacher's mean square: blocks with large activations do not drown the others."""
    teacher = teacher.astype(jnp.float32)
    return jnp.mean(jnp.square(student.astype(jnp.float32) - teacher)) / (jnp.mean(jnp.square(teacher)) + 1e-6)


def distill_loss(student, teacher, x, t, img_ids, txt, txt_ids, y, guidance, *, feature_weight: float = 0.0):
    """(loss, {"velocity_loss": ..., "feature_loss": ...}): velocity MSE plus `feature_weight` times the mean
    relative MSE of the image hidden states over all blocks. Nothing flows into the teacher."""
    inputs = (x, img_ids, txt, txt_ids, t, y, guidance)
    if feature_weight:
        target, teacher_features = jax.lax.stop_gradient(teacher(*inputs, return_features=True))
        out, features = student(*inputs, return_features=True)
        matched = jnp.mean(jnp.stack([_relative_mse(s, t_) for s, t_ in zip(features, teacher_features)]))
    else:
        target, out, matched = jax.lax.stop_gradient(teacher(*inputs)), student(*inputs), jnp.zeros((), jnp.float32)
    velocity = jnp.mean(jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32)))
    return velocity + feature_weight * matched, {"velocity_loss": velocity, "feature_loss": matched}
