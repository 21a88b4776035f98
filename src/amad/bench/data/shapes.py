"""The "Shapes" dataset: generated images with questions, captions and German translations.

Everything comes from one seed (numpy ``Generator``); no file is needed.
``generate_shapes(ShapesConfig(...))`` returns a ``datasets.DatasetDict`` with
splits ``train`` / ``validation`` / ``test`` and one row per image:

- ``image_id`` (str), ``image``: ``(48, 48, 3)`` uint8 RGB, ``objects``: the scene;
- ``questions`` / ``answers`` / ``question_types``: VQA (answers from :data:`ANSWERS`);
- ``captions``: 4-5 English reference captions (fully specified);
- ``captions_de``: the German translation of each caption;
- ``sources_en``: each caption as the translation source, with some shapes made vague
  ("the small red object") so that the image is needed to translate it.

``vqa_view`` / ``caption_view`` / ``translation_view`` flatten it into one row
per training example. ``save_shapes`` / ``load_shapes`` write and read the
splits (``datasets.load_from_disk``) and the tokenizer (``save_pretrained``).

Each split has its own random stream (``[seed, split index]``), generated in the
order test, validation, train, and a layout already used by an earlier split
is redrawn: splits never share a layout, and the test set does not change
when only the training size does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from datasets import Array3D, Dataset, DatasetDict, Features, List, Value, load_from_disk
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .captions import english_caption, plan_captions
from .german import german_caption
from .questions import ANSWER_TO_ID, ANSWERS, sample_questions
from .scenes import IMAGE_SIZE, Scene, render_scene, sample_scene
from .tokenizer import build_tokenizer

SPLITS: tuple[str, ...] = ("train", "validation", "test")
TASK_PREFIX: dict[str, str] = {"vqa": "vqa :", "caption": "caption :", "translate": "translate English to German :"}
_OBJECT = {"shape": Value("string"), "colour": Value("string"), "size": Value("string"),
           "row": Value("int32"), "col": Value("int32"), "dx": Value("int32"), "dy": Value("int32")}
FEATURES = Features({
    "image_id": Value("string"),
    "image": Array3D(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), dtype="uint8"),
    "objects": List(_OBJECT),
    "questions": List(Value("string")),
    "answers": List(Value("string")),
    "question_types": List(Value("string")),
    "captions": List(Value("string")),
    "captions_de": List(Value("string")),
    "sources_en": List(Value("string")),
})


@dataclass(frozen=True)
class ShapesConfig:
    """Sizes (in images) and generation options of the Shapes dataset."""

    seed: int = 0
    train_size: int = 3000
    validation_size: int = 300
    test_size: int = 500
    questions_per_image: int = 5
    min_objects: int = 2
    max_objects: int = 4
    vague_probability: float = 0.5
    jitter: bool = False

    def __post_init__(self) -> None:
        for name in ("train_size", "validation_size", "test_size", "questions_per_image"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.vague_probability <= 1.0:
            raise ValueError(f"vague_probability must be in [0, 1], got {self.vague_probability}")

    def size(self, split: str) -> int:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return getattr(self, f"{split}_size")


def make_example(scene: Scene, rng: np.random.Generator, config: ShapesConfig, image_id: str) -> dict[str, Any]:
    """One row: the image, its questions, captions, German translations and vague sources."""
    questions = sample_questions(scene, rng, config.questions_per_image)
    plans = plan_captions(scene, rng)
    return {
        "image_id": image_id,
        "image": render_scene(scene),
        "objects": scene.to_records(),
        "questions": [q.text for q in questions],
        "answers": [q.answer for q in questions],
        "question_types": [q.qtype for q in questions],
        "captions": [english_caption(p) for p in plans],
        "captions_de": [german_caption(p) for p in plans],
        "sources_en": [english_caption(p.made_vague(scene, rng, config.vague_probability)) for p in plans],
    }


def _generate_split(split: str, config: ShapesConfig, used: set) -> Iterator[dict[str, Any]]:
    rng = np.random.default_rng([config.seed, SPLITS.index(split)])
    for i in range(config.size(split)):
        for _attempt in range(1000):
            scene = sample_scene(rng, config.min_objects, config.max_objects, config.jitter)
            if scene.key not in used:
                break
        else:
            raise ValueError(f"could not draw {config.size(split)} distinct {split} scenes; ask for fewer images")
        used.add(scene.key)
        yield make_example(scene, rng, config, f"{split}-{i:05d}")


def generate_shapes(config: ShapesConfig | None = None) -> DatasetDict:
    """All three splits of the dataset (deterministic for a given config)."""
    config = config or ShapesConfig()
    used: set = set()
    splits = {}
    for split in ("test", "validation", "train"):
        rows = list(_generate_split(split, config, used))
        columns = {name: [row[name] for row in rows] for name in FEATURES}
        splits[split] = Dataset.from_dict(columns, features=FEATURES)
    return DatasetDict({split: splits[split] for split in SPLITS})


def dataset_texts(data: DatasetDict | Dataset) -> Iterator[str]:
    """Every text of the data (questions, captions, German, sources) and the task prefixes."""
    yield from TASK_PREFIX.values()
    parts = data.values() if isinstance(data, DatasetDict) else [data]
    for part in parts:
        for column in ("questions", "captions", "captions_de", "sources_en"):
            for texts in part[column]:
                yield from texts


def build_shapes_tokenizer(data: DatasetDict | Dataset) -> PreTrainedTokenizerFast:
    """The word-level tokenizer covering every text of the data."""
    return build_tokenizer(dataset_texts(data))


# -- one row per training example ------------------------------------------------
def _flatten(data: Dataset, make_rows: Any, features: dict[str, Any]) -> Dataset:
    """Apply ``make_rows(row) -> rows`` to every image row; images are repeated by index, not re-encoded."""
    images = data.with_format("numpy", columns=["image"])[:]["image"]
    columns: dict[str, list] = {name: [] for name in ("image_id", *features)}
    index: list[int] = []
    for i, row in enumerate(data.select_columns([c for c in data.column_names if c != "image"])):
        for new in make_rows(row):
            index.append(i)
            for name in columns:
                columns[name].append(new[name])
    full = Features({"image_id": Value("string"), "image": FEATURES["image"], **features})
    image_rows = images[np.asarray(index, dtype=np.int64)] if index else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
    return Dataset.from_dict({**columns, "image": image_rows}, features=full)


def vqa_view(data: Dataset) -> Dataset:
    """One row per question: image, question, answer, answer_id, question_type."""
    def rows(r: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for q, a, t in zip(r["questions"], r["answers"], r["question_types"]):
            yield {"image_id": r["image_id"], "question": q, "answer": a,
                   "answer_id": ANSWER_TO_ID[a], "question_type": t}

    return _flatten(data, rows, {"question": Value("string"), "answer": Value("string"),
                                 "answer_id": Value("int64"), "question_type": Value("string")})


def caption_view(data: Dataset, per_reference: bool = True) -> Dataset:
    """Captioning rows: ``caption`` (the target) and ``references`` (all captions of the image).

    ``per_reference=True`` gives one row per reference caption (training);
    False gives one row per image with its first caption as ``caption`` (evaluation).
    """
    def rows(r: dict[str, Any]) -> Iterator[dict[str, Any]]:
        targets = r["captions"] if per_reference else r["captions"][:1]
        for caption in targets:
            yield {"image_id": r["image_id"], "caption": caption, "references": r["captions"]}

    return _flatten(data, rows, {"caption": Value("string"), "references": List(Value("string"))})


def translation_view(data: Dataset) -> Dataset:
    """One row per caption: ``source`` (English, possibly vague) and ``target`` (German)."""
    def rows(r: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for source, target in zip(r["sources_en"], r["captions_de"]):
            yield {"image_id": r["image_id"], "source": source, "target": target}

    return _flatten(data, rows, {"source": Value("string"), "target": Value("string")})


# -- disk -------------------------------------------------------------------------
def save_shapes(data: DatasetDict, tokenizer: PreTrainedTokenizerFast, path: str | Path) -> Path:
    """Write ``path/dataset`` (``datasets.load_from_disk``) and ``path/tokenizer``."""
    path = Path(path)
    data.save_to_disk(str(path / "dataset"))
    tokenizer.save_pretrained(str(path / "tokenizer"))
    return path


def load_shapes(path: str | Path) -> tuple[DatasetDict, PreTrainedTokenizerFast]:
    """Read what :func:`save_shapes` wrote."""
    path = Path(path)
    if not (path / "dataset").is_dir() or not (path / "tokenizer").is_dir():
        raise FileNotFoundError(f"{path} does not hold a saved Shapes dataset (needs dataset/ and tokenizer/)")
    data = load_from_disk(str(path / "dataset"))
    if not isinstance(data, DatasetDict):
        raise ValueError(f"{path / 'dataset'} holds a single Dataset, expected the train/validation/test splits")
    return data, AutoTokenizer.from_pretrained(str(path / "tokenizer"))


__all__ = [
    "ANSWERS", "FEATURES", "SPLITS", "TASK_PREFIX", "ShapesConfig", "build_shapes_tokenizer", "caption_view",
    "dataset_texts", "generate_shapes", "load_shapes", "make_example", "save_shapes", "translation_view", "vqa_view",
]
