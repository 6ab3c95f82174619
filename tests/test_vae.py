"""Our autoencoder against diffusers' AutoencoderKL: encode and decode."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from convert import CheckpointError
from convert.vae import load_vae
from tests.helpers import randomize_torch
from tests.torch_reference import assert_close


def random_vae(folder, blocks: int = 3):
    """A diffusers AutoencoderKL with random weights, `blocks` resolution levels (an image 2^(blocks-1)
    times the latent size: FLUX's has four, 8x), and our VAE loaded from its save_pretrained folder."""
    torch.manual_seed(0)
    reference = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16)[:blocks], layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    randomize_torch(reference)
    reference.save_pretrained(folder)
    return reference, load_vae(folder)


@pytest.fixture(scope="module", params=[3, 4], ids=["4x", "8x (FLUX's)"])
def vae(tmp_path_factory, request):
    return random_vae(tmp_path_factory.mktemp("vae"), blocks=request.param)


def test_encode_matches_diffusers(vae):
    reference, ours = vae
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(images)).latent_dist.mean.numpy()
    got = np.asarray(ours.encode(images.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    assert_close(got, expected)
    assert ours.config.scaling_factor == 0.3611 and ours.config.shift_factor == 0.1159


def test_decode_matches_diffusers(vae):
    reference, ours = vae
    latents = np.random.default_rng(1).standard_normal((2, 4, 6, 5)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).sample.numpy()
    got = np.asarray(ours.decode(latents.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    assert_close(got, expected)


def test_a_folder_of_something_else_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CheckpointError, match="describes a UNet2DModel"):
        load_vae(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(tmp_path / "missing")


@pytest.mark.parametrize("tile_rows", [1, 6, 13])
def test_tiled_decoding_is_exact(vae, tile_rows):
    """Tiles of the full-resolution tail (with the last upsampling), from windows reaching past them
    and group norms over the whole image: diffusers' images, not blended ones. 1 row rounds up to 2
    (the upsampling's factor); 13 rows leave a short last tile."""
    reference, ours = vae
    latents = np.random.default_rng(2).standard_normal((2, 4, 9, 5)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).sample.numpy()
    whole = np.asarray(ours.decode(latents.transpose(0, 2, 3, 1)))
    ours.enable_tiling(tile_rows)
    try:
        tiled = np.asarray(ours.decode(latents.transpose(0, 2, 3, 1)))
    finally:
        ours.disable_tiling()
    assert_close(tiled.transpose(0, 3, 1, 2), expected)
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=2e-6 * np.abs(whole).max())
    with pytest.raises(ValueError, match="tile_rows must be at least 1, got 0"):
        ours.enable_tiling(0)


def test_tiled_decoding_holds_no_full_size_activation():
    """The decoder's temporaries, from XLA's buffer assignment: tiled, the tail's full-resolution
    activations (here 16 channels at 256x256 in float32, 4 MiB each) never exist whole: five of
    them untiled, 1.5 tiled (measured)."""
    import jax
    from flax import nnx

    from flux_jax.vae import AutoencoderConfig
    from flux_jax.vae import AutoencoderKL as Ours

    config = AutoencoderConfig(block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=4, dtype="float32",
                               param_dtype="float32", latent_channels=4)
    vae = Ours(config, rngs=nnx.Rngs(0))
    latents = jax.ShapeDtypeStruct((1, 64, 64, 4), np.float32)
    decode = nnx.jit(lambda v, z: v.decode(z), graph_updates=False)
    whole = decode.lower(vae, latents).compile().memory_analysis().temp_size_in_bytes
    vae.enable_tiling(16)
    tiled = decode.lower(vae, latents).compile().memory_analysis().temp_size_in_bytes
    full_size = 256 * 256 * 16 * 4
    assert whole >= 3 * full_size and tiled < 0.4 * whole, (whole, tiled)
