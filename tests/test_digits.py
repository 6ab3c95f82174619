"""The digits world, its teacher, the evaluation and the default main job, in shortened runs: the
pieces work and their outputs are sane. The quality goals themselves are measured by the full run
(`python -m train.distill`, recorded in docs/benchmarks.md), not asserted here."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import linalg

from convert import load_flux
from flux_jax import FluxConfig
from train import evaluate
from train.teacher import TeacherConfig, train_teacher
from train.worlds import digits

ROOT = Path(__file__).resolve().parents[1]


def test_prompts_cover_every_digit_with_held_out_phrasings():
    train, held_out = digits.prompts("train"), digits.prompts("held_out")
    assert len(train) == 10 * len(digits.TRAIN_PHRASINGS) and len(held_out) == 10 * len(digits.HELD_OUT_PHRASINGS)
    assert {p.digit for p in held_out} == set(range(10)) and all(p.held_out for p in held_out)
    assert not {p.text for p in train} & {p.text for p in held_out}
    assert "a handwritten seven" in {p.text for p in train}
    encoder = digits.prompt_encoder()
    for tokenizer in (encoder.clip_tokenizer, encoder.t5_tokenizer):
        ids = tokenizer([p.text for p in digits.prompts("all")])["input_ids"]
        assert tokenizer.unk_token_id not in {i for row in ids for i in row}  # every word is in the vocabulary


def test_images_are_the_sklearn_digits_at_16x16():
    from sklearn.datasets import load_digits

    x, labels = digits.images()
    assert x.shape == (1797, 16, 16) and x.min() == -1.0 and x.max() == 1.0
    original = load_digits().images / 16.0 * 2 - 1
    # each source pixel's centre lies between output pixels 2i and 2i+1: their mean in both directions
    # is the source pixel wherever no clamping happens
    inner = x[:, 1:15, 1:15].reshape(1797, 7, 2, 7, 2).mean(axis=(2, 4))
    np.testing.assert_allclose(inner, 0.25 * (original[:, :-1, :-1] + original[:, 1:, :-1] + original[:, :-1, 1:] + original[:, 1:, 1:]),
                               atol=1e-5)
    np.testing.assert_array_equal(labels, load_digits().target)
    train, test = digits.images("train")[1], digits.images("test")[1]
    assert len(train) + len(test) == 1797 and abs(len(test) - 360) <= 1
    np.testing.assert_array_equal(digits.to_images(digits.to_latents(x[:5])), x[:5])


def test_encoders_are_fixed_by_their_seed():
    y, txt = digits.prompt_encoder()(["a handwritten seven", "the digit 7"])
    digits.prompt_encoder.cache_clear()
    y2, txt2 = digits.prompt_encoder()(["a handwritten seven", "the digit 7"])
    np.testing.assert_array_equal(txt, txt2)
    np.testing.assert_array_equal(y, y2)
    assert txt.shape == (2, digits.TEXT_LENGTH, FluxConfig.preset("digits").context_in_dim)
    assert y.shape == (2, FluxConfig.preset("digits").vec_in_dim)
    assert not np.allclose(txt[0], txt[1])


def test_the_digits_world_is_a_world_found_by_name_only():
    from train.worlds import World, find_world

    assert isinstance(digits, World) and find_world("digits") is digits
    assert find_world("flux-dev") is None and find_world("/runs/teacher") is None and find_world(None) is None


def test_frechet_distance_matches_the_gaussian_formula():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3))
    b = rng.standard_normal((20000, 3)) * np.array([1.0, 2.0, 0.5]) + np.array([1.0, 0.0, 0.0])
    # closed form for N(0, I) vs N(mu, diag(s^2)): |mu|^2 + sum (1 + s^2 - 2 s)
    expected = 1.0 + sum(1 + s * s - 2 * s for s in (1.0, 2.0, 0.5))
    assert abs(evaluate.frechet_distance(a, b) - expected) < 0.05
    assert abs(evaluate.frechet_distance(a, a)) < 1e-6
    # correlated features, against scipy's matrix square root
    c = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6)) + 1.0
    d = rng.standard_normal((500, 6)) @ rng.standard_normal((6, 6))
    cov_c, cov_d = np.cov(c, rowvar=False), np.cov(d, rowvar=False)
    scipy_formula = np.sum((d.mean(0) - c.mean(0)) ** 2) + np.trace(cov_d + cov_c - 2 * linalg.sqrtm(cov_d @ cov_c).real)
    assert evaluate.frechet_distance(d, c) == pytest.approx(scipy_formula, rel=1e-9)


def test_psnr_by_hand():
    a = np.zeros((1, 16, 16))
    assert np.isclose(evaluate.psnr(a, a + 0.2)[0], 20 * np.log10(2 / 0.2))


def test_classifier_reads_real_digits():
    classifier = evaluate.DigitClassifier()
    assert classifier.test_accuracy >= 95.0  # 98.3 measured
    x, labels = digits.images("test")
    assert np.mean(classifier.predict(x) == labels) * 100 == pytest.approx(classifier.test_accuracy)
    assert classifier.features(x).shape == (len(x), 128)


@pytest.fixture(scope="module")
def short_world(tmp_path_factory):
    """A shortened teacher in a private cache, and a shortened default run distilled from it."""
    cache = tmp_path_factory.mktemp("cache")
    env = {**os.environ, "FLUX_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    teacher = subprocess.run([sys.executable, "-m", "train.teacher", "--world", "digits", "--steps", "300"], env=env,
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    run = cache / "run"
    distill = subprocess.run([sys.executable, "-m", "train.distill", "--steps", "6", "--save-every", "3", "--sample-every", "3", "--eval-samples", "2",
                              "--workdir", str(run)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert distill.returncode == 0, distill.stderr[-3000:]
    return cache, run, teacher.stdout, distill.stdout


def test_teacher_training_lowers_the_loss_and_saves_a_checkpoint(short_world):
    """The shortened teacher of the run below (`python -m train.teacher`, 300 of the default 1200 steps)."""
    cache, _, teacher_out, _ = short_world
    first, last = (float(v) for v in teacher_out.split("(loss ")[1].split(")")[0].split(" -> "))
    assert last < 0.7 * first, teacher_out
    out = cache / "digits" / "teacher"
    model = load_flux(out)
    assert model.config == FluxConfig.preset("digits")
    # the saved weights (the bias-corrected average) fit the flow better than the initial ones
    import jax
    from flax import nnx

    from flux_jax import Flux
    from train.data import position_ids
    from train.teacher import flow_matching_loss

    images, labels = digits.images("test")
    y, txt = digits.prompt_encoder()([digits.TRAIN_PHRASINGS[0].format(word=digits.NUMBER_WORDS[d], digit=d) for d in labels[:32]])
    x0 = digits.to_latents(images[:32])
    noise = jax.random.normal(jax.random.key(1), x0.shape)
    t = jax.nn.sigmoid(jax.random.normal(jax.random.key(2), (32,)) + 1.4)
    img_ids, txt_ids = position_ids(32, digits.SIZE, digits.SIZE, digits.TEXT_LENGTH)
    fresh = Flux(FluxConfig.preset("digits"), rngs=nnx.Rngs(0))
    trained, initial = (float(flow_matching_loss(m, x0, noise, t, img_ids, txt, txt_ids, y)) for m in (model, fresh))
    assert trained < 0.5 * initial, (trained, initial)


def table_rows(text: str) -> dict[str, list[str]]:
    """The evaluation table's rows as printed (`train.evaluate.table`), by model name."""
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("model"))
    return {line.split()[0]: line.split() for line in lines[header + 2: header + 6]}


