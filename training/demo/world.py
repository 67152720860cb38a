"""The demo world: a seeded synthetic knowledge base of fictional towns, its questions, and a changed "v2".

One passage per town; questions ask for one attribute of one town; train, dev and
test questions are about disjoint towns, so answering a test question needs
retrieval. Values are shared by many towns: only the name identifies the passage.
In v2 some test towns had facts changed and their passages re-rendered, for the
index hot-swap experiment (new answers without retraining).

All randomness comes from ``random.Random`` streams derived from the seed, one per
concern, so that e.g. the change fraction never alters the v1 world.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from index.passage_files import Passage, write_passages_tsv
from rag_models.atomic import atomic_text_writer
from rag_models.errors import InputError
from training.data.questions import DprExample, QAExample, write_dpr_training_jsonl, write_questions_jsonl
from training.demo.world_text import (
    ATTRIBUTES,
    FLAVOURS,
    INTROS,
    PASSAGE_TEMPLATES,
    QUESTION_TEMPLATES,
    NameMaker,
    value_pools,
)

SPLITS = ("train", "dev", "test")
MIN_ENTITIES = 100  # below this, pool values would no longer be shared by several towns


@dataclass(frozen=True)
class Entity:
    """A town: passage id, name, its facts, and how its passage is laid out (kept for re-rendering in v2).

    Fields:
        id: the passage id, "1" to "N" in creation order.
        name: one or two invented words; also the passage title.
        facts: attribute -> value, for the 4 or 5 of ``ATTRIBUTES`` its passage renders.
        layout: one (attribute, index into ``PASSAGE_TEMPLATES[attribute]``, subject is the name rather than
            "the town") per fact, in passage order.
        intro: index into ``INTROS``, the opening sentence.
        flavour: index into ``FLAVOURS``, the fact-free sentence in the middle.
    """

    id: str
    name: str
    facts: dict[str, str]  # attribute -> value, only the attributes it renders
    layout: tuple[tuple[str, int, bool], ...]  # (attribute, template index, subject is the name), in order
    intro: int
    flavour: int


@dataclass(frozen=True)
class Question:
    """One question about one attribute of one town (its text is the same in v1 and v2).

    Fields:
        entity: the town asked about; its passage is the gold passage.
        attribute: the fact asked for, one of the town's ``facts`` keys.
        text: the question, a ``QUESTION_TEMPLATES[attribute]`` template filled with the town's name.
    """

    entity: Entity
    attribute: str
    text: str


@dataclass
class World:
    """The whole world in memory: towns, their split, questions, and the v2 changes.

    Fields:
        seed: the seed every random stream of the world derives from.
        entities: every town, in id order.
        splits: "train" / "dev" / "test" -> disjoint lists of towns, each in id order.
        questions: split -> one question per (town, fact) of that split's towns.
        changes: entity id -> {attribute: new value}, for the changed test towns (1 or 2 facts each).
        pools: attribute -> the values towns draw that fact from (each shared by many towns).
    """

    seed: int
    entities: list[Entity]
    splits: dict[str, list[Entity]]
    questions: dict[str, list[Question]]
    changes: dict[str, dict[str, str]]  # entity id -> {attribute: new value} for the changed test towns
    pools: dict[str, tuple[str, ...]]


@dataclass(frozen=True)
class WorldFiles:
    """Paths written by :func:`write_world`.

    Fields:
        root: the world directory.
        v1_passages: ``v1/psgs_w100.tsv``, one passage per town (DPR's TSV format).
        train: ``v1/train.jsonl``, NQ-Open questions about the training towns, with their ``passage_id``.
        dev: ``v1/dev.jsonl``, the same for the dev towns.
        test: ``v1/test.jsonl``, the same for the test towns (v1 answers).
        dpr_train: ``v1/dpr_train.jsonl``, DPR training examples of the training questions, with hard negatives.
        dpr_dev: ``v1/dpr_dev.jsonl``, the same for the dev questions.
        v2_passages: ``v2/psgs_w100.tsv``, every passage re-rendered with the v2 facts.
        v2_test: ``v2/test.jsonl``, all test questions with their v2 answers.
        v2_changed_test: ``v2/changed_test.jsonl``, the test questions whose answer changed, with the old
            one as ``stale_answer``.
        summary: ``world.json``, the world's counts; written last, so it marks a complete world.
    """

    root: Path
    v1_passages: Path
    train: Path
    dev: Path
    test: Path
    dpr_train: Path
    dpr_dev: Path
    v2_passages: Path
    v2_test: Path
    v2_changed_test: Path
    summary: Path


def _stream(seed: int, concern: str) -> random.Random:
    """An independent, reproducible random stream for one concern (string seeds hash the same everywhere)."""
    return random.Random(f"demo-world/{seed}/{concern}")


def _balanced(pool: tuple[str, ...], n: int, rng: random.Random) -> list[str]:
    """n values cycling through the pool, shuffled: every value is used about n / len(pool) times."""
    values = [pool[i % len(pool)] for i in range(n)]
    rng.shuffle(values)
    return values


def make_entities(seed: int, n_entities: int) -> tuple[list[Entity], dict[str, tuple[str, ...]]]:
    """Invent ``n_entities`` towns with 4-5 facts each, and the value pools they draw from."""
    maker = NameMaker(_stream(seed, "names"))
    pools = value_pools(maker, _stream(seed, "years"))
    rng = _stream(seed, "facts")
    columns = {attr: _balanced(pools[attr], n_entities, rng) for attr in ATTRIBUTES}
    layout_rng = _stream(seed, "layout")
    entities = []
    for i in range(n_entities):
        name = maker.name(two_words=rng.random() < 0.3)
        attrs = list(ATTRIBUTES)
        if rng.random() < 0.5:  # half the towns leave one fact out, so passages differ in shape
            attrs.remove(rng.choice(attrs))
        layout_rng.shuffle(attrs)
        layout = tuple(
            (attr, layout_rng.randrange(len(PASSAGE_TEMPLATES[attr])), layout_rng.random() < 0.5) for attr in attrs
        )
        entities.append(Entity(
            id=str(i + 1),
            name=name,
            facts={attr: columns[attr][i] for attr in attrs},
            layout=layout,
            intro=layout_rng.randrange(len(INTROS)),
            flavour=layout_rng.randrange(len(FLAVOURS)),
        ))
    return entities, pools


def render_passage(entity: Entity, facts: dict[str, str] | None = None) -> Passage:
    """The town's passage (title = name); ``facts`` overrides its facts with the same layout (v2)."""
    facts = entity.facts if facts is None else facts
    sentences = [INTROS[entity.intro].format(name=entity.name)]
    for attr, template, by_name in entity.layout:
        subject = entity.name if by_name else "the town"
        sentence = PASSAGE_TEMPLATES[attr][template].format(s=subject, **{attr: facts[attr]})
        sentences.append(sentence[0].upper() + sentence[1:])
    # The flavour sentence sits in the middle so the first and last sentences carry facts.
    sentences.insert(1 + len(entity.layout) // 2, FLAVOURS[entity.flavour])
    return Passage(id=entity.id, title=entity.name, text=" ".join(sentences))


def _questions(entities: list[Entity], rng: random.Random) -> list[Question]:
    """One question per (town, fact), each with a random template."""
    out = []
    for entity in entities:
        for attr in ATTRIBUTES:
            if attr in entity.facts:
                template = rng.choice(QUESTION_TEMPLATES[attr])
                out.append(Question(entity, attr, template.format(name=entity.name)))
    return out


def _changes(test: list[Entity], pools: dict[str, tuple[str, ...]], fraction: float,
             rng: random.Random) -> dict[str, dict[str, str]]:
    """Pick ceil(fraction * n_test) test towns and give each 1-2 facts a different value from the pool."""
    chosen = rng.sample(sorted(test, key=lambda e: int(e.id)), math.ceil(fraction * len(test)))
    changes = {}
    for entity in chosen:
        attrs = sorted(entity.facts, key=ATTRIBUTES.index)
        picked = rng.sample(attrs, 2 if rng.random() < 0.3 else 1)
        changes[entity.id] = {
            attr: rng.choice([v for v in pools[attr] if v != entity.facts[attr]]) for attr in sorted(picked)
        }
    return changes


def _check_sizes(n_entities: int, n_dev: int, n_test: int, change_fraction: float) -> None:
    """InputError naming the setting when the requested sizes make no world."""
    if n_entities < MIN_ENTITIES:
        raise InputError(f"{n_entities} entities is too few", setting="n_entities",
                         fix=f"Use at least {MIN_ENTITIES} so that every value is shared by several towns")
    if n_dev < 1 or n_test < 1 or n_dev + n_test >= n_entities:
        raise InputError(f"dev {n_dev} + test {n_test} must be >= 1 each and leave train towns of {n_entities}",
                         setting="n_dev / n_test", fix="Lower n_dev / n_test or raise n_entities")
    if not 0.0 < change_fraction <= 1.0:
        raise InputError(f"change fraction {change_fraction} is not in (0, 1]", setting="change_fraction",
                         fix="Use e.g. 0.4 (40% of the test towns change in v2)")


def build_world(*, seed: int = 0, n_entities: int = 1200, n_dev: int = 100, n_test: int = 200,
                change_fraction: float = 0.4) -> World:
    """Generate the world in memory (deterministic in all arguments)."""
    _check_sizes(n_entities, n_dev, n_test, change_fraction)
    entities, pools = make_entities(seed, n_entities)
    order = list(entities)
    _stream(seed, "split").shuffle(order)
    n_train = n_entities - n_dev - n_test
    splits = {
        "train": sorted(order[:n_train], key=lambda e: int(e.id)),
        "dev": sorted(order[n_train:n_train + n_dev], key=lambda e: int(e.id)),
        "test": sorted(order[n_train + n_dev:], key=lambda e: int(e.id)),
    }
    question_rng = _stream(seed, "questions")
    questions = {split: _questions(splits[split], question_rng) for split in SPLITS}
    changes = _changes(splits["test"], pools, change_fraction, _stream(seed, "changes"))
    return World(seed=seed, entities=entities, splits=splits, questions=questions, changes=changes, pools=pools)


def v2_facts(world: World, entity: Entity) -> dict[str, str]:
    """The town's facts in v2 (its v1 facts where nothing changed)."""
    return entity.facts | world.changes.get(entity.id, {})


def _qa(question: Question, facts: dict[str, str], stale: str | None = None) -> QAExample:
    """QAExample of a question under some facts, with its gold passage id."""
    return QAExample(question.text, (facts[question.attribute],), positive_ids=(question.entity.id,),
                     stale_answers=() if stale is None else (stale,))


def dpr_examples(world: World, split: str, passages: dict[str, Passage], n_hard: int) -> list[DprExample]:
    """DPR training examples: the gold passage, and up to ``n_hard`` towns sharing the answer value."""
    sharing: dict[tuple[str, str], list[str]] = {}
    for entity in world.entities:
        for attr, value in entity.facts.items():
            sharing.setdefault((attr, value), []).append(entity.id)
    rng = _stream(world.seed, f"negatives/{split}")
    examples = []
    for q in world.questions[split]:
        value = q.entity.facts[q.attribute]
        others = [i for i in sharing[(q.attribute, value)] if i != q.entity.id]
        hard = rng.sample(others, min(n_hard, len(others)))
        examples.append(DprExample(q.text, (value,), positives=(passages[q.entity.id],),
                                   hard_negatives=tuple(passages[i] for i in hard)))
    return examples


def world_summary(world: World, *, n_changed_questions: int, n_hard_negatives: int) -> dict[str, object]:
    """The counts that describe a world (written to ``world.json``)."""
    n_test = len(world.splits["test"])
    return {
        "format": "rag-demo-world/1",
        "seed": world.seed,
        "entities": {"total": len(world.entities), **{s: len(world.splits[s]) for s in SPLITS}},
        "questions": {s: len(world.questions[s]) for s in SPLITS},
        "attributes": list(ATTRIBUTES),
        "pool_sizes": {attr: len(pool) for attr, pool in world.pools.items()},
        "hard_negatives_per_question": n_hard_negatives,
        "v2": {
            "changed_test_entities": len(world.changes),
            "fraction_changed": round(len(world.changes) / n_test, 6),
            "changed_facts": sum(len(c) for c in world.changes.values()),
            "changed_test_questions": n_changed_questions,
        },
    }


def world_files(out_dir: str | Path) -> WorldFiles:
    """The layout of a world directory."""
    root = Path(out_dir)
    v1, v2 = root / "v1", root / "v2"
    return WorldFiles(
        root=root, v1_passages=v1 / "psgs_w100.tsv", train=v1 / "train.jsonl", dev=v1 / "dev.jsonl",
        test=v1 / "test.jsonl", dpr_train=v1 / "dpr_train.jsonl", dpr_dev=v1 / "dpr_dev.jsonl",
        v2_passages=v2 / "psgs_w100.tsv", v2_test=v2 / "test.jsonl", v2_changed_test=v2 / "changed_test.jsonl",
        summary=root / "world.json",
    )


def write_world(out_dir: str | Path, *, seed: int = 0, n_entities: int = 1200, n_dev: int = 100,
                n_test: int = 200, change_fraction: float = 0.4, n_hard_negatives: int = 3) -> WorldFiles:
    """Generate the world and write v1 and v2 under ``out_dir``; every file is atomic, ``world.json`` last."""
    if n_hard_negatives < 0:
        raise InputError(f"{n_hard_negatives} hard negatives", setting="n_hard_negatives", fix="Use 0 or more")
    world = build_world(seed=seed, n_entities=n_entities, n_dev=n_dev, n_test=n_test,
                        change_fraction=change_fraction)
    files = world_files(out_dir)
    # world.json marks a complete world: drop an old one first so a killed rerun never looks finished.
    files.summary.unlink(missing_ok=True)
    v1 = {e.id: render_passage(e) for e in world.entities}
    write_passages_tsv(v1.values(), files.v1_passages)
    for split, path in (("train", files.train), ("dev", files.dev), ("test", files.test)):
        write_questions_jsonl((_qa(q, q.entity.facts) for q in world.questions[split]), path)
    write_dpr_training_jsonl(dpr_examples(world, "train", v1, n_hard_negatives), files.dpr_train)
    write_dpr_training_jsonl(dpr_examples(world, "dev", v1, n_hard_negatives), files.dpr_dev)

    write_passages_tsv((render_passage(e, v2_facts(world, e)) for e in world.entities), files.v2_passages)
    test = world.questions["test"]
    write_questions_jsonl((_qa(q, v2_facts(world, q.entity)) for q in test), files.v2_test)
    changed = [
        _qa(q, v2_facts(world, q.entity), stale=q.entity.facts[q.attribute])
        for q in test
        if q.attribute in world.changes.get(q.entity.id, {})
    ]
    write_questions_jsonl(changed, files.v2_changed_test)

    summary = world_summary(world, n_changed_questions=len(changed), n_hard_negatives=n_hard_negatives)
    with atomic_text_writer(files.summary) as out:
        out.write(json.dumps(summary, indent=2) + "\n")
    return files
