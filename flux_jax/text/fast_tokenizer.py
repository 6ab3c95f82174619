"""Tokenizer folders read with the `tokenizers` library alone, without transformers.

transformers 5 imports PyTorch whenever it is installed, from its tokenizer and config modules alike:
loading FLUX's tokenizers through it added 0.45 GB to the pipeline's resident memory in an environment
that has torch (issue 17). `load_tokenizer` reads a Hugging Face tokenizer folder (tokenizer.json, or
CLIP's vocab.json + merges.txt built the way transformers' CLIPTokenizer builds them) into a
`FastTokenizer`, which answers the calls `flux_jax.text.prompts` makes of a transformers tokenizer;
any transformers tokenizer can still be passed to the pipeline instead.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

UNLIMITED_LENGTH = int(1e30)  # transformers' model_max_length when a folder names none
CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class FastTokenizer:
    """A `tokenizers.Tokenizer` with a folder's special tokens and model_max_length, called like a
    transformers tokenizer: `tok(text or texts, padding="max_length", max_length=n, truncation=True,
    return_tensors="np")["input_ids"]` (padding on the right, special tokens included)."""

    def __init__(self, backend: Tokenizer, *, model_max_length: int, pad_token: str | None = None,
                 eos_token: str | None = None, bos_token: str | None = None):
        self.backend = backend
        self.model_max_length = model_max_length
        self.pad_token, self.eos_token, self.bos_token = pad_token, eos_token, bos_token
        self.pad_token_id = self._id(pad_token)
        self.eos_token_id = self._id(eos_token)
        self.bos_token_id = self._id(bos_token)

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def __call__(self, text: str | Sequence[str], *, padding: bool | str = False, max_length: int | None = None,
                 truncation: bool = False, return_tensors: str | None = None) -> dict:
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        backend = self.backend  # padding and truncation are settings of the object: set for each call
        length = max_length if max_length is not None else self.model_max_length
        if truncation:
            backend.enable_truncation(length)
        else:
            backend.no_truncation()
        if padding == "max_length":
            if self.pad_token_id is None:
                raise ValueError("this tokenizer has no pad token to pad with")
            backend.enable_padding(length=length, pad_id=self.pad_token_id, pad_token=self.pad_token)
        elif padding:
            raise ValueError(f"padding={padding!r}: only 'max_length' (or none) is supported")
        else:
            backend.no_padding()
        encodings = backend.encode_batch(texts)
        ids = [encoding.ids for encoding in encodings]
        mask = [encoding.attention_mask for encoding in encodings]
        if return_tensors == "np":
            ids, mask = np.asarray(ids, np.int64), np.asarray(mask, np.int64)
        elif return_tensors is not None:
            raise ValueError(f"return_tensors={return_tensors!r}: only 'np' (or none) is supported")
        elif single:
            ids, mask = ids[0], mask[0]
        return {"input_ids": ids, "attention_mask": mask}


def _token(value) -> str | None:
    """A special token as tokenizer_config.json or special_tokens_map.json writes it: a string or
    {"content": ...}."""
    return value.get("content") if isinstance(value, dict) else value


def _clip_backend(vocab: dict[str, int], merges: list[tuple[str, str]], *, unk: str, bos: str, eos: str) -> Tokenizer:
    """CLIP's byte-level BPE as transformers' CLIPTokenizer builds it from vocab.json and merges.txt."""
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                                   end_of_word_suffix="</w>", fuse_unk=False, unk_token=unk))
    backend.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.RobertaProcessing((eos, vocab[eos]), (bos, vocab[bos]), False, False)
    return backend


def _require_specials(tokens: dict[str, str | None], token_id) -> list[str]:
    """The folder's special tokens, each checked to be in the vocabulary (`token_id` None if not)."""
    specials = [token for token in dict.fromkeys(tokens.values()) if token is not None]
    missing = [token for token in specials if token_id(token) is None]
    if missing:
        raise ValueError(f"special tokens {missing} are not in the vocabulary")
    return specials


def load_tokenizer(folder: str | Path) -> FastTokenizer:
    """A tokenizer folder: tokenizer.json where there is one, else CLIP's vocab.json and merges.txt.
    FileNotFoundError where it has neither (a sentencepiece-only folder, say); ValueError where the
    files do not make a tokenizer."""
    folder = Path(folder)
    settings = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins, as in transformers
        if (folder / name).is_file():
            settings.update(json.loads((folder / name).read_text()))
    tokens = {key: _token(settings.get(key)) for key in ("unk_token", "bos_token", "eos_token", "pad_token")}
    if (folder / "tokenizer.json").is_file():
        backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        tokens = {"unk_token": "<|endoftext|>", "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                  "pad_token": "<|endoftext|>", **{k: v for k, v in tokens.items() if v is not None}}
        vocab = json.loads((folder / "vocab.json").read_text())
        lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split()) for line in lines if line.strip() and not line.startswith("#version")]
        _require_specials(tokens, vocab.get)
        backend = _clip_backend(vocab, merges, unk=tokens["unk_token"], bos=tokens["bos_token"], eos=tokens["eos_token"])
    else:
        raise FileNotFoundError(f"{folder}: neither tokenizer.json nor vocab.json with merges.txt")
    specials = _require_specials(tokens, backend.token_to_id)
    backend.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in specials])
    limit = settings.get("model_max_length")
    return FastTokenizer(backend, model_max_length=int(limit) if isinstance(limit, (int, float)) else UNLIMITED_LENGTH,
                         pad_token=tokens["pad_token"], eos_token=tokens["eos_token"], bos_token=tokens["bos_token"])
