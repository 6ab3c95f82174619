"""Our T5 and CLIP text encoders against transformers' T5EncoderModel and CLIPTextModel."""

import json

import numpy as np
import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from convert import CheckpointError
from convert.text_encoders import load_clip_text_encoder, load_t5_encoder
from tests import helpers
from tests.helpers import randomize_torch
from tests.torch_reference import assert_close

INT8_TOLERANCE = 0.02  # max |int8 - full| / max |full| of an encoder's outputs (measured values in the test)

T5_CONFIG = T5Config(vocab_size=120, d_model=32, d_kv=8, d_ff=48, num_layers=3, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=20, feed_forward_proj="gated-gelu")
CLIP_CONFIG = CLIPTextConfig(vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=16, eos_token_id=98, bos_token_id=97, pad_token_id=98)


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    model = randomize_torch(T5EncoderModel(T5_CONFIG), scale=0.3, seed=0)
    folder = tmp_path_factory.mktemp("t5")
    model.save_pretrained(folder, max_shard_size="20KB")
    return model, folder


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    model = randomize_torch(CLIPTextModel(CLIP_CONFIG), scale=0.3, seed=1)
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    return model, folder


def test_t5_encoder_matches_transformers(t5):
    reference, folder = t5
    ours = load_t5_encoder(folder)
    ids = np.random.default_rng(0).integers(0, 120, (2, 30))  # longer than max_distance: log-spaced buckets
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
    assert_close(np.asarray(ours(ids)), expected)
    mask = np.ones_like(ids)
    mask[1, 20:] = 0
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    assert_close(np.asarray(ours(ids, mask))[:, :20], expected[:, :20])


def test_clip_text_encoder_matches_transformers_hidden_and_pooled(clip):
    reference, folder = clip
    ours = load_clip_text_encoder(folder)
    ids = np.random.default_rng(1).integers(0, 97, (3, 16))
    ids[:, 0] = 97
    ids[0, 5], ids[1, 15], ids[2, 9:] = 98, 98, 98  # end-of-text at different places, padded with it
    with torch.no_grad():
        out = reference(torch.from_numpy(ids))
    hidden, pooled = ours(ids)
    assert_close(np.asarray(hidden), out.last_hidden_state.numpy())
    assert_close(np.asarray(pooled), out.pooler_output.numpy())


def test_encoders_name_what_is_missing(t5, clip, tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_t5_encoder(tmp_path)
    with pytest.raises(CheckpointError, match="describes a 'clip_text_model' model, not 't5'"):
        load_t5_encoder(clip[1])
    with pytest.raises(CheckpointError, match="describes a 't5' model"):
        load_clip_text_encoder(t5[1])


@pytest.mark.parametrize("config_class, defaults, model_type", [
    (T5Config, "T5_DEFAULTS", "t5"), (CLIPTextConfig, "CLIP_DEFAULTS", "clip_text_model")])
def test_configs_missing_keys_take_transformers_defaults(config_class, defaults, model_type, tmp_path):
    """config.json is read without transformers; a key it leaves out takes transformers' default."""
    from convert import text_encoders

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 321}))
    ours, _ = text_encoders._config(tmp_path, getattr(text_encoders, defaults), (model_type,))
    expected = config_class.from_pretrained(tmp_path)
    assert ours == {key: getattr(expected, key) for key in ours} and ours["vocab_size"] == 321
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "num_heads": "8", "num_attention_heads": "8"}))
    with pytest.raises(CheckpointError, match="config.json: not a usable config .*'8' is not a int"):
        text_encoders._config(tmp_path, getattr(text_encoders, defaults), (model_type,))


