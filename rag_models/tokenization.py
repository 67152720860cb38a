"""Tokenizers trained offline on a local corpus, wrapped as transformers tokenizers.

The tiny models of the tests and the demo cannot download `bert-base-uncased` or
`facebook/bart-large`; they train their own vocabularies here with `tokenizers`
(WordPiece for the DPR side, byte-level BPE for BART) and wrap them in the same
transformers classes the real checkpoints use, so `save_pretrained` /
`AutoTokenizer.from_pretrained` round trips work exactly as for a hub model.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import BartTokenizer, DPRContextEncoderTokenizerFast, DPRQuestionEncoderTokenizerFast

WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
BPE_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..3 order, then mask


def train_wordpiece_vocab(texts: Iterable[str], vocab_size: int = 1000) -> dict[str, int]:
    """Train a lower-cased BERT-style WordPiece vocabulary; returns token -> id.

    BERT's normalizer and pre-tokenizer split the words; then, as WordPiece training does,
    each word starts as characters (``##`` marks a word-internal one) and the most frequent
    adjacent pair is merged until the vocabulary is full. Written here rather than with
    ``tokenizers``' WordPieceTrainer because that one breaks ties between equally frequent
    pairs in hash-map order, which changes per process: the same corpus gave different
    vocabularies, so the same seed gave different models. Ties here go to the shorter, then
    the lexicographically larger pair: the same texts always give the same ids.
    """
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    return _merge_pieces(counts, vocab_size)


def _merge_pieces(counts: Counter[str], vocab_size: int) -> dict[str, int]:
    """WordPiece vocabulary of word ``counts``: specials, every character, then merged pieces in merge order."""
    splits = {word: [word[0]] + ["##" + ch for ch in word[1:]] for word in counts}
    alphabet = {piece for pieces in splits.values() for piece in pieces} - set(WORDPIECE_SPECIALS)
    vocab = WORDPIECE_SPECIALS + sorted(alphabet)
    known = set(vocab)
    pair_counts: Counter[tuple[str, str]] = Counter()
    words_with: defaultdict[tuple[str, str], set[str]] = defaultdict(set)  # pair -> words where it occurs

    def count_pairs(word: str, sign: int) -> None:
        pieces = splits[word]
        for pair in zip(pieces, pieces[1:]):
            pair_counts[pair] += sign * counts[word]
            if sign > 0:
                words_with[pair].add(word)
            elif pair_counts[pair] <= 0:
                del pair_counts[pair]

    for word in counts:
        count_pairs(word, +1)
    while len(vocab) < vocab_size and pair_counts:
        (left, right), _ = max(pair_counts.items(), key=lambda item: (item[1], -len(item[0][0] + item[0][1]), item[0]))
        merged = left + right.removeprefix("##")
        if merged not in known:
            known.add(merged)
            vocab.append(merged)
        for word in sorted(words_with.pop((left, right), ())):
            count_pairs(word, -1)
            splits[word] = _merge_pair(splits[word], left, right, merged)
            count_pairs(word, +1)
        pair_counts.pop((left, right), None)
    return {token: number for number, token in enumerate(vocab)}


def _merge_pair(pieces: list[str], left: str, right: str, merged: str) -> list[str]:
    """``pieces`` with every adjacent (left, right) replaced by ``merged``, left to right."""
    out: list[str] = []
    i = 0
    while i < len(pieces):
        if i + 1 < len(pieces) and pieces[i] == left and pieces[i + 1] == right:
            out.append(merged)
            i += 2
        else:
            out.append(pieces[i])
            i += 1
    return out


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
