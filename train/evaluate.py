"""`python -m train.evaluate`: the paper's claim measured on the digits world. A digit classifier
trained on scikit-learn's digits judges samples of four models from the same prompts and seeds:

    teacher     the full-precision FLUX-shaped model trained by flow matching
    ptq         the teacher rounded to ternary, no training
    student     the ternary student distilled data-free from the teacher
    packed      the student packed to 2 bits, run through `ternary_matmul`

Columns: prompt adherence (samples classified as the prompted digit, GenEval's idea), the same on
held-out phrasings, a Frechet distance to real test digits on the classifier's hidden features,
agreement with the teacher for the same seed (same class, PSNR) and the parameters' bytes.

    python -m train.evaluate                                # digits teacher + runs/digits/student
    python -m train.evaluate --student runs/digits/student --samples 16 --grid grid.png
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx
from tqdm.auto import tqdm

from flux_jax.io.cli import reported_errors
from flux_jax.io.errors import CheckpointError
from flux_jax.model import Flux
from flux_jax.sampling import sample
from flux_jax.ternary import describe, pack_model, quantize_model
from train.worlds import digits

PROG = "python -m train.evaluate"
GOALS = {"teacher_adherence": 90.0, "student_gap": 3.0}


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Judging the digits world's teacher, its plain ternary rounding, the distilled student and its packing."""

    teacher: str | None = None
    """the teacher checkpoint (default: the digits world's cached teacher)"""
    student: str = "runs/digits/student"
    """the distilled student (WORKDIR/student of `python -m train.distill`)"""
    packed: str | None = None
    """the packed student (WORKDIR/packed); default: the student packed here"""
    samples: int = 8
    """samples per prompt and model (every digit in every phrasing)"""
    sampler_steps: int = 16
    seed: int = 0
    grid: str | None = None
    """where to write the PNG grid (one row per model, one column per digit); default: beside the student"""


class DigitClassifier:
    """A small MLP (scikit-learn) on 16x16 digits: judges adherence; its hidden layer gives the
    features of the Frechet distance."""

    def __init__(self, seed: int = 0):
        from sklearn.neural_network import MLPClassifier

        train_x, train_y = digits.images("train")
        test_x, test_y = digits.images("test")
        self.mlp = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-3, max_iter=400, random_state=seed)
        self.mlp.fit(train_x.reshape(len(train_x), -1), train_y)
        self.test_accuracy = 100.0 * float(self.mlp.score(test_x.reshape(len(test_x), -1), test_y))
        self.reference = self.features(test_x)

    def predict(self, images: np.ndarray) -> np.ndarray:
        return self.mlp.predict(images.reshape(len(images), -1))

    def features(self, images: np.ndarray) -> np.ndarray:
        hidden = images.reshape(len(images), -1) @ self.mlp.coefs_[0] + self.mlp.intercepts_[0]
        return np.maximum(hidden, 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) between two feature sets (rows). The trace
    of the root is taken as sum sqrt(eig(S_a^(1/2) S_b S_a^(1/2))), which stays exact when ReLU units
    that never fire make the covariances singular."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    values, vectors = np.linalg.eigh(cov_a)
    root_a = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = np.linalg.eigvalsh(root_a @ cov_b @ root_a)
    trace_root = float(np.sum(np.sqrt(np.clip(middle, 0.0, None))))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_root)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB for images in [-1, 1] (peak-to-peak 2)."""
    mse = np.mean((a - b) ** 2, axis=(-2, -1))
    return 20.0 * np.log10(2.0) - 10.0 * np.log10(np.maximum(mse, 1e-12))




def generate(model: Flux, txt: np.ndarray, y: np.ndarray, *, samples: int, sampler_steps: int, seed: int,
             batch_size: int = 160) -> np.ndarray:
    """Images (P, samples, 16, 16) for P encoded prompts; sample j of prompt i starts from the same
    noise for every model (seed, i, j), so models can be compared image by image."""
    n = len(txt) * samples
    rows = np.repeat(np.arange(len(txt)), samples)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(n))
    tokens = (digits.SIZE // 2) ** 2
    noise = jax.vmap(lambda k: jax.random.normal(k, (tokens, model.config.in_channels)))(keys)
    out = []
    for start in range(0, n, batch_size):
        part = slice(start, min(start + batch_size, n))
        size = part.stop - part.start
        pad = batch_size - size
        index = np.concatenate([rows[part], np.repeat(rows[part][-1:], pad)])
        x = jnp.concatenate([noise[part], jnp.repeat(noise[part][-1:], pad, axis=0)])
        out.append(np.asarray(sample(model, x, jnp.asarray(txt[index]), jnp.asarray(y[index]), latent_height=digits.SIZE,
                                     latent_width=digits.SIZE, steps=sampler_steps))[:size])
    return digits.to_images(np.concatenate(out)).reshape(len(txt), samples, digits.SIZE, digits.SIZE)


def parameter_bytes(model: Flux) -> int:
    """Bytes of the model's parameters as held (codes, scales and full-precision parts)."""
    return int(sum(leaf.nbytes for leaf in jax.tree.leaves(nnx.state(model))))


