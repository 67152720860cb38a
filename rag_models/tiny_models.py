"""Tiny random-init DPR encoders and BART, built offline and saved as ordinary checkpoints.

The demo and the tests train tokenizers on a local corpus (`rag_models/tokenization.py`),
build the models from configs, and save them with `save_pretrained`; everything
downstream then loads them through `rag_models/loaders.py`, the road the real
checkpoints take.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import BartConfig, BartForConditionalGeneration, DPRConfig, PreTrainedModel, PreTrainedTokenizerBase

from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.loaders import DPR_CLASSES
from rag_models.tokenization import dpr_tokenizers, train_bart_tokenizer, train_wordpiece_vocab


@dataclass(frozen=True)
class TinyDprSize:
    """Sizes of the tiny BERT inside each DPR encoder (defaults: the demo's).

    Fields:
        hidden_size: D, the width of every layer and of the output vectors (no projection).
        num_layers: transformer layers.
        num_heads: attention heads per layer (must divide ``hidden_size``).
        intermediate_size: width of each layer's feed-forward block.
        max_positions: the most tokens an encoder input may have (its position embeddings).
        vocab_size: the WordPiece vocabulary size to train for; the model takes the trained tokenizer's
            actual size, which may differ (a tiny corpus runs out of merges).
        projection_dim: DPR's projection of the pooled vector; D when positive (0: none, D = hidden_size).
            A narrow encoder with ``projection_dim=768`` gives vectors of the real size at a tiny cost.
    """

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 128
    max_positions: int = 256
    vocab_size: int = 1000
    projection_dim: int = 0


@dataclass(frozen=True)
class TinyBartSize:
    """Sizes of the tiny BART generator (defaults: the demo's).

    init_std 0.06 rather than BART's 0.02: measured on the demo world, a tiny BART
    with 0.02 collapses to one constant answer; with 0.06 it learns to copy.
    dropout is BART's 0.1 here; the demo turns it off (training/demo/stages.py says why).

    Fields:
        d_model: the model width (embeddings and every layer).
        layers: encoder layers, and as many decoder layers.
        heads: attention heads per layer, encoder and decoder (must divide ``d_model``).
        ffn_dim: width of each layer's feed-forward block.
        max_positions: the most tokens of a source or target (position embeddings); the generator's
            ``max_source_length`` may not exceed it (checked), nor should its ``max_target_length``.
        vocab_size: the byte-level BPE vocabulary size to train for; V, the model's vocabulary, is the
            trained tokenizer's actual size, which may differ.
        init_std: standard deviation of the random weight initialization.
        dropout: dropout probability of BART's layers.
    """

    d_model: int = 128
    layers: int = 2
    heads: int = 4
    ffn_dim: int = 256
    max_positions: int = 256
    vocab_size: int = 1000
    init_std: float = 0.06
    dropout: float = 0.1


@dataclass(frozen=True)
class CheckpointPaths:
    """Where `save_tiny_checkpoints` wrote each model (with its tokenizer).

    Fields:
        question_encoder: ``out_dir/question_encoder``, the DPR question encoder checkpoint directory.
        context_encoder: ``out_dir/context_encoder``, the DPR context encoder checkpoint directory.
        generator: ``out_dir/generator``, the BART generator checkpoint directory.
    """

    question_encoder: Path
    context_encoder: Path
    generator: Path


def tiny_dpr_encoder(role: str, vocab_size: int, size: TinyDprSize, seed: int) -> PreTrainedModel:
    """A random-init DPR question or context encoder (`role` = "question" | "context")."""
    config = DPRConfig(
        vocab_size=vocab_size,
        hidden_size=size.hidden_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        intermediate_size=size.intermediate_size,
        max_position_embeddings=size.max_positions,
        projection_dim=size.projection_dim,
    )
    torch.manual_seed(seed)
    return DPR_CLASSES[role](config).eval()


def tiny_bart(tokenizer: PreTrainedTokenizerBase, size: TinyBartSize, seed: int) -> BartForConditionalGeneration:
    """A random-init BART whose special-token ids follow `tokenizer`."""
    config = BartConfig(
        vocab_size=len(tokenizer),
        d_model=size.d_model,
        encoder_layers=size.layers,
        decoder_layers=size.layers,
        encoder_attention_heads=size.heads,
        decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn_dim,
        decoder_ffn_dim=size.ffn_dim,
        max_position_embeddings=size.max_positions,
        init_std=size.init_std,
        dropout=size.dropout,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.eos_token_id,  # as facebook/bart-large
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return BartForConditionalGeneration(config).eval()


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out: Path) -> Path:
    """save_pretrained into a temp dir beside `out`, then rename: never a half checkpoint."""
    with atomic_directory(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def save_tiny_checkpoints(
    out_dir: str | Path,
    texts: Iterable[str],
    *,
    dpr_size: TinyDprSize = TinyDprSize(),
    bart_size: TinyBartSize = TinyBartSize(),
    seed: int = 0,
) -> CheckpointPaths:
    """Train tokenizers on `texts`, build tiny DPR encoders and BART, save all three.

    Writes `out_dir/question_encoder`, `out_dir/context_encoder`, `out_dir/generator`,
    each a normal checkpoint directory that `rag_models.loaders` reads.
    """
    texts = list(texts)
    if not texts:
        raise InputError("no text to train the tokenizers on", setting="texts",
                         fix="pass the corpus passages and questions")
    out_dir = Path(out_dir)
    q_tok, c_tok = dpr_tokenizers(train_wordpiece_vocab(texts, dpr_size.vocab_size))
    bart_tok = train_bart_tokenizer(texts, bart_size.vocab_size)
    paths = CheckpointPaths(
        question_encoder=out_dir / "question_encoder",
        context_encoder=out_dir / "context_encoder",
        generator=out_dir / "generator",
    )
    _save_atomically(tiny_dpr_encoder("question", len(q_tok), dpr_size, seed), q_tok, paths.question_encoder)
    _save_atomically(tiny_dpr_encoder("context", len(c_tok), dpr_size, seed + 1), c_tok, paths.context_encoder)
    _save_atomically(tiny_bart(bart_tok, bart_size, seed + 2), bart_tok, paths.generator)
    return paths


