"""Questions about a scene with answers from a fixed vocabulary (VQA as classification).

Only unambiguous questions are asked: every object a question names is named
by the shortest description (shape; colour + shape; size + shape; size +
colour + shape) that fits exactly one object of the scene, and a relational
question is asked only when exactly one object stands in that relation.

Question types (``qtype``) and templates:

- ``colour``:        what colour is the <ref> ?            (ref without colour)
- ``shape``:         what shape is the <size?> <colour> object ?
- ``size``:          what size is the <colour> <shape> ?
- ``count-shape``:   how many <shape>s are there ?
- ``count-colour``:  how many <colour> objects are there ?
- ``exist-yes`` / ``exist-no``: is there a <colour> <shape> ?  (drawn as two types, so yes/no are balanced)
- ``relate-shape``:  what shape is <relation> the <ref> ?
- ``relate-colour``: what colour is the object <relation> the <ref> ?
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product

import numpy as np

from .captions import EN_PLURAL
from .scenes import COLOURS, GRID, RELATIONS, SHAPES, SIZES, Scene, ShapeObject

__all__ = ["ANSWERS", "ANSWER_TO_ID", "QUESTION_TYPES", "Question", "all_questions", "describe", "sample_questions"]

COUNTS: tuple[str, ...] = tuple(str(n) for n in range(GRID * GRID + 1))
ANSWERS: tuple[str, ...] = COLOURS + SHAPES + SIZES + COUNTS + ("yes", "no")
ANSWER_TO_ID: dict[str, int] = {a: i for i, a in enumerate(ANSWERS)}
QUESTION_TYPES: tuple[str, ...] = (
    "colour", "shape", "size", "count-shape", "count-colour",
    "exist-yes", "exist-no", "relate-shape", "relate-colour",
)
# attribute subsets tried, shortest first, to name an object unambiguously
DESCRIPTIONS: tuple[tuple[str, ...], ...] = (("shape",), ("colour", "shape"), ("size", "shape"), ("size", "colour", "shape"))


@dataclass(frozen=True)
class Question:
    text: str
    answer: str
    qtype: str

    @property
    def answer_id(self) -> int:
        return ANSWER_TO_ID[self.answer]


def describe(scene: Scene, obj: ShapeObject, allowed: tuple[tuple[str, ...], ...] = DESCRIPTIONS) -> str | None:
    """Shortest unambiguous "the ..." phrase for ``obj`` using one of ``allowed``, or None."""
    for attributes in allowed:
        if len(scene.select(**{a: getattr(obj, a) for a in attributes})) == 1:
            words = [getattr(obj, a) for a in ("size", "colour", "shape") if a in attributes]
            return "the " + " ".join(words)
    return None


def _by_type(scene: Scene) -> dict[str, list[Question]]:
    """Every question the scene can answer unambiguously, grouped by type."""
    out: dict[str, list[Question]] = {t: [] for t in QUESTION_TYPES}
    for o in scene.objects:
        ref = describe(scene, o, (("shape",), ("size", "shape")))
        if ref is not None:
            out["colour"].append(Question(f"what colour is {ref} ?", o.colour, "colour"))
        ref = describe(scene, o, (("colour",), ("size", "colour")))
        if ref is not None:
            out["shape"].append(Question(f"what shape is {ref} object ?", o.shape, "shape"))
        if len(scene.select(colour=o.colour, shape=o.shape)) == 1:
            out["size"].append(Question(f"what size is the {o.colour} {o.shape} ?", o.size, "size"))
        anchor = describe(scene, o)
        for relation in RELATIONS:
            related = scene.related(o, relation)
            if anchor is None or len(related) != 1:
                continue
            out["relate-shape"].append(Question(f"what shape is {relation} {anchor} ?", related[0].shape, "relate-shape"))
            out["relate-colour"].append(
                Question(f"what colour is the object {relation} {anchor} ?", related[0].colour, "relate-colour")
            )
    for shape in SHAPES:
        n = len(scene.select(shape=shape))
        out["count-shape"].append(Question(f"how many {EN_PLURAL[shape]} are there ?", str(n), "count-shape"))
    for colour in COLOURS:
        n = len(scene.select(colour=colour))
        out["count-colour"].append(Question(f"how many {colour} objects are there ?", str(n), "count-colour"))
    for colour, shape in product(COLOURS, SHAPES):
        present = bool(scene.select(colour=colour, shape=shape))
        qtype = "exist-yes" if present else "exist-no"
        out[qtype].append(Question(f"is there a {colour} {shape} ?", "yes" if present else "no", qtype))
    return out


def all_questions(scene: Scene) -> list[Question]:
    """Every unambiguous question about the scene (for tests and analysis)."""
    return [q for group in _by_type(scene).values() for q in group]


def sample_questions(scene: Scene, rng: np.random.Generator, count: int) -> list[Question]:
    """``count`` distinct questions: a uniformly drawn type, then a uniform question of it.

    Fewer are returned only if the scene has fewer unambiguous questions.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    groups = {t: qs for t, qs in _by_type(scene).items() if qs}
    chosen: list[Question] = []
    while groups and len(chosen) < count:
        qtype = sorted(groups)[int(rng.integers(len(groups)))]
        pool = groups[qtype]
        chosen.append(pool.pop(int(rng.integers(len(pool)))))
        if not pool:
            del groups[qtype]
    return chosen

