"""`python -m train.distill`: data-free distillation of a ternary FLUX student from its full-precision
teacher. The teacher is the only source of signal: states come from its own sampler trajectories
from noise (or around latents it sampled once), and the loss is the MSE between student and teacher
velocities at those states, optionally plus the mismatch of their hidden states after every block.

    python -m train.distill                                   # the digits world: teacher, student, table
    python -m train.distill smoke --steps 100 --mesh.fsdp 8
    python -m train.distill cache smoke && python -m train.distill smoke --objective cache
    python -m train.distill flux-dev --prompts prompts.txt --workdir gs://b/run
    python -m train.distill flux-dev --config run.toml --steps 100   # preset < file < flags

Setup (mesh, teacher, prompts; the student quantized in one compiled program, or restored into shapes)
then one flat loop of small steps: batch -> jit step -> on sync steps read the losses, agree to stop,
log, sample, save. A run resumes from the latest checkpoint in its workdir, on any mesh, with the
settings it was started with (WORKDIR/config.json; `--allow-config-change FIELD...` accepts changes);
SIGTERM saves and exits; a non-finite loss stops the run and leaves the last good checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

import jax
import jax.numpy as jnp
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm.auto import tqdm

from convert import load_flux, save_flux
from convert.orbax_io import META_FILE, is_flux_checkpoint, write_flux
from convert.pipeline_io import load_prompt_encoder
from flux_jax.config import PRESETS as MODEL_PRESETS
from flux_jax.config import FluxConfig
from flux_jax.io.cli import reported_errors
from flux_jax.io.errors import CheckpointError, UserError
from flux_jax.io.files import append_file, location, persist, write_file
from flux_jax.model import Flux
from flux_jax.params import leaf_sharding
from flux_jax.sharding import check_sharded
from flux_jax.ternary import QuantPolicy, build, pack_model, quantize_model
from train import checkpointing, optim
from train.cache import build_cache, cached_state, load_cache
from train.config import PRESETS, RESUME_FREE_FIELDS, DistillConfig
from train.data import PromptEmbeddings, batch_indices, position_ids, read_prompts, trajectory_state
from train.losses import distill_loss
from train.mesh import make_mesh
from train.samples import sample_grid, save_png
from train.teacher import TeacherConfig, train_teacher
from train.tensorboard import ScalarWriter
from train.worlds import World, find_world

PROG = "python -m train.distill"


class TrainingError(UserError, RuntimeError):
    """The run cannot go on (a non-finite loss); the message says where the last good checkpoint is."""


class ConfigError(UserError, ValueError):
    pass


def load_teacher(spec: str, mesh: Mesh, seed: int) -> Flux:
    """A world's name gives its trained teacher (trained first when its cache has none); a FluxConfig
    preset name a random teacher (smoke runs); anything else goes to load_flux."""
    world = find_world(spec)
    if world is not None:
        path = world.teacher_path()
        found = is_flux_checkpoint(path)
        if jax.process_count() > 1:  # every host decides alike, or some would wait for the others forever
            found = bool(multihost_utils.process_allgather(np.array(found)).all())
            if not found:
                raise CheckpointError(f"{path}: no {spec} teacher on every host; train it once first "
                                      f"(python -m train.teacher --world {spec}) where every host sees it")
        if not found:
            print(f"no {spec} teacher in {path}: training one first (python -m train.teacher --world {spec})")
            train_teacher(TeacherConfig(world=spec), progress=jax.process_index() == 0)
        return load_flux(path, mesh=mesh)
    if spec in MODEL_PRESETS:
        check_sharded(nnx.eval_shape(lambda: Flux(FluxConfig.preset(spec), rngs=nnx.Rngs(seed))), mesh)  # as `fill` does for loaded ones
        with jax.set_mesh(mesh):
            return Flux(FluxConfig.preset(spec), rngs=nnx.Rngs(seed))
    return load_flux(spec, mesh=mesh)


def learning_rate(config: DistillConfig) -> optax.Schedule:
    """Warmup then cosine decay, counted in optimizer updates (one per `grad_accum` steps), which is
    how optax.MultiSteps advances it."""
    return optim.warmup_cosine(config.learning_rate, max(config.steps // config.grad_accum, 1),
                               config.warmup_steps // config.grad_accum)


def optimizer_for(config: DistillConfig) -> optax.GradientTransformation:
    """AdamW (moments in the student's dtype) with warmup + cosine decay and global-norm clipping; optional accumulation."""
    tx = optim.adamw(learning_rate(config), clip_norm=config.clip_norm, weight_decay=config.weight_decay)
    return optax.MultiSteps(tx, config.grad_accum) if config.grad_accum > 1 else tx


def _check(config: DistillConfig, mesh, world: World | None) -> None:
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    if config.batch_size % math.lcm(data_parallel, jax.process_count()):
        raise ConfigError(f"batch_size {config.batch_size} is not divisible by the data axes (data x fsdp = {data_parallel})"
                          + (f" and the {jax.process_count()} processes" if jax.process_count() > 1 else ""))
    if config.latent_height % 2 or config.latent_width % 2:
        raise ConfigError(f"latent_height and latent_width must be even, got {config.latent_height}x{config.latent_width}")
    if config.objective not in ("trajectory", "cache"):
        raise ConfigError(f"objective must be 'trajectory' or 'cache', got {config.objective!r}")
    if min(config.steps, config.sampler_steps, config.grad_accum, config.save_every, config.log_every,
           config.eval_samples) < 1:
        raise ConfigError("steps, sampler_steps, grad_accum, save_every, log_every and eval_samples must be at least 1")
    if config.feature_weight < 0:
        raise ConfigError(f"feature_weight must not be negative, got {config.feature_weight}")
    text_prompts = config.prompts is not None and not config.prompts.endswith(".npz")
    if config.text_encoders and not text_prompts and not (config.prompts is None and world is not None):
        raise ConfigError("--text-encoders encodes text prompts; give them with --prompts FILE.txt or FILE.jsonl")
    if world is not None and (config.prompts is None or text_prompts) and config.text_length != world.TEXT_LENGTH:
        raise ConfigError(f"the {world.NAME} world's encoders take {world.TEXT_LENGTH} tokens; "
                          f"text_length is {config.text_length}")


def start_processes(config: DistillConfig) -> None:
    """Joins the other hosts of a multi-process run (once per process)."""
    if jax.distributed.is_initialized():
        return
    if config.coordinator:
        jax.distributed.initialize(config.coordinator, config.num_processes, config.process_id)
    elif config.distributed:
        jax.distributed.initialize()


def global_batch(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A batch whose rows are split over processes: each host hands over only its own share."""
    per_process = len(array) // jax.process_count()
    local = array[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
    return jax.make_array_from_process_local_data(sharding, local, array.shape)


def _setup(config: DistillConfig):
    """Processes, mesh, teacher and prompts: what training and cache building share."""
    start_processes(config)
    mesh = make_mesh(config.mesh)
    world = prompt_world(config)
    _check(config, mesh, world)
    texts = prompt_texts(config, world)  # a bad prompt file is named before the teacher is loaded or trained
    teacher = load_teacher(config.teacher, mesh, config.seed)
    teacher.config = teacher.config.replace(scan_blocks=config.scan_blocks)
    return mesh, teacher, load_prompts(config, texts, teacher.config, mesh, world)


def prompt_world(config: DistillConfig) -> World | None:
    """The world whose prompts and encoders the run uses: that of --text-encoders, else of --teacher."""
    return find_world(config.text_encoders or config.teacher)


def prompt_texts(config: DistillConfig, world: World | None) -> list[str] | None:
    """The run's prompts in words: from --prompts (.txt/.jsonl), or the world's training phrasings; None
    when the prompts are embeddings (.npz) or random stand-ins."""
    if config.prompts is None:
        return [p.text for p in world.prompts("train")] if world is not None else None
    return None if config.prompts.endswith(".npz") else read_prompts(config.prompts)


def load_prompts(config: DistillConfig, texts: list[str] | None, flux: FluxConfig, mesh: Mesh,
                 world: World | None) -> PromptEmbeddings:
    """The run's prompts as embeddings: `texts` encoded now with the text encoders of `text_encoders`
    (default: the teacher's folder, or its world's), precomputed (.npz), or random stand-ins."""
    if texts is None:
        if config.prompts is not None:
            return PromptEmbeddings.load(config.prompts, flux)
        return PromptEmbeddings.random(config.num_random_prompts, config.text_length, flux, config.seed)
    source = config.text_encoders or config.teacher
    if world is not None:
        encoder = world.prompt_encoder()
    else:
        try:
            encoder = load_prompt_encoder(source, max_sequence_length=config.text_length, dtype=flux.dtype, mesh=mesh)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; text prompts are encoded with --text-encoders (default: the teacher's folder)") from None
    with jax.set_mesh(mesh):
        return PromptEmbeddings.encode(encoder, texts, flux, batch_size=config.batch_size, source=source)


def frozen(teacher: Flux) -> tuple[nnx.GraphDef, dict]:
    """The teacher as (structure, weights as a plain dict of arrays) for `make_train_step`: a module
    argument of an nnx.jit function comes back as an output, which would copy the whole teacher every
    step; plain arrays that the step only reads do not."""
    graph, state = nnx.split(teacher)
    return graph, nnx.to_pure_dict(state)


def make_train_step(config: DistillConfig, *, text_length: int, teacher_graph: nnx.GraphDef):
    """The jit-compiled step `(student, optimizer, teacher_weights, txt, y, x0, key)`, student and
    optimizer state donated (`frozen` gives the teacher's graph and weights): build a training state
    from the teacher (trajectory) or around a cached latent x0, then one optimizer update."""
    tokens = (config.latent_height // 2) * (config.latent_width // 2)
    img_ids, txt_ids = position_ids(config.batch_size, config.latent_height, config.latent_width, text_length)

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(student, optimizer, teacher_weights, txt, y, x0, key):
        teacher = nnx.merge(teacher_graph, teacher_weights)
        k_noise, k_guidance, k_state = jax.random.split(key, 3)
        noise = jax.random.normal(k_noise, (txt.shape[0], tokens, teacher.config.in_channels), jnp.float32)
        guidance = None
        if teacher.config.guidance_embed:
            guidance = jax.random.uniform(k_guidance, (txt.shape[0],), minval=config.guidance_min, maxval=config.guidance_max)
        if x0 is None:
            x, t = trajectory_state(teacher, noise, img_ids, txt, txt_ids, y, guidance, k_state, sampler_steps=config.sampler_steps)
        else:
            x, t = cached_state(x0, noise, k_state, shift=teacher.config.guidance_embed)
        loss_fn = functools.partial(distill_loss, feature_weight=config.feature_weight)
        (loss, parts), grads = nnx.value_and_grad(loss_fn, has_aux=True)(student, teacher, x, t, img_ids, txt, txt_ids, y, guidance)
        optimizer.update(student, grads)
        return loss, {"grad_norm": optax.tree.norm(grads), **parts}

    return train_step


def train(config: DistillConfig) -> dict:
    """Runs (or resumes) the distillation described by `config`; returns {"losses": {step: loss}, ...}.
    Setup, then one flat loop whose every step is: batch -> step -> (on a sync step) read the losses,
    agree to stop, log, sample, save."""
    start_processes(config)  # before anything asks JAX about devices (check_resume asks for the process index)
    check_resume(config)
    mesh, teacher, prompts = _setup(config)
    latents = load_cache(config, len(prompts.txt)) if config.objective == "cache" else None
    record_config(config)
    mngr = checkpointing.manager(config.workdir, save_every=config.save_every, keep=config.keep_checkpoints)
    start = mngr.latest_step() or 0
    with jax.set_mesh(mesh):
        student, optimizer = restored_state(config, teacher.config, mesh, mngr, start) if start else new_state(config, teacher, mesh)
    teacher_graph, teacher_weights = frozen(teacher)
    train_step = make_train_step(config, text_length=prompts.txt.shape[1], teacher_graph=teacher_graph)
    batches = Batches(config, prompts, latents, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))
    progress = Progress()
    profiler = Profiler(config)
    with stop_on_sigterm(progress):
        log = Log.open(config, start)
        try:
            bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="distill", disable=log.board is None)
            for step in bar:
                profiler.before(step + 1)
                with jax.set_mesh(mesh):
                    loss, extras = train_step(student, optimizer, teacher_weights, *batches.at(step), batches.key(step))
                progress.dispatched(step + 1, loss, extras)
                profiler.after(step + 1, loss)
                saving = step + 1 == config.steps or mngr.should_save(step + 1)
                logging = (step + 1) % config.log_every == 0 or step + 1 == config.steps
                sampling = bool(config.sample_every) and (step + 1) % config.sample_every == 0
                if not (progress.stopping or saving or logging or sampling):
                    continue  # no sync: the host runs ahead and queues the next step
                progress.agree_to_stop()
                metrics = progress.read(mngr, config.workdir)  # every loss since the last read checked first
                bar.set_postfix(loss=f"{metrics['loss']:.4g}", samples_per_s=f"{config.batch_size / metrics['step_time_s']:.1f}")
                if logging:
                    log.write(step + 1, {**metrics, "lr": float(learning_rate(config)(step // config.grad_accum)),
                                         **throughput(config, prompts.txt.shape[1], metrics["step_time_s"])}, progress.compile_s)
                if sampling:
                    save_samples(config, mesh, teacher, student, prompts, step + 1)
                if saving or progress.stopping:
                    log.persist()  # every row the checkpoint covers outlives a kill (a remote log uploads every 30 s)
                checkpointing.save(mngr, step + 1, nnx.state((student, optimizer)), force=step + 1 == config.steps or progress.stopping)
                if progress.stopping:
                    break
        finally:
            profiler.close()
            mngr.wait_until_finished()
            mngr.close()
            log.close()
    if not progress.stopping:
        export_student(student, config.workdir)
        if config.pack and jax.process_count() == 1:
            save_flux(pack_model(student), epath.Path(config.workdir) / "packed", overwrite=True)
    return {"losses": progress.losses, "last_step": max(progress.losses, default=start), "preempted": progress.stopping,
            "student": student}


CONFIG_FILE = "config.json"


def _flat_fields(values: dict, prefix: str = "") -> dict:
    flat = {}
    for name, value in values.items():
        flat.update(_flat_fields(value, f"{prefix}{name}.") if isinstance(value, dict) else {prefix + name: value})
    return flat


def _settings(config: DistillConfig) -> dict:
    """The config as JSON values, nested fields dotted (mesh.fsdp): what WORKDIR/config.json holds."""
    return _flat_fields(json.loads(json.dumps(dataclasses.asdict(config))))


def config_changes(saved: dict, config: DistillConfig) -> dict[str, tuple]:
    """{field: (saved value, value now)} of every field that differs and may not change freely on resume."""
    now = _settings(config)
    missing = "(not a setting)"
    return {name: (saved.get(name, missing), now.get(name, missing)) for name in sorted(saved.keys() | now.keys())
            if name.split(".")[0] not in RESUME_FREE_FIELDS and saved.get(name, missing) != now.get(name, missing)}


def check_resume(config: DistillConfig) -> None:
    """A workdir keeps the settings of the run started in it: a later start there with other settings
    stops with one error naming every changed field, unless `allow_config_change` names it."""
    known = set(_settings(config))
    unknown = [name for name in config.allow_config_change if name not in known]
    if unknown:
        raise ConfigError(f"allow_config_change: {', '.join(map(repr, unknown))} not a setting of the run")
    path = location(config.workdir) / CONFIG_FILE
    if not path.exists():
        return
    try:
        saved = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); remove it to accept this run's settings") from None
    changes = config_changes(saved, config)
    refused = [name for name in changes if name not in config.allow_config_change]
    if refused:
        listed = "; ".join(f"{name}: {changes[name][0]!r} -> {changes[name][1]!r}" for name in refused)
        raise ConfigError(f"{path}: this workdir's run was started with other settings ({listed}); resume with "
                          f"the same settings, accept the change with --allow-config-change {' '.join(refused)}, "
                          f"or start in another workdir")
    if jax.process_index() == 0:
        for name, (before, after) in changes.items():
            print(f"resuming with a changed setting (--allow-config-change): {name}: {before!r} -> {after!r}")


def record_config(config: DistillConfig) -> None:
    """WORKDIR/config.json, written whole by process 0 at every start (with any accepted changes)."""
    if jax.process_index() == 0:
        write_file(location(config.workdir) / CONFIG_FILE, (json.dumps(_settings(config), indent=1) + "\n").encode())


def _student_config(config: DistillConfig, teacher_config: FluxConfig) -> tuple[FluxConfig, QuantPolicy]:
    policy = QuantPolicy(per_channel=config.per_channel, learnable_scale=config.learnable_scale, lowrank_rank=config.lowrank_rank)
    return teacher_config.replace(param_dtype=config.student_dtype, remat=config.remat), policy


def _each_variable(models, fn) -> nnx.State:
    """`models`' state with every variable's value replaced by `fn(variable)`."""
    return jax.tree.map(lambda v: v.replace(fn(v)), nnx.state(models), is_leaf=lambda x: isinstance(x, nnx.Variable))


def _with_optimizer(config: DistillConfig, student: Flux) -> tuple[Flux, nnx.Optimizer]:
    return student, nnx.Optimizer(student, optimizer_for(config), wrt=nnx.Param)


def new_state(config: DistillConfig, teacher: Flux, mesh: Mesh) -> tuple[Flux, nnx.Optimizer]:
    """The student quantized from `teacher` and its fresh optimizer, every leaf placed on `mesh`: one
    compiled program (eagerly, leaf by leaf, it was hundreds of small compilations); eager only for a
    low-rank residual, whose SVD runs in NumPy."""
    student_config, policy = _student_config(config, teacher.config)

    def create(teacher: Flux) -> tuple[Flux, nnx.Optimizer]:
        models = _with_optimizer(config, quantize_model(teacher, policy, config=student_config))
        nnx.update(models, _each_variable(models, lambda v: jax.lax.with_sharding_constraint(v[...], leaf_sharding(v, mesh))))
        return models

    return create(teacher) if policy.lowrank_rank else nnx.jit(create)(teacher)


def restored_state(config: DistillConfig, teacher_config: FluxConfig, mesh: Mesh, mngr, step: int) -> tuple[Flux, nnx.Optimizer]:
    """Student and optimizer as saved at `step`, restored straight into their places on `mesh`: the
    targets are shapes (`nnx.eval_shape`), so no student is quantized only to be overwritten."""
    student_config, policy = _student_config(config, teacher_config)
    abstract = nnx.eval_shape(lambda: _with_optimizer(config, build(student_config, "student", policy, rngs=nnx.Rngs(0))))
    graph, _ = nnx.split(abstract)
    targets = _each_variable(abstract, lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=leaf_sharding(v, mesh)))
    return nnx.merge(graph, checkpointing.restore(mngr, step, targets))


@dataclasses.dataclass(frozen=True)
class Batches:
    """Step -> (txt, y, x0 or None) as global arrays: a pure function of (seed, step), so a resumed run
    draws the batches of an uninterrupted one."""

    config: DistillConfig
    prompts: PromptEmbeddings
    latents: np.ndarray | None
    sharding: NamedSharding

    def at(self, step: int) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        rows = batch_indices(len(self.prompts.txt), self.config.batch_size, self.config.seed, step)
        x0 = None if self.latents is None else global_batch(self.latents[rows], self.sharding)
        return global_batch(self.prompts.txt[rows], self.sharding), global_batch(self.prompts.y[rows], self.sharding), x0

    def key(self, step: int) -> jax.Array:
        return jax.random.fold_in(jax.random.key(self.config.seed), step)


@dataclasses.dataclass
class Progress:
    """Steps dispatched but not read yet, the losses read, timing, and the stop request (SIGTERM)."""

    losses: dict[int, float] = dataclasses.field(default_factory=dict)
    unread: list = dataclasses.field(default_factory=list)
    stopping: bool = False
    signalled: bool = False
    compile_s: float | None = None
    """the first step of this start, its compilation included (the step is synchronised once for it)"""
    since: float = dataclasses.field(default_factory=time.perf_counter)
    timed: int = 0
    """steps dispatched since `since` (after the first)"""

    def stop_locally(self) -> None:
        """The SIGTERM handler: a single process stops after this step; several agree on a sync step."""
        self.signalled = True
        self.stopping = self.stopping or jax.process_count() == 1

    def dispatched(self, step: int, loss: jax.Array, extras: dict) -> None:
        self.unread.append((step, loss, extras))
        if self.compile_s is None:
            jax.block_until_ready(loss)
            self.compile_s, self.since = time.perf_counter() - self.since, time.perf_counter()
        else:
            self.timed += 1

    def agree_to_stop(self) -> None:
        """One host's SIGTERM stops every host at the same step. The flags are gathered only on sync
        steps, which every host takes at the same steps (it reads the loss there anyway): not one
        host-device sync per step."""
        if jax.process_count() > 1:
            self.stopping = bool(multihost_utils.process_allgather(np.array(self.signalled)).any())

    def read(self, mngr, workdir: str) -> dict[str, float]:
        """The metrics of the last step, after every loss since the last read is checked: a non-finite
        one stops the run before anything is logged or saved."""
        read, self.unread = jax.device_get(self.unread), []
        for done, value, _ in read:
            if not np.isfinite(value):
                mngr.wait_until_finished()
                raise TrainingError(f"loss is {float(value)} at step {done}; stopped without saving; the last good "
                                    f"checkpoint is step {mngr.latest_step()} in {epath.Path(workdir) / 'checkpoints'}")
            self.losses[done] = float(value)
        seconds = (time.perf_counter() - self.since) / self.timed if self.timed else self.compile_s
        self.since, self.timed = time.perf_counter(), 0
        _, loss, extras = read[-1]
        return {"loss": float(loss), **{name: float(value) for name, value in extras.items()}, "step_time_s": seconds}


@contextlib.contextmanager
def stop_on_sigterm(progress: Progress) -> Iterator[None]:
    """SIGTERM (a preempted machine) asks the run to save and stop instead of killing it."""
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: progress.stop_locally())
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def throughput(config: DistillConfig, text_length: int, step_time_s: float) -> dict[str, float]:
    """Samples and tokens (image + text: the transformer's sequence) per second."""
    tokens = (config.latent_height // 2) * (config.latent_width // 2) + text_length
    return {"samples_per_s": config.batch_size / step_time_s, "tokens_per_s": config.batch_size * tokens / step_time_s}


@dataclasses.dataclass
class Log:
    """WORKDIR/metrics.jsonl and TensorBoard scalars, written by process 0 (elsewhere every call does nothing)."""

    metrics: BinaryIO | None
    board: ScalarWriter | None
    compile_s_logged: bool = False

    @classmethod
    def open(cls, config: DistillConfig, start: int) -> Log:
        """Rows past the checkpoint `start` are dropped: a resumed run logs those steps again."""
        if jax.process_index() != 0:
            return cls(None, None)
        path = epath.Path(config.workdir) / "metrics.jsonl"
        if start and path.exists():
            rows = path.read_text().splitlines(keepends=True)
            write_file(path, "".join(r for r in rows if json.loads(r)["step"] <= start).encode())
        return cls(append_file(path), ScalarWriter(str(epath.Path(config.workdir) / "tensorboard")))

    def write(self, step: int, metrics: dict[str, float], compile_s: float | None = None) -> None:
        """One row; `compile_s` (the first step of this start) goes into the first row after it."""
        if self.metrics is None:
            return
        if compile_s is not None and not self.compile_s_logged:
            metrics, self.compile_s_logged = {**metrics, "compile_s": compile_s}, True
        self.metrics.write((json.dumps({"step": step, **metrics}) + "\n").encode())
        self.metrics.flush()
        self.board.scalars(step, metrics)

    def persist(self) -> None:
        """The rows so far, stored now (a remote log is otherwise uploaded at most every 30 s)."""
        if self.metrics is not None:
            persist(self.metrics)

    def close(self) -> None:
        for writer in (self.board, self.metrics):
            if writer is not None:
                writer.close()


class Profiler:
    """A jax.profiler trace of the steps `config.profile_steps` (A, B), counted from 1, in WORKDIR/profile."""

    def __init__(self, config: DistillConfig):
        self.steps, self.folder, self.active = config.profile_steps, str(location(config.workdir) / "profile"), False

    def before(self, step: int) -> None:
        if self.steps is not None and step == self.steps[0]:
            jax.profiler.start_trace(self.folder)
            self.active = True

    def after(self, step: int, loss: jax.Array) -> None:
        if self.active and step >= self.steps[1]:
            jax.block_until_ready(loss)
            self.close()

    def close(self) -> None:
        if self.active:
            jax.profiler.stop_trace()
            self.active = False


def save_samples(config: DistillConfig, mesh: Mesh, teacher: Flux, student: Flux, prompts: PromptEmbeddings, step: int) -> None:
    """WORKDIR/samples/step-N.png: teacher over student, same prompts and seeds."""
    with jax.set_mesh(mesh):
        grid = sample_grid(teacher, student, prompts, latent_height=config.latent_height, latent_width=config.latent_width,
                           sampler_steps=config.sampler_steps, guidance=(config.guidance_min + config.guidance_max) / 2,
                           seed=config.seed)
    if jax.process_index() == 0:
        save_png(grid, epath.Path(config.workdir) / "samples" / f"step-{step:07d}.png")


def export_student(student: Flux, workdir: str) -> epath.Path:
    """The trained student as one of our checkpoints (WORKDIR/student), which `convert.load_flux`,
    `convert.pack_ternary` and `convert.export_diffusers` read."""
    out = epath.Path(workdir) / "student"
    if jax.process_count() == 1:
        save_flux(student, out, overwrite=True)
    else:  # every process writes its shards; the description is the same bytes from each
        if jax.process_index() == 0 and out.exists():
            (out / META_FILE).unlink(missing_ok=True)  # the description goes first: never over half a checkpoint
            out.rmtree()
        multihost_utils.sync_global_devices("student export folder ready")
        out.mkdir(parents=True, exist_ok=True)
        write_flux(student, out)
    return out


def parse(argv: list[str] | None = None) -> DistillConfig:
    """Presets as subcommands with every field a flag; no subcommand means the default preset.
    `--config FILE` (.toml or .json) sets fields over the preset's, and flags over the file's."""
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    argv, config_file = _config_file_argument(argv)
    presets = PRESETS
    if config_file is not None:
        presets = {name: (about, from_file(preset, config_file)) for name, (about, preset) in PRESETS.items()}
    if not argv or argv[0].startswith("-") and argv[0] not in ("-h", "--help"):
        argv = ["digits", *argv]
    return tyro.extras.overridable_config_cli(presets, prog=PROG, args=argv)


def _config_file_argument(argv: list[str]) -> tuple[list[str], str | None]:
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 == len(argv):
                raise ConfigError("--config needs a file (.toml or .json)")
            return argv[:i] + argv[i + 2:], argv[i + 1]
        if arg.startswith("--config="):
            return argv[:i] + argv[i + 1:], arg.split("=", 1)[1]
    return argv, None


def from_file(config: DistillConfig, path: str) -> DistillConfig:
    """`config` with the fields a TOML or JSON file sets (the mesh as a table / object of its own)."""
    import tomllib

    file = location(path)
    if not file.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        values = tomllib.loads(file.read_text()) if file.suffix == ".toml" else json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not a valid {file.suffix[1:] or 'JSON'} file ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a table of DistillConfig fields")
    return _replaced(config, values, path)


def _replaced(config, values: dict, path: str, prefix: str = ""):
    fields = {f.name: f for f in dataclasses.fields(config)}
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"{path}: unknown field {prefix + key!r}")
        current = getattr(config, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{path}: {prefix + key} must be a table of its fields")
            changes[key] = _replaced(current, value, path, prefix=f"{prefix}{key}.")
        elif current is not None and not isinstance(value, type(current)) and not (isinstance(current, float) and isinstance(value, int)):
            raise ConfigError(f"{path}: {prefix + key} must be {type(current).__name__}, got {value!r}")
        else:
            changes[key] = float(value) if isinstance(current, float) else value
    return dataclasses.replace(config, **changes)


def cache(config: DistillConfig) -> epath.Path:
    """`python -m train.distill cache ...`: the teacher latent cache of the run `config` describes."""
    mesh, teacher, prompts = _setup(config)
    with jax.set_mesh(mesh):
        return build_cache(config, teacher, prompts, NamedSharding(mesh, PartitionSpec(("data", "fsdp"))))


def use_compile_cache(config: DistillConfig) -> None:
    """CLI runs keep what XLA compiles in JAX's persistent cache, $FLUX_JAX_CACHE/xla (default
    ~/.cache/flux_jax/xla), unless `--no-compile-cache`; a cache folder set already (JAX_COMPILATION_CACHE_DIR)
    is kept. Compilations under half a second are not worth a file."""
    if not config.compile_cache:
        jax.config.update("jax_enable_compilation_cache", False)
        return
    if not jax.config.jax_compilation_cache_dir:
        root = os.environ.get("FLUX_JAX_CACHE") or "~/.cache/flux_jax"
        jax.config.update("jax_compilation_cache_dir", str(epath.Path(os.path.expanduser(root)) / "xla"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    with reported_errors(PROG):
        if argv[:1] == ["cache"]:
            config = parse(argv[1:])
            use_compile_cache(config)
            print(f"latent cache in {cache(config)}")
            return
        config = parse(argv)
        use_compile_cache(config)
        report(config, train(config))


def report(config: DistillConfig, result: dict) -> None:
    """What a finished (or preempted) run prints; a world's run also its evaluation table, in
    single-process runs (`python -m train.evaluate` does it afterwards for the others)."""
    workdir = epath.Path(config.workdir)
    if result["preempted"]:
        print(f"preempted, saved at step {result['last_step']}; checkpoints in {workdir / 'checkpoints'}")
        return
    packed = workdir / "packed" if config.pack and jax.process_count() == 1 else None
    print(f"done at step {result['last_step']}; checkpoints in {workdir / 'checkpoints'}, student in {workdir / 'student'}"
          + (f", packed in {packed}" if packed else ""))
    if config.evaluate and find_world(config.teacher) is not None and jax.process_count() == 1:
        from train.evaluate import EvaluateConfig, run

        print(run(EvaluateConfig(student=str(workdir / "student"), packed=str(packed) if packed else None,
                                 samples=config.eval_samples))[0])


if __name__ == "__main__":
    main()
