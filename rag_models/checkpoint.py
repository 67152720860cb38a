"""Building a RagModel from checkpoint names (the Hydra target of configs/model/), saving and loading a trained one.

A saved RagModel is a directory:

    question_encoder/   DPR (or other) encoder + its tokenizer; pooling in config.json
    generator/          the seq2seq model + its tokenizer
    context_encoder/    only when the model has one (end-to-end training, or kept for re-indexing)
    rag_config.json     marginalization, n_docs, lengths, ... (RagModel.settings()), and "mode":
                        "rag", or "closed_book" for a generator trained to read the question alone
    checksums.json      every file above with its size and content hash (rag_models/file_manifest.py),
                        checked at load: a truncated, missing or replaced file is refused by name

It is written to a temporary directory beside the target and renamed into place,
so a run killed mid-save never leaves a directory that looks complete.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rag_models.atomic import atomic_directory
from rag_models.errors import InputError
from rag_models.file_manifest import check_directory, write_file_manifest
from rag_models.generator import DOC_SEP, TITLE_SEP, Generator
from rag_models.loaders import load_generator_checkpoint
from rag_models.rag import RagModel
from rag_models.retriever import load_encoder
from rag_models.saved_config import MODES, check_saved_config

CONFIG_NAME = "rag_config.json"
# How a checkpoint reads its inputs: `build_rag_model(init_from=...)` keeps the saved values, since
# fine-tuning with another input format or truncation would start from inputs the weights never saw.
INPUT_SETTINGS = ("input_format", "max_source_length", "max_question_length", "max_passage_length", "title_sep",
                  "doc_sep")  # how a saved model was trained to read: with retrieved passages, or without


def save_rag_model(model: RagModel, out_dir: str | Path, *, mode: str = "rag",
                   extra_files: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Write ``model`` as a RagModel directory (see the module docstring), atomically.

    ``mode`` records how it was trained, so that rag-eval evaluates it the same way by default.
    ``extra_files``: file name -> text written beside the rest (e.g. rag-import's imported_from.json).
    ``overwrite``: replace an existing ``out_dir`` (training exports); False raises InputError instead.
    """
    if mode not in MODES:
        raise InputError(f"unknown mode {mode!r}", setting="mode", fix=f"use one of {', '.join(MODES)}")
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        for name, encoder, tokenizer in (
            ("question_encoder", model.question_encoder, model.question_tokenizer),
            ("context_encoder", model.context_encoder, model.context_tokenizer),
        ):
            if encoder is not None:
                encoder.model.save_pretrained(tmp / name)
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp / name)
        model.generator.save_pretrained(str(tmp / "generator"))
        (tmp / CONFIG_NAME).write_text(json.dumps({**model.settings(), "mode": mode}, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        write_file_manifest(tmp)  # last: lists every file above
    return Path(out_dir)


def saved_settings(model_dir: str | Path) -> dict[str, Any]:
    """The settings of a `save_rag_model` directory (its rag_config.json without "mode").

    Raises InputError when the directory has no readable rag_config.json.
    """
    model_dir = Path(model_dir)
    config_path = model_dir / CONFIG_NAME
    if not config_path.is_file():
        transformers_rag = (model_dir / "config.json").is_file() and '"rag"' in (model_dir / "config.json").read_text()
        raise InputError(f"no {CONFIG_NAME} here: not a saved RagModel", path=model_dir,
                         fix=f"it is a transformers RAG checkpoint: convert it first with rag-import {model_dir} "
                         "--out NEW_DIR" if transformers_rag else "pass a directory written by save_rag_model "
                         "(rag-train's <run_dir>/model) or by rag-import")
    try:
        settings = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"unreadable JSON ({err.msg})", path=config_path, line=err.lineno,
                         fix="re-save the model") from err
    settings = dict(check_saved_config(settings, config_path, build_rag_model))
    settings.pop("mode", None)  # how it was trained (saved_mode), not a setting of the model
    return settings


def check_saved_model(model_dir: str | Path, *, verify: bool | None = None) -> None:
    """Refuse a saved RagModel directory with a missing, truncated or (with ``verify``) corrupt file, by name.

    ``verify`` None: contents hashed when ``RAG_VERIFY_FILES=1`` or on the first use of a copy (see
    rag_models/file_manifest.py); sizes are always checked. Raises InputError.
    """
    if (Path(model_dir) / CONFIG_NAME).is_file():  # else saved_settings says what the directory is not
        check_directory(model_dir, what="checkpoint", verify=verify)


def load_rag_model(model_dir: str | Path, *, verify: bool | None = None, **overrides: Any) -> RagModel:
    """Load a directory written by `save_rag_model`; ``overrides`` replace saved settings (e.g. n_docs).

    Every file is checked first (`check_saved_model`; ``verify``: hash the contents too).
    """
    model_dir = Path(model_dir)
    check_saved_model(model_dir, verify=verify)
    settings = saved_settings(model_dir)
    settings.update(overrides)
    context = model_dir / "context_encoder"
    return build_rag_model(
        question_encoder=str(model_dir / "question_encoder"),
        generator=str(model_dir / "generator"),
        context_encoder=str(context) if context.is_dir() else None,
        **settings,
    )


def saved_mode(model_dir: str | Path) -> str:
    """How the model in ``model_dir`` was trained: "rag" or "closed_book" ("rag" when not recorded).

    Raises InputError for a rag_config.json that is no object, or whose ``mode`` is another word.
    """
    path = Path(model_dir) / CONFIG_NAME
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return "rag"  # loading the model reports a missing or broken directory with its own clear error
    check_saved_config(settings, path, build_rag_model)
    return settings.get("mode", "rag")


def build_rag_model(
    *,
    question_encoder: str | None,
    generator: str | None,
    context_encoder: str | None = None,
    pooling: str = "auto",
    marginalization: str = "sequence",
    n_docs: int = 5,
    label_smoothing: float = 0.0,
    exclude_bos_score: bool = False,
    train_context_encoder: bool = False,
    max_question_length: int = 64,
    max_passage_length: int = 256,
    max_source_length: int = 300,
    max_target_length: int = 64,
    input_format: str = "question_first",
    loss_reduction: str = "mean",
    title_sep: str = TITLE_SEP,
    doc_sep: str = DOC_SEP,
    init_from: str | None = None,
) -> RagModel:
    """Build a RagModel from checkpoint names or local paths (the Hydra ``_target_`` of configs/model/).

    ``question_encoder`` / ``context_encoder``: e.g. facebook/dpr-question_encoder-single-nq-base;
    ``generator``: e.g. facebook/bart-large. The context encoder is optional unless
    ``train_context_encoder`` (it is frozen otherwise).

    ``init_from``: a saved RagModel directory (rag-train's <run_dir>/model, or `rag-import` of a
    released transformers checkpoint) to start from instead: its question encoder, generator and
    (when a context encoder is asked for and it has one) context encoder replace the checkpoint names,
    and its `INPUT_SETTINGS` (how the checkpoint reads its inputs) replace the given ones; the training
    settings (marginalization, n_docs, label smoothing, ...) stay as given. Raises InputError when it is
    not a saved RagModel.
    """
    if init_from is not None:
        check_saved_model(init_from)
        saved = saved_settings(init_from)
        source = Path(init_from)
        question_encoder, generator = str(source / "question_encoder"), str(source / "generator")
        if context_encoder is not None and (source / "context_encoder").is_dir():
            context_encoder = str(source / "context_encoder")
        reading = {name: saved[name] for name in INPUT_SETTINGS if name in saved}
        max_source_length = reading.get("max_source_length", max_source_length)
        max_question_length = reading.get("max_question_length", max_question_length)
        max_passage_length = reading.get("max_passage_length", max_passage_length)
        input_format = reading.get("input_format", input_format)
        title_sep, doc_sep = reading.get("title_sep", title_sep), reading.get("doc_sep", doc_sep)
        shown = ", ".join(f"{name}={value!r}" for name, value in reading.items())
        print(f"model: starting from {source} (weights and {shown})")
    for setting, value in (("retriever.question_encoder", question_encoder), ("model.generator", generator)):
        if value is None:
            raise InputError("is null", setting=setting, fix="give a hub name or a local checkpoint directory "
                             "(the demo fills configs/retriever/tiny.yaml)")
    q_encoder, q_tokenizer = load_encoder(question_encoder, role="question", pooling=pooling)
    c_encoder, c_tokenizer = (None, None)
    if context_encoder is not None:
        c_encoder, c_tokenizer = load_encoder(context_encoder, role="context", pooling=pooling)
    seq2seq, g_tokenizer = load_generator_checkpoint(generator)
    wrapped = Generator(seq2seq, g_tokenizer, max_source_length=max_source_length, max_target_length=max_target_length,
                        input_format=input_format, title_sep=title_sep, doc_sep=doc_sep)
    return RagModel(
        question_encoder=q_encoder,
        question_tokenizer=q_tokenizer,
        generator=wrapped,
        context_encoder=c_encoder,
        context_tokenizer=c_tokenizer,
        marginalization=marginalization,
        n_docs=n_docs,
        label_smoothing=label_smoothing,
        exclude_bos_score=exclude_bos_score,
        train_context_encoder=train_context_encoder,
        max_question_length=max_question_length,
        max_passage_length=max_passage_length,
        loss_reduction=loss_reduction,
    )
