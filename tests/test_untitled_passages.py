"""A passage with an empty title is named by its passage id wherever provenance is shown (issue 13).

rag-ask's "from:" line, Answer.titles and rag-eval's predictions.jsonl "titles" all read
`RetrievedDocs.names`; the generator still reads the empty title, as transformers' RAG does.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from decoding.answer import DecodingSettings, answer
from decoding.ask_cli import format_answer
from decoding.retrieve import embed_questions
from index.build_cli import build_index
from index.passage_files import Passage, write_passages_tsv
from index.retrieval import Retriever
from rag_models.checkpoint import load_rag_model
from tiny_setup import save_untrained_rag
from training.config import compose
from training.evaluation.eval_cli import evaluate

# ids that are not row numbers: the store keeps them as strings, and a name must be the id, not the row
CORPUS = [Passage(id="note-7", title="", text="Orvanta lies on the Selk river."),
          Passage(id="note-9", title="Tella Marr", text="Tella Marr founded Orvanta."),
          Passage(id="note-4", title="", text="The Selk river flows north.")]
UNTITLED = {"note-7", "note-4"}


@pytest.fixture(scope="module")
def untitled(tiny_setup, tmp_path_factory) -> tuple[Path, Path]:
    """An index of CORPUS (two untitled passages) and a tiny RagModel reading all three docs."""
    root = tmp_path_factory.mktemp("untitled")
    write_passages_tsv(CORPUS, root / "psgs.tsv")
    index_root = build_index(root / "psgs.tsv", tiny_setup.models.context_encoder, root / "index", factory="Flat",
                             max_length=64, progress=False).parent
    save_untrained_rag(tiny_setup.models, root / "rag", n_docs=3, max_passage_length=64)
    return index_root, root / "rag"


def test_retrieved_docs_name_untitled_passages_by_id_but_generator_reads_the_empty_title(untitled):
    index_root, checkpoint = untitled
    model, retriever = load_rag_model(checkpoint).eval(), Retriever.from_dir(index_root)
    questions = ["Where is Orvanta?"]
    docs = retriever.retrieve(embed_questions(model, questions), 3)  # (1, 3): every passage
    by_id = dict(zip(retriever.passages.ids(docs.ids[0].numpy()), zip(docs.titles[0], docs.names[0])))
    assert by_id == {"note-7": ("", "note-7"), "note-9": ("Tella Marr", "Tella Marr"), "note-4": ("", "note-4")}
    assert docs.first(2).names == [docs.names[0][:2]]
    ids, mask = model.build_generator_inputs(questions, docs)  # (K, L)
    plain_ids, plain_mask = model.build_generator_inputs(questions, replace(docs, names=None))
    assert torch.equal(ids, plain_ids) and torch.equal(mask, plain_mask)  # names never reach the generator

    found = answer(questions, retriever, model, DecodingSettings(max_length=5), progress=False)[0]
    ids_of_rows = retriever.passages.ids(found.doc_ids)
    assert [name == pid for name, pid in zip(found.titles, ids_of_rows)] == [pid in UNTITLED for pid in ids_of_rows]
    shown = format_answer(questions[0], found, top_docs=3).splitlines()[-1]
    assert "note-7 (" in shown and "note-4 (" in shown and "Tella Marr (" in shown
    assert "from:  (" not in shown and ", (" not in shown  # no empty name left


def test_predictions_jsonl_names_untitled_passages_by_id(untitled, tmp_path):
    index_root, checkpoint = untitled
    questions = tmp_path / "questions.jsonl"
    questions.write_text(json.dumps({"question": "Where is Orvanta?", "answers": ["Selk"]}) + "\n", encoding="utf-8")
    out = tmp_path / "eval"
    evaluate(compose([f"checkpoint={checkpoint}", f"questions={questions}", f"index.path={index_root}",
                      f"out_dir={out}", "progress=false", "decoding.max_length=5"], config_name="eval"))
    record = json.loads((out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()[0])
    names = dict(zip(record["doc_ids"], record["titles"]))
    assert names == {"note-7": "note-7", "note-9": "Tella Marr", "note-4": "note-4"}
