"""Each FLUX block against its diffusers counterpart (FluxTransformerBlock, FluxSingleTransformerBlock),
with weights moved by the converter's own key map: a parity failure names the block."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed, FluxSingleTransformerBlock, FluxTransformerBlock
from flax import nnx

from convert import layouts
from flux_jax.blocks import DoubleStreamBlock, SingleStreamBlock
from flux_jax.layers import dense, rope
from tests.helpers import randomize_torch
from tests.torch_reference import TINY_DEV, assert_close, random_inputs

CONFIG = TINY_DEV
# Our block's parameter paths sit under these prefixes in a whole model; the converter's map is keyed by them.
OUR_PREFIX = {"double": "double_blocks.0.", "single": "single_blocks.0."}
THEIR_PREFIX = {"double": "transformer_blocks.0.", "single": "single_transformer_blocks.0."}


def random_torch_block(kind: str) -> torch.nn.Module:
    """A float32 diffusers block with every parameter random (QK-norm scales near one)."""
    torch.manual_seed(0)
    cls = FluxTransformerBlock if kind == "double" else FluxSingleTransformerBlock
    block = cls(dim=CONFIG.hidden_size, num_attention_heads=CONFIG.num_heads, attention_head_dim=CONFIG.head_dim).eval()
    return randomize_torch(block, near_one=lambda name: "norm_" in name)


def our_block(kind: str, reference: torch.nn.Module) -> nnx.Module:
    """Our block holding `reference`'s weights, each leaf gathered as `layouts.diffusers_source` says."""
    c, kw = CONFIG, dict(linear=dense, dtype="float32", param_dtype="float32")
    if kind == "double":
        block = nnx.eval_shape(lambda: DoubleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias, **kw, rngs=nnx.Rngs(0)))
    else:
        block = nnx.eval_shape(lambda: SingleStreamBlock(c.hidden_size, c.num_heads, c.mlp_ratio, **kw, rngs=nnx.Rngs(0)))
    tensors = {THEIR_PREFIX[kind] + k: v.numpy() for k, v in reference.state_dict().items()}
    used = set()
    for path, var in nnx.to_flat_state(nnx.state(block, nnx.Param)):
        source = layouts.diffusers_source(OUR_PREFIX[kind] + ".".join(map(str, path)))
        value = np.concatenate([tensors[k] for k in source.keys], axis=0)
        var.set_value(jnp.asarray(value.T if source.transpose else value))
        used.update(source.keys)
    assert used == set(tensors), f"diffusers tensors the map leaves out: {sorted(set(tensors) - used)}"
    return block


@pytest.fixture(scope="module")
def inputs():
    """Hidden states, the conditioning vector and RoPE angles from one set of position ids, for both sides."""
    x = random_inputs(CONFIG, batch=2, height=3, width=5, txt_len=4)
    rng = np.random.default_rng(1)
    hidden = lambda n: rng.standard_normal((2, n, CONFIG.hidden_size)).astype(np.float32)  # noqa: E731
    ids = np.concatenate([x["txt_ids"], x["img_ids"]], axis=1)
    ids[:, :4, 0] = np.arange(4)  # text positions differ, so a rotation applied to the wrong tokens shows
    with torch.no_grad():
        cos, sin = FluxPosEmbed(theta=CONFIG.theta, axes_dim=list(CONFIG.axes_dim))(torch.from_numpy(ids[0]))
    return dict(img=hidden(15), txt=hidden(4), vec=hidden(1)[:, 0], pe=rope(jnp.asarray(ids), CONFIG.axes_dim, CONFIG.theta),
                torch_rope=(cos, sin))


def test_double_stream_block_matches_diffusers_flux_transformer_block(inputs):
    reference = random_torch_block("double")
    t = {k: torch.from_numpy(inputs[k]) for k in ("img", "txt", "vec")}
    with torch.no_grad():
        txt_ref, img_ref = reference(t["img"], t["txt"], t["vec"], image_rotary_emb=inputs["torch_rope"])
    img, txt = nnx.jit(our_block("double", reference))(inputs["img"], inputs["txt"], inputs["vec"], inputs["pe"])
    assert_close(np.asarray(img), img_ref.numpy())
    assert_close(np.asarray(txt), txt_ref.numpy())


def test_single_stream_block_matches_diffusers_flux_single_transformer_block(inputs):
    reference = random_torch_block("single")
    t = {k: torch.from_numpy(inputs[k]) for k in ("img", "txt", "vec")}
    with torch.no_grad():
        txt_ref, img_ref = reference(t["img"], t["txt"], t["vec"], image_rotary_emb=inputs["torch_rope"])
    out = nnx.jit(our_block("single", reference))(np.concatenate([inputs["txt"], inputs["img"]], axis=1), inputs["vec"], inputs["pe"])
    assert_close(np.asarray(out), np.concatenate([txt_ref.numpy(), img_ref.numpy()], axis=1))
