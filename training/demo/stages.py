"""The stages of the offline demo, each through the code path a user runs (Hydra configs, build_index, evaluate).

    world -> tiny checkpoints -> DPR pre-training -> v1 index -> RAG-Sequence, RAG-Token, closed-book
    training -> test evaluation -> v2 index (same context encoder) -> evaluation after the swap

Everything lands under one demo directory laid out as ``configs/train.yaml``'s
``paths.demo_dir`` expects: ``world/``, ``tiny/``, ``dpr/model/``, ``index/``,
one run directory per trained model, ``index_v2/`` and ``eval/<name>/``. rag-demo then runs the n_docs
sweeps, figures and the RAG-Sequence vs RAG-Token comparison (training/demo/views.py).
"""
from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lightning.pytorch as pl
import torch
from tqdm.auto import tqdm

from index.build_cli import build_index
from index.passage_files import iter_passages
from rag_models.atomic import atomic_write_text
from rag_models.tiny_models import CheckpointPaths, TinyBartSize, TinyDprSize, save_tiny_checkpoints
from training.config import compose
from training.data.questions import read_questions
from training.demo.world import WorldFiles, world_files, write_world
from training.evaluation.eval_cli import evaluate
from training.lit.train_cli import TrainResult, train

# Hydra override values made only of these characters need no quoting.
_PLAIN_VALUE = re.compile(r"^[\w./\-]+$")


@dataclass(frozen=True)
class DemoPlan:
    """How big the demo is: the world, the tiny models, and what every stage overrides.

    Fields:
        n_entities: towns in the world (one passage each), at least ``world.MIN_ENTITIES`` (100).
        n_dev: towns held out for dev questions, >= 1.
        n_test: towns held out for test questions, >= 1; ``n_dev + n_test`` must leave training towns.
        change_fraction: the fraction of test towns whose facts change in v2, in (0, 1].
        dpr_size: sizes of the tiny DPR question and context encoders (and of their WordPiece vocabulary).
        bart_size: sizes of the tiny BART generator (and its tokenizer's vocabulary).
        train_overrides: Hydra overrides added to every rag-train stage, DPR included.
        rag_overrides: Hydra overrides added to the RAG and closed-book stages only.
        eval_overrides: Hydra overrides added to every rag-eval stage.
        index_max_length: tokens per passage when the demo builds its v1 and v2 indexes; keep it equal to the
            tiny context encoder's ``max_passage_length`` (configs/retriever/tiny.yaml).
        threads: torch CPU threads of the demo process and of each parallel training process.
        sweep_n_docs: the n_docs values both RAG models are evaluated at on the test questions (one retrieval).

    The world stage checks the world's sizes (InputError from `write_world`); the plan itself does not.
    """

    n_entities: int = 1200
    n_dev: int = 100
    n_test: int = 200
    change_fraction: float = 0.4
    dpr_size: TinyDprSize = TinyDprSize()
    bart_size: TinyBartSize = TinyBartSize()
    train_overrides: tuple[str, ...] = ()  # added to every rag-train stage (the quick run shortens them)
    rag_overrides: tuple[str, ...] = ()  # added to the RAG and closed-book stages only
    eval_overrides: tuple[str, ...] = ()
    index_max_length: int = 128  # the tiny context encoder's max_passage_length (configs/retriever/tiny.yaml)
    # Measured on 2 cores: a tiny-model training step takes 1.0-1.5 s with 1 thread and ~3 s with 2 (the
    # ops are too small to split), so the three models train at once in 1-thread processes.
    threads: int = 1
    sweep_n_docs: tuple[int, ...] = (1, 2, 3, 5, 10)


