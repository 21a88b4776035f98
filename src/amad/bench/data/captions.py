"""Captions of a scene: what each says (a plan) and how it reads in English.

A caption is first planned as structure — which objects it mentions, in which
order, with which relation — and then realised, in English here and in German
in :mod:`amad.bench.data.german`. Realising both languages from one plan keeps every
German caption an exact translation of its English caption.

Captions of one scene (4 or 5 paraphrases):

- inventory: ``there are three objects : a small red circle , a large blue square and a small green triangle .``
- presence:  ``a large blue square , ... are in the picture .`` (objects in a random order)
- counts:    ``the picture contains two circles and one square .``
- relation (one or two): ``the small red circle is left of the large blue square .``

Multimodal translation. The English *source* of a translation pair is the
caption with some mentions made vague: ``the small red object`` instead of
``the small red circle``. The German target always names the shape, and
German articles and adjective endings depend on the noun's gender (``der
kleine rote Kreis`` / ``das kleine rote Quadrat`` / ``die kleine rote
Raute``), so only the image tells a translator how to translate the vague
mention. A mention is made vague only when its size and colour identify one
object of the scene, so the image always resolves it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .scenes import RELATIONS, SHAPES, Scene, ShapeObject

EN_NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EN_PLURAL = {"circle": "circles", "square": "squares", "triangle": "triangles", "diamond": "diamonds"}
VAGUE_NOUN = "object"


@dataclass(frozen=True)
class Mention:
    """An object as a caption names it; ``vague`` replaces the shape by "object" (English only)."""

    obj: ShapeObject
    vague: bool = False


@dataclass(frozen=True)
class CaptionPlan:
    """What one caption says. ``kind`` is inventory, presence, counts or relation."""

    kind: str
    mentions: tuple[Mention, ...] = ()
    relation: str | None = None
    counts: tuple[tuple[str, int], ...] = ()

    def made_vague(self, scene: Scene, rng: np.random.Generator, probability: float) -> "CaptionPlan":
        """A copy in which each resolvable mention is vague with the given probability."""
        mentions = tuple(
            Mention(m.obj, vague=can_be_vague(scene, m.obj) and bool(rng.random() < probability))
            for m in self.mentions
        )
        return CaptionPlan(self.kind, mentions, self.relation, self.counts)


def can_be_vague(scene: Scene, obj: ShapeObject) -> bool:
    """Whether "the <size> <colour> object" identifies ``obj`` in the scene."""
    return len(scene.select(size=obj.size, colour=obj.colour)) == 1


def plan_captions(scene: Scene, rng: np.random.Generator, max_relations: int = 2) -> list[CaptionPlan]:
    """The 4-5 caption plans of a scene (relations need two objects)."""
    objects = scene.objects
    plans = [
        CaptionPlan("inventory", tuple(Mention(o) for o in objects)),
        CaptionPlan("presence", tuple(Mention(objects[i]) for i in rng.permutation(len(objects)))),
        CaptionPlan("counts", counts=tuple((s, len(scene.select(shape=s))) for s in SHAPES if scene.select(shape=s))),
    ]
    pairs = [(i, j) for i in range(len(objects)) for j in range(len(objects)) if i < j]
    chosen = rng.permutation(len(pairs))[:max_relations]
    for p in chosen:
        i, j = pairs[p]
        subject, anchor = (objects[i], objects[j]) if rng.random() < 0.5 else (objects[j], objects[i])
        valid = [r for r in RELATIONS if subject.relation_to(anchor, r)]
        relation = valid[int(rng.integers(len(valid)))]
        plans.append(CaptionPlan("relation", (Mention(subject), Mention(anchor)), relation=relation))
    return plans


# -- English ----------------------------------------------------------------
def english_phrase(mention: Mention, determiner: str) -> str:
    """``a small red circle`` / ``the large blue object``."""
    o = mention.obj
    noun = VAGUE_NOUN if mention.vague else o.shape
    return f"{determiner} {o.size} {o.colour} {noun}"


def join_list(items: list[str], conjunction: str) -> str:
    """``a , b and c`` (punctuation as separate words, like every text of the dataset)."""
    if len(items) == 1:
        return items[0]
    return " , ".join(items[:-1]) + f" {conjunction} " + items[-1]


def english_caption(plan: CaptionPlan) -> str:
    """The English sentence of a plan (words and punctuation separated by spaces)."""
    if plan.kind == "inventory":
        listed = join_list([english_phrase(m, "a") for m in plan.mentions], "and")
        if len(plan.mentions) == 1:
            return f"there is one object : {listed} ."
        return f"there are {EN_NUMBERS[len(plan.mentions)]} objects : {listed} ."
    if plan.kind == "presence":
        listed = join_list([english_phrase(m, "a") for m in plan.mentions], "and")
        verb = "are" if len(plan.mentions) > 1 else "is"
        return f"{listed} {verb} in the picture ."
    if plan.kind == "counts":
        parts = [f"{EN_NUMBERS[n]} {shape if n == 1 else EN_PLURAL[shape]}" for shape, n in plan.counts]
        return f"the picture contains {join_list(parts, 'and')} ."
    if plan.kind == "relation":
        subject, anchor = plan.mentions
        return f"{english_phrase(subject, 'the')} is {plan.relation} {english_phrase(anchor, 'the')} ."
    raise ValueError(f"unknown caption kind {plan.kind!r}")
