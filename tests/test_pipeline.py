"""FluxPipeline end to end against diffusers' FluxPipeline with the same tiny components and noise."""

import json
import logging
import os

import jax
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from convert import CheckpointError
from convert.torch_to_flax import convert_checkpoint
from flux_jax.pipeline import FluxPipeline
from flux_jax.sampling import SchedulerConfig, schedule
from tests.pipeline_reference import diffusers_schedule, packed_noise, tiny_pipeline

PROMPTS = ["a red fox in the snow", "a photo of a small blue cat"]
INT8_IMAGE_TOLERANCE = 0.05  # max |int8 - full| over image values in [0, 1] (0.015 measured, mean 0.0015)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    pipe = tiny_pipeline()
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return pipe, folder


def run_reference(pipe, latents, height, width, steps, guidance=3.5):
    with torch.no_grad():
        return pipe(PROMPTS, height=height, width=width, num_inference_steps=steps, guidance_scale=guidance,
                    latents=torch.from_numpy(latents), output_type="np", max_sequence_length=512).images


def test_images_match_diffusers_flux_pipeline(reference):
    pipe, folder = reference
    ours = FluxPipeline.from_pretrained(folder)
    latents = packed_noise(2, 32, 48)
    expected = run_reference(pipe, latents, 32, 48, steps=3)
    got = ours(PROMPTS, height=32, width=48, steps=3, guidance=3.5, latents=latents, output_type="np")
    assert got.shape == expected.shape == (2, 32, 48, 3)
    assert np.abs(got - expected).max() < 2e-3, np.abs(got - expected).max()
    assert expected.std() > 0.01  # not a blank image


# Our keyword -> diffusers' for the options both have under different names.
DIFFUSERS_NAMES = {"steps": "num_inference_steps", "guidance": "guidance_scale"}
OPTIONS = {
    "images per prompt, sequence length": dict(num_images_per_prompt=2, max_sequence_length=16),
    "true cfg": dict(negative_prompt="a big green dog", true_cfg_scale=2.5),
    "sigmas": dict(sigmas=[1.0, 0.8, 0.45, 0.2]),
    "latent output": dict(output_type="latent"),
}


@pytest.mark.parametrize("options", OPTIONS.values(), ids=OPTIONS.keys())
def test_diffusers_call_options_give_diffusers_outputs(reference, options):
    pipe, folder = reference
    ours = FluxPipeline.from_pretrained(folder)
    latents = packed_noise(2 * options.get("num_images_per_prompt", 1), 32, 48)
    theirs = {**options, "output_type": options.get("output_type", "np")}
    if "negative_prompt" in options:  # diffusers encodes a negative prompt as its own batch
        theirs["negative_prompt"] = [options["negative_prompt"]] * len(PROMPTS)
    if "sigmas" not in options:
        theirs["num_inference_steps"] = 3
    with torch.no_grad():
        expected = pipe(PROMPTS, height=32, width=48, guidance_scale=3.5, latents=torch.from_numpy(latents),
                        **{"max_sequence_length": 512, **theirs}).images
    got = ours(PROMPTS, height=32, width=48, guidance=3.5, latents=latents, **{"output_type": "np", "steps": 3, **options})
    expected = np.asarray(expected, np.float32)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() < 2e-3 * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()
    if "sigmas" in options or "negative_prompt" in options:  # the option changed the images
        plain = ours(PROMPTS, height=32, width=48, steps=len(options.get("sigmas", [0] * 3)), guidance=3.5, latents=latents,
                     output_type="np")
        assert np.abs(got - plain).max() > 1e-2


