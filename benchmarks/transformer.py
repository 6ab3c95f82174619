"""Forward-pass speed of our jit-compiled FLUX against diffusers' PyTorch forward, same weights, same CPU.

    python -m benchmarks.transformer                      # width 1024, 4 double + 8 single blocks, 1024 + 256 tokens
    python -m benchmarks.transformer --repeats 10 --dtype bfloat16

Both sides run in one process on the same random weights: a diffusers model is saved with
`save_pretrained` and loaded through `convert.load_flux`, so the comparison also checks the port.
Needs the test extra (torch, diffusers); the library itself never imports them.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
from flax import nnx

from flux_jax.config import FluxConfig
from pallas_kernels.bench import median_seconds

# As the library jits its models (sampling.sample, the pipeline): read, not returned. nnx.jit's default
# returns every weight of a module argument as an output, a copy of the model on every call (6% of this
# benchmark's forward on CPU, measured).
forward = nnx.jit(lambda model, inputs: model(**inputs), graph_updates=False)


def run(config: FluxConfig, *, img_tokens: int, txt_tokens: int, repeats: int) -> dict[str, float]:
    """Times both forwards; returns seconds per forward, the ratio and the max relative difference."""
    try:
        import torch
        from diffusers import FluxTransformer2DModel
    except ImportError as err:
        raise SystemExit(f"python -m benchmarks.transformer: error: needs the test extra (pip install -e '.[test]'): {err}") from None
    from convert import load_flux

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    reference = FluxTransformer2DModel(
        in_channels=config.in_channels, num_layers=config.depth, num_single_layers=config.depth_single_blocks,
        attention_head_dim=config.head_dim, num_attention_heads=config.num_heads,
        joint_attention_dim=config.context_in_dim, pooled_projection_dim=config.vec_in_dim,
        guidance_embeds=config.guidance_embed, axes_dims_rope=config.axes_dim,
    ).eval()
    with tempfile.TemporaryDirectory() as folder:
        reference.save_pretrained(folder)
        model = load_flux(folder, dtype=config.dtype)
    torch_dtype = getattr(torch, config.dtype)
    if torch_dtype != torch.float32:
        reference = reference.to(torch_dtype)

    rng = np.random.default_rng(0)
    side = int(np.sqrt(img_tokens))
    img_ids = np.stack(np.meshgrid(np.zeros(1), np.arange(side), np.arange(img_tokens // side), indexing="ij"), -1).reshape(-1, 3)
    inputs = dict(
        img=rng.standard_normal((1, img_ids.shape[0], config.in_channels), np.float32),
        img_ids=img_ids[None].astype(np.float32),
        txt=rng.standard_normal((1, txt_tokens, config.context_in_dim), np.float32),
        txt_ids=np.zeros((1, txt_tokens, 3), np.float32),
        timesteps=np.array([0.5], np.float32),
        y=rng.standard_normal((1, config.vec_in_dim), np.float32),
        guidance=np.array([3.5], np.float32) if config.guidance_embed else None,
    )
    jax_inputs = jax.device_put(inputs)

    def ours():
        return forward(model, jax_inputs).block_until_ready()

    t = {k: torch.from_numpy(v).to(torch_dtype) for k, v in inputs.items() if v is not None and k not in ("img_ids", "txt_ids")}

    def theirs():
        with torch.inference_mode():
            return reference(
                hidden_states=t["img"], encoder_hidden_states=t["txt"], pooled_projections=t["y"],
                timestep=t["timesteps"], img_ids=torch.from_numpy(inputs["img_ids"][0]),
                txt_ids=torch.from_numpy(inputs["txt_ids"][0]), guidance=t.get("guidance"), return_dict=False,
            )[0]

    ref_out = theirs().float().numpy()
    diff = float(np.abs(np.asarray(ours(), np.float32) - ref_out).max() / np.abs(ref_out).max())
    jax_s, torch_s = median_seconds([ours, theirs], repeats)
    return {"jax_s": jax_s, "torch_s": torch_s, "speedup": torch_s / jax_s, "max_rel_diff": diff}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.transformer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--width", type=int, default=1024, help="hidden size (head dim 128)")
    parser.add_argument("--double", type=int, default=4, help="double-stream blocks")
    parser.add_argument("--single", type=int, default=8, help="single-stream blocks")
    parser.add_argument("--img-tokens", type=int, default=1024)
    parser.add_argument("--txt-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    if args.width % 128 or min(args.double, args.single, args.img_tokens, args.txt_tokens, args.repeats) < 1:
        parser.error("--width must be a multiple of 128 and every count at least 1")
    config = FluxConfig(hidden_size=args.width, num_heads=args.width // 128, depth=args.double,
                        depth_single_blocks=args.single).with_dtype(args.dtype)
    result = run(config, img_tokens=args.img_tokens, txt_tokens=args.txt_tokens, repeats=args.repeats)
    print(f"device: {jax.devices()[0].device_kind}, {os.cpu_count()} cores; dtype {args.dtype}")
    print(f"config: width {args.width}, {args.double} double + {args.single} single blocks, "
          f"{args.img_tokens} image + {args.txt_tokens} text tokens, batch 1")
    print(f"flux_jax (jit)       {result['jax_s'] * 1e3:9.1f} ms / forward")
    print(f"diffusers (PyTorch)  {result['torch_s'] * 1e3:9.1f} ms / forward")
    print(f"ratio PyTorch / JAX  {result['speedup']:9.2f}x  (goal: > 1, ours faster)")
    print(f"max |ours - ref| / max |ref| = {result['max_rel_diff']:.2e}")


if __name__ == "__main__":
    main()
