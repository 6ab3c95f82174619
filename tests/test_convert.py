"""Every checkpoint form `convert.load_flux` reads, and the `convert.torch_to_flax` CLI."""

import copy
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import save_file

from convert import CheckpointError, load_flux, save_flux
from convert.torch_to_flax import convert_checkpoint
from flux_jax import Flux
from flux_jax.io.errors import OutputExistsError
from tests import helpers
from tests.torch_reference import (
    TINY_DEV,
    TINY_SCHNELL,
    assert_close,
    bfl_state_dict,
    diffusers_bfl_converter,
    diffusers_model,
    random_inputs,
    run_diffusers,
    run_ours,
)

HUB_ID = "black-forest-labs/FLUX.1-tiny-test"


@pytest.fixture(scope="module")
def reference():
    return diffusers_model(TINY_DEV, seed=1)


@pytest.fixture(scope="module")
def reference_out(reference):
    inputs = random_inputs(TINY_DEV)
    return inputs, run_diffusers(reference, inputs)


def test_sharded_diffusers_folder(reference, reference_out, tmp_path):
    reference.save_pretrained(tmp_path, max_shard_size="200KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    inputs, expected = reference_out
    assert_close(run_ours(load_flux(tmp_path), inputs), expected)


def test_pipeline_root_with_transformer_subfolder(reference, reference_out, tmp_path):
    reference.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    inputs, expected = reference_out
    assert_close(run_ours(load_flux(tmp_path), inputs), expected)


@pytest.mark.parametrize("config", [TINY_DEV, TINY_SCHNELL], ids=["dev", "schnell"])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file_matches_diffusers_own_converter(config, prefix, tmp_path):
    """A BFL-keyed file: config inferred from shapes; diffusers' BFL converter is the reference."""
    source = Flux(config, rngs=nnx.Rngs(3))
    rngs = np.random.default_rng(3)
    state = {k: (rngs.standard_normal(v.shape) * 0.2 + ("norm" in k)).astype(np.float32) for k, v in bfl_state_dict(source).items()}
    save_file({prefix + k: v for k, v in state.items()}, tmp_path / "flux1-tiny.safetensors")

    converted = diffusers_bfl_converter(config.hidden_size)({k: torch.from_numpy(v) for k, v in state.items()})
    reference = diffusers_model(config)
    reference.load_state_dict(converted, strict=True)

    ours = load_flux(tmp_path / "flux1-tiny.safetensors", axes_dim=config.axes_dim)
    assert ours.config == config
    inputs = random_inputs(config, height=3, width=5)
    assert_close(run_ours(ours, inputs), run_diffusers(reference, inputs))


@pytest.mark.parametrize("how", ["axes_dim", "config"])
def test_bfl_file_loads_with_the_rope_axes_the_caller_gives(how, tmp_path):
    """A BFL file stores no RoPE axes: the given ones are used (parity with diffusers built with them),
    and another split, which no tensor shape can reveal, gives other outputs."""
    config = TINY_DEV.replace(axes_dim=(8, 12, 12))  # not the (4, 14, 14) a head-dim rule would guess
    reference = diffusers_model(config, seed=6)
    reference.save_pretrained(tmp_path / "diffusers")
    path = tmp_path / "flux1-tiny.safetensors"
    save_file(bfl_state_dict(load_flux(tmp_path / "diffusers")), path)
    given = {"axes_dim": (8, 12, 12)} if how == "axes_dim" else {"config": config.replace(remat=True)}  # remat: not the file's
    ours = load_flux(path, **given)
    assert ours.config == config
    inputs = random_inputs(config)
    expected = run_diffusers(reference, inputs)
    assert_close(run_ours(ours, inputs), expected)
    other = run_ours(load_flux(path, axes_dim=(4, 14, 14)), inputs)
    assert np.abs(other - expected).max() > 1e-2 * np.abs(expected).max()


def test_bfl_file_of_head_dim_128_keeps_flux_rope_axes(tmp_path):
    config = TINY_DEV.replace(hidden_size=128, num_heads=1, axes_dim=(16, 56, 56))
    save_file(bfl_state_dict(Flux(config, rngs=nnx.Rngs(0))), tmp_path / "flux1.safetensors")
    assert load_flux(tmp_path / "flux1.safetensors").config == config


def test_bfl_file_of_another_head_dim_without_axes_is_refused_saying_what_to_pass(tmp_path):
    save_file(bfl_state_dict(Flux(TINY_DEV, rngs=nnx.Rngs(0))), tmp_path / "flux1.safetensors")
    with pytest.raises(CheckpointError, match=r"head dim 32: the file stores no RoPE axes.*axes_dim=.*config=.*--axes-dim"):
        load_flux(tmp_path / "flux1.safetensors")


def test_a_given_config_must_agree_with_the_checkpoint(reference, tmp_path):
    save_file(bfl_state_dict(Flux(TINY_DEV, rngs=nnx.Rngs(0))), tmp_path / "flux1.safetensors")
    with pytest.raises(CheckpointError, match=r"flux1.safetensors: the given config disagrees with the checkpoint: "
                                              r"depth 3 \(the checkpoint has 2\)"):
        load_flux(tmp_path / "flux1.safetensors", config=TINY_DEV.replace(depth=3))
    reference.save_pretrained(tmp_path / "diffusers")
    save_flux(load_flux(tmp_path / "diffusers"), tmp_path / "ours")
    for stored in ("diffusers", "ours"):  # a config.json / our JSON holds the axes: the given ones must match
        with pytest.raises(CheckpointError, match=r"axes_dim \[8, 12, 12\] \(the checkpoint has \[4, 14, 14\]\)"):
            load_flux(tmp_path / stored, axes_dim=(8, 12, 12))
        assert load_flux(tmp_path / stored, config=TINY_DEV.replace(param_dtype="bfloat16")).config == TINY_DEV
    with pytest.raises(CheckpointError, match="not both"):
        load_flux(tmp_path / "ours", config=TINY_DEV, axes_dim=TINY_DEV.axes_dim)


def test_bfl_repository_root_skips_the_autoencoder(tmp_path):
    state = bfl_state_dict(Flux(TINY_DEV, rngs=nnx.Rngs(0)))
    save_file(state, tmp_path / "flux1-dev.safetensors")
    save_file({"decoder.conv_in.weight": np.zeros((2, 2), np.float32)}, tmp_path / "ae.safetensors")
    assert load_flux(tmp_path, axes_dim=TINY_DEV.axes_dim).config == TINY_DEV


def test_orbax_round_trip_keeps_every_weight(reference, tmp_path):
    reference.save_pretrained(tmp_path / "src")
    model = load_flux(tmp_path / "src")
    save_flux(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "src"]  # no temporary folder left beside it
    restored = load_flux(tmp_path / "ckpt")
    assert restored.config == model.config
    for a, b in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(restored))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    as_bf16 = load_flux(tmp_path / "ckpt", dtype="bfloat16")
    assert as_bf16.img_in.kernel[...].dtype == jax.numpy.bfloat16 and as_bf16.config.dtype == "bfloat16"
    model.config = model.config.replace(remat=True, scan_blocks=True)  # a training run's execution choices
    save_flux(model, tmp_path / "trained")
    assert load_flux(tmp_path / "trained").config == restored.config  # ... are not the model's


