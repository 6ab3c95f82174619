"""Hugging Face text-encoder folders (`text_encoder/` CLIP, `text_encoder_2/` T5) into our NNX encoders.

Configs are read with transformers' config classes; tensors are streamed by `load_mirrored`.
"""

from __future__ import annotations

import os
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from convert.hf_modules import load_mirrored, stored_dtype
from flux_jax.io.errors import CheckpointError
from flux_jax.text import CLIPTextEncoder, CLIPTextEncoderConfig, T5Encoder, T5EncoderConfig


def _config(folder: Path, config_class: str, model_types: tuple[str, ...]):
    import json

    import transformers

    config_json = folder / "config.json"
    if not config_json.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a {model_types[0]} text encoder folder)")
    try:
        model_type = json.loads(config_json.read_text()).get("model_type")
        if model_type not in model_types:
            raise ValueError(f"it describes a {model_type!r} model, not {' or '.join(map(repr, model_types))}")
        return getattr(transformers, config_class).from_pretrained(str(folder))
    except (OSError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{config_json}: not a usable config ({err})") from None


def load_t5_encoder(folder: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> T5Encoder:
    """A T5EncoderModel folder (FLUX's `text_encoder_2/`) as our T5Encoder."""
    folder = Path(folder)
    hf = _config(folder, "T5Config", ("t5", "umt5"))
    if not hf.is_gated_act or hf.dense_act_fn not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{folder}: only T5 v1.1 (gated-GELU) encoders are supported, got {hf.feed_forward_proj}")
    name = stored_dtype(folder, dtype)
    config = T5EncoderConfig(
        vocab_size=hf.vocab_size, d_model=hf.d_model, d_kv=hf.d_kv, d_ff=hf.d_ff, num_layers=hf.num_layers,
        num_heads=hf.num_heads, relative_attention_num_buckets=hf.relative_attention_num_buckets,
        relative_attention_max_distance=hf.relative_attention_max_distance, layer_norm_epsilon=hf.layer_norm_epsilon,
        param_dtype=name, dtype=name,
    )
    # T5 checkpoints also hold encoder.embed_tokens, a tied copy of `shared`.
    return load_mirrored(folder, lambda: T5Encoder(config, rngs=nnx.Rngs(0)), mesh=mesh, ignored=("encoder.embed_tokens.weight",))


def load_clip_text_encoder(folder: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> CLIPTextEncoder:
    """A CLIPTextModel folder (FLUX's `text_encoder/`) as our CLIPTextEncoder."""
    folder = Path(folder)
    hf = _config(folder, "CLIPTextConfig", ("clip_text_model",))
    name = stored_dtype(folder, dtype)
    config = CLIPTextEncoderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings, layer_norm_eps=hf.layer_norm_eps,
        eos_token_id=hf.eos_token_id, hidden_act=hf.hidden_act, param_dtype=name, dtype=name,
    )
    return load_mirrored(folder, lambda: CLIPTextEncoder(config, rngs=nnx.Rngs(0)), mesh=mesh, strip="text_model.",
                         ignored=("embeddings.position_ids",))
