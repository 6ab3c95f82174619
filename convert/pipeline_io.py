"""The components of a FLUX pipeline folder, for `flux_jax.FluxPipeline.from_pretrained`.

A diffusers pipeline folder (or hub snapshot) holds transformer/, vae/, text_encoder/ (CLIP),
text_encoder_2/ (T5), tokenizer/, tokenizer_2/ and scheduler/. Our bundle is the same layout with
transformer/ replaced by one of our checkpoints (full precision, student or packed), so one reader
serves both.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

from convert.loader import load_flux, locate
from convert.text_encoders import load_clip_text_encoder, load_t5_encoder, write_int8_text_encoder
from convert.vae import load_vae
from flux_jax.io.errors import CheckpointError
from flux_jax.pipeline_settings import PipelineSettings
from flux_jax.sampling import SchedulerConfig
from flux_jax.text import PromptEncoder
from flux_jax.text.fast_tokenizer import load_tokenizer
from flux_jax.text.int8 import int8_text_encoder

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
# FlowMatchEulerDiscreteScheduler settings our Euler sampler does not implement, with the values that
# leave them off (diffusers' defaults).
UNSUPPORTED_SCHEDULER_SETTINGS = {
    "num_train_timesteps": 1000, "invert_sigmas": False, "shift_terminal": None, "use_karras_sigmas": False,
    "use_exponential_sigmas": False, "use_beta_sigmas": False, "time_shift_type": "exponential",
    "stochastic_sampling": False,
}


def _tokenizer(folder: Path):
    """The folder's tokenizer through the `tokenizers` library (`load_tokenizer`: no transformers, so no
    PyTorch import); transformers' AutoTokenizer only for folders without tokenizer.json or CLIP's
    vocab.json and merges.txt (a sentencepiece-only T5 folder)."""
    try:
        return load_tokenizer(folder)
    except FileNotFoundError:
        pass
    except Exception as err:  # (tokenizers raises a bare Exception for a malformed tokenizer.json)
        raise CheckpointError(f"{folder}: not a usable tokenizer ({err})") from None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{folder}: not a usable tokenizer ({err})") from None


def scheduler_config(folder: Path) -> SchedulerConfig:
    """The schedule of a diffusers scheduler/ folder (its scheduler_config.json): keys it leaves out take
    diffusers' defaults (no dynamic shifting, shift 1); settings our sampler lacks are refused by name."""
    config_json = folder / "scheduler_config.json"
    try:
        raw = json.loads(config_json.read_text())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_json}: unreadable ({err})") from None
    for key, off in UNSUPPORTED_SCHEDULER_SETTINGS.items():
        if raw.get(key, off) != off:
            raise CheckpointError(f"{config_json}: {key}={raw[key]!r} is not supported (only {off!r})")
    settings = {f.name: raw[f.name] for f in dataclasses.fields(SchedulerConfig) if raw.get(f.name) is not None}
    settings.setdefault("use_dynamic_shifting", False)
    for name, value in settings.items():
        flag = name == "use_dynamic_shifting"
        if isinstance(value, bool) != flag or not isinstance(value, (int, float)):
            raise CheckpointError(f"{config_json}: {name} must be a {'boolean' if flag else 'number'}, got {value!r}")
    try:
        return SchedulerConfig(**settings)
    except ValueError as err:
        raise CheckpointError(f"{config_json}: {err}") from None


