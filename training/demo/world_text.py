"""The demo world's words: invented names, value pools, passage and question templates.

Everything here is fictional. Names are built from syllables under one rule that keeps
retrieval honest: no invented word is a substring of another word, of an export, or of
any template, so a name found in a text always means that entity and nothing else.
"""
from __future__ import annotations

import random

# Attributes every town may have; each entity renders 4 or 5 of them.
ATTRIBUTES = ("region", "river", "founder", "export", "year")

SYLLABLES = (
    "ka", "ro", "mel", "dun", "vi", "tor", "sa", "len", "bri", "os", "ath", "ul", "gar", "ni", "fen", "dra",
    "mo", "kes", "ly", "ven", "thal", "ir", "zo", "pra", "quel", "ber", "ska", "wyn", "hol", "tam", "rin",
    "co", "dal", "vos", "ju", "nar", "pel", "gry", "fa", "sten", "lo", "mir", "ba", "tu", "ran", "ced",
)

# Real goods, 1-2 words, none a substring of another (a reader must copy the whole value).
EXPORTS = (
    "copper", "salt", "wool", "amber", "timber", "olive oil", "glass beads", "dried fish", "silk", "cheese",
    "honey", "pottery", "leather", "barley", "wine", "marble", "linen", "spices", "horses", "paper",
    "rope", "indigo", "pearls", "iron nails",
)

# Passage sentences per attribute; {s} is the subject (the name, or "the town" after the first sentence).
PASSAGE_TEMPLATES = {
    "region": (
        "{s} lies in the region of {region}.",
        "{s} is situated in {region}.",
        "{s} belongs to the {region} region.",
        "In {region}, {s} is one of the older settlements.",
    ),
    "river": (
        "The {river} river flows through {s}.",
        "{s} stands on the banks of the {river}.",
        "{s} is built along the {river} river.",
    ),
    "founder": (
        "{s} was founded by {founder}.",
        "{founder} founded {s}.",
        "The founder of {s} was {founder}.",
    ),
    "export": (
        "The main export of {s} is {export}.",
        "{s} mainly exports {export}.",
        "Traders come to {s} chiefly for its {export}.",
    ),
    "year": (
        "{s} was founded in {year}.",
        "{s} dates back to {year}.",
        "Records show that {s} was established in {year}.",
    ),
}

INTROS = (
    "{name} is a small town.",
    "{name} is a quiet market town.",
    "{name} is an old walled town.",
    "{name} is a town of modest size.",
)

# Sentences that carry no fact: they vary the texts and are never asked about.
FLAVOURS = (
    "Its streets are narrow and paved with grey stone.",
    "A weekly market fills the main square.",
    "Visitors often remark on the bells of its chapel.",
    "Most houses there have red tiled roofs.",
    "The town hall is its largest building.",
    "Winters there are long and windy.",
)

QUESTION_TEMPLATES = {
    "region": (
        "in which region is {name}?",
        "{name} is located in which region?",
        "what region is {name} part of?",
        "which region does {name} belong to?",
    ),
    "river": (
        "which river flows through {name}?",
        "what river runs through {name}?",
        "{name} lies on which river?",
    ),
    "founder": (
        "who founded {name}?",
        "who was the founder of {name}?",
        "{name} was founded by whom?",
    ),
    "export": (
        "what is the main export of {name}?",
        "what does {name} mainly export?",
        "which good is {name} best known for exporting?",
    ),
    "year": (
        "when was {name} founded?",
        "in what year was {name} founded?",
        "what year was {name} established?",
    ),
}

POOL_SIZES = {"region": 12, "river": 30, "founder": 40, "year": 40}


def _template_text() -> str:
    """All fixed text of the world, lower-cased, for the no-substring rule."""
    parts = [*EXPORTS, *INTROS, *FLAVOURS]
    for table in (PASSAGE_TEMPLATES, QUESTION_TEMPLATES):
        parts += [t for group in table.values() for t in group]
    return " | ".join(parts).lower()


class NameMaker:
    """Invents unique words such that none is a substring of another, of an export, or of a template.

    Args:
        rng: the random stream every syllable is drawn from (the world passes one seeded stream per concern).
    """

    def __init__(self, rng: random.Random) -> None:
        """Start with the export words taken, so no name contains e.g. "salt"."""
        self._rng = rng
        self._fixed_text = _template_text()
        self._words: set[str] = set()
        self._pieces: set[str] = set()  # every substring of every accepted word
        for export in EXPORTS:
            for word in export.split():
                self._accept(word)

    def _accept(self, word: str) -> None:
        """Record a lower-case word and all its substrings."""
        self._words.add(word)
        self._pieces.update(word[i:j] for i in range(len(word)) for j in range(i + 1, len(word) + 1))

    def _free(self, word: str) -> bool:
        """True when ``word`` and every accepted word are mutually non-substrings, and no template holds it."""
        if word in self._pieces or word in self._fixed_text:
            return False
        return not any(word[i:j] in self._words for i in range(len(word)) for j in range(i + 1, len(word) + 1))

    def word(self, min_syllables: int = 2, max_syllables: int = 3, max_tries: int = 10_000) -> str:
        """A new capitalized invented word of 2-3 syllables."""
        for _ in range(max_tries):
            n = self._rng.randint(min_syllables, max_syllables)
            candidate = "".join(self._rng.choice(SYLLABLES) for _ in range(n))
            if self._free(candidate):
                self._accept(candidate)
                return candidate.capitalize()
        raise RuntimeError(f"no unused invented word after {max_tries} tries: ask for fewer entities")

    def name(self, two_words: bool) -> str:
        """An entity name of one or two invented words."""
        return f"{self.word()} {self.word()}" if two_words else self.word()


def value_pools(maker: NameMaker, rng: random.Random) -> dict[str, tuple[str, ...]]:
    """Small pools of values per attribute, so that each value is shared by many towns."""
    years = rng.sample(range(1100, 1900), POOL_SIZES["year"])
    return {
        "region": tuple(maker.word(3, 3) for _ in range(POOL_SIZES["region"])),
        "river": tuple(maker.word(2, 2) for _ in range(POOL_SIZES["river"])),
        "founder": tuple(f"{maker.word(2, 2)} {maker.word(2, 3)}" for _ in range(POOL_SIZES["founder"])),
        "export": EXPORTS,
        "year": tuple(str(y) for y in sorted(years)),
    }