# One beam per doc, as the demo's validation decodes: the answers are short names.
# The reader: dropout off and a 2,000-piece BPE vocabulary. Measured on the dev questions (reader given
# the gold passage, 1 thread, gradient clipping), dev EM at steps 200 / 300 / 400: vocab 1000, lr 3e-3:
# 0.63 / 0.93 / 0.95 with dropout 0.1, 0.60 / 0.96 / 0.98 without; lr 2e-3 without dropout: 0.77 / 0.96 /
# 0.96 with vocab 1000, 0.96 / 1.00 at steps 200 / 300 with vocab 2000 (inputs ~7% shorter as well).
# Dropout also costs ~12% of a step on CPU; a deterministic copying task has nothing to regularize.
FULL = DemoPlan(bart_size=TinyBartSize(vocab_size=2000, dropout=0.0), eval_overrides=("decoding.num_beams=1",))
# The smoke run: the smallest world and the test suite's model sizes, a few steps per stage.
QUICK = DemoPlan(
    n_entities=100, n_dev=10, n_test=20,
    dpr_size=TinyDprSize(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300),
    bart_size=TinyBartSize(d_model=32, layers=1, heads=2, ffn_dim=64, vocab_size=300),
    train_overrides=("trainer.max_steps=3", "trainer.val_check_interval=3", "data.batch_size=16",
                     "callbacks.checkpoint_last.every_n_train_steps=3", "trainer.enable_progress_bar=false",
                     "trainer.enable_model_summary=false"),
    rag_overrides=("data.max_val_examples=10",),
    sweep_n_docs=(1, 2, 3),
    eval_overrides=("recall_depth=20", "progress=false", "decoding.num_beams=1"),
)


def override(key: str, value: object) -> str:
    """A Hydra override ``key=value``, quoted when the value (e.g. a path with spaces) needs it."""
    text = str(value)
    if _PLAIN_VALUE.match(text):
        return f"{key}={text}"
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"{key}='{escaped}'"


