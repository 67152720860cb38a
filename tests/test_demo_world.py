"""The demo world: determinism, held-out towns, distractors, the changed v2, files the readers load, the CLI."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

import training.demo.world as demo_world
from index.passage_files import Passage, iter_passages
from rag_models.errors import InputError
from training.data.questions import read_dpr_training, read_questions
from training.demo.world import build_world, world_files, write_world
from training.demo.world_cli import main
from training.demo.world_text import QUESTION_TEMPLATES

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(n_entities=150, n_dev=15, n_test=30)


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default world, written once for the module."""
    out = tmp_path_factory.mktemp("world")
    start = time.perf_counter()
    write_world(out, seed=0)
    assert time.perf_counter() - start < 10.0  # the demo regenerates it: it must stay cheap
    return out


@pytest.fixture(scope="module")
def loaded(world_dir: Path) -> dict[str, list]:
    """Every file of the default world, through the project's own readers."""
    files = world_files(world_dir)
    return {
        "v1": list(iter_passages(files.v1_passages)),
        "v2": list(iter_passages(files.v2_passages)),
        **{name: read_questions(getattr(files, name)) for name in ("train", "dev", "test", "v2_test")},
        "changed": read_questions(files.v2_changed_test),
        "dpr_train": read_dpr_training(files.dpr_train),
        "dpr_dev": read_dpr_training(files.dpr_dev),
    }


def _has(text: str, value: str) -> bool:
    """Whole-word occurrence of a value in a text."""
    return re.search(rf"(?<!\w){re.escape(value)}(?!\w)", text) is not None


def test_counts_and_summary(loaded: dict[str, list], world_dir: Path) -> None:
    summary = json.loads((world_dir / "world.json").read_text())
    assert summary["entities"] == {"total": 1200, "train": 900, "dev": 100, "test": 200}
    assert len(loaded["v1"]) == len(loaded["v2"]) == 1200
    assert 3600 <= len(loaded["train"]) <= 4500
    assert 400 <= len(loaded["dev"]) <= 500 and 800 <= len(loaded["test"]) <= 1000
    for split in ("train", "dev", "test"):
        assert summary["questions"][split] == len(loaded[split])
        assert len({e.positive_ids for e in loaded[split]}) == summary["entities"][split]
    assert len(loaded["dpr_train"]) == len(loaded["train"]) and len(loaded["dpr_dev"]) == len(loaded["dev"])
    assert summary["v2"]["changed_test_questions"] == len(loaded["changed"])


def test_passages_are_short_and_name_their_town(loaded: dict[str, list]) -> None:
    names = [p.title for p in loaded["v1"]]
    assert len(set(n.lower() for n in names)) == 1200
    assert all(1 <= len(n.split()) <= 2 for n in names)
    lengths = [len(p.text.split()) for p in loaded["v1"]]
    assert 30 <= min(lengths) and max(lengths) <= 60
    assert all(p.title in p.text for p in loaded["v1"])
    assert len({p.text for p in loaded["v1"]}) == 1200


def test_a_name_identifies_exactly_one_passage(loaded: dict[str, list]) -> None:
    names = sorted((p.title.lower() for p in loaded["v1"]), key=len)
    for i, short in enumerate(names):  # no name inside another, so a name never matches the wrong town
        assert not any(short in longer for longer in names[i + 1:]), short
    owner = {p.title: p.id for p in loaded["v1"]}
    for p in loaded["v1"]:
        words = p.text.replace(".", " ").replace(",", " ").split()
        grams = set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}
        assert {owner[g] for g in grams if g in owner} == {p.id}


def test_questions_point_at_their_gold_passage(loaded: dict[str, list]) -> None:
    passages = {p.id: p for p in loaded["v1"]}
    for split in ("train", "dev", "test"):
        for ex in loaded[split]:
            gold = passages[ex.positive_ids[0]]
            assert len(ex.positive_ids) == 1 and gold.title in ex.question
            assert len(ex.answers) == 1 and 1 <= len(ex.answers[0].split()) <= 3
            assert _has(gold.text, ex.answers[0]), (ex, gold)


