"""Tokenizers trained offline on a local corpus, wrapped as transformers tokenizers.

The tiny models of the tests and the demo cannot download `bert-base-uncased` or
`facebook/bart-large`; they train their own vocabularies here with `tokenizers`
(WordPiece for the DPR side, byte-level BPE for BART) and wrap them in the same
transformers classes the real checkpoints use, so `save_pretrained` /
`AutoTokenizer.from_pretrained` round trips work exactly as for a hub model.
"""
from __future__ import annotations

import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    BartTokenizer,
    DPRContextEncoderTokenizerFast,
    DPRQuestionEncoderTokenizerFast,
    PreTrainedTokenizerBase,
)

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..3 order, then mask


def train_wordpiece_vocab(texts: Iterable[str], vocab_size: int = 1000) -> dict[str, int]:
    """Train a lower-cased BERT-style WordPiece vocabulary; returns token -> id."""
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=WORDPIECE_SPECIALS)
    tok.train_from_iterator(texts, trainer)
    return tok.get_vocab()


def dpr_tokenizers(
    vocab: dict[str, int],
) -> tuple[DPRQuestionEncoderTokenizerFast, DPRContextEncoderTokenizerFast]:
    """The question- and context-side DPR tokenizers over one WordPiece vocabulary."""
    return (
        DPRQuestionEncoderTokenizerFast(vocab=dict(vocab)),
        DPRContextEncoderTokenizerFast(vocab=dict(vocab)),
    )


def train_bart_tokenizer(texts: Iterable[str], vocab_size: int = 1000) -> BartTokenizer:
    """Train a byte-level BPE (GPT-2 / BART style) and wrap it as a BART tokenizer.

    Every byte is in the initial alphabet, so no input ever maps to <unk>.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=BPE_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return BartTokenizer(vocab=model["vocab"], merges=merges)


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase, texts: list[str]) -> bool:
    """True when two tokenizers give identical ids on every text (used by round-trip checks)."""
    return all(a(t)["input_ids"] == b(t)["input_ids"] for t in texts)
