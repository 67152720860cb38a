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


def bag_of_words_encoders(paths: CheckpointPaths) -> None:
    """Make the tiny DPR encoders at ``paths`` retrieve by shared words, without training.

    A random encoder's CLS vector hardly depends on the input, so every question would retrieve the same
    passages (and CLS-pooled DPR does not learn quickly from scratch). With the [CLS] embedding and the
    position and segment embeddings zeroed, [CLS] attends uniformly and its vector becomes a mix of the
    input's word vectors; the question encoder gets the context encoder's weights, so a question that names
    a town lands near that town's passage.
    """
    context = DPRContextEncoder.from_pretrained(paths.context_encoder)
    bert = context.ctx_encoder.bert_model
    cls_id = AutoTokenizer.from_pretrained(paths.context_encoder).cls_token_id
    with torch.no_grad():
        bert.embeddings.word_embeddings.weight[cls_id] = 0.0
        bert.embeddings.position_embeddings.weight.zero_()
        bert.embeddings.token_type_embeddings.weight.zero_()
    context.save_pretrained(paths.context_encoder)
    question = DPRQuestionEncoder.from_pretrained(paths.question_encoder)
    question.question_encoder.load_state_dict(context.ctx_encoder.state_dict())
    question.save_pretrained(paths.question_encoder)


def train_title_copier(generator: Path, titles: list[str], texts: list[str], *, steps: int = 100,
                       seed: int = 0) -> None:
    """Train the tiny BART at ``generator`` for a few steps to answer a passage's title from ``title / text``.

    A random BART answers every input alike, which would make answer parity trivially true; copying the
    title makes each answer depend on the docs (about 10 s on 2 CPU cores).
    """
    model = BartForConditionalGeneration.from_pretrained(generator).train()
    tokenizer = AutoTokenizer.from_pretrained(generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randperm(len(titles), generator=rng)[:16].tolist()
        source = tokenizer([f"{titles[r]} / {texts[r]}" for r in rows], truncation=True, max_length=128,
                           padding=True, return_tensors="pt")
        target = tokenizer([" " + titles[r] for r in rows], padding=True, return_tensors="pt")["input_ids"]  # (b, T)
        loss = model(**source, labels=target.masked_fill(target == tokenizer.pad_token_id, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval().save_pretrained(generator)