def evaluate(models: Mapping[str, Flux], classifier: DigitClassifier, *, samples: int = 8, sampler_steps: int = 16,
             seed: int = 0, progress: bool = True) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """(one row of figures per model, its images (P, samples, 16, 16)) over every prompt of the world."""
    prompts = digits.prompts("all")
    y, txt = digits.prompt_encoder()([p.text for p in prompts])
    txt, y = np.asarray(txt), np.asarray(y)
    wanted = np.repeat([p.digit for p in prompts], samples)
    held_out = np.repeat([p.held_out for p in prompts], samples)
    images, rows = {}, {}
    for name in tqdm(list(models), desc="evaluate", disable=not progress):
        images[name] = generate(models[name], txt, y, samples=samples, sampler_steps=sampler_steps, seed=seed)
        flat = images[name].reshape(-1, digits.SIZE, digits.SIZE)
        predicted = classifier.predict(flat)
        hit = predicted == wanted
        row = {
            "adherence": 100.0 * hit[~held_out].mean(),
            "held_out_adherence": 100.0 * hit[held_out].mean(),
            "per_class": [100.0 * hit[(wanted == d) & ~held_out].mean() for d in range(10)],
            "frechet": frechet_distance(classifier.features(flat), classifier.reference),
            "bytes": parameter_bytes(models[name]),
        }
        if "teacher" in images and name != "teacher":
            reference = images["teacher"].reshape(-1, digits.SIZE, digits.SIZE)
            row["same_class"] = 100.0 * float(np.mean(predicted == classifier.predict(reference)))
            row["psnr"] = float(np.mean(psnr(flat, reference)))
        if name == "packed" and "student" in images:
            row["student_max_diff"] = float(np.abs(images["packed"] - images["student"]).max())
        rows[name] = row
    return rows, images


def table(rows: Mapping[str, dict], classifier_accuracy: float) -> str:
    """The evaluation table and the goals, as printed."""
    head = (f"{'model':<8} {'adherence':>9} {'held-out':>8} {'Frechet':>8} {'same class':>10} {'PSNR dB':>7} "
            f"{'bytes':>10}   per-class adherence 0..9")
    lines = [f"digit classifier: {classifier_accuracy:.1f}% on held-out real digits", head, "-" * len(head)]
    for name, r in rows.items():
        same = f"{r['same_class']:.1f}%" if "same_class" in r else "-"
        level = f"{r['psnr']:.1f}" if "psnr" in r else "-"
        per_class = " ".join(f"{a:3.0f}" for a in r["per_class"])
        lines.append(f"{name:<8} {r['adherence']:8.1f}% {r['held_out_adherence']:7.1f}% {r['frechet']:8.2f} {same:>10} "
                     f"{level:>7} {r['bytes']:>10,}   {per_class}")
    lines += ["", "goals:"] + [f"  [{'x' if ok else ' '}] {text}" for text, ok in goals(rows)]
    return "\n".join(lines)


