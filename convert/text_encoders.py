"""Hugging Face text-encoder folders (`text_encoder/` CLIP, `text_encoder_2/` T5) into our NNX encoders.

Configs are read with transformers' config classes; tensors are streamed from safetensors (one file
or sharded with an index). Our attribute names mirror Hugging Face's, so the map is: a Linear's
`weight` is our transposed `kernel`, an Embed's `weight` our `embedding`, a LayerNorm's `weight` our
`scale`, a bare parameter `x` is `x.weight`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx
from jax.sharding import Mesh

from convert.errors import CheckpointError
from convert.loader import find_tensor_files
from convert.safetensors_io import SafetensorsFiles
from flux_jax.params import fill
from flux_jax.text import CLIPTextEncoder, CLIPTextEncoderConfig, T5Encoder, T5EncoderConfig

# Keys a checkpoint may hold that are not parameters of ours: T5's tied copy of `shared`, CLIP's
# position-id buffer of older files.
_IGNORED = ("encoder.embed_tokens.weight", "embeddings.position_ids")


def hf_key(path: tuple) -> tuple[str, bool]:
    """(Hugging Face key, transpose?) of one of our parameter paths."""
    *module, leaf = map(str, path)
    prefix = ".".join(module)
    if leaf == "kernel":
        return f"{prefix}.weight", True
    if leaf in ("embedding", "scale"):
        return f"{prefix}.weight", False
    if leaf in ("weight", "bias"):
        return ".".join(map(str, path)), False
    return f"{'.'.join(map(str, path))}.weight", False


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


def _load(folder: Path, model_fn, *, mesh: Mesh | None, strip: str = ""):
    tensors, _ = find_tensor_files(folder)
    abstract = nnx.eval_shape(model_fn)
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(abstract))]
    wanted = {hf_key(p)[0] for p in paths}
    names = {k[len(strip):] if k.startswith(strip) else k: k for k in tensors.keys()}
    missing = sorted(wanted - set(names))
    unexpected = sorted(set(names) - wanted - set(_IGNORED))
    if missing:
        raise CheckpointError(f"{tensors.name}: missing key {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    if unexpected:
        raise CheckpointError(f"{tensors.name}: unexpected key {unexpected[0]!r}" + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))

    def value_of(path, var):
        key, transpose = hf_key(path)
        value = tensors.read(names[key])
        value = value.T if transpose else value
        if value.shape != tuple(var.shape):
            raise CheckpointError(f"{tensors.file_of(names[key])}: tensor {names[key]!r} has shape {value.shape}, "
                                  f"expected {tuple(var.shape)[::-1] if transpose else tuple(var.shape)}")
        return np.ascontiguousarray(value)

    return fill(abstract, value_of, mesh=mesh)


def _dtype_name(folder: Path, dtype) -> str:
    import jax.numpy as jnp

    if dtype is not None:
        return jnp.dtype(dtype).name
    tensors, _ = find_tensor_files(folder)
    first = tensors.keys()[0]
    return "float32" if tensors.dtype_name(first) == "F32" else "bfloat16"


def load_t5_encoder(folder: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> T5Encoder:
    """A T5EncoderModel folder (FLUX's `text_encoder_2/`) as our T5Encoder."""
    folder = Path(folder)
    hf = _config(folder, "T5Config", ("t5", "umt5"))
    if not hf.is_gated_act or hf.dense_act_fn not in ("gelu_new", "gelu_pytorch_tanh"):
        raise CheckpointError(f"{folder}: only T5 v1.1 (gated-GELU) encoders are supported, got {hf.feed_forward_proj}")
    name = _dtype_name(folder, dtype)
    config = T5EncoderConfig(
        vocab_size=hf.vocab_size, d_model=hf.d_model, d_kv=hf.d_kv, d_ff=hf.d_ff, num_layers=hf.num_layers,
        num_heads=hf.num_heads, relative_attention_num_buckets=hf.relative_attention_num_buckets,
        relative_attention_max_distance=hf.relative_attention_max_distance, layer_norm_epsilon=hf.layer_norm_epsilon,
        param_dtype=name, dtype=name,
    )
    return _load(folder, lambda: T5Encoder(config, rngs=nnx.Rngs(0)), mesh=mesh)


def load_clip_text_encoder(folder: str | os.PathLike, *, dtype=None, mesh: Mesh | None = None) -> CLIPTextEncoder:
    """A CLIPTextModel folder (FLUX's `text_encoder/`) as our CLIPTextEncoder."""
    folder = Path(folder)
    hf = _config(folder, "CLIPTextConfig", ("clip_text_model",))
    name = _dtype_name(folder, dtype)
    config = CLIPTextEncoderConfig(
        vocab_size=hf.vocab_size, hidden_size=hf.hidden_size, intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers, num_attention_heads=hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings, layer_norm_eps=hf.layer_norm_eps,
        eos_token_id=hf.eos_token_id, hidden_act=hf.hidden_act, param_dtype=name, dtype=name,
    )
    return _load(folder, lambda: CLIPTextEncoder(config, rngs=nnx.Rngs(0)), mesh=mesh, strip="text_model.")