def test_prompt_embeddings_and_a_step_callback_that_reads_the_latents(reference):
    pipe, folder = reference
    ours = FluxPipeline.from_pretrained(folder)
    latents = packed_noise(2, 32, 48)
    with torch.no_grad():
        embeds, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=512)
    seen = {"ours": [], "diffusers": []}

    def record(side):
        def callback(pipeline, step, timestep, tensors):
            seen[side].append((step, float(timestep), np.asarray(tensors["latents"], np.float32)))
            return tensors
        return callback

    with torch.no_grad():
        expected = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=32, width=48, num_inference_steps=3,
                        guidance_scale=3.5, latents=torch.from_numpy(latents), output_type="np",
                        callback_on_step_end=record("diffusers")).images
    got = ours(prompt_embeds=embeds.numpy(), pooled_prompt_embeds=pooled.numpy(), height=32, width=48, steps=3, guidance=3.5,
               latents=latents, output_type="np", callback_on_step_end=record("ours"))
    assert np.abs(got - expected).max() < 2e-3
    assert [(s, round(t, 2)) for s, t, _ in seen["ours"]] == [(s, round(t, 2)) for s, t, _ in seen["diffusers"]]
    for (_, _, a), (_, _, b) in zip(seen["ours"], seen["diffusers"]):
        assert np.abs(a - b).max() < 2e-3 * np.abs(b).max()
    with pytest.raises(ValueError, match="give either prompt or both prompt_embeds and pooled_prompt_embeds"):
        ours(PROMPTS, prompt_embeds=embeds.numpy(), height=32, width=48)


def test_int8_text_encoders_give_nearly_the_full_precision_images(reference):
    from flax import nnx

    from flux_jax.text.int8 import Int8Linear

    folder = reference[1]
    full, int8 = FluxPipeline.from_pretrained(folder), FluxPipeline.from_pretrained(folder, text_encoder_dtype="int8")
    for encoder in (int8.text.clip, int8.text.t5):
        linears = [m for _, m in nnx.iter_graph(encoder) if isinstance(m, Int8Linear | nnx.Linear)]
        assert linears and all(isinstance(m, Int8Linear) for m in linears)
    latents = packed_noise(2, 32, 48)
    images = [p(PROMPTS, height=32, width=48, steps=3, latents=latents, output_type="np") for p in (full, int8)]
    assert 0 < np.abs(images[0] - images[1]).max() < INT8_IMAGE_TOLERANCE, np.abs(images[0] - images[1]).max()
    with pytest.raises(ValueError, match="text_encoder_dtype must be None .* or 'int8', got 'int4'"):
        FluxPipeline.from_pretrained(folder, text_encoder_dtype="int4")


