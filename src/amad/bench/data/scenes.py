"""Scenes of the generated "Shapes" dataset and how they are drawn.

A scene is 2-4 objects on a 3 x 3 grid of a 48 x 48 RGB image, at most one
object per cell. Every object has a shape, a colour and a size, and no two
objects of a scene share all three (so "the small red circle" always names
exactly one object). An optional small pixel jitter is part of the scene, so
the scene alone determines its image.

Spatial relations follow CLEVR: A is *left of* B when A's column is strictly
smaller, *above* B when A's row is strictly smaller (anywhere in the image,
not only in the same row or column).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")

IMAGE_SIZE = 48
GRID = 3
CELL = IMAGE_SIZE // GRID
BACKGROUND = (28, 28, 32)
RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 45, 45),
    "green": (50, 190, 70),
    "blue": (55, 100, 245),
    "yellow": (240, 220, 50),
    "purple": (165, 70, 215),
}
# half of an object's extent in pixels, and how far it may be shifted from the cell centre
RADIUS: dict[str, int] = {"small": 4, "large": 7}
JITTER: dict[str, int] = {"small": 3, "large": 0}  # a large object fills its cell


@dataclass(frozen=True)
class ShapeObject:
    """One object: what it is and where it is (grid cell plus pixel jitter)."""

    shape: str
    colour: str
    size: str
    row: int
    col: int
    dx: int = 0
    dy: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, COLOURS),
            ("size", self.size, SIZES),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
        if not (0 <= self.row < GRID and 0 <= self.col < GRID):
            raise ValueError(f"cell ({self.row}, {self.col}) is outside the {GRID}x{GRID} grid")
        limit = JITTER[self.size]
        if abs(self.dx) > limit or abs(self.dy) > limit:
            raise ValueError(f"jitter ({self.dx}, {self.dy}) exceeds {limit} px for a {self.size} object")

    @property
    def attributes(self) -> tuple[str, str, str]:
        return (self.size, self.colour, self.shape)

    def matches(self, **attributes: str | None) -> bool:
        """Whether every given attribute (shape/colour/size; None = any) equals this object's."""
        return all(value is None or getattr(self, key) == value for key, value in attributes.items())

    def relation_to(self, other: "ShapeObject", relation: str) -> bool:
        """Whether ``self`` is ``relation`` (one of RELATIONS) ``other``."""
        if relation == "left of":
            return self.col < other.col
        if relation == "right of":
            return self.col > other.col
        if relation == "above":
            return self.row < other.row
        if relation == "below":
            return self.row > other.row
        raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


@dataclass(frozen=True)
class Scene:
    """The objects of one image, in row-major order of their cells."""

    objects: tuple[ShapeObject, ...]

    def __post_init__(self) -> None:
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        cells = [(o.row, o.col) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a grid cell: {cells}")
        kinds = [o.attributes for o in self.objects]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"two objects have the same size, colour and shape: {kinds}")
        if cells != sorted(cells):
            raise ValueError(f"objects must be in row-major cell order, got cells {cells}")

    @property
    def key(self) -> tuple[tuple[str, str, str, int, int], ...]:
        """Identity of the layout, ignoring jitter (used to keep splits disjoint)."""
        return tuple((o.shape, o.colour, o.size, o.row, o.col) for o in self.objects)

    def select(self, **attributes: str | None) -> list[ShapeObject]:
        return [o for o in self.objects if o.matches(**attributes)]

    def related(self, anchor: ShapeObject, relation: str) -> list[ShapeObject]:
        """Objects that are ``relation`` the anchor."""
        return [o for o in self.objects if o is not anchor and o.relation_to(anchor, relation)]

    def to_records(self) -> list[dict[str, Any]]:
        return [asdict(o) for o in self.objects]

    @classmethod
    def from_records(cls, records: Iterable[dict[str, Any]]) -> "Scene":
        return cls(tuple(ShapeObject(**dict(r)) for r in records))


def sample_scene(rng: np.random.Generator, min_objects: int = 2, max_objects: int = 4, jitter: bool = False) -> Scene:
    """Draw a scene: a uniform number of objects in distinct cells with distinct kinds.

    ``jitter`` shifts each object by up to JITTER pixels; off by default, since
    from-scratch models learn the shapes of centred objects markedly faster.
    """
    if not 1 <= min_objects <= max_objects <= GRID * GRID:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= {GRID * GRID}, got {min_objects}, {max_objects}")
    count = int(rng.integers(min_objects, max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=count, replace=False))
    kinds: set[tuple[str, str, str]] = set()
    objects = []
    for cell in cells:
        while True:
            kind = (SIZES[rng.integers(len(SIZES))], COLOURS[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))])
            if kind not in kinds:
                break
        kinds.add(kind)
        size, colour, shape = kind
        dx, dy = (int(v) for v in rng.integers(-JITTER[size], JITTER[size] + 1, size=2)) if jitter else (0, 0)
        objects.append(ShapeObject(shape, colour, size, cell // GRID, cell % GRID, dx, dy))
    return Scene(tuple(objects))


def _outline(shape: str, cx: float, cy: float, r: float) -> Sequence[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return None


def render_scene(scene: Scene) -> np.ndarray:
    """The scene as a ``(48, 48, 3)`` uint8 RGB array."""
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        r = RADIUS[o.size]
        cx = o.col * CELL + CELL / 2 - 0.5 + o.dx
        cy = o.row * CELL + CELL / 2 - 0.5 + o.dy
        fill = RGB[o.colour]
        polygon = _outline(o.shape, cx, cy, r)
        if polygon is not None:
            draw.polygon(polygon, fill=fill)
        elif o.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:  # square, drawn a little smaller so that its area is close to the circle's
            s = r - 1
            draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    return np.asarray(image, dtype=np.uint8)
