"""The distillation trainer on CPU: learning, its metrics and outputs, objectives, prompts, bad input."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert import CheckpointError, load_flux
from flux_jax import Flux, FluxConfig
from flux_jax.sampling import schedule
from flux_jax.ternary import describe, quantize_model
from train import distill
from train.config import MeshConfig
from train.data import DataError, PromptEmbeddings, position_ids
from train.losses import distill_loss
from train.mesh import MeshError, make_mesh

from tests.distill_runs import BASE, run


def fixed_states_loss(student, teacher):
    """The velocity loss on fixed states drawn once from the teacher's trajectories."""
    prompts = PromptEmbeddings.random(8, 4, teacher.config, seed=123)
    img_ids, txt_ids = position_ids(8, 8, 8, 4)
    x = jax.random.normal(jax.random.key(5), (8, 16, teacher.config.in_channels))
    t = jnp.asarray(schedule(3, 16)[:3].repeat(3)[:8])
    g = jnp.full((8,), 3.5)
    return float(distill_loss(student, teacher, x, t, img_ids, prompts.txt, txt_ids, prompts.y, g)[0])


def test_distillation_brings_the_student_closer_to_its_teacher(tmp_path):
    result = run(tmp_path, "run", steps=80, learning_rate=3e-3, save_every=80, sample_every=40, profile_steps=(3, 4))
    teacher = Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(BASE.seed))  # the trainer's random teacher
    before = fixed_states_loss(quantize_model(teacher), teacher)
    after = fixed_states_loss(result["student"], teacher)
    assert after < 0.75 * before, (before, after)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 81))
    assert {"loss", "velocity_loss", "feature_loss", "grad_norm", "lr", "step_time_s", "samples_per_s", "tokens_per_s"} <= set(rows[0])
    assert rows[0]["compile_s"] > 0 and not any("compile_s" in r for r in rows[1:])  # once per start
    for row in rows:  # 4 x 4 image patches and 4 text tokens per sample, 8 samples per step
        np.testing.assert_allclose([row["samples_per_s"], row["tokens_per_s"]], [8 / row["step_time_s"], 8 * 20 / row["step_time_s"]], rtol=1e-6)
    traces = [f for _, _, files in os.walk(tmp_path / "run" / "profile") for f in files]
    assert any(f.endswith(".xplane.pb") for f in traces), traces
    assert sorted(os.listdir(tmp_path / "run" / "samples")) == ["step-0000040.png", "step-0000080.png"]
    from PIL import Image

    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step-0000080.png"))
    assert grid.shape == (2 * 8 * 4, 4 * 8 * 4, 3) and grid.std() > 0  # teacher row over student row, 4 prompts
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert len(events) == 1 and events[0].startswith("events.out.tfevents")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    tags = {v.tag for e in EventFileLoader(str(tmp_path / "run" / "tensorboard" / events[0])).Load() for v in e.summary.value}
    assert {"loss", "compile_s", "samples_per_s", "tokens_per_s"} <= tags
    exported = load_flux(tmp_path / "run" / "student")
    assert describe(exported)[0] == "student"
    assert fixed_states_loss(exported, teacher) == pytest.approx(after, rel=1e-5)


