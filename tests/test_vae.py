"""Our autoencoder against diffusers' AutoencoderKL: encode and decode."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from convert import CheckpointError
from convert.vae import load_vae
from tests.torch_reference import assert_close

TILED_MEAN_ERROR = 0.18  # mean |tiled - whole| / mean |whole| at tile 8 of 16 latent rows: measured 0.12


def random_vae(folder, blocks: int = 3):
    """A diffusers AutoencoderKL with random weights, `blocks` resolution levels (an image 2^(blocks-1)
    times the latent size: FLUX's has four, 8x), and our VAE loaded from its save_pretrained folder."""
    torch.manual_seed(0)
    reference = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16, 16)[:blocks], layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    reference.save_pretrained(folder)
    return reference, load_vae(folder)


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    return random_vae(tmp_path_factory.mktemp("vae"))


@pytest.fixture(scope="module")
def flux_shaped_vae(tmp_path_factory):
    """Four levels, 8x upsampling, as FLUX's VAE."""
    return random_vae(tmp_path_factory.mktemp("vae8"), blocks=4)[1]


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


@pytest.mark.parametrize("tile", [6, 7])
def test_a_tile_covering_the_image_is_the_whole_decode(vae, tile):
    latents = np.random.default_rng(1).standard_normal((2, 6, 5, 4)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vae[1].decode(latents, tile=tile)), np.asarray(vae[1].decode(latents)))


def decoded_strips(ours, latents, tile: int, upsampling: int) -> np.ndarray:
    """Tiled decoding as documented: each `tile` rows decoded with tile // 2 rows of context on both
    sides, only the strip's own image rows kept."""
    h, context, strips = latents.shape[1], max(tile // 2, 1), []
    for start in range(0, h, tile):
        lo, hi = max(start - context, 0), min(start + tile + context, h)
        window = np.asarray(ours.decode(latents[:, lo:hi]))
        strips.append(window[:, upsampling * (start - lo): upsampling * (min(start + tile, h) - lo)])
    return np.concatenate(strips, axis=1)


@pytest.mark.parametrize("blocks", [4, 3])  # 8x (FLUX's) and 4x upsampling: strips cut at each one's own rows
def test_tiled_decode_keeps_each_strips_own_rows(vae, flux_shaped_vae, blocks):
    ours, upsampling = (flux_shaped_vae, 8) if blocks == 4 else (vae[1], 4)
    latents = np.random.default_rng(2).standard_normal((1, 8, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(np.asarray(ours.decode(latents, tile=3)), decoded_strips(ours, latents, 3, upsampling),
                               rtol=1e-6, atol=1e-6)


def test_tiled_decode_stays_near_the_whole_decode(flux_shaped_vae):
    """Strips see less of the image than the whole decode (group norms, mid-block attention), so they
    differ from it, but by less than a broken seam: the second strip shifted by one image row gives 0.35,
    twice the bound."""
    latents = np.random.default_rng(3).standard_normal((1, 16, 5, 4)).astype(np.float32)
    whole = np.asarray(flux_shaped_vae.decode(latents))
    error = np.abs(np.asarray(flux_shaped_vae.decode(latents, tile=8)) - whole).mean() / np.abs(whole).mean()
    assert error < TILED_MEAN_ERROR, error


def test_a_folder_of_something_else_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CheckpointError, match="describes a UNet2DModel"):
        load_vae(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(tmp_path / "missing")