@dataclass
class Stopwatch:
    """Seconds spent per stage, in the order the stages ran, and which stages an earlier run had finished.

    Fields:
        seconds: stage name -> wall-clock seconds (rounded to 0.1 s), in run order; 0.0 for a reused stage.
        resumed: names of the stages an earlier, killed run had finished (reused, not run again).
        each: training run name -> seconds from the start of the parallel training stage to that run's end.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    resumed: list[str] = field(default_factory=list)
    each: dict[str, float] = field(default_factory=dict)  # parallel runs: seconds of each, within its stage

    def run(self, name: str, title: str, work: Callable[[], Any], finished: Callable[[], Any] | None = None) -> Any:
        """Run one stage with a header line and time it; reuse its result when ``finished()`` finds one."""
        number = len(self.seconds) + 1
        print(f"\n=== [{number}] {title}", flush=True)
        earlier = finished() if finished is not None else None
        if earlier is not None:  # a killed demo, re-run with the same --out, keeps what it had finished
            self.seconds[name] = 0.0
            self.resumed.append(name)
            print(f"=== [{number}] {title}: finished by an earlier run, reused", flush=True)
            return earlier
        started = time.perf_counter()
        result = work()
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"=== [{number}] {title}: done in {self.seconds[name]:.1f} s", flush=True)
        return result


def finished_training(run_dir: Path) -> TrainResult | None:
    """The result of a training stage an earlier run completed (train_result.json is written last), else None."""
    path = run_dir / "train_result.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    export = Path(saved["export_dir"]) if saved.get("export_dir") else None
    if export is None or not export.is_dir():
        return None
    checkpoint = {key: Path(saved[key]) if saved.get(key) else None for key in ("best_checkpoint", "last_checkpoint")}
    return TrainResult(run_dir=run_dir, export_dir=export, metrics=saved.get("metrics", {}), **checkpoint)


def finished_world(out: Path) -> WorldFiles | None:
    """The world of an earlier run (world.json is written last); rewriting it would look like new passages."""
    files = world_files(out / "world")
    return files if files.summary.is_file() else None


def finished_tiny_models(out: Path) -> CheckpointPaths | None:
    """The tiny checkpoints of an earlier run (each is saved atomically), else None."""
    paths = CheckpointPaths(out / "tiny" / "question_encoder", out / "tiny" / "context_encoder",
                            out / "tiny" / "generator")
    return paths if all((p / "config.json").is_file() for p in (paths.question_encoder, paths.context_encoder,
                                                                  paths.generator)) else None


def make_world(out: Path, plan: DemoPlan, seed: int) -> WorldFiles:
    """The synthetic world (v1 and the changed v2) under ``out/world``."""
    return write_world(out / "world", seed=seed, n_entities=plan.n_entities, n_dev=plan.n_dev,
                       n_test=plan.n_test, change_fraction=plan.change_fraction)


def make_tiny_models(out: Path, world: WorldFiles, plan: DemoPlan, seed: int) -> CheckpointPaths:
    """Untrained tiny DPR encoders and BART under ``out/tiny``, tokenizers trained on the world's text.

    The tokenizers see the v1 passages and the training questions only: the v2 world
    arrives later, as it would in reality, and test questions stay unseen.
    """
    texts = [f"{p.title} {p.text}" for p in iter_passages(world.v1_passages)]
    texts += [example.question for example in read_questions(world.train)]
    return save_tiny_checkpoints(out / "tiny", texts, dpr_size=plan.dpr_size, bart_size=plan.bart_size, seed=seed)


def train_overrides(out: Path, experiment: str, run_name: str, plan: DemoPlan, seed: int) -> list[str]:
    """The overrides of ``rag-train experiment=EXPERIMENT`` into ``out/RUN_NAME`` (test left to evaluation)."""
    overrides = [f"experiment={experiment}", override("paths.demo_dir", out), override("paths.run_dir", out / run_name),
                 f"seed={seed}", "test=false", *plan.train_overrides]
    return overrides + ([] if experiment.startswith("dpr") else list(plan.rag_overrides))


def train_stage(out: Path, experiment: str, run_name: str, plan: DemoPlan, seed: int) -> TrainResult:
    """``rag-train experiment=EXPERIMENT`` into ``out/RUN_NAME``, in this process."""
    return train(compose(train_overrides(out, experiment, run_name, plan, seed)))


class StepFile(pl.Callback):
    """Writes the global step to a small file, so that the demo can show the progress of a child process.

    Args:
        path: the file that holds the latest global step (optimizer steps) as text, rewritten atomically.
        every: write after a training batch when the global step is a multiple of this (optimizer steps), >= 1.
    """

    def __init__(self, path: str, every: int = 5) -> None:
        self.path = Path(path)
        self.every = every

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.is_global_zero and trainer.global_step % self.every == 0:
            atomic_write_text(self.path, str(trainer.global_step))


def _train_child(out: Path, experiment: str, run_name: str, plan: DemoPlan, seed: int) -> None:
    """Body of one training process: 1 thread, output to <run>/train.log, progress to <run>/step."""
    torch.set_num_threads(plan.threads)
    (out / run_name).mkdir(parents=True, exist_ok=True)
    log = open(out / run_name / "train.log", "w", encoding="utf-8")  # noqa: SIM115 (lives as long as the process)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    step_file = override("+callbacks.demo_progress.path", out / run_name / "step")
    overrides = train_overrides(out, experiment, run_name, plan, seed)
    overrides += ["+callbacks.demo_progress._target_=training.demo.stages.StepFile", step_file,
                  "trainer.enable_progress_bar=false"]
    train(compose(overrides))


def _failed(run_dir: Path, code: int | None) -> RuntimeError:
    """The error for a training process that exited badly, with the end of its log."""
    log = run_dir / "train.log"
    tail = log.read_text(encoding="utf-8", errors="replace").splitlines()[-25:] if log.is_file() else []
    return RuntimeError(f"training in {run_dir} failed (exit code {code}); end of {log}:\n" + "\n".join(tail))


def train_in_parallel(out: Path, jobs: dict[str, str], plan: DemoPlan, seed: int) -> dict[str, float]:
    """Train several experiments at once, one process each (``jobs``: run name -> experiment).

    Shows one progress bar per run; returns each run's seconds. A failing run stops the others.
    """
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    procs, bars, seconds = {}, {}, {}
    for position, (name, experiment) in enumerate(jobs.items()):
        total = compose(train_overrides(out, experiment, name, plan, seed)).trainer.max_steps
        bars[name] = tqdm(total=total, desc=f"{name:>12}", unit="step", position=position)
        procs[name] = context.Process(target=_train_child, args=(out, experiment, name, plan, seed), name=name)
        procs[name].start()
    try:
        while len(seconds) < len(procs):
            time.sleep(1.0)
            for name, proc in procs.items():
                step_file = out / name / "step"
                if step_file.is_file():
                    bars[name].update(int(step_file.read_text() or 0) - bars[name].n)
                if name not in seconds and not proc.is_alive():
                    if proc.exitcode != 0:
                        raise _failed(out / name, proc.exitcode)
                    seconds[name] = round(time.perf_counter() - started, 1)
                    bars[name].update(bars[name].total - bars[name].n)
    finally:
        for name, proc in procs.items():
            if proc.is_alive():
                proc.terminate()
            proc.join()
            bars[name].close()
    return seconds


def index_stage(out: Path, passages: Path, context_encoder: Path, name: str, plan: DemoPlan) -> Path:
    """``rag-build-index`` of ``passages`` with ``context_encoder`` into ``out/NAME``; returns that directory."""
    build_index(passages, context_encoder, out / name, factory="Flat", max_length=plan.index_max_length)
    return out / name


def eval_stage(out: Path, name: str, checkpoint: Path, questions: Path, plan: DemoPlan, *,
               index: Path | None = None, decoding: str = "greedy") -> dict[str, Any]:
    """``rag-eval`` of one checkpoint on one question file into ``out/eval/NAME``; returns its metrics."""
    overrides = [override("checkpoint", checkpoint), override("questions", questions),
                 override("out_dir", out / "eval" / name), f"decoding={decoding}", "batch_size=64",
                 *plan.eval_overrides]
    # No index: the closed-book checkpoint, which rag-eval evaluates without retrieval (its rag_config.json says so).
    overrides += [override("index.path", index)] if index is not None else []
    metrics = evaluate(compose(overrides, config_name="eval"))
    shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith(("exact_match", "recall@"))}
    print(f"{name}: {json.dumps(shown)}", flush=True)
    return metrics


def run_stages(out: Path, plan: DemoPlan, seed: int) -> tuple[dict[str, dict[str, Any]], Stopwatch]:
    """Every stage in order; returns the metrics of each evaluation and the stage clock."""
    torch.set_num_threads(plan.threads)
    clock = Stopwatch()
    world = clock.run("world", "demo world (v1, and v2 where some facts changed)", lambda: make_world(out, plan, seed),
                      lambda: finished_world(out))
    clock.run("tiny_models", "tiny checkpoints, tokenizers trained on the world's text",
              lambda: make_tiny_models(out, world, plan, seed), lambda: finished_tiny_models(out))
    dpr = clock.run("dpr", "DPR bi-encoder pre-training (rag-train experiment=dpr_demo)",
                    lambda: train_stage(out, "dpr_demo", "dpr", plan, seed), lambda: finished_training(out / "dpr"))
    context_encoder = dpr.export_dir / "context_encoder"
    index_v1 = clock.run("index_v1", "index of the v1 passages (rag-build-index)",
                         lambda: index_stage(out, world.v1_passages, context_encoder, "index", plan))
    jobs = {"rag_sequence": "demo", "rag_token": "demo_rag_token", "closed_book": "closed_book"}
    todo = {name: experiment for name, experiment in jobs.items() if finished_training(out / name) is None}
    clock.run("train", "RAG-Sequence and RAG-Token (joint training) and the closed-book baseline, in parallel "
              "(rag-train experiment=demo | demo_rag_token | closed_book)",
              lambda: clock.each.update(train_in_parallel(out, todo, plan, seed)), lambda: None if todo else True)
    runs = {name: finished_training(out / name) for name in jobs}
    index_v2 = clock.run("index_v2", "index of the v2 passages, same context encoder",
                         lambda: index_stage(out, world.v2_passages, context_encoder, "index_v2", plan))
    metrics = clock.run("evaluate", "evaluation on held-out test questions, then after the index swap",
                        lambda: evaluate_all(out, world, runs, index_v1, index_v2, plan))
    return metrics, clock


def evaluate_all(out: Path, world: WorldFiles, runs: dict[str, TrainResult], index_v1: Path, index_v2: Path,
                 plan: DemoPlan) -> dict[str, dict[str, Any]]:
    """Test EM of the three models, and both RAG models on the changed questions before and after the swap."""
    seq, tok = runs["rag_sequence"].export_dir, runs["rag_token"].export_dir
    return {
        "rag_sequence": eval_stage(out, "rag_sequence", seq, world.test, plan, index=index_v1, decoding="fast"),
        "rag_token": eval_stage(out, "rag_token", tok, world.test, plan, index=index_v1, decoding="greedy"),
        "closed_book": eval_stage(out, "closed_book", runs["closed_book"].export_dir, world.test, plan),
        # The changed questions with the old index: the model answers as the v1 world says.
        "before_swap": eval_stage(out, "before_swap", seq, world.v2_changed_test, plan, index=index_v1,
                                  decoding="fast"),
        # Same model, same weights, the v2 index: the answers should follow the new world.
        "swap": eval_stage(out, "swap", seq, world.v2_changed_test, plan, index=index_v2, decoding="fast"),
        "swap_rag_token": eval_stage(out, "swap_rag_token", tok, world.v2_changed_test, plan, index=index_v2,
                                     decoding="greedy"),
    }
