"""transformers' RAG checkpoints in and out: `import_transformers_rag` and `export_transformers_rag`.

A transformers RAG directory (``RagSequenceForGeneration`` / ``RagTokenForGeneration`` /
``RagModel.save_pretrained`` plus ``RagTokenizer.save_pretrained``, or a hub name such as
``facebook/rag-sequence-nq``) holds config.json (a ``RagConfig`` with the question encoder's and the
generator's configs inside), the weights of both, and ``question_encoder_tokenizer/`` +
``generator_tokenizer/``. Our RagModel directory (rag_models/checkpoint.py) holds the same weights as
two ordinary checkpoints plus rag_config.json.

Import maps every ``RagConfig`` key that changes what the model computes to our settings, with the
input format of transformers' ``RagRetriever`` (``title / text // question``, the question decoded
back from the question tokenizer, truncated as one string to ``max_combined_length``), and keeps the
generation settings transformers would decode with in ``generator/generation_config.json``. A key
that would change outputs but has no equivalent here is refused by name (`UnsupportedSetting`),
never dropped. What describes the index the checkpoint was published with (``dataset``,
``index_name``, ...) is kept in ``imported_from.json`` for the user to build that index.

Export writes a directory that ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` and
``RagTokenizer.from_pretrained`` load; import -> export -> import is the identity on weights and settings.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from transformers import (
    GenerationConfig,
    PreTrainedModel,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

from rag_models.atomic import atomic_directory
from rag_models.checkpoint import load_rag_model, save_rag_model
from rag_models.errors import InputError
from rag_models.generator import Generator
from rag_models.loaders import _load_config, check_tokenizer
from rag_models.rag import RagModel
from rag_models.retriever import DenseEncoder

# transformers architecture -> our marginalization; a bare RagModel needs `marginalization` given.
ARCHITECTURES: dict[str, str] = {"RagSequenceForGeneration": "sequence", "RagTokenForGeneration": "token"}
HF_CLASSES: dict[str, type[PreTrainedModel]] = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}
PROVENANCE_NAME = "imported_from.json"
# Beside a RAG-Sequence export: its generator's generation config, which transformers would lose (see
# `_own_export_generation`); rag-import reads it back, so import -> export -> import keeps it.
GENERATOR_GENERATION_NAME = "generator_generation_config.json"
# A knowledge base in transformers' custom-index format (index/dataset_export.py writes one):
KNOWLEDGE_DATASET = "dataset"  # Dataset.save_to_disk of id, title, text, embeddings (RagConfig.passages_path)
KNOWLEDGE_FAISS = "index.faiss"  # an inner-product faiss index over its rows (RagConfig.index_path)

# RagConfig keys that describe the index a checkpoint was published with, not the model.
INDEX_KEYS = ("dataset", "dataset_split", "index_name", "index_path", "passages_path", "use_dummy_dataset",
              "dataset_revision", "retrieval_batch_size", "retrieval_vector_size")
# RagConfig keys that change nothing the model computes (what forward returns, caching, bookkeeping).
NO_EFFECT_KEYS = ("architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "question_encoder",
                  "generator", "is_encoder_decoder", "vocab_size", "use_cache", "output_retrieved", "do_marginalize",
                  "_name_or_path", "_commit_hash", "return_dict", "output_hidden_states", "output_attentions",
                  "tie_word_embeddings", "chunk_size_feed_forward", "id2label", "label2id", "problem_type",
                  # generic keys older transformers wrote into every config.json (the released checkpoints')
                  "use_bfloat16", "torchscript", "xla_device", "pruned_heads", "tie_encoder_decoder", "is_decoder",
                  "cross_attention_hidden_size", "add_cross_attention", "finetuning_task", "tokenizer_class",
                  "task_specific_params", "sep_token_id", "output_scores", "return_dict_in_generate")
# RagConfig keys mapped onto our settings (see `_model_settings`), or checked against the generator's.
MAPPED_KEYS = ("n_docs", "max_combined_length", "title_sep", "doc_sep", "exclude_bos_score", "label_smoothing",
               "reduce_loss", "prefix", "do_deduplication")
TOKEN_KEYS = ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id")
# Generation settings our decoders apply (decoding/beam.py reads the special ids and the constraints from the
# generator's generation config; beams and lengths come from the decoding settings).
SUPPORTED_GENERATION = ("num_beams", "max_length", "min_length", "length_penalty", "early_stopping",
                        "num_return_sequences", "no_repeat_ngram_size", "forced_bos_token_id", "forced_eos_token_id",
                        "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id", "use_cache",
                        "output_attentions", "output_hidden_states", "output_scores", "output_logits",
                        "return_dict_in_generate", "_from_model_config", "transformers_version")
# Values of unsupported generation settings that leave decoding unchanged (transformers' defaults are None).
NEUTRAL_GENERATION: dict[str, object] = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
                                         "diversity_penalty": 0.0, "num_beam_groups": 1,
                                         "encoder_no_repeat_ngram_size": 0}
# What transformers would decode with, reported by rag-import (the special ids are kept but not shown).
DECODING_KEYS = ("num_beams", "max_length", "min_length", "length_penalty", "early_stopping", "no_repeat_ngram_size",
                 "forced_bos_token_id", "forced_eos_token_id")
# Only read when sampling; a checkpoint that does not sample may carry them harmlessly.
SAMPLING_ONLY = ("temperature", "top_k", "top_p", "typical_p", "min_p", "epsilon_cutoff", "eta_cutoff")


def _read_rag_config(source: str) -> tuple[RagConfig, str]:
    """The RagConfig of ``source`` (hub name or directory) and its architecture name."""
    config = _load_config(source)
    if config.model_type != "rag":
        raise InputError(f"{source!r} is a {config.model_type!r} checkpoint, not a transformers RAG one",
                         setting="rag-import SRC",
                         fix="pass a directory written by RagSequenceForGeneration / RagTokenForGeneration / "
                         "RagModel.save_pretrained, or a hub name such as facebook/rag-sequence-nq")
    architectures = getattr(config, "architectures", None) or ["RagModel"]
    return config, architectures[0]


def _marginalization(architecture: str, marginalization: str | None, source: str) -> str:
    """Our marginalization from the architecture; a bare RagModel (or an explicit choice) needs ``marginalization``."""
    implied = ARCHITECTURES.get(architecture)
    if marginalization is not None:
        if marginalization not in HF_CLASSES:
            raise InputError(f"unknown marginalization {marginalization!r}", setting="--marginalization",
                             fix="use sequence or token")
        if implied is not None and implied != marginalization:
            raise InputError(f"{source} is a {architecture}, which marginalizes per {implied}",
                             setting="--marginalization", fix=f"drop --marginalization or pass {implied}")
        return marginalization
    if implied is None:
        raise InputError(f"{source} is a {architecture}: it does not say how to marginalize",
                         setting="--marginalization",
                         fix="pass --marginalization sequence (RAG-Sequence) or token (RAG-Token)")
    return implied


def _check_keys(config: RagConfig, source: str) -> None:
    """Refuse any non-default RagConfig key we neither map, check, nor know to be harmless."""
    known = set(INDEX_KEYS + NO_EFFECT_KEYS + MAPPED_KEYS + TOKEN_KEYS) | set(GenerationConfig().to_dict())
    unknown = sorted(key for key in config.to_diff_dict() if key not in known)
    if unknown:
        raise InputError(f"RagConfig setting(s) {', '.join(unknown)} of {source} have no equivalent here",
                         setting=", ".join(unknown),
                         fix="remove them from its config.json if they do not change the outputs, or open an issue")


def _model_settings(config: RagConfig, marginalization: str, question_positions: int, source: str) -> dict[str, Any]:
    """Our rag_config.json settings for ``config``; InputError naming any setting we cannot honour."""
    generator_config = config.generator
    for key in TOKEN_KEYS:
        value, own = getattr(config, key, None), getattr(generator_config, key, None)
        if value is not None and value != own:
            raise InputError(f"RagConfig.{key}={value} but the generator's is {own}", setting=key,
                             fix="make them equal in config.json (transformers reads one or the other in places)")
    prefix, own_prefix = getattr(config, "prefix", None), getattr(generator_config, "prefix", None)
    if prefix and prefix != own_prefix:
        raise InputError(f"RagConfig.prefix={prefix!r} differs from the generator's prefix {own_prefix!r}; "
                         "transformers' RAG prefixes inputs with the generator's", setting="prefix",
                         fix="set the prefix in the generator's config (config.json, generator.prefix)")
    positions = getattr(generator_config, "max_position_embeddings", None)
    if positions is not None and config.max_combined_length > positions:
        raise InputError(f"max_combined_length={config.max_combined_length} exceeds the generator's {positions} "
                         "positions (transformers pads every input to it, so it cannot run either)",
                         setting="max_combined_length", fix=f"set it to at most {positions} in config.json")
    if not config.do_deduplication:
        raise InputError("do_deduplication=false: our RAG-Sequence decoders always merge identical hypotheses",
                         setting="do_deduplication", fix="set it to true in config.json (false is for DDP training)")
    return {
        "marginalization": marginalization,
        "n_docs": config.n_docs,
        "label_smoothing": float(config.label_smoothing),
        # transformers' RagTokenForGeneration ignores exclude_bos_score: the imported model computes what it does.
        "exclude_bos_score": bool(config.exclude_bos_score) and marginalization == "sequence",
        "train_context_encoder": False,
        "max_question_length": question_positions,  # transformers does not truncate questions itself
        "max_passage_length": 256,  # only used to re-encode passages (no context encoder is imported)
        "loss_reduction": "sum" if config.reduce_loss else "mean",
        "max_source_length": config.max_combined_length,
        "max_target_length": 64,  # only truncates training targets; transformers takes labels as given
        "input_format": "transformers",
        "title_sep": config.title_sep,
        "doc_sep": config.doc_sep,
    }


def _own_export_generation(source: str, marginalization: str) -> GenerationConfig | None:
    """The generator's generation config that `export_transformers_rag` keeps beside a RAG-Sequence export.

    transformers' RagSequenceForGeneration neither saves nor reads one (its generator's generation settings
    are lost in a save / load); transformers' own checkpoints have no such file, so only our exports do.
    """
    path = Path(source) / GENERATOR_GENERATION_NAME
    if marginalization != "sequence" or not path.is_file():
        return None
    return GenerationConfig.from_pretrained(str(Path(source)), config_file_name=GENERATOR_GENERATION_NAME)


def _generation_config(model: PreTrainedModel, marginalization: str, source: str,
                       kept: GenerationConfig | None = None) -> GenerationConfig:
    """What transformers decodes with: RagToken its own generation config, RagSequence its generator's.

    ``kept``: the generator's generation config a RAG-Sequence export of ours kept beside it (used instead).
    Raises InputError naming the settings our decoders do not implement (sampling, repetition penalty, ...).
    """
    owner = model if marginalization == "token" else model.generator
    config = copy.deepcopy(kept if kept is not None else owner.generation_config)
    sampling = bool(getattr(config, "do_sample", False))
    unsupported = sorted(
        key for key, value in config.to_diff_dict().items()
        if key not in SUPPORTED_GENERATION and not (key in SAMPLING_ONLY and not sampling) and key != "do_sample"
        and value not in (None, False, NEUTRAL_GENERATION.get(key))
    )
    if sampling:
        unsupported.insert(0, "do_sample")
    if unsupported:
        values = ", ".join(f"{key}={getattr(config, key, None)!r}" for key in unsupported)
        raise InputError(f"generation setting(s) {values} of {source} are not implemented by our decoders",
                         setting=", ".join(unsupported),
                         fix="remove them from the checkpoint's generation config (or config.json) to import it")
    return config


def import_transformers_rag(source: str | Path, out: str | Path, *, marginalization: str | None = None) -> Path:
    """Convert a transformers RAG checkpoint into our RagModel directory at ``out`` (atomic); returns ``out``.

    ``source``: a hub name (e.g. facebook/rag-token-nq) or a local directory with config.json, the weights and
    RagTokenizer's ``question_encoder_tokenizer/`` + ``generator_tokenizer/``. ``marginalization`` is only needed
    for a bare ``RagModel`` checkpoint. The imported model reads inputs as transformers' RagRetriever formats them
    (input_format "transformers") and keeps what transformers would decode with in generator/generation_config.json.

    Raises InputError for a non-RAG checkpoint, a non-DPR question encoder, and any setting that would change the
    outputs but has no equivalent here (named in the message).
    """
    source = str(source)
    config, architecture = _read_rag_config(source)
    marginalization = _marginalization(architecture, marginalization, source)
    _check_keys(config, source)
    if config.question_encoder.model_type != "dpr":
        raise InputError(f"the question encoder is a {config.question_encoder.model_type!r} model; transformers' RAG "
                         "scores docs with output [0] of the question encoder, a (B, D) vector only for DPR",
                         setting="question_encoder", fix="import a RAG checkpoint with a DPR question encoder")
    if Path(out).exists():  # before the slow loads; never replace a directory (it may be the source itself)
        raise InputError("already exists", path=out, fix="choose a new --out directory (or delete this one)")
    try:
        hf_model = HF_CLASSES[marginalization].from_pretrained(source).eval()
        tokenizer = RagTokenizer.from_pretrained(source)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the weights or tokenizers: {str(err).splitlines()[0]}", path=source,
                         fix="a RAG checkpoint needs config.json, its weights (model.safetensors or "
                         "pytorch_model.bin) and question_encoder_tokenizer/ + generator_tokenizer/") from err
    for part, sub_tokenizer in (("question_encoder_tokenizer", tokenizer.question_encoder),
                                ("generator_tokenizer", tokenizer.generator)):
        check_tokenizer(sub_tokenizer, f"{source}/{part}")
    question_positions = int(hf_model.question_encoder.config.max_position_embeddings)
    settings = _model_settings(config, marginalization, question_positions, source)
    generation = _generation_config(hf_model, marginalization, source, _own_export_generation(source, marginalization))
    seq2seq = hf_model.generator
    seq2seq.generation_config = generation
    generator = Generator(seq2seq, tokenizer.generator, max_source_length=settings["max_source_length"],
                          max_target_length=settings["max_target_length"], input_format="transformers",
                          title_sep=settings["title_sep"], doc_sep=settings["doc_sep"])
    model = RagModel(
        question_encoder=DenseEncoder(hf_model.question_encoder, pooling="pooler"),
        question_tokenizer=tokenizer.question_encoder,
        generator=generator,
        **{key: settings[key] for key in ("marginalization", "n_docs", "label_smoothing", "exclude_bos_score",
                                          "max_question_length", "max_passage_length", "loss_reduction")},
    )
    index = {key: getattr(config, key, None) for key in INDEX_KEYS}
    provenance = {"source": source, "architecture": architecture, "index": index,
                  "generation": {key: getattr(generation, key) for key in DECODING_KEYS
                                 if getattr(generation, key, None) is not None}}
    return save_rag_model(model, out, extra_files={PROVENANCE_NAME: json.dumps(provenance, indent=2) + "\n"},
                          overwrite=False)


def _knowledge_settings(knowledge: str | Path, dim: int) -> dict[str, Any]:
    """RagConfig settings that point transformers' RagRetriever at a knowledge directory (absolute paths)."""
    import faiss  # only here: the model package itself needs no faiss

    knowledge = Path(knowledge).resolve()
    dataset, faiss_file = knowledge / KNOWLEDGE_DATASET, knowledge / KNOWLEDGE_FAISS
    if not dataset.is_dir() or not faiss_file.is_file():
        raise InputError(f"not a knowledge directory (needs {KNOWLEDGE_DATASET}/ and {KNOWLEDGE_FAISS})",
                         path=knowledge, setting="--knowledge",
                         fix="write one with rag-export-index INDEX_DIR --out DIR")
    found = faiss.read_index(str(faiss_file), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY).d
    if found != dim:
        raise InputError(f"its vectors have dimension {found}, the model's question vectors {dim}", path=faiss_file,
                         setting="--knowledge", fix="export the index this model was trained or evaluated with")
    return {"index_name": "custom", "passages_path": str(dataset), "index_path": str(faiss_file)}