def test_a_bundle_stores_the_text_encoders_int8(reference, tmp_path):
    """--text-encoder-dtype int8: the bundle's encoders hold int8 weights and their scales (a quarter of
    the float32 bytes of each linear weight), load as int8 without asking and give exactly the images of
    int8 made at load time; a foreign quantization_config is refused by name."""
    from convert.pipeline_io import load_prompt_encoder
    from convert.text_encoders import INT8_METHOD
    from convert.torch_to_flax import main as convert_main
    from safetensors import safe_open

    folder = reference[1]
    convert_main([str(folder), str(tmp_path / "bundle"), "--pipeline", "--text-encoder-dtype", "int8", "--no-progress"])
    for component, weight in (("text_encoder", "text_model.encoder.layers.0.mlp.fc1.weight"),
                              ("text_encoder_2", "encoder.block.0.layer.1.DenseReluDense.wi_0.weight")):
        config = json.loads((tmp_path / "bundle" / component / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == INT8_METHOD
        original = json.loads((folder / component / "config.json").read_text())
        assert {k: v for k, v in config.items() if k != "quantization_config"} == original
        with safe_open(str(tmp_path / "bundle" / component / "model.safetensors"), "numpy") as stored:
            key = weight.removeprefix("text_model.")
            assert stored.get_tensor(key).dtype == np.int8
            assert stored.get_tensor(key.replace(".weight", ".weight_scale")).dtype == np.float32
    stored, made = FluxPipeline.from_pretrained(tmp_path / "bundle"), FluxPipeline.from_pretrained(folder, text_encoder_dtype="int8")
    latents = packed_noise(2, 32, 48)
    np.testing.assert_array_equal(stored(PROMPTS, height=32, width=48, steps=2, latents=latents, output_type="np"),
                                  made(PROMPTS, height=32, width=48, steps=2, latents=latents, output_type="np"))
    trainer_encoder = load_prompt_encoder(folder, max_sequence_length=16, text_encoder_dtype="int8")  # the trainer's
    for got, expected in zip(trainer_encoder(PROMPTS), made.encode_prompts(PROMPTS, 16)):
        np.testing.assert_array_equal(got, expected)
    config_json = tmp_path / "bundle" / "text_encoder_2" / "config.json"
    config_json.write_text(config_json.read_text().replace(INT8_METHOD, "bitsandbytes"))
    with pytest.raises(CheckpointError, match="text_encoder_2/config.json: not a usable config .*'bitsandbytes'.* is not ours"):
        FluxPipeline.from_pretrained(tmp_path / "bundle")


def link_components(folder, target, *, but: str):
    """`folder`'s components but one, linked into `target`."""
    target.mkdir(exist_ok=True)
    for component in os.listdir(folder):
        if component != but and (folder / component).is_dir():
            os.symlink(folder / component, target / component)
    return target


def with_scheduler(folder, target, scheduler):
    """A pipeline folder `target`: `folder`'s components (linked) with another scheduler/."""
    scheduler.save_pretrained(link_components(folder, target, but="scheduler") / "scheduler")
    return target


@pytest.mark.parametrize("settings, via_bundle", [
    (dict(use_dynamic_shifting=True, base_shift=0.3, max_shift=1.0, base_image_seq_len=16, max_image_seq_len=64), True),
    (dict(use_dynamic_shifting=False, shift=2.0), False),
])
def test_scheduler_settings_of_the_folder_and_bundle_give_diffusers_images(reference, tmp_path, settings, via_bundle):
    pipe, folder = reference
    scheduler = FlowMatchEulerDiscreteScheduler(**settings)
    folder = with_scheduler(folder, tmp_path / "folder", scheduler)
    if via_bundle:
        convert_checkpoint(folder, tmp_path / "bundle", pipeline=True, progress=False)
        folder = tmp_path / "bundle"
    ours = FluxPipeline.from_pretrained(folder)
    assert ours.settings.scheduler == SchedulerConfig(**settings)
    np.testing.assert_allclose(schedule(3, 24, ours.settings.scheduler), diffusers_schedule(scheduler, 3, 24)[0], rtol=1e-6)

    original, pipe.scheduler = pipe.scheduler, scheduler
    try:
        latents = packed_noise(2, 32, 48)
        expected = run_reference(pipe, latents, 32, 48, steps=3)
    finally:
        pipe.scheduler = original
    got = ours(PROMPTS, height=32, width=48, steps=3, guidance=3.5, latents=latents, output_type="np")
    assert np.abs(got - expected).max() < 2e-3, np.abs(got - expected).max()


@pytest.mark.parametrize("change, message", [
    (dict(use_karras_sigmas=True), "use_karras_sigmas=True is not supported"),
    (dict(time_shift_type="linear"), "time_shift_type='linear' is not supported"),
    (dict(base_shift="0.3"), "base_shift must be a number, got '0.3'"),
    (dict(use_dynamic_shifting=1), "use_dynamic_shifting must be a boolean"),
    (dict(base_image_seq_len=4096), "must differ"),
])
def test_unsupported_or_bad_scheduler_settings_are_named(reference, tmp_path, change, message):
    folder = with_scheduler(reference[1], tmp_path, FlowMatchEulerDiscreteScheduler())
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(CheckpointError, match=f"scheduler_config.json: .*{message}"):
        FluxPipeline.from_pretrained(folder)


def xla_compilations(caplog, name: str) -> int:
    return sum(r.getMessage().startswith(f"Finished XLA compilation of jit({name}) ") for r in caplog.records)


def test_two_pipelines_share_one_compiled_generate(reference, caplog):
    """Same configs and shapes (those of two other tests here): the second pipeline compiles nothing."""
    first, second = FluxPipeline.from_pretrained(reference[1]), FluxPipeline.from_pretrained(reference[1])
    caplog.set_level(logging.WARNING)
    with jax.log_compiles():
        image = first("a red fox", height=16, width=16, steps=1, output_type="np")
        assert xla_compilations(caplog, "denoise_and_decode") <= 1  # none if an earlier test compiled this shape
        jax.jit(lambda x: x + 1)(np.float32(0))
        assert xla_compilations(caplog, "<lambda>") == 1  # the log names what it compiles
        caplog.clear()
        again = second("a red fox", height=16, width=16, steps=1, output_type="np")
        assert xla_compilations(caplog, "denoise_and_decode") == 0
    np.testing.assert_array_equal(image, again)


def test_bundle_and_pil_output_and_progress(reference, tmp_path):
    _, folder = reference
    convert_checkpoint(folder, tmp_path / "bundle", pipeline=True, progress=False)
    assert (tmp_path / "bundle" / "transformer" / "flux_jax.json").is_file()
    pipe = FluxPipeline.from_pretrained(tmp_path / "bundle")
    steps_seen = []
    images = pipe("a green dog", height=32, width=32, steps=2, seed=3, progress=steps_seen.append)
    assert len(images) == 1 and images[0].size == (32, 32)
    assert sorted(steps_seen) == [0, 1]
    again = pipe("a green dog", height=32, width=32, steps=2, seed=3, output_type="np")
    np.testing.assert_array_equal(np.asarray(images[0]), (again[0] * 255).round().astype(np.uint8))


def test_truncated_prompt_warns_and_names_it(reference):
    pipe = FluxPipeline.from_pretrained(reference[1])
    long = " ".join(["red"] * 40)
    with pytest.warns(UserWarning, match="CLIP: prompt 'red red"):
        pipe(long, height=16, width=16, steps=1, output_type="np")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=[]), "prompt list is empty"),
        (dict(prompt="a cat", height=20), "multiples of 8"),
        (dict(prompt="a cat", steps=-1), "at least 1"),
    ],
)
def test_bad_calls_are_refused(reference, kwargs, message):
    pipe = FluxPipeline.from_pretrained(reference[1])
    with pytest.raises(ValueError, match=message):
        pipe(kwargs.pop("prompt"), **{"height": 16, "width": 16, **kwargs})


