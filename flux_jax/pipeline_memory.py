"""The whole text-to-image pipeline's memory on one accelerator chip, from its own compiler.

`python -m flux_jax.memory_report --pipeline --target v5e-1` calls `pipeline_memory_report`: the
pipeline's programs (prompt encoding, the denoising loop, decoding) compiled as one program for one
chip, deviceless, with every component's weights as its arguments (all resident, as after
`FluxPipeline.from_pretrained`), for three ways of storing the weights. Each stage is also compiled
alone, to say which one holds the peak: what it needs beyond the weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from flux_jax.config import FluxConfig
from flux_jax.pipeline import decode_latents, denoise_and_decode
from flux_jax.sampling import SchedulerConfig, sample_latents
from flux_jax.targets import Target, compile_abstract, one_chip_mesh, out_of_memory, total_bytes, tree_bytes
from flux_jax.ternary import QuantPolicy, build, runtime_layout
from flux_jax.text import CLIPTextEncoder, T5Encoder
from flux_jax.text.clip import CLIPTextEncoderConfig
from flux_jax.text.int8 import int8_text_encoder
from flux_jax.text.prompts import encode_tokens
from flux_jax.text.t5 import T5EncoderConfig
from flux_jax.vae import AutoencoderConfig, AutoencoderKL


@dataclasses.dataclass(frozen=True)
class PipelineVariant:
    """How the weights are held: the transformer's kind ("flux": bf16, "packed": 2-bit ternary codes)
    and the text encoders' ("bf16" or "int8", `flux_jax.text.int8`)."""

    name: str
    transformer: str
    text_encoders: str


VARIANTS = (
    PipelineVariant("bf16", "flux", "bf16"),
    PipelineVariant("packed + bf16 encoders", "packed", "bf16"),
    PipelineVariant("packed + int8 encoders", "packed", "int8"),
)


@dataclasses.dataclass(frozen=True)
class PipelineShapes:
    """The architectures and the call: flux-dev's components, one 1024x1024 image, 28 steps, decoded in
    exact tiles of 128 rows (`AutoencoderKL.enable_tiling`; None: whole)."""

    transformer: FluxConfig = FluxConfig.preset("flux-dev")
    t5: T5EncoderConfig = T5EncoderConfig()
    clip: CLIPTextEncoderConfig = CLIPTextEncoderConfig()
    vae: AutoencoderConfig = AutoencoderConfig()
    height: int = 1024
    width: int = 1024
    steps: int = 28
    max_sequence_length: int = 512
    vae_tile_rows: int | None = 128

    @property
    def latent_grid(self) -> tuple[int, int]:
        factor = 2 ** (len(self.vae.block_out_channels) - 1)
        return self.height // factor, self.width // factor


def _vae(shapes: PipelineShapes, tile_rows: int | None) -> AutoencoderKL:
    vae = nnx.eval_shape(lambda: AutoencoderKL(shapes.vae, rngs=nnx.Rngs(0)))
    if tile_rows is not None:
        vae.enable_tiling(tile_rows)
    return vae


def _components(shapes: PipelineShapes, variant: PipelineVariant, platform: str, policy: QuantPolicy) -> dict:
    """The four components as abstract modules (shapes only, nothing allocated)."""
    text = int8_text_encoder if variant.text_encoders == "int8" else (lambda encoder: encoder)
    transformer = shapes.transformer.with_dtype("bfloat16")
    return {
        "transformer": nnx.eval_shape(lambda: build(transformer, variant.transformer, policy,
                                                    layout=runtime_layout(platform), rngs=nnx.Rngs(0))),
        "vae": _vae(shapes, shapes.vae_tile_rows),
        "clip": nnx.eval_shape(lambda: text(CLIPTextEncoder(shapes.clip, rngs=nnx.Rngs(0)))),
        "t5": nnx.eval_shape(lambda: text(T5Encoder(shapes.t5, rngs=nnx.Rngs(0)))),
    }