def test_default_main_job_distills_packs_and_prints_the_table(short_world):
    """The run's one evaluation (its table is also what the notebook must reproduce below): figures
    checked against what they must equal, not only their ranges."""
    from flax import nnx

    from flux_jax import Flux
    from flux_jax.ternary import pack_model

    cache, run, teacher_out, out = short_world
    assert f"saved to {cache / 'digits' / 'teacher'}" in teacher_out
    assert "done at step 6" in out and f"packed in {run / 'packed'}" in out
    rows = table_rows(out)
    assert list(rows) == ["teacher", "ptq", "student", "packed"]
    for name, row in rows.items():
        adherence, per_class = float(row[1].rstrip("%")), [float(a) for a in row[7:17]]
        # 2 samples x 9 training phrasings per digit: every class's adherence is a multiple of 1/18
        assert all(min(abs(a - 100 * k / 18) for k in range(19)) <= 0.5 for a in per_class), row
        assert abs(np.mean(per_class) - adherence) <= 0.5, row  # equal counts per class, each rounded to 1
    # 300 teacher steps draw the asked digit far above chance (10%): 42.8% measured, 180 samples
    assert float(rows["teacher"][1].rstrip("%")) >= 25.0, rows["teacher"]
    # the packed model runs the student's ternary weights exactly: the same samples, so the same figures
    assert rows["packed"][1:6] == rows["student"][1:6] and rows["packed"][7:] == rows["student"][7:]
    assert rows["teacher"][4:6] == ["-", "-"] and rows["student"][4] != "-"
    digits_config = FluxConfig.preset("digits")
    parameters = sum(v.size for v in jax_leaves(nnx.state(nnx.eval_shape(lambda: Flux(digits_config, rngs=nnx.Rngs(0))))))
    assert int(rows["teacher"][6].replace(",", "")) == 4 * parameters == int(rows["ptq"][6].replace(",", ""))
    packed = load_flux(run / "packed")
    assert int(rows["packed"][6].replace(",", "")) == evaluate.parameter_bytes(pack_model(load_flux(run / "student")))
    assert int(rows["packed"][6].replace(",", "")) == evaluate.parameter_bytes(packed) < parameters  # under a byte a parameter
    assert "[x] packed equals unpacked: max |packed - student| = 0 over all samples" in out
    assert "digit classifier: 98.3% on held-out real digits" in out
    assert (run / "samples" / "step-0000006.png").is_file()
    from PIL import Image

    grid = np.asarray(Image.open(run / "digits-grid.png"))  # rows teacher, ptq, student, packed; columns 0..9
    assert grid.shape[:2] == (4 * 16 * 4, 10 * 16 * 4)
    assert packed.config == digits_config


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_evaluate_cli_refuses_bad_settings_in_one_line():
    result = subprocess.run([sys.executable, "-m", "train.evaluate", "--student", "nowhere", "--samples", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode != 0 and "samples and sampler_steps must be at least 1, got 0 and 16" in result.stderr
    assert "Traceback" not in result.stderr


def test_quickstart_notebook_reproduces_the_runs_evaluation(short_world):
    """The notebook evaluates the run's models itself, at the run's number of samples: its table must
    carry the very numbers the run printed (same models from disk, same seeds)."""
    cache, run, _, out = short_world
    env = {**os.environ, "FLUX_JAX_CACHE": str(cache), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code")  # committed clean
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}})
    client.execute(env={**env, "DIGITS_RUN": str(run), "DIGITS_EVAL_SAMPLES": "2"})
    text = "\n".join(o.get("text", "") for c in notebook.cells for o in c.get("outputs", []))
    assert table_rows(text) == table_rows(out)
    assert "flux-dev  ternary fraction 99.44%" in text


