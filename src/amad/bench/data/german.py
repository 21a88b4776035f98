"""German realisation of caption plans, with gender, case and adjective agreement.

Nouns: der Kreis (masculine), das Quadrat, das Dreieck (neuter), die Raute
(feminine); plurals Kreise, Quadrate, Dreiecke, Rauten. Adjectives before the
noun (size, then colour) all take the same ending, which depends on the
article, gender and case (standard German declension):

=====================  ==================  ====================  ==================
                       masculine           neuter                feminine
=====================  ==================  ====================  ==================
indefinite nominative  ein roter Kreis     ein rotes Quadrat     eine rote Raute
indefinite accusative  einen roten Kreis   ein rotes Quadrat     eine rote Raute
definite nominative    der rote Kreis      das rote Quadrat      die rote Raute
definite dative        dem roten Kreis     dem roten Quadrat     der roten Raute
=====================  ==================  ====================  ==================

"von dem" contracts to "vom" (``links vom roten Kreis``, but ``links von der
roten Raute``); "über"/"unter" take the dative for a location. The German
always names the shape, also where the English source says "object": the
shape comes from the scene, i.e. from the image (see :mod:`amad.bench.data.captions`).
"""

from __future__ import annotations

from .captions import CaptionPlan, Mention
from .captions import join_list as _join

GENDER = {"circle": "m", "square": "n", "triangle": "n", "diamond": "f"}
NOUN = {"circle": "Kreis", "square": "Quadrat", "triangle": "Dreieck", "diamond": "Raute"}
NOUN_PLURAL = {"circle": "Kreise", "square": "Quadrate", "triangle": "Dreiecke", "diamond": "Rauten"}
ADJECTIVE = {
    "small": "klein",
    "large": "groß",
    "red": "rot",
    "green": "grün",
    "blue": "blau",
    "yellow": "gelb",
    "purple": "violett",
}
NUMBERS = {2: "zwei", 3: "drei", 4: "vier", 5: "fünf", 6: "sechs", 7: "sieben", 8: "acht", 9: "neun"}
# (article, adjective ending) by (definiteness, case) and gender
DECLENSION: dict[tuple[str, str], dict[str, tuple[str, str]]] = {
    ("indefinite", "nominative"): {"m": ("ein", "er"), "n": ("ein", "es"), "f": ("eine", "e")},
    ("indefinite", "accusative"): {"m": ("einen", "en"), "n": ("ein", "es"), "f": ("eine", "e")},
    ("definite", "nominative"): {"m": ("der", "e"), "n": ("das", "e"), "f": ("die", "e")},
    ("definite", "dative"): {"m": ("dem", "en"), "n": ("dem", "en"), "f": ("der", "en")},
}
PREPOSITION = {"left of": "links von", "right of": "rechts von", "above": "über", "below": "unter"}


def noun_phrase(shape: str, adjectives: tuple[str, ...], definiteness: str, case: str) -> str:
    """``einen kleinen roten Kreis`` for ("circle", ("small", "red"), "indefinite", "accusative")."""
    try:
        article, ending = DECLENSION[(definiteness, case)][GENDER[shape]]
    except KeyError:
        raise ValueError(f"no German declension for {shape!r}, {definiteness!r}, {case!r}") from None
    words = [article] + [ADJECTIVE[a] + ending for a in adjectives] + [NOUN[shape]]
    return " ".join(words)


def _mention(mention: Mention, definiteness: str, case: str) -> str:
    o = mention.obj
    return noun_phrase(o.shape, (o.size, o.colour), definiteness, case)


def prepositional_phrase(relation: str, mention: Mention) -> str:
    """``links vom großen blauen Quadrat`` / ``über der kleinen roten Raute``."""
    phrase = f"{PREPOSITION[relation]} {_mention(mention, 'definite', 'dative')}"
    return phrase.replace("von dem ", "vom ", 1)


def count_phrase(shape: str, count: int) -> str:
    """``einen Kreis`` / ``zwei Quadrate`` (accusative: the object of "enthält")."""
    if count == 1:
        return noun_phrase(shape, (), "indefinite", "accusative")
    return f"{NUMBERS[count]} {NOUN_PLURAL[shape]}"


def german_caption(plan: CaptionPlan) -> str:
    """The German translation of a plan's caption (words and punctuation separated by spaces)."""
    if plan.kind == "inventory":
        listed = _join([_mention(m, "indefinite", "accusative") for m in plan.mentions], "und")
        if len(plan.mentions) == 1:
            return f"es gibt ein Objekt : {listed} ."
        return f"es gibt {NUMBERS[len(plan.mentions)]} Objekte : {listed} ."
    if plan.kind == "presence":
        listed = _join([_mention(m, "indefinite", "nominative") for m in plan.mentions], "und")
        verb = "sind" if len(plan.mentions) > 1 else "ist"
        return f"{listed} {verb} im Bild ."
    if plan.kind == "counts":
        return f"das Bild enthält {_join([count_phrase(s, n) for s, n in plan.counts], 'und')} ."
    if plan.kind == "relation":
        subject, anchor = plan.mentions
        return f"{_mention(subject, 'definite', 'nominative')} ist {prepositional_phrase(plan.relation, anchor)} ."
    raise ValueError(f"unknown caption kind {plan.kind!r}")
