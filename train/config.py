"""Run configuration of `python -m train.distill`: dataclasses with presets, every field a flag.

    python -m train.distill                       # the digits preset: the laptop-sized real world
    python -m train.distill smoke --steps 50 --mesh.fsdp 8
    python -m train.distill flux-dev --teacher black-forest-labs/FLUX.1-dev --prompts embeds.npz --workdir gs://b/run
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes; -1 on one axis takes every device the others leave."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """Data-free distillation of a ternary student from a full-precision FLUX teacher."""

    teacher: str = "tiny"
    """anything convert.load_flux reads, or a FluxConfig preset name for a random teacher (smoke runs)"""
    workdir: str = "runs/distill"
    """checkpoints (workdir/checkpoints) and metrics (workdir/metrics.jsonl); resumed from if present"""
    prompts: str | None = None
    """.txt (one prompt per line) or .jsonl ({"prompt": ...} per line) encoded with text_encoders before
    training, or an .npz of precomputed embeddings: txt (N, S, context_in_dim), y (N, vec_in_dim);
    None: random embeddings (smoke runs)"""
    text_encoders: str | None = None
    """pipeline folder, hub id or bundle whose text_encoder(_2)/ and tokenizer(_2)/ encode text prompts
    (None: the teacher's own folder)"""
    num_random_prompts: int = 64
    text_length: int = 8
    """T5 tokens per prompt (512 for dev, 256 for schnell) and the length of random embeddings"""
    latent_height: int = 16
    """latent grid of the training states (image size / 8); packed to (height/2) * (width/2) tokens"""
    latent_width: int = 16
    steps: int = 200
    batch_size: int = 8
    objective: str = "trajectory"
    """where training states come from: "trajectory" (the teacher's sampler, on the fly) or "cache"
    (x_t around teacher latents sampled once by `python -m train.distill cache`)"""
    sampler_steps: int = 8
    """length of the teacher trajectories the training states (or cached latents) come from"""
    feature_weight: float = 0.0
    """weight of block-feature matching (relative MSE of the image hidden states after every block)"""
    guidance_min: float = 1.0
    guidance_max: float = 5.0
    learning_rate: float = 3e-4
    warmup_steps: int = 20
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    per_channel: bool = True
    learnable_scale: bool = False
    lowrank_rank: int = 0
    student_dtype: str = "float32"
    """dtype of the student's latent weights, and of its AdamW moments (optax keeps them in the parameters' dtype)"""
    remat: bool = False
    scan_blocks: bool = False
    """run each kind of block through one lax.scan, teacher and student (FluxConfig.scan_blocks): the
    flux-dev step compiles in minutes instead of a quarter of an hour"""
    mesh: MeshConfig = MeshConfig()
    distributed: bool = False
    """call jax.distributed.initialize() with the platform's auto-detection (TPU pods, SLURM, ...)"""
    coordinator: str | None = None
    """host:port of process 0, for an explicit multi-process launch (with num_processes, process_id)"""
    num_processes: int = 1
    process_id: int = 0
    seed: int = 0
    save_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 10
    sample_every: int = 0
    """every this many steps, WORKDIR/samples/step-N.png: teacher and student from the same seeds (0: never)"""
    pack: bool = True
    """at the end, also save the packed student (2-bit codes) to WORKDIR/packed (single-process runs;
    otherwise `python -m convert.pack_ternary WORKDIR/student OUT`)"""
    evaluate: bool = True
    """at the end of a run on a world's teacher, print the evaluation table (`python -m train.evaluate`)"""
    eval_samples: int = 8
    """samples per prompt and model in that evaluation"""
    allow_config_change: tuple[str, ...] = ()
    """fields a resumed run may change from the settings its workdir was started with (WORKDIR/config.json),
    e.g. `--allow-config-change steps learning_rate`; each accepted change is printed. Fields in
    RESUME_FREE_FIELDS may always change."""
    compile_cache: bool = True
    """keep XLA compilations in JAX's persistent cache ($FLUX_JAX_CACHE/xla, default ~/.cache/flux_jax/xla), so
    a restarted run does not compile its step again (`--no-compile-cache`: off)"""
    profile_steps: tuple[int, int] | None = None
    """`--profile-steps A B`: a jax.profiler trace of steps A..B (counted from 1) in WORKDIR/profile"""


RESUME_FREE_FIELDS = frozenset({
    "workdir", "mesh", "distributed", "coordinator", "num_processes", "process_id", "remat", "scan_blocks",
    "save_every", "keep_checkpoints", "log_every", "sample_every", "pack", "evaluate", "eval_samples",
    "allow_config_change", "compile_cache", "profile_steps",
})
"""What a resumed run may change without `--allow-config-change`: where and how the steps run (the mesh:
checkpoints are resharded on restore; remat and scan_blocks change memory and compile time, not the
result) and what is logged, saved and judged. Everything else changes what is trained, `steps` included
(it sets the length of the learning-rate decay)."""


PRESETS: dict[str, tuple[str, DistillConfig]] = {
    "digits": (
        "the default: the digits world's teacher (trained first if missing), distilled, packed and judged in minutes",
        DistillConfig(teacher="digits", workdir="runs/digits", text_length=10, latent_height=16, latent_width=16,
                      steps=500, batch_size=32, sampler_steps=8, learning_rate=1e-3, warmup_steps=25,
                      save_every=100, log_every=10, sample_every=100),
    ),
    "smoke": ("a tiny random teacher, seconds on a laptop",
              DistillConfig(steps=30, save_every=10, log_every=5, sample_every=15)),
    "flux-dev": (
        "FLUX.1-dev at 1024x1024 (needs --prompts; text prompts are encoded with the teacher's own encoders)",
        DistillConfig(teacher="black-forest-labs/FLUX.1-dev", text_length=512, latent_height=128, latent_width=128, batch_size=32,
                      steps=20_000, sampler_steps=28, learning_rate=1e-5, warmup_steps=500, student_dtype="bfloat16",
                      remat=True, scan_blocks=True, save_every=500, log_every=10, sample_every=500),
    ),
}
