"""The Flax FLUX transformer against diffusers' FluxTransformer2DModel, through the production loader."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from convert import load_flux
from flux_jax import Flux, FluxConfig
from tests.torch_reference import TINY_DEV, TINY_SCHNELL, assert_close, diffusers_model, random_inputs, run_diffusers, run_ours


@pytest.fixture(scope="module", params=[TINY_DEV, TINY_SCHNELL], ids=["guidance", "no-guidance"])
def pair(request, tmp_path_factory):
    """(diffusers reference, our model loaded from its save_pretrained folder)."""
    config = request.param
    reference = diffusers_model(config)
    folder = tmp_path_factory.mktemp("diffusers")
    reference.save_pretrained(folder)
    return reference, load_flux(folder)


def test_loaded_config_matches_the_reference(pair):
    reference, ours = pair
    assert ours.config.depth == reference.config.num_layers
    assert ours.config.guidance_embed == reference.config.guidance_embeds
    assert ours.config.param_dtype == "float32"


@pytest.mark.parametrize(
    "shape",
    [
        dict(batch=2, height=4, width=6, txt_len=7),
        dict(batch=3, height=5, width=2, txt_len=1),
        dict(batch=1, height=20, width=28, txt_len=9),  # 569 tokens: attention runs over query blocks on CPU
    ],
)
def test_forward_matches_diffusers(pair, shape):
    reference, ours = pair
    inputs = random_inputs(ours.config, **shape)
    assert_close(run_ours(ours, inputs), run_diffusers(reference, inputs))


@pytest.mark.parametrize("pair", [TINY_DEV], ids=["guidance"], indirect=True)  # guidance changes no block
def test_jit_remat_and_scan_give_the_same_output_and_gradients(pair):
    _, ours = pair
    inputs = random_inputs(ours.config, batch=2)
    rematted = nnx.merge(*_split_with_config(ours, ours.config.replace(remat=True)))
    scanned = nnx.merge(*_split_with_config(ours, ours.config.replace(remat=True, scan_blocks=True)))

    def loss(model):
        return jnp.mean(model(**inputs) ** 2)

    eager = run_ours(ours, inputs)
    assert_close(np.asarray(nnx.jit(lambda m: m(**inputs))(ours)), eager, rel=1e-5)
    out, features = nnx.jit(lambda m: m(**inputs, return_features=True))(scanned)
    reference_out, reference_features = ours(**inputs, return_features=True)
    assert_close(np.asarray(out), eager, rel=1e-5)
    assert len(features) == len(reference_features) == ours.config.depth + ours.config.depth_single_blocks
    for f, r in zip(features, reference_features):
        assert_close(np.asarray(f), np.asarray(r), rel=1e-5)
    grads = nnx.jit(nnx.grad(loss))(ours)
    for variant in (rematted, scanned):
        for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(nnx.jit(nnx.grad(loss))(variant))):
            np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5 * float(jnp.abs(g).max()))
    assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def _split_with_config(model, config):
    graphdef, state = nnx.split(nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0))))
    nnx.replace_by_pure_dict(state, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    return graphdef, state


def test_bfloat16_compute_stays_close_to_float32(pair):
    reference, ours = pair
    inputs = random_inputs(ours.config)
    bf16 = nnx.merge(*_split_with_config(ours, ours.config.with_dtype("bfloat16")))
    out = bf16(**inputs)
    assert out.dtype == jnp.bfloat16
    ref = run_diffusers(reference, inputs)
    assert np.abs(np.asarray(out, np.float32) - ref).max() < 0.1 * np.abs(ref).max()


@pytest.mark.parametrize(
    "name, bad, message",
    [
        ("img", np.zeros((2, 24, 5), np.float32), "img has shape"),
        ("txt_ids", np.zeros((2, 6, 3), np.float32), "txt_ids has shape"),
        ("y", np.zeros((3, 32), np.float32), "y has shape"),
        ("guidance", None, "embeds guidance"),
    ],
)
def test_bad_input_shapes_name_the_argument(name, bad, message):
    model = Flux(TINY_DEV, rngs=nnx.Rngs(0))
    inputs = random_inputs(TINY_DEV)
    inputs[name] = bad
    with pytest.raises(ValueError, match=message):
        model(**inputs)


def test_block_linears_come_from_the_factory():
    built = []

    def recording_dense(in_features, out_features, **kwargs):
        from flux_jax.layers import dense

        built.append((in_features, out_features, kwargs["axes"]))
        return dense(in_features, out_features, **kwargs)

    config = FluxConfig.preset("tiny")
    nnx.eval_shape(lambda: Flux(config, rngs=nnx.Rngs(0), linear=recording_dense))
    # per double block: 2 x (modulation, qkv, proj, mlp in, mlp out); per single block: linear1, linear2, modulation
    assert len(built) == 10 * config.depth + 3 * config.depth_single_blocks
