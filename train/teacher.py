"""`python -m train.teacher --world digits`: the teacher of a small world, trained by ordinary flow
matching on the world's images (the role FLUX.1-dev's pretraining plays), saved as one of our Orbax
checkpoints that `convert.load_flux` and `python -m train.distill` read.

    python -m train.teacher --world digits                 # ~4 minutes on 2 CPU cores
    python -m train.teacher --world digits --steps 50 --out /tmp/teacher

Flow matching as FLUX: x_t = (1 - t) x0 + t noise with t from a shifted logit-normal, and the model
learns the velocity noise - x0; the saved weights are an exponential moving average. Each image is paired with a prompt of its digit in a random training phrasing.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from convert import save_flux
from flux_jax.io.cli import reported_errors
from flux_jax.io.errors import OutputExistsError, UserError
from flux_jax.io.files import location
from flux_jax.model import Flux
from train import optim
from train.data import position_ids
from train.worlds import WORLDS, digits, find_world

PROG = "python -m train.teacher"


class TeacherConfigError(UserError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """Flow-matching training of a world's teacher."""

    world: str = digits.NAME
    """the world to train on (only "digits" so far)"""
    out: str | None = None
    """where the checkpoint goes (default: the world's cache, e.g. ~/.cache/flux_jax/digits/teacher)"""
    steps: int = 1200
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    time_shift: float = 1.4
    """t = sigmoid(normal + time_shift): FLUX's shifted logit-normal; more training at high noise, where
    the sample's class is decided"""
    ema_decay: float = 0.995
    """the saved teacher is the (bias-corrected) exponential moving average of the trained weights
    (0: the last weights)"""
    seed: int = 0
    overwrite: bool = True


def flow_matching_loss(model: Flux, x0: jax.Array, noise: jax.Array, t: jax.Array, img_ids: jax.Array, txt: jax.Array,
                       txt_ids: jax.Array, y: jax.Array) -> jax.Array:
    """MSE between the model's velocity at x_t = (1 - t) x0 + t noise and the path's velocity noise - x0."""
    x_t = (1.0 - t)[:, None, None] * x0 + t[:, None, None] * noise
    velocity = model(x_t, img_ids, txt, txt_ids, t, y)
    return jnp.mean(jnp.square(velocity.astype(jnp.float32) - (noise - x0)))


def train_teacher(config: TeacherConfig, *, progress: bool = True) -> tuple[epath.Path, list[float]]:
    """Trains the world's teacher and saves it; returns (checkpoint path, loss every 25 steps).
    Raises TeacherConfigError for a bad config, before any training."""
    world = find_world(config.world)
    if world is None:
        raise TeacherConfigError(f"unknown world {config.world!r}; known: {', '.join(WORLDS)}")
    if min(config.steps, config.batch_size) < 1 or not 0.0 <= config.ema_decay < 1.0:
        raise TeacherConfigError("steps and batch_size must be at least 1, and ema_decay in [0, 1)")
    out = location(config.out) if config.out else world.teacher_path()
    if not config.overwrite and location(out).exists():
        raise OutputExistsError(f"{out}: already exists (leave out --no-overwrite to replace it)")
    images, labels = world.images("train")
    latents = world.to_latents(images)
    phrasings = world.prompts("train")
    pooled, features = world.prompt_encoder()([p.text for p in phrasings])

    model = Flux(world.flux_config(), rngs=nnx.Rngs(config.seed))
    schedule = optim.warmup_cosine(config.learning_rate, config.steps, config.warmup_steps)
    optimizer = nnx.Optimizer(model, optim.adamw(schedule), wrt=nnx.Param)
    img_ids, txt_ids = position_ids(config.batch_size, world.SIZE, world.SIZE, features.shape[1])

    # The average starts at zero and is divided by 1 - decay^steps at the end (as Adam's moments), so
    # a short run's teacher is not mostly its random initial weights.
    ema = nnx.clone(model)
    nnx.update(ema, jax.tree.map(jnp.zeros_like, nnx.state(ema, nnx.Param)))

    @nnx.jit(donate_argnums=(0, 1, 2))
    def step(model, optimizer, ema, x0, prompt_rows, key):
        k_noise, k_t = jax.random.split(key)
        noise = jax.random.normal(k_noise, x0.shape)
        t = jax.nn.sigmoid(jax.random.normal(k_t, (x0.shape[0],)) + config.time_shift)
        loss, grads = nnx.value_and_grad(flow_matching_loss)(model, x0, noise, t, img_ids, features[prompt_rows],
                                                            txt_ids, pooled[prompt_rows])
        optimizer.update(model, grads)
        decay = config.ema_decay
        nnx.update(ema, jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, nnx.state(ema, nnx.Param), nnx.state(model, nnx.Param)))
        return loss

    rng = np.random.default_rng(config.seed)
    losses = []
    bar = tqdm(range(config.steps), desc=f"{config.world} teacher", disable=not progress)
    for i in bar:
        rows = rng.integers(0, len(latents), config.batch_size)
        prompt_rows = world.paired_prompts(phrasings, labels[rows], rng)
        loss = step(model, optimizer, ema, latents[rows], prompt_rows, jax.random.key(config.seed * 1_000_003 + i))
        if i % 25 == 0 or i == config.steps - 1:
            losses.append(float(loss))
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
    correction = 1.0 - config.ema_decay ** config.steps
    nnx.update(ema, jax.tree.map(lambda e: e / correction, nnx.state(ema, nnx.Param)))
    save_flux(ema, out, overwrite=config.overwrite)
    return out, losses


def main(argv: list[str] | None = None) -> None:
    import tyro

    config = tyro.cli(TeacherConfig, args=sys.argv[1:] if argv is None else argv, prog=PROG)
    began = time.perf_counter()
    with reported_errors(PROG):
        out, losses = train_teacher(config)
    print(f"{config.world} teacher trained in {time.perf_counter() - began:.0f} s (loss {losses[0]:.3f} -> {losses[-1]:.3f}); saved to {out}")


if __name__ == "__main__":
    main()
