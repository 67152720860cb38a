"""Stand-ins for the released RAG checkpoints and knowledge bases, made offline in transformers' own formats.

    python scripts/make_transformers_example.py --out runs/hf_example

writes, from the demo world's passages and tiny random-init models:

    OUT/world/                   the demo world (100 towns): passages, NQ-Open style questions
    OUT/tiny/                    tiny DPR question / context encoders and BART (ordinary checkpoints)
    OUT/rag-sequence-nq/         RagSequenceForGeneration.save_pretrained + RagTokenizer.save_pretrained,
    OUT/rag-token-nq/            the layout of facebook/rag-sequence-nq / facebook/rag-token-nq
    OUT/knowledge/my_knowledge_dataset               what transformers' use_own_knowledge_dataset.py
    OUT/knowledge/my_knowledge_dataset_hnsw_index.faiss  writes: title / text / embeddings + HNSW index

so that the commands of the README's "Reproduce Lewis et al. with the released checkpoints" run on
any machine (``rag-import OUT/rag-sequence-nq``, ``rag-build-index --from-dataset OUT/knowledge/...``).
The models are tricks, not trained RAG models: encoders that retrieve by shared words
(`bag_of_words_encoders`) and a generator trained for a few seconds to repeat a passage's title
(`train_title_copier`); the formats and the path are real. The end-to-end parity tests build their
transformers side with the same functions (tests/test_transformers_pipeline.py).
"""
from __future__ import annotations

import argparse
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

from index.passage_files import iter_passages
from rag_models.tiny_models import CheckpointPaths, TinyBartSize, TinyDprSize, save_tiny_checkpoints
from training.data.questions import read_questions
from training.demo.world import write_world

HF_CLASSES: dict[str, type] = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}
HNSW_M = 128  # as transformers' use_own_knowledge_dataset.py


@dataclass(frozen=True)
class KnowledgeDataset:
    """Where `build_knowledge_dataset` wrote the dataset and its faiss index.

    Fields:
        dataset_path: the `Dataset.save_to_disk` directory (title, text, embeddings).
        index_path: the `.faiss` file of an IndexHNSWFlat(D, 128, inner product) over its rows.
        dim: D, the embedding dimension.
    """

    dataset_path: Path
    index_path: Path
    dim: int


def save_transformers_rag(paths: CheckpointPaths, marginalization: str, out: Path, **config: object) -> Path:
    """Save a transformers RAG model of the question encoder + generator at ``paths`` to ``out``, with RagTokenizer.

    ``marginalization``: "sequence" (RagSequenceForGeneration) or "token" (RagTokenForGeneration).
    ``config``: RagConfig settings; max_combined_length defaults to 128 (the tiny generators have 256
    positions, fewer than RagConfig's default 300).
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
    """Embed the passages with a DPR context encoder and save dataset + HNSW index as transformers' example does.

    Embeddings: the encoder's pooler output of ``title [SEP] text`` (batches of 8, padded to the longest).
    """
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
    dim = encoder.config.projection_dim or encoder.config.hidden_size
    dataset.add_faiss_index("embeddings", custom_index=faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT))
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


def make_example(out: str | Path, *, seed: int = 0) -> KnowledgeDataset:
    """Write the world, tiny checkpoints, both transformers RAG checkpoints and the knowledge base under ``out``."""
    out = Path(out)
    world = write_world(out / "world", seed=seed, n_entities=100, n_dev=10, n_test=10)
    passages = list(iter_passages(world.v1_passages))
    texts = [f"{p.title} {p.text}" for p in passages]
    texts += [example.question for example in read_questions(world.train)]
    checkpoints = save_tiny_checkpoints(out / "tiny", texts, seed=seed, dpr_size=TinyDprSize(hidden_size=64),
                                        bart_size=TinyBartSize(d_model=64, layers=2, heads=2, ffn_dim=128,
                                                               vocab_size=300, dropout=0.0))
    bag_of_words_encoders(checkpoints)
    train_title_copier(checkpoints.generator, [p.title for p in passages], [p.text for p in passages], steps=250,
                       seed=seed)
    knowledge = build_knowledge_dataset([p.title for p in passages], [p.text for p in passages],
                                        checkpoints.context_encoder, out / "knowledge")
    for marginalization in HF_CLASSES:
        save_transformers_rag(checkpoints, marginalization, out / f"rag-{marginalization}-nq", n_docs=5,
                              retrieval_vector_size=knowledge.dim)
    return knowledge


def main(argv: list[str] | None = None) -> None:
    """Console entry point of scripts/make_transformers_example.py."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/hf_example", help="output directory (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="world and weights seed (default: 0)")
    args = parser.parse_args(argv)
    knowledge = make_example(args.out, seed=args.seed)
    out = Path(args.out)
    print(f"transformers checkpoints: {out / 'rag-sequence-nq'}, {out / 'rag-token-nq'}\n"
          f"knowledge base: {knowledge.dataset_path} (+ {knowledge.index_path.name})\n"
          f"questions: {out / 'world' / 'v1' / 'test.jsonl'}")


if __name__ == "__main__":
    main()