def _stages(shapes: PipelineShapes, sds) -> dict:
    """Each stage as (the components it reads, its function of them and its inputs, its inputs)."""
    height, width = shapes.latent_grid
    tokens = (height // 2) * (width // 2)
    dt, packed_channels = jnp.bfloat16, shapes.transformer.in_channels
    clip_ids = sds((1, shapes.clip.max_position_embeddings), jnp.int32)
    t5_ids = sds((1, shapes.max_sequence_length), jnp.int32)
    noise = sds((1, tokens, packed_channels), jnp.float32)
    features = sds((1, shapes.max_sequence_length, shapes.t5.d_model), dt)
    pooled = sds((1, shapes.clip.hidden_size), dt)
    scheduler = SchedulerConfig()
    guidance = 3.5 if shapes.transformer.guidance_embed else None

    def whole(transformer, vae, clip, t5, clip_ids, t5_ids, noise):
        pooled, features = encode_tokens(clip, t5, clip_ids, t5_ids)
        return denoise_and_decode(transformer, vae, noise, features, pooled, jnp.float32(guidance or 0.0), None,
                                  jnp.float32(1.0), height=height, width=width, steps=shapes.steps, scheduler=scheduler,
                                  sigmas=None, report=False, latents_to_host=False, decode=True)

    def denoise(transformer, noise, features, pooled):
        return sample_latents(transformer, noise.astype(dt), features, pooled, latent_height=height, latent_width=width,
                              steps=shapes.steps, guidance=guidance, scheduler=scheduler)

    return {
        "whole": (("transformer", "vae", "clip", "t5"), whole, (clip_ids, t5_ids, noise)),
        "encode": (("clip", "t5"), encode_tokens, (clip_ids, t5_ids)),
        "denoise": (("transformer",), denoise, (noise, features, pooled)),
        "decode": (("vae",), lambda vae, x: decode_latents(vae, x, height, width), (noise,)),
    }


def _weight_bytes(modules) -> int:
    return sum(tree_bytes(nnx.state(m)) for m in modules)


def pipeline_memory_report(target: Target, shapes: PipelineShapes = PipelineShapes(), *,
                           policy: QuantPolicy = QuantPolicy(), variants=VARIANTS) -> dict:
    """For each variant: its weights, the whole pipeline's peak on one chip of `target` (arguments +
    outputs + temporaries of the compiled program: the compiler's figure), or the compiler's refusal;
    and each stage's need beyond its own weights (compiled alone), the largest being the stage that
    holds the peak; with tiled decoding, also what decoding whole would need. Stages are compiled once
    per distinct weight format."""
    mesh = one_chip_mesh(target)
    one_chip = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=one_chip)  # noqa: E731
    stages = _stages(shapes, sds)
    results, stage_cache = [], {}
    with jax.set_mesh(mesh):
        for variant in variants:
            components = _components(shapes, variant, target.platform, policy)
            entry = {"variant": variant.name, "weight_bytes": _weight_bytes(components.values()),
                     **{f"{name}_weight_bytes": _weight_bytes([m]) for name, m in components.items()}}
            names, fn, inputs = stages["whole"]
            try:
                stats = compile_abstract([components[n] for n in names], fn, inputs, one_chip).memory_analysis()
            except jax.errors.JaxRuntimeError as err:
                if out_of_memory(err) is None:
                    raise
                results.append({**entry, "peak_bytes": None, "refused": out_of_memory(err)})
                continue
            entry.update(peak_bytes=total_bytes(stats), temp_bytes=stats.temp_size_in_bytes)
            for stage in ("encode", "denoise", "decode"):
                names, fn, inputs = stages[stage]
                key = (stage, variant.transformer if stage == "denoise" else variant.text_encoders if stage == "encode" else "")
                if key not in stage_cache:
                    modules = [components[n] for n in names]
                    stage_stats = compile_abstract(modules, fn, inputs, one_chip).memory_analysis()
                    stage_cache[key] = total_bytes(stage_stats) - _weight_bytes(modules)
                entry[f"{stage}_beyond_weights_bytes"] = stage_cache[key]
            if shapes.vae_tile_rows is not None:
                if "decode whole" not in stage_cache:
                    names, fn, inputs = stages["decode"]
                    vae = _vae(shapes, None)
                    stage_cache["decode whole"] = total_bytes(compile_abstract([vae], fn, inputs, one_chip).memory_analysis()) - _weight_bytes([vae])
                entry["decode_whole_beyond_weights_bytes"] = stage_cache["decode whole"]
            entry["peak_stage"] = max(("encode", "denoise", "decode"), key=lambda s: entry[f"{s}_beyond_weights_bytes"])
            results.append(entry)
    return {"target": target.name, "hbm_bytes": target.hbm_bytes, "height": shapes.height, "width": shapes.width,
            "steps": shapes.steps, "vae_tile_rows": shapes.vae_tile_rows, "variants": results}
