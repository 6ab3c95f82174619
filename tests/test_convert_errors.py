"""Bad input: one clear error naming the thing at fault, from the library and from the CLI; no output left."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from convert import CheckpointError, load_flux
from convert.torch_to_flax import main
from flux_jax import Flux
from tests.torch_reference import TINY_DEV, bfl_state_dict, diffusers_model


# Head dim 128: a BFL file whose RoPE axes need not be given (FLUX's), so each case reaches its own fault.
BFL_CONFIG = TINY_DEV.replace(hidden_size=128, num_heads=1, axes_dim=(16, 56, 56))


@pytest.fixture(scope="module")
def bfl_state():
    return bfl_state_dict(Flux(BFL_CONFIG, rngs=nnx.Rngs(0)))


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reference")
    diffusers_model(TINY_DEV).save_pretrained(folder, max_shard_size="200KB")
    return folder


def _copy_folder(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _bfl_file(tmp_path, state):
    save_file(state, tmp_path / "flux.safetensors")
    return tmp_path / "flux.safetensors"


def no_such_path(tmp_path, **_):
    return tmp_path / "nope.safetensors", "nope.safetensors: no such file or folder"


def empty_file(tmp_path, **_):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    return tmp_path / "empty.safetensors", "empty.safetensors: the file is empty"


def truncated_file(tmp_path, bfl_state, **_):
    data = _bfl_file(tmp_path, bfl_state).read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.safetensors", "cut.safetensors: not a readable safetensors file"


def garbage_header(tmp_path, **_):
    (tmp_path / "junk.safetensors").write_bytes(len(b"{nonsense").to_bytes(8, "little") + b"{nonsense")
    return tmp_path / "junk.safetensors", "junk.safetensors: not a readable safetensors file"


def other_model(tmp_path, **_):
    save_file({"down_blocks.0.resnets.0.conv1.weight": np.zeros((4, 4), np.float32)}, tmp_path / "unet.safetensors")
    return tmp_path / "unet.safetensors", "unet.safetensors: not a FLUX transformer checkpoint"


def missing_key(tmp_path, bfl_state, **_):
    state = dict(bfl_state)
    del state["double_blocks.1.txt_attn.proj.bias"]
    return _bfl_file(tmp_path, state), "missing key 'double_blocks.1.txt_attn.proj.bias'"


def unexpected_key(tmp_path, bfl_state, **_):
    state = {**bfl_state, "double_blocks.0.lora_A.weight": np.zeros((2, 2), np.float32)}
    return _bfl_file(tmp_path, state), "unexpected key 'double_blocks.0.lora_A.weight'"


def wrong_shape(tmp_path, bfl_state, **_):
    state = {**bfl_state, "single_blocks.1.linear2.weight": np.zeros((128, 600), np.float32)}
    return _bfl_file(tmp_path, state), "tensor 'single_blocks.1.linear2.weight' has shape (128, 600), expected (128, 640)"


def head_dim_without_rope_axes(tmp_path, **_):
    state = bfl_state_dict(Flux(TINY_DEV, rngs=nnx.Rngs(0)))  # head dim 32: no known split
    return _bfl_file(tmp_path, state), ("head dim 32: the file stores no RoPE axes and only head dim 128 has a known "
                                        "split (16, 56, 56); pass the model's axes_dim=(a, b, c)")


def corrupt_config(tmp_path, diffusers_folder, **_):
    folder = _copy_folder(diffusers_folder, tmp_path / "model")
    (folder / "config.json").write_text('{"num_layers": 2,')
    return folder, "config.json: not a usable FluxTransformer2DModel config"


def config_of_another_model(tmp_path, diffusers_folder, **_):
    folder = _copy_folder(diffusers_folder, tmp_path / "model")
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    return folder, "describes a UNet2DConditionModel"


def config_missing_field(tmp_path, diffusers_folder, **_):
    folder = _copy_folder(diffusers_folder, tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    del data["num_single_layers"]
    (folder / "config.json").write_text(json.dumps(data))
    return folder, "config.json: missing field 'num_single_layers'"


def config_disagrees_with_tensors(tmp_path, diffusers_folder, **_):
    folder = _copy_folder(diffusers_folder, tmp_path / "model")
    data = json.loads((folder / "config.json").read_text())
    data["num_layers"] = 3
    (folder / "config.json").write_text(json.dumps(data))
    return folder, "missing key 'transformer_blocks.2."


def shard_missing(tmp_path, diffusers_folder, **_):
    folder = _copy_folder(diffusers_folder, tmp_path / "model")
    shard = sorted(folder.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    return folder, f"shard '{shard.name}' listed in the index is missing"


def empty_folder(tmp_path, **_):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty", "empty: empty folder"


def not_cached_hub_id(tmp_path, **_):
    return "black-forest-labs/FLUX.1-never-downloaded", "no snapshot of that hub id in the local Hugging Face cache"


def pickle_file(tmp_path, **_):
    (tmp_path / "model.pt").write_bytes(b"\x80\x04")
    return tmp_path / "model.pt", "model.pt: not a .safetensors file"


def corrupt_orbax_meta(tmp_path, **_):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "flux_jax.json").write_text("{")
    return tmp_path / "ckpt", "flux_jax.json: unreadable"


def orbax_params_missing(tmp_path, **_):
    (tmp_path / "ckpt").mkdir()
    meta = {"format": "flux_jax", "format_version": 1, "kind": "flux", "config": TINY_DEV.to_dict()}
    (tmp_path / "ckpt" / "flux_jax.json").write_text(json.dumps(meta))
    return tmp_path / "ckpt", "params: cannot restore parameters"


BAD_INPUTS = [
    no_such_path, empty_file, truncated_file, garbage_header, other_model, missing_key, unexpected_key,
    wrong_shape, head_dim_without_rope_axes, corrupt_config, config_of_another_model, config_missing_field, config_disagrees_with_tensors,
    shard_missing, empty_folder, not_cached_hub_id, pickle_file, corrupt_orbax_meta, orbax_params_missing,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda f: f.__name__)
def test_library_raises_one_clear_error(make, tmp_path, bfl_state, diffusers_folder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, message = make(tmp_path, bfl_state=bfl_state, diffusers_folder=diffusers_folder)
    with pytest.raises(CheckpointError) as info:
        load_flux(path)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("make", BAD_INPUTS, ids=lambda f: f.__name__)
def test_cli_exits_nonzero_names_the_fault_and_leaves_no_output(make, tmp_path, bfl_state, diffusers_folder, capsys):
    path, message = make(tmp_path, bfl_state=bfl_state, diffusers_folder=diffusers_folder)
    before = set(os.listdir(tmp_path))
    with pytest.raises(SystemExit) as info:
        main([str(path), str(tmp_path / "out"), "--no-progress"])
    assert info.value.code == 1
    last_line = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in last_line and last_line.startswith("python -m convert.torch_to_flax: error:")
    assert set(os.listdir(tmp_path)) == before  # neither OUT nor a temporary folder


def test_cli_process_prints_no_traceback(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "convert.torch_to_flax", str(tmp_path / "missing"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].endswith("missing: no such file or folder")
    assert not (tmp_path / "out").exists()


def test_cli_bad_flag_is_a_usage_error(tmp_path):
    with pytest.raises(SystemExit) as info:
        main([str(tmp_path), str(tmp_path / "out"), "--dtype", "int8"])
    assert info.value.code == 2
