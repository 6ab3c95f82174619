"""What the student learns from, with no images: prompts (text encoded once before training, or
precomputed embeddings), and states along the teacher's own trajectories from noise. Every batch is a
pure function of (seed, step), so a resumed run draws the same batches as an uninterrupted one."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from flux_jax.config import FluxConfig
from flux_jax.io.errors import UserError
from flux_jax.io.files import location
from flux_jax.sampling import image_ids, schedule, text_ids


class DataError(UserError, ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class PromptEmbeddings:
    txt: np.ndarray  # (N, S, context_in_dim)
    y: np.ndarray  # (N, vec_in_dim)

    @classmethod
    def load(cls, path: str, config: FluxConfig) -> PromptEmbeddings:
        """From an .npz with arrays `txt` and `y` (one row per prompt)."""
        if not location(path).is_file():
            raise DataError(f"{path}: no such prompt embeddings file")
        try:
            with location(path).open("rb") as f, np.load(f) as data:
                txt, y = np.asarray(data["txt"], np.float32), np.asarray(data["y"], np.float32)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{path}: not an .npz with arrays 'txt' and 'y' ({err})") from None
        if len(txt) == 0:
            raise DataError(f"{path}: holds no prompts")
        return cls(txt, y)._checked(path, config)

    def _checked(self, source: str, config: FluxConfig) -> PromptEmbeddings:
        txt, y = self.txt, self.y
        if txt.ndim != 3 or txt.shape[2] != config.context_in_dim or y.shape != (len(txt), config.vec_in_dim):
            raise DataError(f"{source}: txt {txt.shape} and y {y.shape} do not fit the teacher "
                            f"(context_in_dim {config.context_in_dim}, vec_in_dim {config.vec_in_dim})")
        return self

    @classmethod
    def encode(cls, encoder, prompts: Sequence[str], config: FluxConfig, *, batch_size: int,
               source: str = "text encoders") -> PromptEmbeddings:
        """Prompts through `encoder` (a flux_jax.text.PromptEncoder), `batch_size` at a time (the last
        batch padded, so one compiled shape serves all); every process encodes every prompt."""
        from jax.experimental import multihost_utils

        txt, y = [], []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start:start + batch_size])
            pooled, features = encoder(chunk + [chunk[-1]] * (batch_size - len(chunk)))
            if jax.process_count() > 1:
                pooled, features = multihost_utils.process_allgather((pooled, features), tiled=True)
            txt.append(np.asarray(features, np.float32)[: len(chunk)])
            y.append(np.asarray(pooled, np.float32)[: len(chunk)])
        return cls(np.concatenate(txt), np.concatenate(y))._checked(source, config)

    @classmethod
    def random(cls, n: int, length: int, config: FluxConfig, seed: int) -> PromptEmbeddings:
        """Gaussian stand-ins for encoded prompts, for smoke runs of the trainer itself."""
        rng = np.random.default_rng(seed)
        return cls(rng.standard_normal((n, length, config.context_in_dim)).astype(np.float32),
                   rng.standard_normal((n, config.vec_in_dim)).astype(np.float32))


def read_prompts(path: str) -> list[str]:
    """Text prompts: one per line of a .txt file, or one JSON object with a "prompt" field (or a JSON
    string) per line of a .jsonl file. Blank lines are skipped."""
    file = location(path)
    if not file.is_file():
        raise DataError(f"{path}: no such prompt file")
    prompts = []
    for number, line in enumerate(_utf8_text(path, file.read_bytes()).splitlines(), 1):
        if not line.strip():
            continue
        if file.suffix != ".jsonl":
            prompts.append(line.strip())
            continue
        try:
            record = json.loads(line)
            prompts.append(record if isinstance(record, str) else record["prompt"])
        except (ValueError, KeyError, TypeError):
            raise DataError(f"{path}:{number}: not a JSON string or an object with a \"prompt\" field") from None
        if not isinstance(prompts[-1], str) or not prompts[-1].strip():
            raise DataError(f"{path}:{number}: the prompt is not a non-empty string")
    if not prompts:
        raise DataError(f"{path}: holds no prompts")
    return prompts


def _utf8_text(path: str, raw: bytes) -> str:
    """`raw` decoded as UTF-8 (a leading byte-order mark dropped); anything else is the user's to fix,
    so the error says where the first undecodable byte is rather than tracing back."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[err.start:err.start + 1]!r} at offset {err.start}); "
                        "save the file as UTF-8") from None


def batch_indices(num_prompts: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Prompts of one step: the step's slice of a per-epoch permutation."""
    per_epoch = max(num_prompts // batch_size, 1)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(num_prompts)
    return np.resize(np.roll(order, -position * batch_size), batch_size)


def trajectory_state(teacher, noise, img_ids, txt, txt_ids, y, guidance, key, *, sampler_steps: int):
    """A training state from the teacher alone: each sample runs the teacher's Euler sampler from its
    noise for its own random number of steps k_i < sampler_steps; returns (x at sigma_k, sigma_k (B,)).
    The batch spans noise levels, and the teacher runs max_i k_i forwards of the whole batch (samples
    already at their k stay put), so a step costs `expected_sampler_forwards` teacher forwards. Nothing
    here is differentiated. The schedule is shifted for guidance-distilled teachers (dev), not schnell."""
    batch, length, _ = noise.shape
    sigmas = jnp.asarray(schedule(sampler_steps, length, shift=teacher.config.guidance_embed))
    k = jax.random.randint(key, (batch,), 0, sampler_steps)

    def step(i, x):
        v = teacher(x, img_ids, txt, txt_ids, jnp.full((batch,), sigmas[i], jnp.float32), y, guidance)
        moved = (x.astype(jnp.float32) + (sigmas[i + 1] - sigmas[i]) * v.astype(jnp.float32)).astype(x.dtype)
        return jnp.where((i < k)[:, None, None], moved, x)

    x = jax.lax.fori_loop(0, jnp.max(k), step, noise)
    return jax.lax.stop_gradient(x), sigmas[k]


def expected_sampler_forwards(sampler_steps: int, batch: int) -> float:
    """E[max k] over a batch of k ~ U{0 .. sampler_steps - 1}: the teacher forwards `trajectory_state`
    runs per step (the sum over m >= 1 of P(max >= m)): just under sampler_steps * batch / (batch + 1)."""
    return float(sum(1 - (m / sampler_steps) ** batch for m in range(1, sampler_steps)))


def position_ids(batch: int, latent_height: int, latent_width: int, text_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Image and text position ids as NumPy: constants a jitted step closes over must not be device
    arrays, or the step cannot be lowered for devices that are not here (deviceless compiles)."""
    return image_ids(batch, latent_height, latent_width), text_ids(batch, text_length)
