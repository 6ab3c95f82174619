"""Word-level tokenizers built offline, in the Hugging Face layout, for worlds without downloads
(tests, benchmarks, the digits world): CLIP-style (<bos> words <eos>, padded with <eos>) and
T5-style (words </s>, padded with <pad>)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

CLIP_SPECIALS = ("<unk>", "<x>", "<bos>", "<eos>")  # eos id 3: not the legacy id 2 CLIP pools differently
T5_SPECIALS = ("<pad>", "</s>", "<unk>")


def _word_tokenizer(specials: tuple[str, ...], words: Iterable[str], template: str, **named) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(dict.fromkeys([*specials, *words]))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[(t, vocab[t]) for t in specials if t in template])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>", **named)


def clip_word_tokenizer(words: Iterable[str], model_max_length: int = 77) -> PreTrainedTokenizerFast:
    return _word_tokenizer(CLIP_SPECIALS, words, "<bos> $A <eos>", model_max_length=model_max_length,
                           bos_token="<bos>", eos_token="<eos>", pad_token="<eos>")


def t5_word_tokenizer(words: Iterable[str], model_max_length: int = 512) -> PreTrainedTokenizerFast:
    return _word_tokenizer(T5_SPECIALS, words, "$A </s>", model_max_length=model_max_length,
                           eos_token="</s>", pad_token="<pad>")
