"""The `index` group travels whole: training validation and rag-eval open and search the index alike.

The training module once received the group key by key and dropped `refine` and
`mmap`: with an IVF-PQ index, validation then ranked by the compressed codes
while rag-eval re-ranked exactly, and the two recall figures silently differed.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning.pytorch as pl
import pytest

from index.build_cli import build_index
from index.retrieval import Retriever
from index.settings import IndexSettings
from tiny_setup import TinySetup, tiny_overrides
from training.config import compose, instantiate
from training.evaluation.eval_cli import evaluate

# A deliberately coarse product quantizer (2 sub-vectors of 2 bits each) over the tiny world's 100
# passages: its ranking differs from the exact one, so the exact re-rank (refine) changes recall.
FACTORY = "IVF2,PQ2x2"
EVERY_KEY = {"factory": "'IVF2,PQ2x2'", "backend": "faiss", "sharded": "true", "device": "cpu", "use_gpu": "false",
             "mmap": "true", "nprobe": "2", "ef_search": "7", "refine": "3", "chunk_size": "128",
             "train_sample": "99", "passages": "/some/store"}


def test_every_index_key_reaches_the_training_module_and_the_retriever(tiny_setup: TinySetup, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch):
    overrides = [f"index.{key}={value}" for key, value in EVERY_KEY.items()]
    cfg = compose(["experiment=demo", *tiny_overrides(tiny_setup, tmp_path), *overrides])
    module = instantiate(cfg.module)
    assert module.index == instantiate(cfg.index)  # the whole group, not a hand-copied subset
    assert module.index.refine == 3 and module.index.mmap is True and module.index.ef_search == 7
    opened: dict = {}
    monkeypatch.setattr(Retriever, "from_dir", classmethod(lambda cls, path, **options: opened.update(options)))
    module.index.open(world_size=2)
    fields = {f.name for f in dataclasses.fields(IndexSettings)} - {"path"}
    assert set(opened) == fields  # Retriever.from_dir receives every setting
    assert {key: opened[key] for key in fields} == {key: getattr(module.index, key) for key in fields}


@pytest.fixture(scope="module")
def ivfpq_index(tiny_setup: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ivfpq")
    return build_index(tiny_setup.world.v1_passages, tiny_setup.models.context_encoder, out / "index", factory=FACTORY,
                       max_length=128, progress=False).parent


def _validation_recall(tiny_setup: TinySetup, run_dir: Path, index_overrides: list[str]) -> dict[str, float]:
    """val/recall@k of the training module on the dev questions, through Trainer.validate."""
    cfg = compose(["experiment=demo", *tiny_overrides(tiny_setup, run_dir), *index_overrides, "logger=none",
                   f"data.val_file={tiny_setup.world.dev}", "data.eval_batch_size=64", "module.recall_ks=[1,5,20]"])
    module = instantiate(cfg.module)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    metrics = trainer.validate(module, datamodule=instantiate(cfg.data), verbose=False)[0]
    module.export_pretrained(run_dir / "model")
    return {key.removeprefix("val/"): value for key, value in metrics.items() if "recall@" in key}


def _eval_recall(tiny_setup: TinySetup, checkpoint: Path, out: Path, index_overrides: list[str]) -> dict[str, float]:
    """rag-eval's recall@k of ``checkpoint`` on the same dev questions, searched as deep as validation."""
    overrides = [f"checkpoint={checkpoint}", f"questions={tiny_setup.world.dev}", f"out_dir={out}", *index_overrides,
                 "recall_depth=20", "batch_size=64", "progress=false"]
    metrics = evaluate(compose(overrides, config_name="eval"))
    return {key: value for key, value in metrics.items() if key.startswith("recall@")}


def test_ivfpq_validation_and_rag_eval_report_the_same_recall(tiny_setup: TinySetup, ivfpq_index: Path, tmp_path: Path):
    index = ["index=ivfpq", f"index.path={ivfpq_index}", f"index.factory='{FACTORY}'", "index.nprobe=2"]
    refined = [*index, "index.refine=4", "index.mmap=true"]
    validation = _validation_recall(tiny_setup, tmp_path / "run", refined)
    evaluation = _eval_recall(tiny_setup, tmp_path / "run" / "model", tmp_path / "eval", refined)
    assert set(validation) == set(evaluation) == {"recall@1", "recall@5", "recall@20"}
    for key, value in evaluation.items():
        assert validation[key] == pytest.approx(value, rel=1e-6), key  # val/ metrics are logged as float32
    # The comparison has teeth: without the exact re-rank the same index ranks differently.
    unrefined = _eval_recall(tiny_setup, tmp_path / "run" / "model", tmp_path / "eval_pq",
                             [*index, "index.refine=null"])
    assert unrefined != evaluation