def test_dtype_argument_sets_parameter_and_compute_dtype(reference, tmp_path):
    copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert load_flux(tmp_path / "bf16").config.param_dtype == "bfloat16"  # bf16 checkpoints stay bf16
    model = load_flux(tmp_path / "bf16", dtype=np.float32)
    assert (model.config.param_dtype, model.config.dtype) == ("float32", "float32")
    assert model.double_blocks[0].img_attn.qkv.kernel[...].dtype == np.float32


def _hub_cache(root, reference):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<sha>/...}."""
    repo = root / ("models--" + HUB_ID.replace("/", "--"))
    sha = "0123456789abcdef0123456789abcdef01234567"
    reference.save_pretrained(repo / "snapshots" / sha / "transformer")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return root


def test_hub_id_resolves_offline_from_the_local_cache(reference, reference_out, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(_hub_cache(tmp_path / "hub", reference)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    inputs, expected = reference_out
    assert_close(run_ours(load_flux(HUB_ID), inputs), expected)
    with pytest.raises(CheckpointError, match="local Hugging Face cache"):
        load_flux("black-forest-labs/FLUX.1-not-cached")


def test_load_onto_a_mesh_shards_parameters_by_the_logical_rules(reference, reference_out, tmp_path):
    reference.save_pretrained(tmp_path)
    mesh = helpers.mesh()
    model = load_flux(tmp_path, mesh=mesh)
    qkv = model.double_blocks[0].img_attn.qkv.kernel[...]
    assert qkv.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(qkv.addressable_shards) == 8 and qkv.addressable_shards[0].data.shape == (32, 96)
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, x: m(**x))(model, reference_out[0])
    assert_close(np.asarray(out), reference_out[1])


def _run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "convert.torch_to_flax", *map(str, args)],
        capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=300,
    )


def test_cli_converts_diffusers_and_bfl_checkpoints(reference, reference_out, tmp_path):
    reference.save_pretrained(tmp_path / "diffusers")
    save_file(bfl_state_dict(load_flux(tmp_path / "diffusers")), tmp_path / "flux1-tiny.safetensors")
    inputs, expected = reference_out
    for src, flags in (("diffusers", ()), ("flux1-tiny.safetensors", ("--axes-dim", "4,14,14"))):
        done = _run_cli(tmp_path / src, tmp_path / f"out-{src}", "--no-progress", *flags)
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"out-{src}" / "flux_jax.json").is_file()
        assert_close(run_ours(load_flux(tmp_path / f"out-{src}"), inputs), expected)


def test_cli_reads_a_hub_id_with_hf_hub_offline(reference, tmp_path):
    cache = _hub_cache(tmp_path / "home" / "hub", reference)
    done = _run_cli(HUB_ID, tmp_path / "out", env={"HF_HOME": str(cache.parent), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr
    assert load_flux(tmp_path / "out").config == TINY_DEV


def test_convert_checkpoint_refuses_to_replace_output_unless_asked(reference, tmp_path):
    reference.save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_checkpoint(tmp_path / "src", tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    convert_checkpoint(tmp_path / "src", tmp_path / "out", overwrite=True, progress=False)
    assert sorted(os.listdir(tmp_path / "out")) == ["flux_jax.json", "params"]

