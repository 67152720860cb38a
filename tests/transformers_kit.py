"""Test kit: transformers' side of the RAG pipeline, built offline from tiny checkpoints.

- `save_transformers_rag`: a RagSequenceForGeneration / RagTokenForGeneration directory with its
  RagTokenizer, as `save_pretrained` writes the released facebook/rag-*-nq checkpoints.
- `build_knowledge_dataset`: a knowledge base the way transformers' RAG example
  `use_own_knowledge_dataset.py` builds one: a `datasets` Dataset of title / text / embeddings
  (DPR context encoder pooler output of ``title [SEP] text``) saved with `save_to_disk`, and an
  `IndexHNSWFlat(d, 128, METRIC_INNER_PRODUCT)` over it saved as a `.faiss` file.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import faiss
import torch
from datasets import Dataset, Features, Sequence, Value
from transformers import (
    AutoTokenizer,
    BartForConditionalGeneration,
    DPRContextEncoder,
    DPRQuestionEncoder,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
    RagTokenizer,
)

from rag_models.tiny_models import CheckpointPaths

HF_CLASSES = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}


@dataclass(frozen=True)
class KnowledgeDataset:
    """Where `build_knowledge_dataset` wrote the dataset and its faiss index."""

    dataset_path: Path
    index_path: Path
    dim: int


def save_transformers_rag(paths: CheckpointPaths, marginalization: str, out: Path, **config: object) -> Path:
    """Save a transformers RAG model of the tiny question encoder + generator at ``out``, with RagTokenizer.

    ``config``: RagConfig settings; max_combined_length defaults to 128 (the tiny generators have 256 positions,
    fewer than RagConfig's default 300).
    """
    config.setdefault("max_combined_length", 128)
    question_encoder = DPRQuestionEncoder.from_pretrained(paths.question_encoder)
    generator = BartForConditionalGeneration.from_pretrained(paths.generator)
    rag_config = RagConfig.from_question_encoder_generator_configs(question_encoder.config, generator.config, **config)
    model = HF_CLASSES[marginalization](rag_config, question_encoder=question_encoder, generator=generator)
    model.save_pretrained(out)
    RagTokenizer(question_encoder=AutoTokenizer.from_pretrained(paths.question_encoder),
                 generator=AutoTokenizer.from_pretrained(paths.generator)).save_pretrained(out)
    return out


def build_knowledge_dataset(titles: list[str], texts: list[str], context_encoder: Path, out: Path) -> KnowledgeDataset:
    """Embed the passages with the DPR context encoder and save dataset + HNSW index as transformers' example does."""
    encoder = DPRContextEncoder.from_pretrained(context_encoder).eval()
    tokenizer = AutoTokenizer.from_pretrained(context_encoder)

    def embed(batch: dict) -> dict:
        enc = tokenizer(batch["title"], batch["text"], truncation=True, padding="longest", return_tensors="pt")
        with torch.no_grad():
            vectors = encoder(enc["input_ids"], attention_mask=enc["attention_mask"]).pooler_output  # (b, D)
        return {"embeddings": vectors.numpy()}

    features = Features({"title": Value("string"), "text": Value("string"),
                         "embeddings": Sequence(Value("float32"))})
    dataset = Dataset.from_dict({"title": titles, "text": texts})
    dataset = dataset.map(embed, batched=True, batch_size=8, features=features)
    dataset_path, index_path = out / "my_knowledge_dataset", out / "my_knowledge_dataset_hnsw_index.faiss"
    dataset.save_to_disk(str(dataset_path))
    dim = encoder.config.hidden_size
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexHNSWFlat(dim, 128, faiss.METRIC_INNER_PRODUCT))
    dataset.get_index("embeddings").save(str(index_path))
    return KnowledgeDataset(dataset_path, index_path, dim)
