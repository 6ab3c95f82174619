"""The optimizer every trainer here uses: AdamW with linear warmup, cosine decay to 0 and global-norm
clipping."""

from __future__ import annotations

import optax


def warmup_cosine(learning_rate: float, steps: int, warmup_steps: int) -> optax.Schedule:
    """From 0 up to `learning_rate` over the warmup (at most half the steps), then a cosine down to 0."""
    warmup = min(warmup_steps, steps // 2)
    return optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup, max(steps, warmup + 1))


def adamw(schedule: optax.Schedule, *, clip_norm: float = 1.0, weight_decay: float = 0.0) -> optax.GradientTransformation:
    """AdamW (moments in the parameters' dtype) after clipping the global gradient norm."""
    return optax.chain(optax.clip_by_global_norm(clip_norm), optax.adamw(schedule, weight_decay=weight_decay))
