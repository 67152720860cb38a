"""The bad-input table: malformed settings and paths through every console script's real ``main()``.

Each row is one input a new user could type. Every one must end the same way: exit status 2,
no traceback, and the setting or file at fault named on the ``COMMAND: error:`` line. Rows run
in-process (``sys.argv`` patched, ``SystemExit`` caught: the same code path as the console
script, Hydra included); `SUBPROCESS_ROWS` run a few as real processes. To add a case, add a
row: ``(command, arguments, text the error line must contain)``; arguments are formatted with
the paths of the shared run directory (`BadInputRun`).
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import torch

from decoding.ask_cli import main as ask_main
from index.build_cli import main as build_index_main
from index.dataset_export import main as export_index_main
from rag_models.convert_cli import export_main, import_main
from tiny_setup import TinySetup, save_untrained_rag, tiny_overrides
from training.config import compose
from training.demo.demo_cli import main as demo_main
from training.demo.world_cli import main as world_main
from training.evaluation.eval_cli import main as eval_main
from training.evaluation.score_cli import main as score_main
from training.lit.train_cli import main as train_main
from training.lit.train_cli import train

REPO_ROOT = Path(__file__).resolve().parents[1]
# command -> (its main, the arguments every row of it starts with)
COMMANDS: dict[str, tuple[Callable, str]] = {
    "rag-train": (train_main, "{train_base}"),
    "rag-eval": (eval_main, "checkpoint={model} index.path={index} questions={questions} progress=false "
                 "out_dir={tmp}/eval"),
    "rag-ask": (ask_main, "--checkpoint {model} --index {index}"),
    "rag-build-index": (build_index_main, "--passages {passages} --encoder {context} --out {tmp}/built"),
    "rag-score": (score_main, ""),
    "rag-make-world": (world_main, ""),
    "rag-export-index": (export_index_main, ""),
    "rag-import": (import_main, ""),
    "rag-export": (export_main, ""),
    "rag-demo": (demo_main, ""),
}
NO_CUDA = not torch.cuda.is_available()

# (command, arguments after the command's base, text the error line must contain)
ROWS: list[tuple[str, str, str]] = [
    # rag-train: types and ranges of settings, misspelled keys (with and without +), config choices
    ("rag-train", "model.n_docs=0", "model.n_docs"),
    ("rag-train", "model.n_docs=-1", "model.n_docs"),
    ("rag-train", "model.n_docs=three", "model.n_docs"),
    ("rag-train", "model.n_docs=2.5", "model.n_docs"),
    ("rag-train", "trainer.max_steps=abc", "trainer.max_steps"),
    ("rag-train", "trainer.max_steps=0", "trainer.max_steps"),
    ("rag-train", "trainer.max_epochs=-5", "trainer.max_epochs"),
    ("rag-train", "data.batch_size=0", "data.batch_size"),
    ("rag-train", "data.eval_batch_size=-4", "data.eval_batch_size"),
    ("rag-train", "model.max_source_length=0", "model.max_source_length"),
    ("rag-train", "retriever.max_question_length=0", "retriever.max_question_length"),
    ("rag-train", "retriever.max_passage_length=long", "retriever.max_passage_length"),
    ("rag-train", "+model.n_doc=3", "model.n_docs?"),
    ("rag-train", "model.n_doc=3", "model.n_docs?"),
    ("rag-train", "n_doc=3", "model.n_docs?"),
    ("rag-train", "+trainer.max_step=5", "trainer.max_steps?"),
    ("rag-train", "+foo=1", "foo"),
    ("rag-train", "seed=-1", "seed"),
    ("rag-train", "seed=abc", "seed"),
    ("rag-train", "test=maybe", "test"),
    ("rag-train", "export=bestt", "export"),
    ("rag-train", "monitor_mode=maximum", "monitor_mode"),
    ("rag-train", "trainer.precision=fp16", "trainer.precision"),
    ("rag-train", "trainer.devices=abc", "trainer.devices"),
    ("rag-train", "trainer.devices=0", "trainer.devices"),
    ("rag-train", "trainer.accelerator=tpu", "trainer.accelerator"),
    ("rag-train", "trainer.gradient_clip_val=-1", "trainer.gradient_clip_val"),
    ("rag-train", "trainer.val_check_interval=0", "trainer.val_check_interval"),
    ("rag-train", "trainer.deterministic=sometimes", "trainer.deterministic"),
    ("rag-train", "module.lr_generator=0", "module.lr_generator"),
    ("rag-train", "module.lr_question_encoder=-1e-3", "module.lr_question_encoder"),
    ("rag-train", "module.warmup_steps=-5", "module.warmup_steps"),
    ("rag-train", "module.final_lr_factor=1.5", "module.final_lr_factor"),
    ("rag-train", "module.train_question_encoder=yes_please", "module.train_question_encoder"),
    ("rag-train", "model.label_smoothing=2", "model.label_smoothing"),
    ("rag-train", "decoding.num_beams=0", "decoding.num_beams"),
    ("rag-train", "decoding.max_length=0", "decoding.max_length"),
    ("rag-train", "callbacks.checkpoint_last.every_n_train_steps=-1", "every_n_train_steps"),
    ("rag-train", "data.max_val_examples=0", "data.max_val_examples"),
    ("rag-train", "index.nprobe=0", "index.nprobe"),
    ("rag-train", "decoding=fastt", "decoding/fastt"),
    ("rag-train", "logger=nonee", "logger/nonee"),
    ("rag-train", "experiment=demoo", "experiment/demoo"),
    ("rag-train", "'model.n_docs=[3'", "model.n_docs=[3"),
    ("rag-train", "'model.n_docs=${{nope}}'", "model.n_docs"),
    ("rag-train", "data.answers=all", "data.answers"),
    ("rag-train", "module.mode=rgb", "module.mode"),
    ("rag-train", "model.marginalization=tokn", "model.marginalization"),
    ("rag-train", "decoding.strategy=fst", "decoding.strategy"),
    ("rag-train", "index.path={tmp}/no_index", "no_index"),
    ("rag-train", "model.generator={tmp}/no_generator", "no_generator"),
    ("rag-train", "ckpt_path={tmp}/no.ckpt", "no.ckpt"),
    # a resume must keep the checkpoint's batch size and seed (the checkpoint: batch 4, seed 0)
    ("rag-train", "ckpt_path={ckpt} data.batch_size=8", "data.batch_size"),
    ("rag-train", "ckpt_path={ckpt} data.batch_size=4 seed=3", "seed"),
    # rag-eval
    ("rag-eval", "n_docs=0", "n_docs"),
    ("rag-eval", "n_docs=-1", "n_docs"),
    ("rag-eval", "n_docs=three", "n_docs"),
    ("rag-eval", "+decoding.n_docs=0", "decoding.n_docs"),
    ("rag-eval", "progress=maybe", "progress"),
    ("rag-eval", "out_dir={questions}", "out_dir"),  # an existing file (Hydra would fail creating it)
    ("rag-eval", "batch_size=0", "batch_size"),
    ("rag-eval", "batch_size=abc", "batch_size"),
    ("rag-eval", "recall_depth=0", "recall_depth"),
    ("rag-eval", "limit=0", "limit"),
    ("rag-eval", "report_examples=-1", "report_examples"),
    ("rag-eval", "max_source_length=0", "max_source_length"),
    ("rag-eval", "+n_doc=3", "n_docs?"),
    ("rag-eval", "n_doc=3", "n_docs?"),
    ("rag-eval", "mode=rgb", "mode"),
    ("rag-eval", "trainer.devices=0", "trainer.devices"),
    ("rag-eval", "trainer.accelerator=tpu", "trainer.accelerator"),
    ("rag-eval", "decoding.num_beams=0", "decoding.num_beams"),
    ("rag-eval", "decoding=beem", "decoding/beem"),
    ("rag-eval", "index=flatt", "index/flatt"),
    ("rag-eval", "index.backend=gpu", "index.backend"),
    ("rag-eval", "checkpoint={tmp}/no_model", "no_model"),
    ("rag-eval", "questions={tmp}/no_questions.jsonl", "no_questions.jsonl"),
    ("rag-eval", "index.path={tmp}/no_index", "no_index"),
    # a saved model's rag_config.json: a bad type, an unknown key, not an object, a misspelled mode
    ("rag-eval", "checkpoint={model_bad_type}", "rag_config.json"),
    ("rag-eval", "checkpoint={model_unknown_key}", "n_doc"),
    ("rag-eval", "checkpoint={model_not_object}", "rag_config.json"),
    ("rag-eval", "checkpoint={model_bad_mode}", "rag_config.json"),
    ("rag-ask", "--checkpoint {model_bad_type} q?", "rag_config.json"),
    ("rag-export", "{model_unknown_key} --out {tmp}/hf", "rag_config.json"),
    # rag-ask
    ("rag-ask", "--n-docs 0 q?", "--n-docs"),
    ("rag-ask", "--n-docs abc q?", "--n-docs"),
    ("rag-ask", "--max-length 0 q?", "--max-length"),
    ("rag-ask", "--num-beams 0 q?", "--num-beams"),
    ("rag-ask", "--num-answers 0 q?", "--num-answers"),
    ("rag-ask", "--top-docs -1 q?", "--top-docs"),
    ("rag-ask", "--nprobe 0 q?", "--nprobe"),
    ("rag-ask", "--device tpu q?", "--device"),
    ("rag-ask", "--strategy fastt q?", "--strategy"),
    ("rag-ask", "--checkpoint {tmp}/no_model q?", "no_model"),
    ("rag-ask", "--index {tmp}/no_index q?", "no_index"),
    # rag-build-index
    ("rag-build-index", "--passages {tmp}/nope.tsv", "nope.tsv"),
    ("rag-build-index", "--encoder {tmp}", "--encoder"),
    ("rag-build-index", "--max-length 0", "--max-length"),
    ("rag-build-index", "--batch-size 0", "--batch-size"),
    ("rag-build-index", "--shard-size -1", "--shard-size"),
    ("rag-build-index", "--train-sample abc", "--train-sample"),
    ("rag-build-index", "--device tpu", "--device"),
    ("rag-build-index", "--out {a_file}", "a_file"),
    ("rag-build-index", "--factory IVF9,PQ5", "factory"),
    # the other commands
    ("rag-make-world", "--out {a_file}", "a_file"),
    ("rag-make-world", "--out {tmp}/w --entities 0", "n_entities"),
    ("rag-make-world", "--out {tmp}/w --seed abc", "--seed"),
    ("rag-make-world", "--out {tmp}/w --change-fraction 2", "change_fraction"),
    ("rag-score", "--references {tmp}/no_refs.jsonl --predictions {predictions}", "no_refs.jsonl"),
    ("rag-score", "--references {questions} --predictions {tmp}/no_preds.jsonl", "no_preds.jsonl"),
    ("rag-export-index", "{tmp}/no_index --out {tmp}/kb", "no_index"),
    ("rag-import", "{tmp}/no_rag --out {tmp}/imported", "no_rag"),
    ("rag-export", "{tmp}/no_model --out {tmp}/hf", "no_model"),
    ("rag-demo", "--out {a_file}", "a_file"),
    ("rag-demo", "--seed -1", "--seed"),
]
# Rows also run as a real process (`python -m MODULE`): Hydra's own process start and exit path (one row:
# each costs an interpreter start, ~10 s on 2 busy cores).
SUBPROCESS_ROWS: list[tuple[str, str, str, str]] = [
    ("training.lit.train_cli", "rag-train", "model.n_docs=0", "model.n_docs"),
]


@dataclass(frozen=True)
class BadInputRun:
    """The shared run directory: a saved (untrained) RagModel, broken copies of it, files and a checkpoint."""

    paths: dict[str, str]

    def format(self, text: str) -> list[str]:
        return shlex.split(text.format(**self.paths))


def _broken_copy(model: Path, name: str, content: str) -> str:
    """A copy of the model directory whose rag_config.json is ``content``."""
    copy = model.parent / name
    shutil.copytree(model, copy)
    (copy / "rag_config.json").write_text(content)
    return str(copy)


def _resumable_checkpoint(setup: TinySetup, run_dir: Path) -> Path:
    """last.ckpt of a one-step run (batch 4, seed 0), for the resume rows.

    It trains with ``logger=none`` and the default callbacks: a shipped choice that once crashed (the
    learning-rate monitor needs a logger; rag-train now leaves it out).
    """
    overrides = ["experiment=demo", *tiny_overrides(setup, run_dir), "trainer.max_steps=1", "data.batch_size=4",
                 "callbacks.checkpoint_last.every_n_train_steps=1", "trainer.val_check_interval=1",
                 "data.max_val_examples=2", "test=false", "logger=none", "callbacks.samples=null"]
    return train(compose(overrides)).last_checkpoint


@pytest.fixture(scope="session")
def bad_input_run(tiny_setup: TinySetup, tmp_path_factory: pytest.TempPathFactory) -> BadInputRun:
    root = tmp_path_factory.mktemp("bad_input")
    model_dir = save_untrained_rag(tiny_setup.models, root / "model", n_docs=2)
    settings = json.loads((model_dir / "rag_config.json").read_text())
    questions = root / "questions.jsonl"
    questions.write_text("".join(tiny_setup.world.test.read_text().splitlines(keepends=True)[:2]))
    first = json.loads(questions.read_text().splitlines()[0])["question"]
    predictions = root / "predictions.jsonl"
    predictions.write_text(json.dumps({"question": first, "prediction": "x"}) + "\n")
    a_file = root / "a_file"
    a_file.write_text("not a directory\n")
    train_base = " ".join(shlex.quote(o) for o in ["experiment=demo", *tiny_overrides(tiny_setup, root / "train"),
                                                   f"hydra.run.dir={root / 'hydra'}", "trainer.max_steps=1"])
    paths = {
        "tmp": str(root), "model": str(model_dir), "index": str(tiny_setup.index_dir), "questions": str(questions),
        "predictions": str(predictions), "a_file": str(a_file), "passages": str(tiny_setup.world.v1_passages),
        "context": str(tiny_setup.models.context_encoder), "train_base": train_base,
        "ckpt": str(_resumable_checkpoint(tiny_setup, root / "resumed")),
        "model_bad_type": _broken_copy(model_dir, "bad_type", json.dumps({**settings, "n_docs": "three"})),
        "model_unknown_key": _broken_copy(model_dir, "unknown_key", json.dumps({**settings, "n_doc": 3})),
        "model_not_object": _broken_copy(model_dir, "not_object", json.dumps([settings])),
        "model_bad_mode": _broken_copy(model_dir, "bad_mode", json.dumps({**settings, "mode": "rgb"})),
    }
    return BadInputRun(paths)


def _verdict(prog: str, code: object, output: str, named: str) -> str | None:
    """None when the input was refused clearly; else what went wrong (TRACEBACK / SILENT / UNCLEAR ...)."""
    if "Traceback" in output:
        return f"TRACEBACK (exit {code}):\n{output[-3000:]}"
    if code in (0, None):
        return f"SILENT: exit {code}, the input was accepted:\n{output[-2000:]}"
    lines = [line for line in output.splitlines() if line.startswith(f"{prog}: error:")]
    if code != 2 or not lines:
        return f"UNCLEAR: exit {code}, no '{prog}: error:' line:\n{output[-2000:]}"
    if named not in lines[-1]:
        return f"UNNAMED: {named!r} not in the error line {lines[-1]!r}"
    return None


@pytest.mark.parametrize("command,arguments,named", ROWS, ids=[f"{c} {a}" for c, a, _ in ROWS])
def test_bad_input_is_refused_clearly(bad_input_run: BadInputRun, command: str, arguments: str, named: str,
                                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    if "trainer=gpu" in arguments and not NO_CUDA:
        pytest.skip("a CUDA GPU is present: trainer=gpu is valid here")
    main, base = COMMANDS[command]
    argv = bad_input_run.format(base) + bad_input_run.format(arguments)
    if command == "rag-build-index":  # later options replace the base's
        argv = bad_input_run.format(base + " " + arguments)
    monkeypatch.setattr(sys, "argv", [command, *argv])
    monkeypatch.setattr(sys, "stdin", open("/dev/null"))
    code: object = None
    try:
        code = main()
    except SystemExit as stop:
        code = stop.code
    except Exception:  # noqa: BLE001 - an escaped exception is what the table counts as a traceback
        import traceback

        code = "exception"
        print(traceback.format_exc(), file=sys.stderr)
    captured = capsys.readouterr()
    verdict = _verdict(command, code, captured.out + captured.err, named)
    assert verdict is None, verdict


@pytest.mark.parametrize("module,command,arguments,named", SUBPROCESS_ROWS, ids=[r[2] for r in SUBPROCESS_ROWS])
def test_bad_input_in_a_real_process(bad_input_run: BadInputRun, module: str, command: str, arguments: str,
                                     named: str) -> None:
    base = COMMANDS[command][1]
    argv = [sys.executable, "-m", module, *bad_input_run.format(base), *bad_input_run.format(arguments)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)
    assert _verdict(command, done.returncode, done.stdout + done.stderr, named) is None, done.stderr[-2000:]
    assert "Error executing job" not in done.stderr


def test_debug_shows_the_traceback(bad_input_run: BadInputRun, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["rag-ask", "--debug", *bad_input_run.format(COMMANDS["rag-ask"][1]),
                                      "--device", "tpu", "q?"])
    with pytest.raises(SystemExit) as stop:
        ask_main()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" in err and "rag-ask: error: setting `--device`" in err