def goals(rows: Mapping[str, dict]) -> list[tuple[str, bool]]:
    """The claims the table tests, each with whether it holds."""
    out = []
    if "teacher" in rows:
        out.append((f"teacher adherence >= {GOALS['teacher_adherence']:.0f}%: {rows['teacher']['adherence']:.1f}%",
                    rows["teacher"]["adherence"] >= GOALS["teacher_adherence"]))
    if "teacher" in rows and "student" in rows:
        gap = rows["teacher"]["adherence"] - rows["student"]["adherence"]
        out.append((f"distilled student within {GOALS['student_gap']:.0f} points of the teacher: {gap:+.1f} points",
                    gap <= GOALS["student_gap"]))
    if "student" in rows and "packed" in rows:
        diff = rows["packed"]["student_max_diff"]
        out.append((f"packed equals unpacked: max |packed - student| = {diff:.2g} over all samples", diff <= 1e-3))
    if "ptq" in rows and "student" in rows:
        gap = rows["student"]["adherence"] - rows["ptq"]["adherence"]
        out.append((f"plain ternary rounding (PTQ) clearly worse than distillation: {gap:+.1f} points",
                    gap >= 10.0))
    return out


def load_models(teacher_path: str, student_path: str, packed_path: str | None = None) -> dict[str, Flux]:
    """The four models: PTQ rounds the teacher with the student's own policy."""
    from convert import load_flux

    teacher, student = load_flux(teacher_path), load_flux(student_path)
    packed = load_flux(packed_path) if packed_path else pack_model(student)
    for path, model, kind in ((student_path, student, "student"), (packed_path, packed, "packed")):
        if describe(model)[0] != kind:
            raise CheckpointError(f"{path}: a {describe(model)[0]} model, not a {kind} one")
    return {"teacher": teacher, "ptq": quantize_model(teacher, describe(student)[1]), "student": student, "packed": packed}


def run(config: EvaluateConfig, *, progress: bool = True) -> tuple[str, dict]:
    """Evaluates, writes the grid, returns (the printed table, the rows)."""
    if min(config.samples, config.sampler_steps) < 1:
        raise ValueError(f"samples and sampler_steps must be at least 1, got {config.samples} and {config.sampler_steps}")
    models = load_models(config.teacher or str(digits.teacher_path()), config.student, config.packed)
    classifier = DigitClassifier(config.seed)
    rows, images = evaluate(models, classifier, samples=config.samples, sampler_steps=config.sampler_steps,
                            seed=config.seed, progress=progress)
    grid_path = epath.Path(config.grid) if config.grid else epath.Path(config.student).parent / "digits-grid.png"
    save_grid(images, grid_path)
    text = table(rows, classifier.test_accuracy) + f"\n\ngrid (rows {', '.join(images)}; columns 0..9): {grid_path}"
    return text, rows


def save_grid(images: Mapping[str, np.ndarray], path: epath.Path, scale: int = 4) -> None:
    """One row per model, one column per digit: the first sample of each digit's first phrasing."""
    from train.samples import save_png

    first = [i for i, p in enumerate(digits.prompts("all")) if p.text == digits.TRAIN_PHRASINGS[0].format(
        word=digits.NUMBER_WORDS[p.digit], digit=p.digit)]
    rows = [np.concatenate([im[i, 0] for i in first], axis=1) for im in images.values()]
    grey = np.round((np.concatenate(rows, axis=0) + 1.0) * 127.5).astype(np.uint8)
    save_png(np.repeat(grey[..., None], 3, axis=-1), path, scale=scale)


def main(argv: list[str] | None = None) -> None:
    import tyro

    config = tyro.cli(EvaluateConfig, args=sys.argv[1:] if argv is None else argv, prog=PROG)
    with reported_errors(PROG, also=(ValueError,)):  # settings are checked with ValueError
        text, _ = run(config)
    print(text)


if __name__ == "__main__":
    main()
