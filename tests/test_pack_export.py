"""The pack, export and memory-report CLIs: round trips through diffusers, and their bad input."""

import json
import os

import numpy as np
import pytest
from diffusers import FluxTransformer2DModel
from safetensors.numpy import save_file

from convert import load_flux, save_flux
from convert.export_diffusers import main as export_main
from convert.pack_ternary import main as pack_main
from flux_jax.memory_report import main as memory_main
from flux_jax.ternary import describe, pack_model, quantize_model
from tests.torch_reference import TINY_DEV, assert_close, diffusers_model, random_inputs, run_diffusers, run_ours


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pack")
    diffusers_model(TINY_DEV, seed=5).save_pretrained(root / "teacher")
    teacher = load_flux(root / "teacher")
    save_flux(quantize_model(teacher), root / "student")
    return root


def test_pack_a_student_and_its_safetensors_and_archive_load_the_same(folders, tmp_path):
    pack_main([str(folders / "student"), str(tmp_path / "packed"), "--archive", "--safetensors", "--no-progress"])
    assert sorted(os.listdir(tmp_path / "packed")) == ["archive.safetensors", "flux_jax.json", "packed.safetensors", "params"]
    student = load_flux(folders / "student")
    inputs = random_inputs(TINY_DEV)
    expected = run_ours(pack_model(student), inputs)
    for path in ("packed", "packed/packed.safetensors", "packed/archive.safetensors"):
        model = load_flux(tmp_path / path)
        assert describe(model)[0] == "packed"
        np.testing.assert_array_equal(run_ours(model, inputs), expected)
    archive, packed = (os.path.getsize(tmp_path / "packed" / f) for f in ("archive.safetensors", "packed.safetensors"))
    assert archive < packed


def test_pack_a_full_precision_checkpoint_is_post_training_quantization(folders, tmp_path):
    pack_main([str(folders / "teacher"), str(tmp_path / "ptq"), "--no-progress"])
    ptq = load_flux(tmp_path / "ptq")
    inputs = random_inputs(TINY_DEV)
    assert_close(run_ours(ptq, inputs), run_ours(pack_model(quantize_model(load_flux(folders / "teacher"))), inputs), rel=1e-6)


def test_pack_a_bfl_file_takes_its_rope_axes_from_the_flag(folders, tmp_path, capsys):
    """PTQ of a BFL file with head dim 32, whose RoPE axes only the user knows: refused without
    --axes-dim (naming the flag), packed with exactly those axes with it."""
    from safetensors.numpy import save_file

    from tests.torch_reference import bfl_state_dict

    config = TINY_DEV.replace(axes_dim=(8, 12, 12))
    save_file(bfl_state_dict(load_flux(folders / "teacher")), tmp_path / "flux1.safetensors")
    code, line = _error_of(pack_main, [str(tmp_path / "flux1.safetensors"), str(tmp_path / "ptq"), "--no-progress"], capsys)
    assert code == 1 and "head dim 32" in line and "--axes-dim A,B,C" in line and not (tmp_path / "ptq").exists()

    pack_main([str(tmp_path / "flux1.safetensors"), str(tmp_path / "ptq"), "--axes-dim", "8,12,12", "--no-progress"])
    ptq = load_flux(tmp_path / "ptq")
    assert ptq.config == config
    teacher = load_flux(tmp_path / "flux1.safetensors", axes_dim=(8, 12, 12))  # honoured: tests/test_convert.py
    inputs = random_inputs(TINY_DEV)
    np.testing.assert_array_equal(run_ours(ptq, inputs), run_ours(pack_model(quantize_model(teacher)), inputs))


