"""Question and context encoders (DPR by default, any transformers encoder) and the doc scores q . d.

Shapes: B questions, K docs per question, L token length, D embedding dim.

The index stores the context encoder's passage vectors; the model recomputes
``doc_scores = q . d`` in torch from those stored vectors, so the gradient of the
marginal likelihood reaches the question encoder (RAG's retriever training). The
context encoder stays frozen (the paper's default) unless end-to-end training
asks for it, in which case the vectors are recomputed from passage tokens.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn
from transformers import BatchEncoding, PreTrainedModel, PreTrainedTokenizerBase

from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.file_manifest import write_file_manifest
from rag_models.loaders import load_encoder_checkpoint
from rag_models.precision import full_precision_matmul, upcast
from rag_models.text_limits import clip_all

POOLING_KEY = "rag_pooling"  # stored in the encoder's config.json, so a saved encoder reloads as it was


def _last_hidden(outputs) -> Tensor:
    """(B, L, H) last-layer token states of any encoder output (DPR only exposes hidden_states)."""
    hidden = getattr(outputs, "last_hidden_state", None)
    return hidden if hidden is not None else outputs.hidden_states[-1]


def _pool_pooler(outputs, attention_mask: Tensor) -> Tensor:
    """The model's own pooled vector: DPR's (projected) CLS, BERT's tanh pooler."""
    return outputs.pooler_output  # (B, D)


def _pool_cls(outputs, attention_mask: Tensor) -> Tensor:
    """The first token's last-layer state."""
    return _last_hidden(outputs)[:, 0]  # (B, D)


def _pool_mean(outputs, attention_mask: Tensor) -> Tensor:
    """Mean of the last-layer states over real (non-pad) tokens (Contriever-style)."""
    hidden = upcast(_last_hidden(outputs))  # (B, L, D); a half sum over L tokens would round
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)  # (B, L, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, D)


# pooling name -> function(encoder outputs, attention_mask) -> (B, D)
POOLINGS: dict[str, Callable[..., Tensor]] = {"pooler": _pool_pooler, "cls": _pool_cls, "mean": _pool_mean}


class DenseEncoder(nn.Module):
    """A transformers encoder that maps token ids to one (B, D) vector per text.

    Args:
        model: the transformers encoder (a DPR question / context encoder, BERT, ...); D is its
            ``projection_dim`` when positive, else its ``hidden_size``. The pooling name is written into
            its config (``rag_pooling``) so that a saved encoder reloads with the same pooling.
        pooling: how token states become one vector, a key of `POOLINGS`: "pooler" (the model's own pooled
            output: DPR's CLS, BERT's tanh pooler), "cls" (first token's last-layer state) or "mean" (mean
            of the last-layer states over non-pad tokens). "auto" is resolved by `load_encoder`, not here.

    Raises InputError for an unknown pooling.
    """

    def __init__(self, model: PreTrainedModel, *, pooling: str = "pooler") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"unknown pooling {pooling!r}", setting="retriever.pooling",
                             fix=f"use one of {sorted(POOLINGS)} or 'auto'")
        self.model = model
        self.pooling = pooling
        self._pool = POOLINGS[pooling]
        # DPR models return no last_hidden_state; CLS / mean pooling then needs all hidden states.
        self._hidden_states = pooling != "pooler" and model.config.model_type == "dpr"
        setattr(model.config, POOLING_KEY, pooling)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Encode token ids (B, L) with their mask (B, L) -> vectors (B, D), float32 (or float64) under autocast.

        No token_type_ids: all-zero segments, as DPR's own training code feeds passages.
        """
        outputs = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             output_hidden_states=self._hidden_states, return_dict=True)
        # Half under autocast; q feeds q . d and the index search, which read float32.
        return upcast(self._pool(outputs, attention_mask))  # (B, D)

    @property
    def dim(self) -> int:
        """D, the size of the vectors (DPR's projection_dim when it has one)."""
        projection = getattr(self.model.config, "projection_dim", 0) or 0
        return projection if projection > 0 else self.model.config.hidden_size

    def save_pretrained(self, out_dir: str | Path, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
        """Write the encoder (pooling in its config.json) and optionally its tokenizer, atomically.

        checksums.json lists every file (rag_models/file_manifest.py): `load_encoder` refuses a damaged copy.
        """
        with atomic_directory(out_dir) as tmp:
            self.model.save_pretrained(tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            write_file_manifest(tmp)


def load_encoder(name_or_path: str | Path, *, role: str = "question",
                 pooling: str = "auto") -> tuple[DenseEncoder, PreTrainedTokenizerBase]:
    """Load a DPR (or any transformers) encoder by hub name or local path, with its tokenizer.

    ``pooling="auto"`` takes the pooling saved with the checkpoint, else "pooler"
    for DPR checkpoints and "cls" for any other encoder.
    """
    model, tokenizer = load_encoder_checkpoint(name_or_path, role)
    if pooling == "auto":
        saved = getattr(model.config, POOLING_KEY, None)
        pooling = saved or ("pooler" if model.config.model_type == "dpr" else "cls")
    return DenseEncoder(model, pooling=pooling), tokenizer


def freeze(module: nn.Module) -> nn.Module:
    """Stop gradients to every parameter of ``module`` (returns it)."""
    for param in module.parameters():
        param.requires_grad_(False)
    return module


def doc_scores(question_vectors: Tensor, doc_vectors: Tensor) -> Tensor:
    """Inner products q . d: (B, D) questions, (B, K, D) their docs -> (B, K), differentiable in both.

    Computed in float32 (float64 if either side is) even inside a half-precision autocast.
    """
    if doc_vectors.dim() != 3 or question_vectors.dim() != 2 or doc_vectors.shape[::2] != question_vectors.shape:
        raise InputError(
            f"question vectors {tuple(question_vectors.shape)} and doc vectors {tuple(doc_vectors.shape)} "
            "should be (B, D) and (B, K, D)",
            setting="retriever",
            fix="use an index built with this model's context encoder (same D)",
        )
    # float32 whatever autocast says: these scores become log p(z|x) (rag_models/precision.py)
    scores = full_precision_matmul(question_vectors.unsqueeze(1), doc_vectors.transpose(1, 2))  # (B, 1, K)
    return scores.squeeze(1)  # (B, K)


def tokenize_passages(tokenizer: PreTrainedTokenizerBase, titles: list[str], texts: list[str],
                      max_length: int) -> BatchEncoding:
    """DPR's passage input ``[CLS] title [SEP] text [SEP]``, truncated to max_length: (N, L) tensors."""
    if len(titles) != len(texts):
        raise InputError(f"{len(titles)} titles for {len(texts)} texts", setting="passages",
                         fix="give one title per passage (an empty string if none)")
    return tokenizer(clip_all(titles, max_length), clip_all(texts, max_length), max_length=max_length,
                     truncation=True, padding=True, return_tensors="pt")
