"""Load real checkpoints (hub names or local directories): DPR or any encoder, and any seq2seq generator.

The tiny offline models (`rag_models/tiny_models.py`) are saved as ordinary
checkpoints and loaded back through these same functions, so the demo and the
tests exercise the loading path of `facebook/bart-large` and
`facebook/dpr-question_encoder-single-nq-base`, only with small weights.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    DPRContextEncoder,
    DPRQuestionEncoder,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from rag_models.errors import InputError
from rag_models.file_manifest import MANIFEST_NAME, check_directory

# The files of a checkpoint that hold its weights / its tokenizer (named when they cannot be read).
PART_FILES = {
    "weights": ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    "tokenizer": ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "vocab.txt",
                  "special_tokens_map.json"),
}
# Which DPR class serves which side; a non-DPR encoder loads with AutoModel.
DPR_CLASSES: dict[str, type[PreTrainedModel]] = {
    "question": DPRQuestionEncoder,
    "context": DPRContextEncoder,
}


def load_encoder_checkpoint(name_or_path: str | Path, role: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a question or context encoder and its tokenizer by hub name or local path, in eval mode.

    A DPR checkpoint loads with its DPR class; any other encoder (BERT, RoBERTa,
    Contriever, ...) with AutoModel (pooling is then chosen by the retriever wrapper).
    Raises InputError for an unknown ``role`` or a checkpoint that cannot be found.
    """
    if role not in DPR_CLASSES:
        raise InputError(f"unknown encoder role {role!r}", setting="role", fix="use 'question' or 'context'")
    check_local_checkpoint(name_or_path)
    config = _load_config(name_or_path)
    model_class = DPR_CLASSES[role] if config.model_type == "dpr" else AutoModel
    with _unreadable_files(name_or_path, "weights"):
        model = model_class.from_pretrained(str(name_or_path))
    return model.eval(), load_tokenizer(name_or_path)


def load_generator_checkpoint(name_or_path: str | Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any transformers seq2seq model (BART by default) and its tokenizer, in eval mode.

    Raises InputError when the checkpoint cannot be found.
    """
    check_local_checkpoint(name_or_path)
    _load_config(name_or_path)
    with _unreadable_files(name_or_path, "weights"):
        model = AutoModelForSeq2SeqLM.from_pretrained(str(name_or_path))
    return model.eval(), load_tokenizer(name_or_path)


def load_tokenizer(name_or_path: str | Path, **kwargs: object) -> PreTrainedTokenizerBase:
    """AutoTokenizer of a checkpoint, refused when it holds only special tokens.

    transformers builds such a tokenizer without a word when the vocabulary files are missing (a
    checkpoint copied without them): every question would become [CLS] [UNK] ... [SEP] and every
    answer silently wrong. Raises InputError then, naming the directory.
    """
    with _unreadable_files(name_or_path, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    check_tokenizer(tokenizer, name_or_path)
    return tokenizer


def check_local_checkpoint(name_or_path: str | Path) -> None:
    """Check a local checkpoint directory against its file manifest, or its parent's (a saved RagModel's part).

    Sizes always, contents as rag_models/file_manifest.py decides; hub names and unlisted directories pass.
    Raises InputError naming a missing, truncated or corrupt file.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return
    if (path / MANIFEST_NAME).is_file():
        check_directory(path, what="checkpoint")
    elif (path.parent / MANIFEST_NAME).is_file():
        check_directory(path.parent, what="checkpoint", under=path.name)


@contextlib.contextmanager
def _unreadable_files(name_or_path: str | Path, part: str) -> Iterator[None]:
    """Turn a library's error about damaged files (safetensors, JSON, tokenizers) into an InputError naming them.

    ``part``: "weights" or "tokenizer", whose files (`PART_FILES`) present in a local directory are named.
    """
    try:
        yield
    except InputError:
        raise
    except Exception as err:  # SafetensorError, OSError, JSON's ValueError; tokenizers raises a bare Exception
        first = (str(err).splitlines() or [type(err).__name__])[0][:300]
        present = [name for name in PART_FILES[part] if (Path(name_or_path) / name).is_file()]
        files = f" ({', '.join(present)})" if present else ""
        raise InputError(f"cannot read the {part}{files}: {type(err).__name__}: {first}; truncated or not the "
                         "files save_pretrained wrote", path=name_or_path,
                         fix="Re-copy the checkpoint from where it came from, or re-save it") from err


def check_tokenizer(tokenizer: PreTrainedTokenizerBase, where: str | Path) -> None:
    """InputError when ``tokenizer`` has no vocabulary beyond its special tokens (its files are missing)."""
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise InputError(f"the tokenizer has no vocabulary, only {len(tokenizer)} special tokens: its files "
                         "(vocab.txt, vocab.json + merges.txt, tokenizer.json, ...) are missing", path=where,
                         fix="copy the checkpoint with its tokenizer files (save_pretrained writes them)")


def _load_config(name_or_path: str | Path) -> AutoConfig:
    """The checkpoint's config, or an error that says offline / missing plainly."""
    try:
        return AutoConfig.from_pretrained(str(name_or_path))
    except ValueError as err:  # a directory whose config.json names no model type
        raise InputError(f"cannot load model {str(name_or_path)!r}: {str(err).splitlines()[0]}",
                         setting="model name or path", fix="pass a checkpoint directory written by "
                         "save_pretrained (config.json with a model_type) or a hub name") from err
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = "it is neither a local checkpoint directory nor reachable on the hub" + (
            " (HF_HUB_OFFLINE=1 is set: unset it on a machine with network access, or pass a local path)"
            if offline else ""
        )
        raise InputError(f"cannot load model {str(name_or_path)!r}: {hint}", setting="model name or path",
                         fix=str(err).splitlines()[0]) from err
