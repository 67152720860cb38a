"""Joint RAG training: every experiment config runs (fast_dev_run, tiny models), the loss goes down,
metrics and learning rates are logged, freezing works, the index refresh swaps indexes, bad input is refused."""
from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from rag_models.checkpoint import load_rag_model
from rag_models.errors import InputError
from rag_models.marginalize import rag_sequence_nll
from tiny_setup import TinySetup, tiny_dpr_overrides, tiny_overrides
from training.config import CONFIG_DIR, compose, instantiate
from training.data.qa_datamodule import QADataModule
from training.lit.optim import param_groups
from training.lit.schedule import parse_refresh_schedule, refresh_due, warmup_decay_factor
from training.lit.train_cli import train

EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


def _config(experiment: str, tiny_setup: TinySetup, run_dir: Path, *extra: str):
    overrides = tiny_dpr_overrides if experiment.startswith("dpr") else tiny_overrides
    return compose([f"experiment={experiment}", *overrides(tiny_setup, run_dir), *extra])


def _read_csv_metrics(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run(experiment: str, tiny_setup: TinySetup, tmp_path: Path):
    result = train(_config(experiment, tiny_setup, tmp_path, "trainer.fast_dev_run=true"))
    assert result.export_dir is not None and result.export_dir.is_dir()
    loss = result.metrics["train/loss"]
    assert loss == loss and loss > 0  # finite, not NaN
    if experiment.startswith("dpr"):
        assert (result.export_dir / "question_encoder" / "config.json").is_file()
        assert (result.export_dir / "context_encoder" / "config.json").is_file()
        assert 0.0 <= result.metrics["val/recall@5"] <= 1.0
    else:
        assert (result.export_dir / "rag_config.json").is_file()
        assert 0.0 <= result.metrics["test/em"] <= 1.0


def test_loss_decreases_and_metrics_are_logged(tiny_setup: TinySetup, tmp_path: Path):
    cfg = _config("demo", tiny_setup, tmp_path, "logger=csv", "trainer.max_steps=30", "trainer.log_every_n_steps=1",
                  "trainer.val_check_interval=30", "data.batch_size=8", "module.warmup_steps=3",
                  "module.lr_question_encoder=1e-4", "module.lr_generator=3e-3")
    result = train(cfg)
    rows = _read_csv_metrics(tmp_path)
    losses = _column(rows, "train/loss")
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses  # measured: 47.7 -> 33.5
    for key in ("val/em", "val/recall@1", "val/recall@3", "test/em"):
        assert key in result.metrics
    assert _column(rows, "perf/questions_per_s") and _column(rows, "perf/tokens_per_s")
    # One lr per component, in the ratio configured (1e-4 : 3e-3), through warm-up and decay.
    q_lr, g_lr = _column(rows, "lr-AdamW/question_encoder"), _column(rows, "lr-AdamW/generator")
    assert len(q_lr) == len(g_lr) > 10
    assert all(abs(g / q - 30.0) < 1e-6 for q, g in zip(q_lr, g_lr) if q > 0)
    assert max(g_lr) == pytest.approx(3e-3) and g_lr[0] < g_lr[3] and g_lr[-1] < g_lr[5]
    # The exported directory is what rag-eval loads.
    reloaded = load_rag_model(result.export_dir)
    assert reloaded.n_docs == 3 and reloaded.marginalization == "sequence"


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("train_question_encoder", [True, False])
def test_question_encoder_trains_or_stays_frozen(train_question_encoder: bool, tiny_setup: TinySetup, tmp_path: Path):
    cfg = _config("demo", tiny_setup, tmp_path, "trainer.max_steps=3", "trainer.limit_val_batches=0", "test=false",
                  f"module.train_question_encoder={train_question_encoder}", "module.warmup_steps=0")
    result = train(cfg)
    before, after = _tensors(tiny_setup.models.question_encoder), _tensors(result.export_dir / "question_encoder")
    changed = any(not torch.equal(before[k], after[k]) for k in before)
    assert changed == train_question_encoder
    generator_before, generator_after = _tensors(tiny_setup.models.generator), _tensors(result.export_dir / "generator")
    assert any(not torch.equal(generator_before[k], generator_after[k]) for k in generator_before)


def test_sample_predictions_reach_tensorboard(tiny_setup: TinySetup, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _config("demo", tiny_setup, tmp_path, "trainer.max_steps=2", "trainer.val_check_interval=2", "test=false")
    train(cfg)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert "val/samples/text_summary" in events.Tags()["tensors"]
    text = events.Tensors("val/samples/text_summary")[-1].tensor_proto.string_val[0].decode()
    first_question = tiny_setup.world.dev.read_text().splitlines()[0].split('"')[3]
    assert first_question in text and "| question | prediction | answers | retrieved |" in text
    # Each sample question's passages with their posteriors, and the recall@k-vs-k figure.
    assert text.count("passages read") == 4 and "| # | title | p(z\\|x,y) | text |" in text
    images = events.Images("val/recall_at_k")
    assert [image.step for image in images] == [2] and images[0].width > 100 and images[0].height > 100


def test_index_refresh_reencodes_and_swaps(tiny_setup: TinySetup, tmp_path: Path):
    cfg = _config("demo_e2e", tiny_setup, tmp_path, "trainer.max_steps=4", "trainer.limit_val_batches=0", "test=false",
                  "callbacks.index_refresh.schedule='0-3:2,3-100:1'")
    result = train(cfg)
    refreshed = sorted(p.name for p in (tmp_path / "refreshed_index").iterdir())
    assert refreshed == ["step_00000003", "step_00000004"]  # steps 2, 3, 4 refreshed; the oldest pruned (keep=2)
    manifest = (tmp_path / "refreshed_index" / "step_00000004" / "index" / "manifest.json").read_text()
    assert "step 4" in manifest
    # The context encoder trained, so it is exported with the model.
    assert (result.export_dir / "context_encoder" / "config.json").is_file()


def test_schedules():
    assert warmup_decay_factor(0, warmup_steps=4, total_steps=10) == pytest.approx(0.2)
    assert warmup_decay_factor(4, warmup_steps=4, total_steps=10) == 1.0
    assert warmup_decay_factor(10, warmup_steps=4, total_steps=10) == 0.0
    assert warmup_decay_factor(7, warmup_steps=4, total_steps=10, final_factor=0.5) == pytest.approx(0.75)
    ranges = parse_refresh_schedule("0-1000:500,1000-10000:2000")
    due = [s for s in range(0, 12000) if refresh_due(s, ranges)]
    assert due == [500, 1000, 3000, 5000, 7000, 9000]
    assert parse_refresh_schedule("") == ()
    for bad in ("0-10", "10-0:1", "0-10:0", "a-b:c", "0-10:5,5-20:5"):
        with pytest.raises(InputError, match="index_refresh.schedule"):
            parse_refresh_schedule(bad)


def test_param_groups_split_components_and_skip_tied_weights():
    shared = torch.nn.Linear(3, 3)
    a, b = torch.nn.Sequential(shared, torch.nn.Linear(3, 2)), torch.nn.Sequential(shared)
    groups = param_groups({"a": (a, 1e-4), "b": (b, 1e-3)}, weight_decay=0.01)
    names = [g["name"] for g in groups]
    assert names == ["a", "a/no_decay"]  # b's only parameters are tied to a's: counted once
    assert all(g["lr"] == 1e-4 for g in groups) and groups[1]["weight_decay"] == 0.0
    with pytest.raises(InputError, match="nothing to train"):
        param_groups({"a": (torch.nn.Linear(2, 2).requires_grad_(False), 1e-3)})


@pytest.mark.parametrize("model,reduction", [("rag_sequence", "mean"), ("rag_token", "sum")])
def test_closed_book_loss_is_the_generator_alone_under_the_models_own_loss(model: str, reduction: str,
                                                                         tiny_setup: TinySetup, tmp_path: Path):
    """One pseudo-doc with log p(z|x) = 0: both marginalizations reduce to the generator's own smoothed NLL."""
    cfg = _config("closed_book", tiny_setup, tmp_path, f"model={model}", "model.label_smoothing=0.1",
                  f"model.loss_reduction={reduction}")
    module = instantiate(cfg.module).eval()
    questions, answers = ["who founded Quenby?", "which river flows through Marrowick?"], ["Elsa Tarn", "Varn"]
    with torch.no_grad():
        loss, nll, _ = module._closed_book_loss(questions, answers)
        gen = module.model.generator
        ids, mask = gen.build_question_inputs(questions)  # (B, L)
        decoder_input_ids, target = gen.prepare_targets(answers)  # (B, T)
        logits = gen(ids, mask, decoder_input_ids)  # (B, T, V)
        zeros = logits.new_zeros(len(questions), 1)  # (B, 1)
        plain = rag_sequence_nll(logits, zeros, target, gen.pad_token_id, bos_token_id=gen.bos_token_id)
        smoothed = rag_sequence_nll(logits, zeros, target, gen.pad_token_id, label_smoothing=0.1,
                                    bos_token_id=gen.bos_token_id)
    assert torch.allclose(nll, plain, rtol=1e-5, atol=1e-5)
    expected = smoothed.mean() if reduction == "mean" else smoothed.sum()
    assert torch.allclose(loss, expected, rtol=1e-5, atol=1e-5)
    assert module.model.marginalization == model.split("_")[1]


def test_bad_settings_raise_input_errors(tiny_setup: TinySetup, tmp_path: Path):
    with pytest.raises(InputError, match="data.answers"):
        QADataModule(train_file=str(tiny_setup.world.train), answers="random")
    with pytest.raises(InputError, match="paths.run_dir"):
        train(_config("demo", tiny_setup, tmp_path, "paths.run_dir=null"))
    with pytest.raises(InputError, match="module.mode"):
        train(_config("demo", tiny_setup, tmp_path, "module.mode=open_book"))
    with pytest.raises(InputError, match="index.path"):
        train(_config("demo", tiny_setup, tmp_path, "index.path=null", "trainer.fast_dev_run=true"))