def test_folder_missing_a_component_is_named(reference, tmp_path):
    link_components(reference[1], tmp_path, but="vae")
    with pytest.raises(CheckpointError, match="missing component vae/"):
        FluxPipeline.from_pretrained(tmp_path)


def test_generate_cli_writes_pngs_and_reports_speed(reference, tmp_path, capsys):
    from PIL import Image

    from flux_jax.generate import main

    main(["--model", str(reference[1]), "--prompt", "a red cat", "--steps", "2", "--height", "32", "--width", "16",
          "--batch", "2", "--seed", "7", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "s/step" in out
    assert sorted(os.listdir(tmp_path / "out")) == ["7-0.png", "7-1.png"]
    assert Image.open(tmp_path / "out" / "7-0.png").size == (16, 32)
    main(["--model", str(reference[1]), "--prompt", "a red cat", "--steps", "2", "--height", "32", "--width", "16", "--seed", "7",
          "--negative-prompt", "a blue dog", "--true-cfg-scale", "3", "--max-sequence-length", "16", "--text-encoder-dtype", "int8",
          "--out", str(tmp_path / "cfg")])
    expected = FluxPipeline.from_pretrained(reference[1], text_encoder_dtype="int8")("a red cat", steps=2, height=32, width=16, seed=7, negative_prompt="a blue dog",
                                                         true_cfg_scale=3.0, max_sequence_length=16)[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "cfg" / "7-0.png")), np.asarray(expected))
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "cfg" / "7-0.png")), np.asarray(Image.open(tmp_path / "out" / "7-0.png")))


@pytest.mark.parametrize("argv, message", [(["--height", "20"], "multiples of 8"), (["--steps", "-3"], "at least 1")])
def test_generate_cli_bad_input_is_one_line_and_writes_nothing(reference, tmp_path, capsys, argv, message):
    from flux_jax.generate import main

    with pytest.raises(SystemExit) as info:
        main(["--model", str(reference[1]), "--prompt", "a cat", "--out", str(tmp_path / "out"), *argv])
    assert info.value.code == 1
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()