def test_test_and_dev_towns_are_held_out_of_training(loaded: dict[str, list]) -> None:
    titles = {p.id: p.title for p in loaded["v1"]}
    town_ids = {split: {e.positive_ids[0] for e in loaded[split]} for split in ("train", "dev", "test")}
    assert not town_ids["train"] & town_ids["test"] and not town_ids["train"] & town_ids["dev"]
    assert not town_ids["dev"] & town_ids["test"]
    train_text = "\n".join(e.question for e in loaded["train"] + loaded["dpr_train"]).lower()
    for pid in town_ids["test"] | town_ids["dev"]:
        assert titles[pid].lower() not in train_text


def test_answers_have_distractors_and_cannot_be_guessed(loaded: dict[str, list]) -> None:
    titles = {p.id: p.title for p in loaded["v1"]}
    template_attr = {t: attr for attr, group in QUESTION_TEMPLATES.items() for t in group}
    holders: dict[str, int] = {}
    answers_by_attr: dict[str, Counter] = {}
    for ex in loaded["test"]:
        value = ex.answers[0]
        if value not in holders:
            holders[value] = sum(_has(p.text, value) for p in loaded["v1"])
        assert holders[value] >= 2, ex  # the value alone does not single out the passage: the name must
        attr = template_attr[ex.question.replace(titles[ex.positive_ids[0]], "{name}")]
        answers_by_attr.setdefault(attr, Counter())[value] += 1
    assert sorted(answers_by_attr) == sorted(QUESTION_TEMPLATES)
    for attr, counts in answers_by_attr.items():
        # Closed-book, the best guess is the commonest value: it must stay rare.
        assert max(counts.values()) / sum(counts.values()) < 0.2, (attr, counts.most_common(3))


def test_v2_changes_test_facts_only(loaded: dict[str, list]) -> None:
    v1 = {p.id: p for p in loaded["v1"]}
    v2 = {p.id: p for p in loaded["v2"]}
    changed_ids = {e.positive_ids[0] for e in loaded["changed"]}
    test_ids = {e.positive_ids[0] for e in loaded["test"]}
    assert changed_ids <= test_ids and len(changed_ids) >= 0.3 * len(test_ids)
    assert [p.id for p in loaded["v1"]] == [p.id for p in loaded["v2"]]
    for pid in v1:
        assert v1[pid].title == v2[pid].title
        assert (v1[pid].text != v2[pid].text) == (pid in changed_ids)
    for ex in loaded["changed"]:
        (new,), (old,) = ex.answers, ex.stale_answers
        pid = ex.positive_ids[0]
        assert new != old and _has(v2[pid].text, new) and not _has(v2[pid].text, old) and _has(v1[pid].text, old)


def test_v2_test_questions_keep_their_text_and_update_answers(loaded: dict[str, list]) -> None:
    assert [e.question for e in loaded["v2_test"]] == [e.question for e in loaded["test"]]
    differ = [(new, old) for new, old in zip(loaded["v2_test"], loaded["test"]) if new.answers != old.answers]
    assert [(new.question, new.answers, old.answers) for new, old in differ] == [
        (e.question, e.answers, e.stale_answers) for e in loaded["changed"]
    ]


def test_dpr_files_have_the_gold_positive_and_value_sharing_hard_negatives(loaded: dict[str, list]) -> None:
    passages = {p.id: p for p in loaded["v1"]}
    for qa, dpr in zip(loaded["train"] + loaded["dev"], loaded["dpr_train"] + loaded["dpr_dev"]):
        assert (dpr.question, dpr.answers) == (qa.question, qa.answers)
        assert dpr.positives == (passages[qa.positive_ids[0]],)
        assert 1 <= len(dpr.hard_negatives) <= 3
        for neg in dpr.hard_negatives:
            assert neg == passages[neg.id] and neg.id != qa.positive_ids[0] and _has(neg.text, qa.answers[0])