def test_t5_loads_into_shards_on_a_mesh_and_computes_the_same(t5):
    import jax
    from jax.sharding import PartitionSpec

    reference, folder = t5
    mesh = helpers.mesh(1, 4, 2)
    sharded = load_t5_encoder(folder, mesh=mesh)
    wi = sharded.encoder.block[0].layer[1].DenseReluDense.wi_0.kernel[...]
    assert wi.sharding.spec == PartitionSpec("fsdp", "tensor") and len(wi.addressable_shards) == 8
    ids = np.random.default_rng(3).integers(0, 120, (2, 12))
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids)).last_hidden_state.numpy()
    with jax.set_mesh(mesh):
        assert_close(np.asarray(sharded(ids)), expected)
    from flux_jax.text.int8 import int8_text_encoder

    wi = int8_text_encoder(sharded).encoder.block[0].layer[1].DenseReluDense.wi_0.kernel[...]
    assert wi.dtype == np.int8 and wi.sharding.spec == PartitionSpec("fsdp", "tensor")  # int8 keeps the shards



def _relative_error(got, expected) -> float:
    expected = np.asarray(expected, np.float64)
    return float(np.abs(np.asarray(got, np.float64) - expected).max() / np.abs(expected).max())


def test_an_int8_linear_layer_at_t5_xxl_width_is_within_one_percent():
    from flax import nnx

    from flux_jax.text.int8 import Int8Linear

    linear = nnx.Linear(4096, 1024, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((4, 4096)).astype(np.float32)
    quantized = Int8Linear(linear)
    assert quantized.kernel[...].dtype == np.int8 and quantized.weight_scale[...].shape == (1024,)
    assert 1e-4 < _relative_error(quantized(x), linear(x)) < 0.01  # 0.48% measured


def test_int8_encoders_stay_within_their_tolerance_of_full_precision(tmp_path):
    """Weight-only int8 (absmax per output channel) T5 and CLIP of the tests' architectures against the
    same encoders in float32: every linear layer replaced, its weights a quarter of the bytes, outputs
    within 2% (0.95% T5, 1.07% CLIP hidden, 0.64% pooled measured) with weights drawn at scale 0.05.
    At the other tests' scale 0.3, attention over random weights is so peaked that T5's 3 layers turn
    the per-layer 0.5% into 24%: the bound is for encoders whose attention is not knife-edged."""
    from flax import nnx

    from flux_jax.text.int8 import Int8Linear, int8_text_encoder

    randomize_torch(T5EncoderModel(T5_CONFIG), scale=0.05, seed=0).save_pretrained(tmp_path / "t5")
    randomize_torch(CLIPTextModel(CLIP_CONFIG), scale=0.05, seed=1).save_pretrained(tmp_path / "clip")
    t5_ids = np.random.default_rng(0).integers(0, 120, (2, 30))
    clip_ids = np.random.default_rng(1).integers(0, 97, (2, 16))
    clip_ids[:, 0], clip_ids[:, 9:] = 97, 98
    full_t5, full_clip = load_t5_encoder(tmp_path / "t5"), load_clip_text_encoder(tmp_path / "clip")
    int8_t5 = int8_text_encoder(load_t5_encoder(tmp_path / "t5"))
    int8_clip = int8_text_encoder(load_clip_text_encoder(tmp_path / "clip"))
    for encoder in (int8_t5, int8_clip):
        assert not any(isinstance(m, nnx.Linear) for _, m in nnx.iter_graph(encoder))
    full_bytes = sum(m.kernel[...].nbytes for _, m in nnx.iter_graph(full_t5) if isinstance(m, nnx.Linear))
    int8_bytes = sum(m.kernel[...].nbytes for _, m in nnx.iter_graph(int8_t5) if isinstance(m, Int8Linear))
    assert int8_bytes * 4 == full_bytes
    assert 1e-4 < _relative_error(int8_t5(t5_ids), full_t5(t5_ids)) < INT8_TOLERANCE
    (hidden, pooled), (hidden8, pooled8) = full_clip(clip_ids), int8_clip(clip_ids)
    assert _relative_error(hidden8, hidden) < INT8_TOLERANCE and _relative_error(pooled8, pooled) < INT8_TOLERANCE