def test_tiled_decoding_gives_the_images_of_decoding_whole(reference, tmp_path, capsys):
    """`pipe.vae.enable_tiling` (generate's --vae-tile-rows): the same images, from a program compiled
    for the tiles (the setting is part of the VAE's static structure)."""
    from PIL import Image

    from flux_jax.generate import main

    pipe = FluxPipeline.from_pretrained(reference[1])
    call = dict(height=48, width=32, steps=2, seed=7)
    whole = pipe("a red cat", **call, output_type="np")
    pipe.vae.enable_tiling(2)
    tiled = pipe("a red cat", **call, output_type="np")
    assert pipe.vae.tile_rows == 2
    np.testing.assert_allclose(tiled, whole, rtol=0, atol=1e-5)
    main(["--model", str(reference[1]), "--prompt", "a red cat", "--steps", "2", "--height", "48", "--width", "32", "--seed", "7",
          "--vae-tile-rows", "2", "--out", str(tmp_path / "tiled")])
    png = np.asarray(Image.open(tmp_path / "tiled" / "7-0.png"), np.int32)
    assert np.abs(png - (whole[0] * 255).round()).max() <= 1
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--model", str(reference[1]), "--prompt", "a cat", "--vae-tile-rows", "0", "--out", str(tmp_path / "none")])
    assert "--vae-tile-rows must be at least 1" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_pipeline_from_a_hub_id_in_the_offline_cache(reference, tmp_path, monkeypatch):
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--black-forest-labs--FLUX.1-tiny"
    sha = "89abcdef0123456789abcdef0123456789abcdef"
    shutil.copytree(reference[1], repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    pipe = FluxPipeline.from_pretrained("black-forest-labs/FLUX.1-tiny")
    assert pipe("a cat", height=16, width=16, steps=1, output_type="np").shape == (1, 16, 16, 3)


def test_packed_ternary_pipeline_matches_diffusers_running_the_exported_weights(reference, tmp_path):
    from diffusers import FluxTransformer2DModel

    from convert.export_diffusers import export_diffusers
    from convert.pack_ternary import pack_checkpoint

    pipe, folder = reference
    convert_checkpoint(folder, tmp_path / "bundle", pipeline=True, progress=False)
    pack_checkpoint(tmp_path / "bundle" / "transformer", tmp_path / "packed", progress=False)  # PTQ of the teacher
    os.rename(tmp_path / "bundle" / "transformer", tmp_path / "full")
    os.rename(tmp_path / "packed", tmp_path / "bundle" / "transformer")
    ours = FluxPipeline.from_pretrained(tmp_path / "bundle")
    assert type(ours.transformer.double_blocks[0].img_attn.qkv).__name__ == "PackedTernaryLinear"

    export_diffusers(tmp_path / "bundle" / "transformer", tmp_path / "exported", dtype="float32", progress=False)
    original = pipe.transformer
    pipe.transformer = FluxTransformer2DModel.from_pretrained(tmp_path / "exported").eval()
    try:
        latents = packed_noise(2, 32, 48, seed=1)
        expected = run_reference(pipe, latents, 32, 48, steps=3)
    finally:
        pipe.transformer = original
    got = ours(PROMPTS, height=32, width=48, steps=3, guidance=3.5, latents=latents, output_type="np")
    assert np.abs(got - expected).max() < 2e-3 and expected.std() > 0.01

    from flux_jax.generate import main

    main(["--model", str(tmp_path / "bundle"), "--prompt", "a red fox", "--steps", "2", "--height", "16", "--width", "16",
          "--out", str(tmp_path / "images")])
    assert os.listdir(tmp_path / "images") == ["0-0.png"]


def test_loading_a_pipeline_imports_neither_transformers_nor_torch(reference):
    """transformers 5 imports PyTorch where it is installed (0.45 GB of the CPU pipeline's peak): the
    folder's tokenizers and configs are read without it, in a fresh process."""
    import subprocess
    import sys

    code = ("import sys; from flux_jax.pipeline import FluxPipeline; "
            f"pipe = FluxPipeline.from_pretrained({str(reference[1])!r}, dtype='float32'); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "[]"