def _pipeline_root(path_or_id: str | os.PathLike, components: tuple[str, ...]) -> Path:
    root = locate(path_or_id)
    if not root.is_dir():
        raise CheckpointError(f"{root}: a pipeline is a folder with {', '.join(c + '/' for c in components)}")
    missing = [c for c in components if not (root / c).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: missing component {missing[0]}/ (needs {', '.join(components)})")
    return root


TEXT_ENCODER_DTYPES = (None, "int8")
TEXT_ENCODERS = {"text_encoder": load_clip_text_encoder, "text_encoder_2": load_t5_encoder}


def check_text_encoder_dtype(text_encoder_dtype: str | None) -> None:
    """Refuses an unknown `text_encoder_dtype` before any weight is read."""
    if text_encoder_dtype not in TEXT_ENCODER_DTYPES:
        raise ValueError(f"text_encoder_dtype must be None (as stored) or 'int8', got {text_encoder_dtype!r}")


def _text_components(root: Path, *, dtype, mesh, text_encoder_dtype: str | None = None) -> dict:
    """CLIP, T5 and their tokenizers; with text_encoder_dtype "int8" the encoders' linear weights are
    int8 (`flux_jax.text.int8`), their activations stay in `dtype`. Encoders a bundle stores as int8
    load as int8 whatever `text_encoder_dtype`."""
    clip = load_clip_text_encoder(root / "text_encoder", dtype=dtype, mesh=mesh)
    t5 = load_t5_encoder(root / "text_encoder_2", dtype=dtype, mesh=mesh)
    if text_encoder_dtype == "int8":
        clip, t5 = int8_text_encoder(clip), int8_text_encoder(t5)
    return {
        "clip": clip,
        "t5": t5,
        "clip_tokenizer": _tokenizer(root / "tokenizer"),
        "t5_tokenizer": _tokenizer(root / "tokenizer_2"),
    }


def load_pipeline_components(path_or_id: str | os.PathLike, *, dtype=None, mesh=None,
                             text_encoder_dtype: str | None = None) -> dict:
    check_text_encoder_dtype(text_encoder_dtype)
    root = _pipeline_root(path_or_id, COMPONENTS)
    scheduler = scheduler_config(root / "scheduler")  # a bad one is named before any weights are read
    transformer = load_flux(root / "transformer", dtype=dtype, mesh=mesh)
    return {
        "transformer": transformer,
        "vae": load_vae(root / "vae", dtype=dtype, mesh=mesh),
        **_text_components(root, dtype=dtype, mesh=mesh, text_encoder_dtype=text_encoder_dtype),
        "settings": PipelineSettings.for_release(scheduler, guidance_embed=transformer.config.guidance_embed),
    }


def load_prompt_encoder(path_or_id: str | os.PathLike, *, max_sequence_length: int = 512, dtype=None,
                        mesh=None, text_encoder_dtype: str | None = None) -> PromptEncoder:
    """The text half of a pipeline folder, hub id or bundle (text_encoder/, text_encoder_2/,
    tokenizer/, tokenizer_2/): what a distillation run encodes its prompts with."""
    check_text_encoder_dtype(text_encoder_dtype)
    root = _pipeline_root(path_or_id, TEXT_COMPONENTS)
    return PromptEncoder(**_text_components(root, dtype=dtype, mesh=mesh, text_encoder_dtype=text_encoder_dtype),
                         max_sequence_length=max_sequence_length)


def write_bundle(src: str | os.PathLike, directory: Path, *, dtype=None, progress: bool = False,
                 text_encoder_dtype: str | None = None) -> None:
    """A pipeline folder as our bundle in `directory`: transformer/ converted to our checkpoint, the
    other components (already readable without torch) copied as they are, except that with
    `text_encoder_dtype="int8"` the text encoders are stored int8 (`write_int8_text_encoder`)."""
    from convert.orbax_io import write_flux

    check_text_encoder_dtype(text_encoder_dtype)
    root = _pipeline_root(src, COMPONENTS)
    scheduler_config(root / "scheduler")  # refused now rather than when the bundle is loaded
    (directory / "transformer").mkdir()
    write_flux(load_flux(root / "transformer", dtype=dtype, progress=progress), directory / "transformer")
    for component in COMPONENTS[1:]:
        if text_encoder_dtype == "int8" and component in TEXT_ENCODERS:
            (directory / component).mkdir()
            encoder = TEXT_ENCODERS[component](root / component, dtype=dtype)
            write_int8_text_encoder(encoder, root / component, directory / component)
        else:
            shutil.copytree(root / component, directory / component)
    if (root / "model_index.json").is_file():
        shutil.copy(root / "model_index.json", directory / "model_index.json")