def test_same_seed_same_bytes_other_seed_other_world(tmp_path: Path) -> None:
    first = write_world(tmp_path / "a", seed=7, **SMALL)
    second = write_world(tmp_path / "b", seed=7, **SMALL)
    third = write_world(tmp_path / "c", seed=8, **SMALL)
    rel = sorted(p.relative_to(first.root) for p in first.root.rglob("*") if p.is_file())
    assert len(rel) == 10 and not any(p.name.startswith(".") for p in rel)  # no temporary files
    for path in rel:
        assert (first.root / path).read_bytes() == (second.root / path).read_bytes(), path
    assert first.v1_passages.read_bytes() != third.v1_passages.read_bytes()
    assert first.train.read_bytes() != third.train.read_bytes()


def test_changing_v2_settings_leaves_v1_untouched(tmp_path: Path) -> None:
    a = write_world(tmp_path / "a", seed=3, change_fraction=0.4, **SMALL)
    b = write_world(tmp_path / "b", seed=3, change_fraction=0.9, n_hard_negatives=1, **SMALL)
    for name in ("v1_passages", "train", "dev", "test"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    assert len(read_questions(b.v2_changed_test)) > len(read_questions(a.v2_changed_test))


@pytest.mark.parametrize("settings, pattern", [
    (dict(n_entities=50), r"setting `n_entities`"),
    (dict(n_dev=100, n_test=1100), r"setting `n_dev / n_test`"),
    (dict(n_dev=0), r"setting `n_dev / n_test`"),
    (dict(change_fraction=0.0), r"setting `change_fraction`"),
    (dict(n_hard_negatives=-1), r"setting `n_hard_negatives`"),
])
def test_bad_settings_raise_input_error(tmp_path: Path, settings: dict, pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        write_world(tmp_path, **settings)
    assert not any(tmp_path.iterdir())


def test_a_killed_rewrite_does_not_look_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = write_world(tmp_path, seed=1, **SMALL)
    assert files.summary.is_file()

    real = demo_world.write_passages_tsv

    def killed_at_v2(passages, path):
        if "v2" in str(path):
            raise KeyboardInterrupt("killed while writing v2")
        return real(passages, path)

    monkeypatch.setattr(demo_world, "write_passages_tsv", killed_at_v2)
    with pytest.raises(KeyboardInterrupt):
        write_world(tmp_path, seed=2, **SMALL)
    assert not files.summary.exists()  # the old world.json must not vouch for a half-new world
    assert not [p for p in tmp_path.rglob(".*")]


def test_build_world_matches_the_written_files(loaded: dict[str, list]) -> None:
    world = build_world(seed=0)
    assert [demo_world.render_passage(e) for e in world.entities] == loaded["v1"]
    assert all(isinstance(p, Passage) for p in loaded["v2"])
    assert len(world.changes) == 80


def test_cli_writes_and_summarises(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--out", str(tmp_path / "w"), "--seed", "4", "--entities", "150", "--dev", "15", "--test", "30"])
    out = capsys.readouterr().out
    assert "towns     train 105, dev 15, test 30" in out and "12 test towns changed (40%)" in out
    assert (tmp_path / "w" / "v2" / "changed_test.jsonl").is_file()
    with pytest.raises(SystemExit) as info:
        main(["--out", str(tmp_path / "x"), "--entities", "20"])
    assert info.value.code == 2 and "n_entities" in capsys.readouterr().err


def test_script_wrapper_runs(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "make_world.py"), "--out", str(tmp_path), "--entities", "120",
         "--dev", "10", "--test", "20"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "8 test towns changed (40%)" in result.stdout and (tmp_path / "world.json").is_file()