def test_bad_teacher_configs_fail_before_training(tmp_path):
    from flux_jax.io.errors import OutputExistsError
    from train.teacher import TeacherConfigError

    with pytest.raises(TeacherConfigError, match="steps and batch_size must be at least 1"):
        train_teacher(TeacherConfig(steps=0, out=str(tmp_path / "t")))
    with pytest.raises(TeacherConfigError, match="unknown world 'letters'"):
        train_teacher(TeacherConfig(world="letters", out=str(tmp_path / "t")))
    (tmp_path / "t").mkdir()
    with pytest.raises(OutputExistsError, match="already exists"):
        train_teacher(TeacherConfig(overwrite=False, out=str(tmp_path / "t")))
    assert not any((tmp_path / "t").iterdir())


def test_the_default_job_trains_the_teacher_when_the_cache_has_none(tmp_path, monkeypatch, capsys):
    import dataclasses

    import jax

    from train import distill
    from train.config import MeshConfig
    from train.mesh import make_mesh

    monkeypatch.setenv("FLUX_JAX_CACHE", str(tmp_path))
    calls = []

    def shortened(config, progress):
        calls.append(config)
        return train_teacher(dataclasses.replace(config, steps=4), progress=False)

    monkeypatch.setattr(distill, "train_teacher", shortened)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    teacher = distill.load_teacher("digits", mesh, seed=0)
    assert [c.world for c in calls] == ["digits"] and teacher.config == FluxConfig.preset("digits")
    assert "no digits teacher" in capsys.readouterr().out
    distill.load_teacher("digits", mesh, seed=0)  # found in the cache now: not trained again
    assert len(calls) == 1
