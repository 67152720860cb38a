"""A complete miniature training set-up in seconds: small demo world, tiny checkpoints, a built index.

Test kit, not library code. conftest.py builds it once per test session (the
``tiny_setup`` fixture); tests run every experiment config end to end
(``fast_dev_run`` and a few real steps) with the real loaders and index, only small:

    setup = make_tiny_setup(tmp_dir)
    cfg = compose(["experiment=demo", *tiny_overrides(setup, run_dir)])
    train(cfg)

`tiny_overrides` points every path of an experiment (demo or real: hub names
such as facebook/bart-large) at the tiny checkpoints and files, on CPU.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from index.build_cli import build_index
from index.passage_files import iter_passages
from rag_models.checkpoint import build_rag_model, save_rag_model
from rag_models.tiny_models import CheckpointPaths, TinyBartSize, TinyDprSize, save_tiny_checkpoints
from training.demo.world import WorldFiles, write_world

# Small enough that a training step of 8 questions x 3 docs takes a few tens of ms on one core.
TEST_DPR = TinyDprSize(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, max_positions=256,
                       vocab_size=300)
TEST_BART = TinyBartSize(d_model=32, layers=1, heads=2, ffn_dim=64, max_positions=256, vocab_size=300)
DROPOUT_KEYS = ("dropout", "attention_dropout", "activation_dropout", "hidden_dropout_prob",
                "attention_probs_dropout_prob")


@dataclass(frozen=True)
class TinySetup:
    """Where a tiny set-up lives."""

    world: WorldFiles
    models: CheckpointPaths
    index_dir: Path  # rag-build-index output (index/ + passages/), built with the tiny context encoder


def disable_dropout(checkpoint_dir: Path) -> None:
    """Set every dropout rate of a saved checkpoint's config.json to 0 (for exact equality tests)."""
    path = checkpoint_dir / "config.json"
    config = json.loads(path.read_text())
    for key in DROPOUT_KEYS:
        if key in config:
            config[key] = 0.0
    path.write_text(json.dumps(config, indent=2))


def make_tiny_setup(out_dir: str | Path, *, seed: int = 0, n_entities: int = 100) -> TinySetup:
    """Write a small world, tiny checkpoints trained on its text, and a Flat index of its v1 passages."""
    out = Path(out_dir)
    world = write_world(out / "world", seed=seed, n_entities=n_entities, n_dev=10, n_test=10)
    texts = [f"{p.title} {p.text}" for p in iter_passages(world.v1_passages)]
    texts += [json.loads(line)["question"] for line in world.train.read_text().splitlines()]
    models = save_tiny_checkpoints(out / "tiny", texts, dpr_size=TEST_DPR, bart_size=TEST_BART, seed=seed)
    index_root = build_index(world.v1_passages, models.context_encoder, out / "index", factory="Flat",
                             max_length=128, progress=False)
    return TinySetup(world=world, models=models, index_dir=index_root.parent)


def without_dropout(setup: TinySetup, out_dir: str | Path) -> TinySetup:
    """The same set-up with copies of its checkpoints whose dropout rates are all 0 (exact equality tests).

    World and index are shared: the index was encoded in eval mode, where dropout plays no part.
    """
    out = Path(out_dir)
    shutil.copytree(setup.models.question_encoder.parent, out / "tiny")
    models = CheckpointPaths(out / "tiny" / "question_encoder", out / "tiny" / "context_encoder",
                             out / "tiny" / "generator")
    for directory in (models.question_encoder, models.context_encoder, models.generator):
        disable_dropout(directory)
    return TinySetup(world=setup.world, models=models, index_dir=setup.index_dir)


def tiny_overrides(setup: TinySetup, run_dir: str | Path) -> list[str]:
    """Hydra overrides that make any experiment run on the tiny set-up, on one CPU."""
    return [
        f"paths.run_dir={run_dir}",
        f"paths.world_dir={setup.world.root}",
        f"retriever.question_encoder={setup.models.question_encoder}",
        f"retriever.context_encoder={setup.models.context_encoder}",
        "retriever.max_question_length=32",
        "retriever.max_passage_length=128",
        f"++model.generator={setup.models.generator}",
        "++model.max_source_length=128",
        f"index.path={setup.index_dir}",
        # A real experiment's data points at hub datasets or large files: use the tiny world's.
        "data=demo",
        "trainer=cpu",
        "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false",
    ]


def tiny_dpr_overrides(setup: TinySetup, run_dir: str | Path) -> list[str]:
    """Like `tiny_overrides`, for the DPR pre-training experiments (DPR data of the tiny world)."""
    keep = [o for o in tiny_overrides(setup, run_dir) if not o.startswith(("data=", "++model."))]
    return keep + ["data=dpr_demo"]


def save_untrained_rag(models: CheckpointPaths, directory: str | Path, *, n_docs: int,
                       max_passage_length: int = 128) -> Path:
    """An untrained RagModel of the tiny question encoder and generator, saved at ``directory`` (returned): the
    checkpoint the evaluation, decoding and bad-input tests read (questions 32 tokens, generator inputs 128)."""
    model = build_rag_model(question_encoder=str(models.question_encoder), generator=str(models.generator),
                            n_docs=n_docs, max_question_length=32, max_passage_length=max_passage_length,
                            max_source_length=128)
    return save_rag_model(model, directory)
