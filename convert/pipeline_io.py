"""The components of a FLUX pipeline folder, for `flux_jax.FluxPipeline.from_pretrained`.

A diffusers pipeline folder (or hub snapshot) holds transformer/, vae/, text_encoder/ (CLIP),
text_encoder_2/ (T5), tokenizer/, tokenizer_2/ and scheduler/. Our bundle is the same layout with
transformer/ replaced by one of our checkpoints (full precision, student or packed), so one reader
serves both.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from convert.errors import CheckpointError
from convert.loader import load_flux, locate
from convert.text_encoders import load_clip_text_encoder, load_t5_encoder
from convert.vae import load_vae
from flux_jax.pipeline import PipelineSettings
from flux_jax.text import PromptEncoder

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"{folder}: not a usable tokenizer ({err})") from None


def _settings(root: Path, guidance_embed: bool) -> PipelineSettings:
    config_json = root / "scheduler" / "scheduler_config.json"
    try:
        scheduler = json.loads(config_json.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{config_json}: unreadable ({err})") from None
    dynamic = bool(scheduler.get("use_dynamic_shifting", False))
    if not dynamic and scheduler.get("shift", 1.0) != 1.0:
        raise CheckpointError(f"{config_json}: a static shift of {scheduler['shift']} is not a FLUX schedule")
    if guidance_embed:  # dev
        return PipelineSettings(dynamic_shift=dynamic, max_sequence_length=512, default_steps=28, default_guidance=3.5)
    return PipelineSettings(dynamic_shift=dynamic, max_sequence_length=256, default_steps=4, default_guidance=0.0)


def _pipeline_root(path_or_id: str | os.PathLike, components: tuple[str, ...]) -> Path:
    root = locate(path_or_id)
    if not root.is_dir():
        raise CheckpointError(f"{root}: a pipeline is a folder with {', '.join(c + '/' for c in components)}")
    missing = [c for c in components if not (root / c).is_dir()]
    if missing:
        raise CheckpointError(f"{root}: missing component {missing[0]}/ (needs {', '.join(components)})")
    return root


def _text_components(root: Path, *, dtype, mesh) -> dict:
    return {
        "clip": load_clip_text_encoder(root / "text_encoder", dtype=dtype, mesh=mesh),
        "t5": load_t5_encoder(root / "text_encoder_2", dtype=dtype, mesh=mesh),
        "clip_tokenizer": _tokenizer(root / "tokenizer"),
        "t5_tokenizer": _tokenizer(root / "tokenizer_2"),
    }


def load_pipeline_components(path_or_id: str | os.PathLike, *, dtype=None, mesh=None) -> dict:
    root = _pipeline_root(path_or_id, COMPONENTS)
    transformer = load_flux(root / "transformer", dtype=dtype, mesh=mesh)
    return {
        "transformer": transformer,
        "vae": load_vae(root / "vae", dtype=dtype, mesh=mesh),
        **_text_components(root, dtype=dtype, mesh=mesh),
        "settings": _settings(root, transformer.config.guidance_embed),
    }


def load_prompt_encoder(path_or_id: str | os.PathLike, *, max_sequence_length: int = 512, dtype=None,
                        mesh=None) -> PromptEncoder:
    """The text half of a pipeline folder, hub id or bundle (text_encoder/, text_encoder_2/,
    tokenizer/, tokenizer_2/): what a distillation run encodes its prompts with."""
    root = _pipeline_root(path_or_id, TEXT_COMPONENTS)
    return PromptEncoder(**_text_components(root, dtype=dtype, mesh=mesh), max_sequence_length=max_sequence_length)


def write_bundle(src: str | os.PathLike, directory: Path, *, dtype=None, progress: bool = False) -> None:
    """A pipeline folder as our bundle in `directory`: transformer/ converted to our checkpoint, the
    other components (already readable without torch) copied as they are."""
    from convert.orbax_io import write_flux

    root = _pipeline_root(src, COMPONENTS)
    (directory / "transformer").mkdir()
    write_flux(load_flux(root / "transformer", dtype=dtype, progress=progress), directory / "transformer")
    for component in COMPONENTS[1:]:
        shutil.copytree(root / component, directory / component)
    if (root / "model_index.json").is_file():
        shutil.copy(root / "model_index.json", directory / "model_index.json")
