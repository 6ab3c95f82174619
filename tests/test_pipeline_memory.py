"""The whole pipeline's memory from the TPU compiler (deviceless), on small components whose text
encoder is made large enough that only its int8 form fits one 16 GB v5e chip."""

import numpy as np
import pytest

from flux_jax import FluxConfig
from flux_jax.memory_report import main
from flux_jax.pipeline_memory import VARIANTS, PipelineShapes, pipeline_memory_report
from flux_jax.targets import get_target
from flux_jax.text.clip import CLIPTextEncoderConfig
from flux_jax.text.t5 import T5EncoderConfig
from flux_jax.vae import AutoencoderConfig

# Two T5 layers with a 350k-wide feed-forward: 17.2 GB in bf16, which one v5e chip (15.75 GB for the
# compiler) cannot hold, 8.6 GB in int8, which it can.
T5 = T5EncoderConfig(vocab_size=128, d_model=4096, d_kv=64, d_ff=350_000, num_layers=2, num_heads=8)
CLIP = CLIPTextEncoderConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=16)
VAE = AutoencoderConfig(latent_channels=4, block_out_channels=(32, 64), norm_num_groups=8)
SHAPES = PipelineShapes(transformer=FluxConfig.preset("tiny").replace(context_in_dim=4096), t5=T5, clip=CLIP, vae=VAE,
                        height=64, width=64, steps=2, max_sequence_length=16, vae_tile_rows=16)


def t5_int8_bytes(c: T5EncoderConfig) -> int:
    """An independent count: int8 linear weights with a float32 scale per output channel; bf16 embedding,
    norms and relative position bias."""
    inner = c.num_heads * c.d_kv
    linears = [(c.d_model, inner)] * 3 + [(inner, c.d_model)] + [(c.d_model, c.d_ff)] * 2 + [(c.d_ff, c.d_model)]
    per_layer = sum(i * o + 4 * o for i, o in linears) + 2 * 2 * c.d_model
    return c.num_layers * per_layer + 2 * (c.vocab_size * c.d_model + c.d_model + c.relative_attention_num_buckets * c.num_heads)


@pytest.fixture(scope="module")
def report():
    """bf16 everything and packed + int8 encoders (packed + bf16 encoders is refused as bf16 is, here)."""
    return pipeline_memory_report(get_target("v5e-1"), SHAPES, variants=(VARIANTS[0], VARIANTS[2]))


def test_only_int8_encoders_fit_and_every_weight_counts(report):
    bf16, packed_int8 = report["variants"]
    assert bf16["peak_bytes"] is None and "RESOURCE_EXHAUSTED" in bf16["refused"]
    assert bf16["t5_weight_bytes"] > 17e9
    assert packed_int8["t5_weight_bytes"] == t5_int8_bytes(T5)
    vae_params = sum(np.prod(leaf.shape) for leaf in _vae_leaves())  # the encoder half too: a loaded pipeline holds it
    assert packed_int8["vae_weight_bytes"] == 2 * vae_params
    assert packed_int8["weight_bytes"] == sum(packed_int8[f"{c}_weight_bytes"] for c in ("transformer", "t5", "clip", "vae"))
    assert packed_int8["weight_bytes"] < packed_int8["peak_bytes"] < 15.75e9
    beyond = {s: packed_int8[f"{s}_beyond_weights_bytes"] for s in ("encode", "denoise", "decode")}
    assert all(b > 0 for b in beyond.values()) and packed_int8["peak_stage"] == max(beyond, key=beyond.get)
    assert packed_int8["peak_bytes"] - packed_int8["weight_bytes"] >= 0.5 * max(beyond.values())
    # decoded in tiles, and whole for comparison (at this size the whole decoder's activations fit the
    # chip's VMEM: tiling pays off at flux-dev's, docs/benchmarks.md; tests/test_vae.py checks it on CPU)
    assert report["vae_tile_rows"] == 16 and packed_int8["decode_whole_beyond_weights_bytes"] > 0


def _vae_leaves():
    import jax
    from flax import nnx

    from flux_jax.vae import AutoencoderKL

    return jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: AutoencoderKL(VAE, rngs=nnx.Rngs(0)))))


def test_the_cli_prints_each_variant_beside_the_chip(report, monkeypatch, capsys):
    monkeypatch.setattr("flux_jax.memory_report.pipeline_memory_report", lambda target, shapes, policy: report)
    main(["--pipeline", "--target", "v5e-1", "--json"])
    out = capsys.readouterr().out
    assert "compiled as one program for one chip of v5e-1: 1 x TPU v5e, 16.0 GB" in out
    assert out.count("does not fit one chip; the compiler refused it: RESOURCE_EXHAUSTED") == 1
    assert "fits with" in out and f"the peak is in {report['variants'][1]['peak_stage']}" in out
    assert "decode (in exact tiles of 16 rows)" in out and "(decoding whole instead of in tiles: " in out
    assert '"variant": "packed + int8 encoders"' in out.splitlines()[-1]


@pytest.mark.parametrize("argv, message", [
    (["--pipeline"], "--pipeline needs --target"),
    (["--pipeline", "--target", "v5e-1", "--height", "100"], "multiples of 16"),
    (["--pipeline", "--target", "v5e-1", "--vae-tile-rows", "-1"], "--vae-tile-rows must be 0 (decode whole) or more"),
])
def test_bad_pipeline_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
