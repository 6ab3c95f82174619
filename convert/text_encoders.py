"""Hugging Face text-encoder folders (`text_encoder/` CLIP, `text_encoder_2/` T5) into our NNX encoders,
and our encoders back into such folders with int8 weights.

Configs are read from config.json with transformers' defaults for the keys a folder leaves out (not
through transformers, which imports PyTorch where it is installed: 0.45 GB of the pipeline's memory);
tensors are streamed by `load_mirrored`. An int8
folder (`write_int8_text_encoder`) keeps Hugging Face's layout and key names, with int8 `weight`s, a
float32 `weight_scale` per output channel beside each, and a `quantization_config` in config.json
naming our method (`INT8_METHOD`) and the compute dtype; transformers cannot load it, our loaders can.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from flax import nnx
from jax.sharding import Mesh

from convert.hf_modules import load_mirrored, save_mirrored, stored_dtype
from flux_jax.io.errors import CheckpointError
from flux_jax.text import CLIPTextEncoder, CLIPTextEncoderConfig, T5Encoder, T5EncoderConfig
from flux_jax.text.int8 import int8_text_encoder

INT8_METHOD = "flux_jax_int8"
"""config.json's quantization_config.quant_method of our int8 text encoder folders."""


# transformers' defaults (T5Config, CLIPTextConfig) for the keys our loaders read.
T5_DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6, "num_heads": 8,
               "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128,
               "layer_norm_epsilon": 1e-6, "feed_forward_proj": "relu"}
CLIP_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                 "num_attention_heads": 8, "max_position_embeddings": 77, "layer_norm_eps": 1e-5,
                 "eos_token_id": 49407, "hidden_act": "quick_gelu"}


def _config(folder: Path, defaults: dict, model_types: tuple[str, ...]) -> tuple[dict, dict | None]:
    """(config.json over `defaults`, our int8 quantization_config or None) of a text encoder folder."""
    config_json = folder / "config.json"
    if not config_json.is_file():
        raise CheckpointError(f"{folder}: no config.json (expected a {model_types[0]} text encoder folder)")
    try:
        raw = json.loads(config_json.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        model_type = raw.get("model_type")
        if model_type not in model_types:
            raise ValueError(f"it describes a {model_type!r} model, not {' or '.join(map(repr, model_types))}")
        quantization = raw.get("quantization_config")
        if quantization is not None and (not isinstance(quantization, dict) or quantization.get("quant_method") != INT8_METHOD):
            raise ValueError(f"quantization_config {quantization!r} is not ours ({INT8_METHOD!r})")
        config = {key: raw[key] if raw.get(key) is not None else default for key, default in defaults.items()}
        for key, default in defaults.items():
            if not isinstance(config[key], type(default)) and not (isinstance(default, float) and isinstance(config[key], int)):
                raise ValueError(f"{key}={config[key]!r} is not a {type(default).__name__}")
        return config, quantization
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_json}: not a usable config ({err})") from None


def _compute_dtype(folder: Path, quantization: dict | None, dtype) -> str:
    """`dtype`, else an int8 folder's recorded compute dtype, else the stored weights' (`stored_dtype`)."""
    if dtype is None and quantization is not None:
        return quantization.get("compute_dtype", "bfloat16")
    return stored_dtype(folder, dtype)


def _encoder_fn(build: Callable[[], nnx.Module], quantization: dict | None) -> Callable[[], nnx.Module]:
    return (lambda: int8_text_encoder(build())) if quantization is not None else build


def load_t5_encoder(folder: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> T5Encoder:
    """A T5EncoderModel folder (FLUX's `text_encoder_2/`) as our T5Encoder."""
    folder = Path(folder)
    hf, quantization = _config(folder, T5_DEFAULTS, ("t5", "umt5"))
    # transformers' reading of feed_forward_proj: "gated-gelu" is the tanh GELU, gated
    gated, _, act = hf["feed_forward_proj"].rpartition("-")
    if gated != "gated" or act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{folder}: only T5 v1.1 (gated-GELU) encoders are supported, got {hf['feed_forward_proj']}")
    name = _compute_dtype(folder, quantization, dtype)
    config = T5EncoderConfig(
        **{key: hf[key] for key in T5_DEFAULTS if key != "feed_forward_proj"}, param_dtype=name, dtype=name,
    )
    # T5 checkpoints also hold encoder.embed_tokens, a tied copy of `shared`.
    return load_mirrored(folder, _encoder_fn(lambda: T5Encoder(config, rngs=nnx.Rngs(0)), quantization), mesh=mesh,
                         ignored=("encoder.embed_tokens.weight",))


def load_clip_text_encoder(folder: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> CLIPTextEncoder:
    """A CLIPTextModel folder (FLUX's `text_encoder/`) as our CLIPTextEncoder."""
    folder = Path(folder)
    hf, quantization = _config(folder, CLIP_DEFAULTS, ("clip_text_model",))
    name = _compute_dtype(folder, quantization, dtype)
    config = CLIPTextEncoderConfig(**hf, param_dtype=name, dtype=name)
    return load_mirrored(folder, _encoder_fn(lambda: CLIPTextEncoder(config, rngs=nnx.Rngs(0)), quantization), mesh=mesh,
                         strip="text_model.", ignored=("embeddings.position_ids",))


def write_int8_text_encoder(encoder: T5Encoder | CLIPTextEncoder, source: Path, directory: Path) -> None:
    """`encoder` (loaded from the folder `source`) with int8 linear weights, written into the existing
    `directory`: model.safetensors and `source`'s config.json with our quantization_config. Loading
    it back gives the same int8 weights, so the encoder is quantized once, here, not at each load."""
    encoder = int8_text_encoder(encoder)
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {"quant_method": INT8_METHOD, "weights": "int8, absmax per output channel",
                                     "compute_dtype": encoder.config.dtype}
    save_mirrored(encoder, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
