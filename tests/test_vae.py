"""Our autoencoder against diffusers' AutoencoderKL: encode and decode."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from convert import CheckpointError
from convert.vae import load_vae
from tests.torch_reference import assert_close


@pytest.fixture(scope="module")
def vae(tmp_path_factory):
    torch.manual_seed(0)
    reference = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159,
    ).eval()
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    folder = tmp_path_factory.mktemp("vae")
    reference.save_pretrained(folder)
    return reference, load_vae(folder)


def test_encode_matches_diffusers(vae):
    reference, ours = vae
    images = np.random.default_rng(0).uniform(-1, 1, (2, 3, 24, 40)).astype(np.float32)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(images)).latent_dist.mean.numpy()
    got = np.asarray(ours.encode(images.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    assert_close(got, expected)
    assert ours.config.scaling_factor == 0.3611 and ours.config.shift_factor == 0.1159


def test_decode_matches_diffusers_and_tiles_agree_where_they_should(vae):
    reference, ours = vae
    latents = np.random.default_rng(1).standard_normal((2, 4, 6, 5)).astype(np.float32)
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(latents)).sample.numpy()
    got = np.asarray(ours.decode(latents.transpose(0, 2, 3, 1))).transpose(0, 3, 1, 2)
    assert_close(got, expected)
    tiled = np.asarray(ours.decode(latents.transpose(0, 2, 3, 1), tile=6)).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(tiled, got)  # a tile covering everything is the whole decode
    strips = np.asarray(ours.decode(latents.transpose(0, 2, 3, 1), tile=2))
    assert strips.shape == got.transpose(0, 2, 3, 1).shape and np.isfinite(strips).all()


def test_a_folder_of_something_else_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    with pytest.raises(CheckpointError, match="describes a UNet2DModel"):
        load_vae(tmp_path)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_vae(tmp_path / "missing")
