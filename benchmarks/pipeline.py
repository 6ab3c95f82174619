"""Seconds per denoising step and peak memory of text-to-image, ours vs diffusers' FluxPipeline.

    python -m benchmarks.pipeline                  # mid-size pipeline, 512x512, 4 steps
    python -m benchmarks.pipeline --size 256 --steps 2

One run builds a mid-size FLUX pipeline with random weights (transformer width 1024 with 4 double and
8 single blocks; 2-layer T5 (width 1024) and CLIP (width 768); FLUX's real autoencoder), saves it with
diffusers, then runs each side in a fresh child process on the same folder, prompt and noise: ours
through `FluxPipeline.from_pretrained`, diffusers' through its own. Seconds per step come from
per-step timestamps (compilation and decoding excluded); peak memory is each process's peak
resident set (weights, activations and the framework itself), float32 on CPU, also given as it
stood once the pipeline was loaded (what loading costs; the rest is compiling and running).
Needs the test extra (torch, diffusers); the library never imports them.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PROMPT = "a photo of a red fox in the snow"
REPO = Path(__file__).resolve().parents[1]  # the children run `python -m benchmarks.pipeline` from here


def _peak_rss() -> int:
    """This process's peak resident set: /proc's VmHWM, which starts afresh at exec. (getrusage's
    ru_maxrss does not: a child started by the parent that built the reference pipeline reported
    the parent's peak until its own passed it.)"""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # no procfs (macOS): ru_maxrss, in bytes there
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def build_reference(folder: str) -> None:
    """The mid-size random pipeline, saved by diffusers into `folder`."""
    import torch
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from flux_jax.text.tokenizers import clip_word_tokenizer, t5_word_tokenizer

    torch.manual_seed(0)
    words = PROMPT.split()
    clip_tokenizer, t5_tokenizer = clip_word_tokenizer(words), t5_word_tokenizer(words, model_max_length=256)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(128, 256, 512, 512),
                          layers_per_block=2, down_block_types=("DownEncoderBlock2D",) * 4,
                          up_block_types=("UpDecoderBlock2D",) * 4, use_quant_conv=False, use_post_quant_conv=False,
                          scaling_factor=0.3611, shift_factor=0.1159),
        text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=len(clip_tokenizer), hidden_size=768, intermediate_size=3072,
                                                  num_hidden_layers=2, num_attention_heads=12, max_position_embeddings=77,
                                                  bos_token_id=2, eos_token_id=3, pad_token_id=3)),
        tokenizer=clip_tokenizer,
        text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), d_model=1024, d_kv=64, d_ff=2816,
                                               num_layers=2, num_heads=16, feed_forward_proj="gated-gelu")),
        tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(in_channels=64, num_layers=4, num_single_layers=8, attention_head_dim=128,
                                           num_attention_heads=8, joint_attention_dim=1024, pooled_projection_dim=768,
                                           guidance_embeds=False),
    )
    pipe.save_pretrained(folder)


def _noise(size: int) -> np.ndarray:
    tokens = (size // 16) ** 2
    return np.random.default_rng(0).standard_normal((1, tokens, 64)).astype(np.float32)


def run_ours(folder: str, size: int, steps: int) -> dict:
    from flux_jax.pipeline import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, dtype="float32")
    loaded = _peak_rss()
    stamps = []
    pipe(PROMPT, height=size, width=size, steps=steps, latents=_noise(size), output_type="np",
         progress=lambda step: stamps.append(time.perf_counter()))
    return {"seconds_per_step": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "peak_rss_bytes": _peak_rss(),
            "loaded_peak_rss_bytes": loaded}


def run_diffusers(folder: str, size: int, steps: int) -> dict:
    import torch
    from diffusers import FluxPipeline

    torch.set_num_threads(os.cpu_count() or 1)
    pipe = FluxPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    loaded = _peak_rss()
    pipe.set_progress_bar_config(disable=True)
    stamps = []

    def on_step(pipe, step, timestep, kwargs):
        stamps.append(time.perf_counter())
        return kwargs

    with torch.inference_mode():
        pipe(PROMPT, height=size, width=size, num_inference_steps=steps, latents=torch.from_numpy(_noise(size)),
             max_sequence_length=256, output_type="np", callback_on_step_end=on_step)
    return {"seconds_per_step": (stamps[-1] - stamps[0]) / (len(stamps) - 1), "peak_rss_bytes": _peak_rss(),
            "loaded_peak_rss_bytes": loaded}


def _child(side: str, folder: str, size: int, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.pipeline", "--side", side, "--folder", folder,
                           "--size", str(size), "--steps", str(steps)], capture_output=True, text=True, cwd=REPO)
    if done.returncode:
        raise SystemExit(f"python -m benchmarks.pipeline: error: the {side} run failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pipeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="image height and width (a multiple of 16)")
    parser.add_argument("--steps", type=int, default=4, help="denoising steps (at least 2)")
    parser.add_argument("--side", choices=("jax", "diffusers"), help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.size % 16 or args.size < 16 or args.steps < 2:
        parser.error("--size must be a positive multiple of 16 and --steps at least 2")
    if args.side:
        run = run_ours if args.side == "jax" else run_diffusers
        print(json.dumps(run(args.folder, args.size, args.steps)))
        return
    try:
        import diffusers  # noqa: F401
    except ImportError as err:
        raise SystemExit(f"python -m benchmarks.pipeline: error: needs the test extra (pip install -e '.[test]'): {err}") from None
    with tempfile.TemporaryDirectory() as folder:
        build_reference(folder)
        ours = _child("jax", folder, args.size, args.steps)
        theirs = _child("diffusers", folder, args.size, args.steps)
    print(f"mid-size FLUX pipeline (width 1024, 4 double + 8 single blocks), {args.size}x{args.size}, "
          f"{(args.size // 16) ** 2} image + 256 text tokens, {args.steps} steps, float32, {os.cpu_count()} CPU cores")
    for name, r in (("flux_jax", ours), ("diffusers (PyTorch)", theirs)):
        print(f"{name:20} {r['seconds_per_step']:8.3f} s/step   peak RSS {r['peak_rss_bytes'] / 2**30:6.2f} GiB "
              f"(after loading: {r['loaded_peak_rss_bytes'] / 2**30:.2f} GiB)")
    print(f"ratio diffusers / ours: speed {theirs['seconds_per_step'] / ours['seconds_per_step']:.2f}x, "
          f"memory {theirs['peak_rss_bytes'] / ours['peak_rss_bytes']:.2f}x  (goal: > 1)")


if __name__ == "__main__":
    main()