def test_axes_dim_flag_must_be_integers(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        pack_main([str(tmp_path), str(tmp_path / "out"), "--axes-dim", "16,56,x"])
    assert info.value.code == 2 and "comma-separated integers" in capsys.readouterr().err


@pytest.mark.parametrize("source", ["student", "packed"])
def test_export_to_diffusers_runs_with_the_students_outputs(folders, tmp_path, source):
    src = folders / "student"
    if source == "packed":
        pack_main([str(src), str(tmp_path / "packed"), "--no-progress"])
        src = tmp_path / "packed"
    export_main([str(src), str(tmp_path / "exported"), "--dtype", "float32", "--no-progress"])
    reference = FluxTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
    inputs = random_inputs(TINY_DEV)
    assert_close(run_diffusers(reference, inputs), run_ours(load_flux(folders / "student"), inputs))


def test_export_streams_shards_with_an_index_that_diffusers_loads(folders, tmp_path, monkeypatch):
    """A small --max-shard-gb cuts the tiny model into shards, as flux-dev's 24 GB are cut at 10 GB: each
    written as soon as it is full (before the model's last tensor is converted), none above the limit."""
    from convert import export_diffusers as module

    limit, consumed, writes = 300_000, [0], []
    leaves = module.dense_leaves

    def counting(model):
        for item in leaves(model):
            consumed[0] += 1
            yield item

    def recording(tensors, path, metadata):
        writes.append((consumed[0], sum(t.nbytes for t in tensors.values()), max(t.nbytes for t in tensors.values())))
        save_file(tensors, path, metadata=metadata)

    monkeypatch.setattr(module, "dense_leaves", counting)
    monkeypatch.setattr(module, "save_file", recording)
    export_main([str(folders / "student"), str(tmp_path / "exported"), "--dtype", "float32", "--max-shard-gb", str(limit / 1e9),
                 "--no-progress"])
    assert len(writes) >= 3
    assert writes[0][0] < consumed[0]  # the first shard was on disk before the last tensor was made
    assert all(total <= limit or total == largest for _, total, largest in writes)
    index = json.loads((tmp_path / "exported" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"diffusion_pytorch_model-{i:05d}-of-{len(writes):05d}.safetensors" for i in range(1, len(writes) + 1)]
    assert sorted(p.name for p in (tmp_path / "exported").iterdir()) == sorted([*files, "config.json",
                                                                                "diffusion_pytorch_model.safetensors.index.json"])
    reference = FluxTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in reference.parameters())
    inputs = random_inputs(TINY_DEV)
    assert_close(run_diffusers(reference, inputs), run_ours(load_flux(folders / "student"), inputs))


def test_export_default_is_bf16_weights(folders, tmp_path):
    export_main([str(folders / "student"), str(tmp_path / "exported"), "--no-progress"])
    assert load_flux(tmp_path / "exported").config.param_dtype == "bfloat16"


def _error_of(main, argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    return info.value.code, capsys.readouterr().err.strip().splitlines()[-1]


def test_packing_a_packed_model_is_refused_and_leaves_nothing(folders, tmp_path, capsys):
    pack_main([str(folders / "student"), str(tmp_path / "packed"), "--no-progress"])
    code, line = _error_of(pack_main, [str(tmp_path / "packed"), str(tmp_path / "again"), "--no-progress"], capsys)
    assert code == 1 and "already a packed model" in line
    assert sorted(os.listdir(tmp_path)) == ["packed"]


def test_pack_and_export_name_a_missing_source(tmp_path, capsys):
    for main in (pack_main, export_main):
        code, line = _error_of(main, [str(tmp_path / "nothing"), str(tmp_path / "out")], capsys)
        assert code == 1 and "nothing: no such file or folder" in line
    assert os.listdir(tmp_path) == []


def test_export_refuses_a_config_diffusers_cannot_express(tmp_path, capsys):
    from flax import nnx

    from flux_jax import Flux

    save_flux(Flux(TINY_DEV.replace(mlp_ratio=2.0), rngs=nnx.Rngs(0)), tmp_path / "odd")
    code, line = _error_of(export_main, [str(tmp_path / "odd"), str(tmp_path / "out")], capsys)
    assert code == 1 and "mlp_ratio 2.0" in line and not (tmp_path / "out").exists()


def test_memory_report_json_line_and_unknown_config(capsys):
    memory_main(["--config", "tiny", "--json", "--image-tokens", "64", "--text-tokens", "8"])
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("params_total", "params_ternary", "ternary_fraction", "bytes_bf16", "bytes_packed", "bytes_archive",
                "storage_ratio_packed", "storage_ratio_archive", "peak_bytes_bf16", "peak_bytes_packed", "memory_ratio"):
        assert key in report
    assert report["params_total"] == 484_496 and report["peak_bytes_packed"] < report["peak_bytes_bf16"]
    with pytest.raises(SystemExit) as info:
        memory_main(["--config", "flux-pro"])
    assert info.value.code == 2
