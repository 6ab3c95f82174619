"""Key maps between our parameter paths and PyTorch checkpoints (BFL single files, diffusers folders).

Our paths are dotted NNX paths such as `double_blocks.3.img_attn.qkv.kernel`. Because our attribute
names copy Black Forest Labs', the BFL map is "weight -> transposed kernel". The diffusers map is a
table of module renames; some of our modules gather several diffusers tensors (fused q/k/v, the
single block's q, k, v and MLP input), concatenated along the output axis, and the final adaLN
stores (scale, shift) in diffusers but (shift, scale) in BFL and here.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from flux_jax.config import FluxConfig

BFL = "bfl"
DIFFUSERS = "diffusers"
BFL_PREFIXES = ("model.diffusion_model.", "diffusion_model.")  # ComfyUI / original-repo wrappers


@dataclasses.dataclass(frozen=True)
class Source:
    """Where one of our leaves comes from: tensors concatenated along the PyTorch output axis (0)."""

    keys: tuple[str, ...]
    transpose: bool  # PyTorch Linear weight (out, in) -> Flax kernel (in, out)
    swap_halves: bool = False  # (scale, shift) <-> (shift, scale)


def _split_leaf(path: str) -> tuple[str, str]:
    module, _, leaf = path.rpartition(".")
    return module, leaf


def bfl_source(path: str) -> Source:
    module, leaf = _split_leaf(path)
    if leaf == "kernel":
        return Source((f"{module}.weight",), transpose=True)
    return Source((path,), transpose=False)


# (our module, diffusers modules in concatenation order, swap halves); {i} is the block index.
_DIFFUSERS_MODULES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("img_in", ("x_embedder",), False),
    ("txt_in", ("context_embedder",), False),
    ("time_in.in_layer", ("time_text_embed.timestep_embedder.linear_1",), False),
    ("time_in.out_layer", ("time_text_embed.timestep_embedder.linear_2",), False),
    ("vector_in.in_layer", ("time_text_embed.text_embedder.linear_1",), False),
    ("vector_in.out_layer", ("time_text_embed.text_embedder.linear_2",), False),
    ("guidance_in.in_layer", ("time_text_embed.guidance_embedder.linear_1",), False),
    ("guidance_in.out_layer", ("time_text_embed.guidance_embedder.linear_2",), False),
    ("double_blocks.{i}.img_mod.lin", ("transformer_blocks.{i}.norm1.linear",), False),
    ("double_blocks.{i}.txt_mod.lin", ("transformer_blocks.{i}.norm1_context.linear",), False),
    (
        "double_blocks.{i}.img_attn.qkv",
        ("transformer_blocks.{i}.attn.to_q", "transformer_blocks.{i}.attn.to_k", "transformer_blocks.{i}.attn.to_v"),
        False,
    ),
    (
        "double_blocks.{i}.txt_attn.qkv",
        (
            "transformer_blocks.{i}.attn.add_q_proj",
            "transformer_blocks.{i}.attn.add_k_proj",
            "transformer_blocks.{i}.attn.add_v_proj",
        ),
        False,
    ),
    ("double_blocks.{i}.img_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_q",), False),
    ("double_blocks.{i}.img_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_k",), False),
    ("double_blocks.{i}.txt_attn.norm.query_norm", ("transformer_blocks.{i}.attn.norm_added_q",), False),
    ("double_blocks.{i}.txt_attn.norm.key_norm", ("transformer_blocks.{i}.attn.norm_added_k",), False),
    ("double_blocks.{i}.img_attn.proj", ("transformer_blocks.{i}.attn.to_out.0",), False),
    ("double_blocks.{i}.txt_attn.proj", ("transformer_blocks.{i}.attn.to_add_out",), False),
    ("double_blocks.{i}.img_mlp.0", ("transformer_blocks.{i}.ff.net.0.proj",), False),
    ("double_blocks.{i}.img_mlp.2", ("transformer_blocks.{i}.ff.net.2",), False),
    ("double_blocks.{i}.txt_mlp.0", ("transformer_blocks.{i}.ff_context.net.0.proj",), False),
    ("double_blocks.{i}.txt_mlp.2", ("transformer_blocks.{i}.ff_context.net.2",), False),
    (
        "single_blocks.{i}.linear1",
        (
            "single_transformer_blocks.{i}.attn.to_q",
            "single_transformer_blocks.{i}.attn.to_k",
            "single_transformer_blocks.{i}.attn.to_v",
            "single_transformer_blocks.{i}.proj_mlp",
        ),
        False,
    ),
    ("single_blocks.{i}.linear2", ("single_transformer_blocks.{i}.proj_out",), False),
    ("single_blocks.{i}.norm.query_norm", ("single_transformer_blocks.{i}.attn.norm_q",), False),
    ("single_blocks.{i}.norm.key_norm", ("single_transformer_blocks.{i}.attn.norm_k",), False),
    ("single_blocks.{i}.modulation.lin", ("single_transformer_blocks.{i}.norm.linear",), False),
    ("final_layer.linear", ("proj_out",), False),
    ("final_layer.adaLN_modulation.1", ("norm_out.linear",), True),
)
_DIFFUSERS_PATTERNS = tuple(
    (re.compile("^" + re.escape(ours).replace(r"\{i\}", r"(?P<i>\d+)") + "$"), theirs, swap)
    for ours, theirs, swap in _DIFFUSERS_MODULES
)
_DIFFUSERS_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight"}


def diffusers_source(path: str) -> Source:
    module, leaf = _split_leaf(path)
    for pattern, theirs, swap in _DIFFUSERS_PATTERNS:
        match = pattern.match(module)
        if match:
            index = match.groupdict().get("i", "")
            keys = tuple(f"{m.replace('{i}', index)}.{_DIFFUSERS_LEAF[leaf]}" for m in theirs)
            return Source(keys, transpose=leaf == "kernel", swap_halves=swap)
    raise KeyError(f"no diffusers key for parameter {path!r}")


SOURCES: dict[str, Callable[[str], Source]] = {BFL: bfl_source, DIFFUSERS: diffusers_source}


def detect_layout(keys: list[str]) -> str | None:
    """BFL or diffusers by their distinctive keys; None for anything else."""
    keys = set(keys)
    if "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys):
        return BFL
    if "x_embedder.weight" in keys and any(k.startswith("transformer_blocks.") for k in keys):
        return DIFFUSERS
    return None


def _count_blocks(shape_of: Callable[[str], tuple[int, ...] | None], template: str) -> int:
    n = 0
    while shape_of(template.format(n)) is not None:
        n += 1
    return n


FLUX_AXES_DIM = (16, 56, 56)  # FLUX's rotary split of its head dim 128 over (time, height, width)
NOT_ARCHITECTURE = frozenset({"param_dtype", "dtype", "remat", "scan_blocks"})  # a load's choices, not the file's


def rope_axes(head_dim: int, axes_dim: tuple[int, ...] | None) -> tuple[int, ...]:
    """The RoPE axes of a checkpoint that stores none: `axes_dim` if given, FLUX's split for head dim
    128; any other head dim has no known split, so the caller must say it (ValueError saying how)."""
    if axes_dim is not None:
        return tuple(axes_dim)
    if head_dim == sum(FLUX_AXES_DIM):
        return FLUX_AXES_DIM
    raise ValueError(
        f"head dim {head_dim}: the file stores no RoPE axes and only head dim 128 has a known split {FLUX_AXES_DIM}; "
        f"pass the model's axes_dim=(a, b, c) (even, summing to {head_dim}) or config=FluxConfig(...) to load_flux, "
        "or --axes-dim A,B,C on the command line"
    )


def infer_config(shape_of: Callable[[str], tuple[int, ...] | None], axes_dim: tuple[int, ...] | None = None) -> FluxConfig:
    """A FluxConfig from tensor shapes alone. `shape_of(our_path)` gives a leaf's shape in our layout
    (kernels (in, out)) or None where the checkpoint has no such tensor. RoPE axes are not stored in
    a checkpoint: `axes_dim`, else FLUX's for head dim 128 (`rope_axes`); theta is FLUX's 10,000."""
    hidden_in = shape_of("img_in.kernel")
    in_channels, hidden = hidden_in
    head_dim = shape_of("double_blocks.0.img_attn.norm.query_norm.scale")
    if head_dim is None:
        head_dim = shape_of("single_blocks.0.norm.query_norm.scale")
    head_dim = head_dim[0]
    mlp = shape_of("double_blocks.0.img_mlp.0.kernel")
    if mlp is None:
        mlp = (hidden, shape_of("single_blocks.0.linear1.kernel")[1] - 3 * hidden)
    return FluxConfig(
        in_channels=in_channels,
        vec_in_dim=shape_of("vector_in.in_layer.kernel")[0],
        context_in_dim=shape_of("txt_in.kernel")[0],
        hidden_size=hidden,
        mlp_ratio=mlp[1] / hidden,
        num_heads=hidden // head_dim,
        depth=_count_blocks(shape_of, "double_blocks.{}.img_attn.qkv.kernel"),
        depth_single_blocks=_count_blocks(shape_of, "single_blocks.{}.linear1.kernel"),
        axes_dim=rope_axes(head_dim, axes_dim),
        qkv_bias=shape_of("double_blocks.0.img_attn.qkv.bias") is not None,
        guidance_embed=shape_of("guidance_in.in_layer.kernel") is not None,
        out_channels=shape_of("final_layer.linear.kernel")[1],
    )


def disagreements(found: FluxConfig, given: dict, ignore: frozenset[str] = NOT_ARCHITECTURE) -> list[str]:
    """The architecture fields of `given` (FluxConfig field -> value) that differ from `found`, each
    as "field GIVEN (the checkpoint has FOUND)"; dtypes and execution choices are not compared."""
    have = found.to_dict()
    return [f"{name} {value} (the checkpoint has {have[name]})"
            for name, value in given.items() if name not in ignore and value != have[name]]


def config_from_diffusers(data: dict) -> FluxConfig:
    """FluxConfig from a diffusers `FluxTransformer2DModel` config.json (KeyError/ValueError if unfit)."""
    class_name = data.get("_class_name", "FluxTransformer2DModel")
    if class_name != "FluxTransformer2DModel":
        raise ValueError(f"it describes a {class_name}, not a FluxTransformer2DModel")
    if data.get("patch_size", 1) != 1:
        raise ValueError(f"patch_size {data['patch_size']} is not supported (FLUX uses 1)")
    heads, head_dim = int(data["num_attention_heads"]), int(data["attention_head_dim"])
    return FluxConfig(
        in_channels=int(data["in_channels"]),
        out_channels=data.get("out_channels") or None,
        vec_in_dim=int(data["pooled_projection_dim"]),
        context_in_dim=int(data["joint_attention_dim"]),
        hidden_size=heads * head_dim,
        num_heads=heads,
        depth=int(data["num_layers"]),
        depth_single_blocks=int(data["num_single_layers"]),
        axes_dim=tuple(data.get("axes_dims_rope", FLUX_AXES_DIM)),
        guidance_embed=bool(data.get("guidance_embeds", False)),
    )


def to_torch_layout(value: np.ndarray, source: Source, hidden_size: int) -> dict[str, np.ndarray]:
    """Inverse of a `Source`: our leaf -> the PyTorch tensors it came from (split along the output
    axis: every part is `hidden_size` wide except the last, which takes the rest)."""
    value = np.asarray(value)
    if source.transpose:
        value = value.T
    if source.swap_halves:
        value = np.concatenate(np.split(value, 2, axis=0)[::-1], axis=0)
    edges = [hidden_size * (i + 1) for i in range(len(source.keys) - 1)]
    parts = np.split(value, edges, axis=0)
    return {key: np.ascontiguousarray(part) for key, part in zip(source.keys, parts)}


def diffusers_config_dict(config: FluxConfig) -> dict:
    """The config.json of a diffusers FluxTransformer2DModel for `config` (inverse of config_from_diffusers)."""
    if config.mlp_ratio != 4.0 or not config.qkv_bias or config.theta != 10_000:
        raise ValueError("diffusers' FluxTransformer2DModel fixes mlp_ratio 4, qkv biases and theta 10000; "
                         f"this config has mlp_ratio {config.mlp_ratio}, qkv_bias {config.qkv_bias}, theta {config.theta}")
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_layers": config.depth,
        "num_single_layers": config.depth_single_blocks,
        "attention_head_dim": config.head_dim,
        "num_attention_heads": config.num_heads,
        "joint_attention_dim": config.context_in_dim,
        "pooled_projection_dim": config.vec_in_dim,
        "guidance_embeds": config.guidance_embed,
        "axes_dims_rope": list(config.axes_dim),
    }
