"""What the trainer's tests share: a small run on the tiny random teacher, and running it."""

import dataclasses

from train import distill
from train.config import DistillConfig, MeshConfig

BASE = DistillConfig(teacher="tiny", num_random_prompts=16, text_length=4, latent_height=8, latent_width=8, batch_size=8,
                     sampler_steps=3, learning_rate=1e-3, warmup_steps=2, steps=6, save_every=2, log_every=1,
                     mesh=MeshConfig(data=1, fsdp=1, tensor=1))


EIGHT = MeshConfig(data=2, fsdp=4, tensor=1)


def run(tmp_path, name, **changes):
    return distill.train(dataclasses.replace(BASE, workdir=str(tmp_path / name), **changes))