def test_a_fresh_student_is_one_compiled_program(caplog):
    """Quantizing, placing and giving the student its optimizer compiles one program (leaf by leaf it
    was a hundred small ones), and places each leaf by its logical names."""
    mesh = make_mesh(MeshConfig(data=1, fsdp=8, tensor=1))
    teacher = distill.load_teacher("tiny", mesh, seed=0)  # placed on the mesh, as the trainer's is
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level("WARNING"), jax.set_mesh(mesh):
            student, optimizer = distill.new_state(BASE, teacher, mesh)
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Finished XLA compilation")]
    assert len(compiled) <= 2, compiled
    reference = quantize_model(teacher)
    for (path, ours), (_, theirs) in zip(nnx.to_flat_state(nnx.state(student)), nnx.to_flat_state(nnx.state(reference))):
        np.testing.assert_array_equal(np.asarray(ours[...]), np.asarray(theirs[...]), err_msg=str(path))
    qkv = student.double_blocks[0].img_attn.qkv.kernel
    assert qkv[...].sharding.is_equivalent_to(distill.leaf_sharding(qkv, mesh), 2) and "fsdp" in str(qkv[...].sharding.spec)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    real = distill.distill_loss

    def poisoned(*args, **kwargs):  # nan whenever the state is not pure noise (t < 1)
        loss, parts = real(*args, **kwargs)
        return loss * jnp.where(args[3][0] < 0.99, jnp.nan, 1.0), parts

    monkeypatch.setattr(distill, "distill_loss", poisoned)
    with pytest.raises(distill.TrainingError, match=r"loss is nan at step \d+; stopped without saving") as info:
        run(tmp_path, "nan", steps=12, save_every=1, sampler_steps=2)
    failed = int(str(info.value).split("at step ")[1].split(";")[0])
    saved = sorted(int(p) for p in os.listdir(tmp_path / "nan" / "checkpoints") if p.isdigit())
    assert failed > 1 and saved[-1] == failed - 1
    assert f"the last good checkpoint is step {failed - 1}" in str(info.value)


@pytest.mark.parametrize(
    "changes, error, message",
    [
        (dict(teacher="/nonexistent/teacher"), CheckpointError, "no such file or folder"),
        (dict(mesh=MeshConfig(data=3, fsdp=1, tensor=1)), MeshError, "does not divide the 8 devices"),
        (dict(batch_size=6, mesh=MeshConfig(data=1, fsdp=4, tensor=1)), distill.ConfigError, "not divisible by the data axes"),
    ],
)
def test_bad_configs_give_one_clear_error(tmp_path, changes, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path, "bad", **changes)
    assert not (tmp_path / "bad").exists()


def test_empty_prompt_file_is_named(tmp_path):
    np.savez(tmp_path / "empty.npz", txt=np.zeros((0, 4, 48), np.float32), y=np.zeros((0, 32), np.float32))
    with pytest.raises(DataError, match="empty.npz: holds no prompts"):
        run(tmp_path, "bad", prompts=str(tmp_path / "empty.npz"))


def test_latent_cache_is_built_once_resumes_and_feeds_training(tmp_path):
    config = dataclasses.replace(BASE, workdir=str(tmp_path / "cached"), objective="cache", steps=3)
    with pytest.raises(DataError, match="missing from the latent cache"):
        distill.train(config)
    folder = distill.cache(config)
    chunks = sorted(os.listdir(str(folder)))
    assert chunks == ["chunk-00000.npy"]
    latents = np.load(str(folder / chunks[0]))
    assert latents.shape == (16, 16, 16) and np.isfinite(latents).all() and latents.std() > 0.1
    stamp = os.path.getmtime(str(folder / chunks[0]))
    distill.cache(config)  # present chunks are kept, not sampled again
    assert os.path.getmtime(str(folder / chunks[0])) == stamp
    losses = distill.train(config)["losses"]
    assert sorted(losses) == [1, 2, 3] and all(np.isfinite(v) for v in losses.values())


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.pipeline_reference import tiny_pipeline

    folder = tmp_path_factory.mktemp("pipe") / "tiny-dev"
    tiny_pipeline().save_pretrained(folder)
    return folder