def export_transformers_rag(model_dir: str | Path, out: str | Path, *, allow_input_format_change: bool = False,
                            knowledge: str | Path | None = None) -> Path:
    """Write our RagModel directory as a transformers RAG directory at ``out`` (atomic); returns ``out``.

    ``out`` loads with ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` (by the model's marginalization)
    and ``RagTokenizer.from_pretrained``. transformers' RagRetriever always formats ``title / text // question``:
    a model trained with input_format "question_first" would read different inputs there, so it is refused
    unless ``allow_input_format_change``. ``knowledge``: a directory written by `rag-export-index`
    (index/dataset_export.py); the config then points ``RagRetriever.from_pretrained(out)`` at it
    (``index_name="custom"``, absolute paths), so the export answers questions in transformers as is.

    Raises InputError for a question encoder that is not a DPR encoder with pooler output, and for the
    input format (above).
    """
    model = load_rag_model(model_dir)
    question_model = model.question_encoder.model
    if question_model.config.model_type != "dpr" or model.question_encoder.pooling != "pooler":
        raise InputError("transformers' RAG needs a DPR question encoder with its pooler output",
                         setting="question_encoder", path=model_dir,
                         fix="export a model whose question encoder is a DPR checkpoint (pooling auto or pooler)")
    generator = model.generator
    if generator.input_format != "transformers" and not allow_input_format_change:
        raise InputError(
            f"the model reads input_format {generator.input_format!r}; transformers' RagRetriever formats "
            "'title / text // question', so the exported model would read inputs it was not trained on",
            setting="model.input_format", path=model_dir,
            fix="train with model.input_format=transformers to share on the hub, or pass "
            "--allow-input-format-change to export anyway")
    dim = question_model.config.projection_dim or question_model.config.hidden_size
    where = {"retrieval_vector_size": dim} | ({} if knowledge is None else _knowledge_settings(knowledge, dim))
    config = RagConfig.from_question_encoder_generator_configs(
        question_model.config, generator.model.config, n_docs=model.n_docs, title_sep=generator.title_sep,
        doc_sep=generator.doc_sep, max_combined_length=generator.max_source_length,
        exclude_bos_score=model.exclude_bos_score, label_smoothing=model.label_smoothing,
        reduce_loss=model.loss_reduction == "sum", **where,
    )
    config.architectures = [HF_CLASSES[model.marginalization].__name__]
    hf_model = HF_CLASSES[model.marginalization](config, question_encoder=question_model, generator=generator.model)
    generation = generator.model.generation_config
    if model.marginalization == "token":
        hf_model.generation_config = copy.deepcopy(generation)
    with atomic_directory(out, overwrite=False) as tmp:
        hf_model.save_pretrained(tmp)
        RagTokenizer(question_encoder=model.question_tokenizer, generator=generator.tokenizer).save_pretrained(tmp)
        if model.marginalization == "sequence":
            generation.save_pretrained(tmp, config_file_name=GENERATOR_GENERATION_NAME)
    lost = {key: getattr(generation, key) for key in DECODING_KEYS if getattr(generation, key, None) is not None
            and key != "forced_eos_token_id"}
    if model.marginalization == "sequence" and lost:
        print(f"note: transformers' RagSequenceForGeneration does not keep its generator's generation settings "
              f"{lost}: pass them to generate() there (rag-import reads them back from {GENERATOR_GENERATION_NAME})")
    return Path(out)
