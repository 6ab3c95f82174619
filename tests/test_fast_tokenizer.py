"""Tokenizer folders read with the `tokenizers` library alone (flux_jax.text.fast_tokenizer) against
transformers' own tokenizers on the same folders: the same ids for every call the pipeline makes."""

import json

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, CLIPTokenizer

from convert.pipeline_io import _tokenizer
from flux_jax.io.errors import CheckpointError
from flux_jax.text.fast_tokenizer import CLIP_SPLIT, load_tokenizer
from flux_jax.text.tokenizers import clip_word_tokenizer, t5_word_tokenizer

WORDS = "a photo of red fox in the snow".split()
TEXTS = ["a photo of a red fox", "A  Photo, of 3 red FOXES!!  in the snow's glare", "zebra", "",
         "a photo of a red fox in the snow " * 4]
CALLS = [dict(truncation=False), dict(padding="max_length", max_length=6, truncation=True, return_tensors="np"),
         dict(padding="max_length", max_length=24, truncation=True, return_tensors="np")]


def clip_bpe_folder(folder):
    """A small CLIP-style byte-level BPE (vocab.json + merges.txt, "</w>" word ends, no tokenizer.json),
    trained offline, with the config files FLUX's tokenizer/ folder has."""
    backend = Tokenizer(models.BPE(end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|startoftext|>", "<|endoftext|>"], end_of_word_suffix="</w>",
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(["a photo of a red fox in the snow", "the fox's photos of snow", "3 red foxes"] * 20, trainer)
    folder.mkdir(exist_ok=True)
    backend.model.save(str(folder))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return folder


def assert_same_ids(ours, reference):
    assert ours.model_max_length == reference.model_max_length
    assert (ours.pad_token_id, ours.eos_token_id) == (reference.pad_token_id, reference.eos_token_id)
    for call in CALLS:
        for text in [*TEXTS, TEXTS]:
            expected, got = reference(text, **call)["input_ids"], ours(text, **call)["input_ids"]
            if call.get("return_tensors"):
                assert got.dtype == np.int64
                np.testing.assert_array_equal(got, expected)
            else:
                assert got == expected, (text, call)


@pytest.mark.parametrize("make", [clip_word_tokenizer, t5_word_tokenizer])
def test_tokenizer_json_folders_give_transformers_ids(make, tmp_path):
    make(WORDS).save_pretrained(tmp_path)
    assert_same_ids(load_tokenizer(tmp_path), AutoTokenizer.from_pretrained(tmp_path))


def test_clip_vocab_and_merges_give_transformers_clip_ids(tmp_path):
    folder = clip_bpe_folder(tmp_path)
    assert not (folder / "tokenizer.json").exists()
    ours, reference = load_tokenizer(folder), CLIPTokenizer.from_pretrained(folder)
    assert len(ours(TEXTS[1])["input_ids"]) > 8  # the merges split words into several pieces
    assert_same_ids(ours, reference)


def test_bad_tokenizer_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor vocab.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=f"{tmp_path}: not a usable tokenizer"):
        _tokenizer(tmp_path)
    clip_bpe_folder(tmp_path / "clip")
    (tmp_path / "clip" / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    with pytest.raises(CheckpointError, match=r"special tokens \['<pad>'\] are not in the vocabulary"):
        _tokenizer(tmp_path / "clip")