def test_text_prompts_are_encoded_with_the_teachers_own_encoders(tmp_path, pipeline_folder):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red fox in the snow"}\n\n"a blue cat"\n{"prompt": "the digit seven"}\n')
    config = dataclasses.replace(BASE, teacher=str(pipeline_folder), prompts=str(tmp_path / "prompts.jsonl"), text_length=12,
                                 batch_size=2, workdir=str(tmp_path / "run"), steps=2)
    teacher = load_flux(pipeline_folder / "transformer")
    world = distill.prompt_world(config)
    assert world is None  # a pipeline folder, not a world
    prompts = distill.load_prompts(config, distill.prompt_texts(config, world), teacher.config,
                                   make_mesh(MeshConfig(data=1, fsdp=2, tensor=1), jax.devices()[:2]), world)
    import torch
    from diffusers import FluxPipeline as TorchFluxPipeline

    reference = TorchFluxPipeline.from_pretrained(pipeline_folder)
    with torch.no_grad():
        txt, y, _ = reference.encode_prompt(["a red fox in the snow", "a blue cat", "the digit seven"], None,
                                            max_sequence_length=12)
    txt, y = txt.numpy(), y.numpy()
    assert prompts.txt.shape == (3, 12, teacher.config.context_in_dim)
    for ours, reference in ((prompts.txt, txt), (prompts.y, y)):  # the project's bar against PyTorch
        assert np.abs(ours - reference).max() <= 1e-4 * np.abs(reference).max()
    assert distill.train(config)["last_step"] == 2


@pytest.mark.parametrize(
    "content, message",
    [("", "holds no prompts"), ('{"text": "a fox"}\n', r"prompts.jsonl:1: not a JSON string"),
     ('"a fox"\n{"prompt": ""}\n', r"prompts.jsonl:2: the prompt is not a non-empty string")],
)
def test_bad_prompt_files_are_named(tmp_path, content, message):
    (tmp_path / "prompts.jsonl").write_text(content)
    with pytest.raises(DataError, match=message):
        run(tmp_path, "bad", prompts=str(tmp_path / "prompts.jsonl"))
    assert not (tmp_path / "bad").exists()


def test_text_prompts_need_text_encoders(tmp_path):
    (tmp_path / "prompts.txt").write_text("a red fox\n")
    with pytest.raises(CheckpointError, match="missing component text_encoder/.*--text-encoders"):
        run(tmp_path, "bad", prompts=str(tmp_path / "prompts.txt"), text_encoders=str(tmp_path))


def test_feature_matching_is_logged_and_trains(tmp_path):
    result = run(tmp_path, "features", feature_weight=0.5, steps=4, save_every=4)
    rows = [json.loads(line) for line in (tmp_path / "features" / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        assert row["feature_loss"] > 0
        np.testing.assert_allclose(row["loss"], row["velocity_loss"] + 0.5 * row["feature_loss"], rtol=1e-5)
    assert result["last_step"] == 4


def test_the_step_does_not_copy_the_teacher():
    """Only the loss and metrics leave the step unaliased: the teacher comes in as plain weights that are
    read, not returned (as a module argument it came back out, a full copy of it every step)."""
    teacher = Flux(FluxConfig.preset("tiny"), rngs=nnx.Rngs(0))
    student = quantize_model(teacher)
    optimizer = nnx.Optimizer(student, distill.optimizer_for(BASE), wrt=nnx.Param)
    graph, weights = distill.frozen(teacher)
    step = distill.make_train_step(BASE, text_length=4, teacher_graph=graph)
    prompts = PromptEmbeddings.random(8, 4, teacher.config, seed=0)
    stats = step.lower(student, optimizer, weights, prompts.txt, prompts.y, None, jax.random.key(0)).compile().memory_analysis()
    teacher_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(weights))
    assert stats.output_size_in_bytes - stats.alias_size_in_bytes < 0.01 * teacher_bytes


def test_a_random_teacher_on_a_mesh_that_does_not_divide_it_is_refused():
    """Preset teachers are built under the mesh, not through `fill`: the same sharding check applies."""
    from flux_jax.sharding import ShardingError

    mesh = make_mesh(MeshConfig(data=1, fsdp=3, tensor=1), jax.devices()[:3])
    with pytest.raises(ShardingError, match=r"single_blocks\.0\.linear1\.kernel"):
        distill.load_teacher("tiny", mesh, seed=0)
