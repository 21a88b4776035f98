"""User data for ``amad distill`` / ``amad evaluate``: read local files, check columns, collate batches.

Files are read with the ``datasets`` library: JSON / JSON lines and CSV with
``load_dataset``, a directory written by ``save_to_disk`` with
``load_from_disk`` (a ``DatasetDict`` gives its ``train_split`` /
``eval_split``). Rows stay raw (strings, labels, image paths); a
:class:`TaskCollator` turns a list of rows into the model's tensors, so images
are opened only when a batch needs them.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..compat import label_permutation, named_labels
from .config import DataSpec, RunConfig
from .inputs import check_image_array, check_values, read_failure
from .typed import ConfigError, suggest

__all__ = [
    "read_table",
    "load_splits",
    "task_columns",
    "label_names",
    "named_labels",
    "check_labels",
    "answer_scores",
    "load_image",
    "TaskCollator",
    "expand_references",
]

FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".txt": "text"}


def read_table(path: str, fmt: str, split: str, key: str) -> Any:
    """One ``datasets.Dataset`` from a JSON(L)/CSV file or a ``save_to_disk`` directory."""
    import datasets

    if fmt == "auto":
        fmt = "disk" if Path(path).is_dir() else FORMATS.get(Path(path).suffix.lower(), "")
        if not fmt:
            raise ConfigError(f"{key}: cannot tell the format of {path!r}; set data.format to json, csv or disk")
    quiet = logging.getLogger("datasets")  # it logs a failed read itself; the error below says it in one line
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        if fmt == "disk":
            table = datasets.load_from_disk(path)
        else:
            table = datasets.load_dataset(fmt, data_files=path, split="train")
    except Exception as exc:  # malformed files surface from deep inside datasets / pyarrow
        raise ConfigError(f"{key}: cannot read {path!r} as {fmt}: {read_failure(path, fmt, exc)}") from None
    finally:
        quiet.setLevel(level)
    if isinstance(table, datasets.DatasetDict):
        if split not in table:
            raise ConfigError(f"{key}: {path!r} has splits {sorted(table)}, not {split!r} (set the data.*_split key)")
        table = table[split]
    if len(table) == 0:
        raise ConfigError(f"{key}: {path!r} has no rows")
    return table


def evaluates_during_training(training: dict) -> str | None:
    """The ``training:`` key that makes the Trainer evaluate while training (it then needs eval data), or None."""
    strategy = str(training.get("eval_strategy", "no")).lower().rsplit(".", 1)[-1]
    return f"training.eval_strategy is {training['eval_strategy']!r}" if strategy != "no" else None


def load_splits(cfg: RunConfig, *, need_eval: bool = False) -> tuple[Any, Any | None]:
    """The training and evaluation tables, columns checked, image paths made absolute and checked."""
    spec = cfg.data
    train = read_table(spec.train, spec.format, spec.train_split, "data.train")
    evaluation = None
    if spec.eval is not None:
        evaluation = read_table(spec.eval, spec.format, spec.eval_split, "data.eval")
    elif Path(spec.train).is_dir():
        import datasets

        whole = datasets.load_from_disk(spec.train)
        if isinstance(whole, datasets.DatasetDict) and spec.eval_split in whole:
            evaluation = whole[spec.eval_split]
    if need_eval and evaluation is None:
        raise ConfigError("data.eval: evaluation needs an eval file (or a saved DatasetDict with data.eval_split)")
    during = evaluates_during_training(cfg.training)
    if during and evaluation is None:
        raise ConfigError(
            f"data.eval: {during}, which evaluates during training, but there is no evaluation data; set data.eval "
            "to an eval file, or set training.eval_strategy: no"
        )
    tables = []
    splits = ((train, spec.max_train_samples, spec.train), (evaluation, spec.max_eval_samples, spec.eval or spec.train))
    for table, limit, source in splits:
        if table is not None:
            if limit is not None:
                table = table.select(range(min(limit, len(table))))
            table = _prepare_table(table, cfg, source)
        tables.append(table)
    return tables[0], tables[1]


def task_columns(task: str, spec: DataSpec, columns: Sequence[str]) -> dict[str, str]:
    """The columns a task reads, as ``{config key: column}`` (seq2seq reads whichever inputs exist)."""
    if task == "sequence-classification":
        out = {"text_column": spec.text_column, "label_column": spec.label_column}
        if spec.text_pair_column:
            out["text_pair_column"] = spec.text_pair_column
        return out
    if task == "image-classification":
        return {"image_column": spec.image_column or "", "label_column": spec.label_column}
    if task == "causal-lm":
        return {"text_column": spec.text_column}
    if task == "visual-question-answering":
        return {
            "image_column": spec.image_column or "",
            "question_column": spec.question_column,
            "answer_column": spec.answer_column,
        }
    out = {"target_column": spec.target_column}
    for key in ("source_column", "image_column"):
        if getattr(spec, key) and getattr(spec, key) in columns:
            out[key] = getattr(spec, key)
    if len(out) == 1:
        raise ConfigError(
            f"data.source_column: seq2seq needs a source text column ({spec.source_column!r}) or an image "
            f"column ({spec.image_column!r}); the data has {list(columns)}"
        )
    return out


def _prepare_table(table: Any, cfg: RunConfig, source: str) -> Any:
    columns = task_columns(cfg.task, cfg.data, table.column_names)
    for key, column in columns.items():
        if column not in table.column_names:
            raise ConfigError(
                f"data.{key}: no column {column!r} in {source}{suggest(column, table.column_names)} "
                f"(columns: {', '.join(table.column_names)})"
            )
    table = table.select_columns(list(dict.fromkeys(columns.values())))
    check_values(table, columns, source)
    image = columns.get("image_column")
    if image and getattr(table.features[image], "dtype", None) in ("string", "large_string"):
        table = _absolute_images(table, image, Path(cfg.data.image_root or Path(source).parent), source)
    return table


def _absolute_images(table: Any, column: str, root: Path, source: str) -> Any:
    paths = [p if Path(p).is_absolute() else str(root / p) for p in table[column]]
    for row, path in enumerate(paths):
        if not Path(path).is_file():
            raise ConfigError(f"data.image_column: image {path!r} (row {row} of {source}) does not exist")
    return table.remove_columns(column).add_column(column, paths)


# -- labels -------------------------------------------------------------------------------------
def label_names(cfg: RunConfig, teacher_config: Any, train: Any) -> list[str] | None:
    """Class names (or the VQA answer vocabulary) in id order, or None when the labels are ids already.

    The Teacher's named labels are authoritative (``data.labels`` may only
    repeat them); ``data.labels`` names unnamed classes; otherwise the data
    decide (sorted unique strings, VQA answers by frequency), which is only
    allowed for a Teacher built from ``config:`` (a trained one fixed its order).
    """
    named = named_labels(teacher_config)
    if cfg.data.labels:
        if named and named != list(cfg.data.labels):
            raise ConfigError(f"data.labels: {cfg.data.labels} differ from the Teacher's labels {named}")
        return list(cfg.data.labels)
    if named:
        return named
    if cfg.task == "visual-question-answering":
        counts = Counter(a for v in train[cfg.data.answer_column] for a in _answers(v))
        names = [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    else:
        values = train[cfg.data.label_column]
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
            return None
        names = sorted({str(v) for v in values})
    if cfg.teacher.path is not None:
        raise ConfigError(
            f"data.labels: the Teacher's {teacher_config.num_labels} classes are unnamed (LABEL_0, ...) and the data "
            f"has names; list them in the Teacher's id order, e.g. data.labels: {names[:teacher_config.num_labels]}"
        )
    return names


def check_labels(table: Any, cfg: RunConfig, config: Any, source: str) -> None:
    """Every class label of ``table`` must be one of the model's labels."""
    if cfg.task not in ("sequence-classification", "image-classification"):
        return
    for row, value in enumerate(table[cfg.data.label_column]):
        _label_id(value, config, f"row {row} of {source}")


def _label_id(value: Any, config: Any, where: str) -> int:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        if 0 <= int(value) < config.num_labels:
            return int(value)
    elif str(value) in config.label2id:
        return int(config.label2id[str(value)])
    names = ", ".join(str(config.id2label[i]) for i in range(config.num_labels))
    raise ConfigError(f"data.label_column: label {value!r} ({where}) is not one of the models' labels: {names}")


def _answers(value: Any) -> list[str]:
    return [str(a) for a in value] if isinstance(value, (list, tuple)) else [str(value)]


def answer_scores(value: Any) -> dict[str, float]:
    """VQA soft scores: a list is annotators' answers, score ``min(1, count / 3)``; a string scores 1."""
    if not isinstance(value, (list, tuple)):
        return {str(value): 1.0}
    return {a: min(1.0, c / 3.0) for a, c in Counter(_answers(value)).items()}


# -- images ---------------------------------------------------------------------------------------
def load_image(value: Any) -> Any:
    """A PIL RGB image from a file path, a PIL image, or an ``(H, W[, C])`` / ``(C, H, W)`` array."""
    from PIL import Image

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and value.get("path"):  # undecoded datasets.Image
        value = value["path"]
    if isinstance(value, (str, Path)):
        with Image.open(value) as img:
            return img.convert("RGB")
    array = np.asarray(value)
    if array.ndim == 3 and array.shape[0] in (1, 3) and array.shape[-1] not in (1, 3):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    problem = check_image_array(array)
    if problem:
        raise ValueError(problem)
    if np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
        array = array * 255.0  # floats in [0, 1]; checked above: finite, in [0, 255]
    return Image.fromarray(array.astype(np.uint8)).convert("RGB")


# -- batches --------------------------------------------------------------------------------------
class TaskCollator:
    """Raw rows -> the model's batch for one task.

    ``generation=True`` (seq2seq evaluation) leaves out the labels. Classes are
    read from ``config.label2id`` (classification) or the answer vocabulary
    (``config`` is the Teacher's: integer labels in the data are its ids);
    ``output_config`` is the config of the model the labels are for (default
    ``config``): its label ids, matched to the Teacher's by name, are emitted.
    """

    def __init__(
        self, task: str, spec: DataSpec, *, tokenizer: Any = None, image_processor: Any = None,
        config: Any = None, generation: bool = False, output_config: Any = None,
    ) -> None:
        self.task, self.spec, self.tokenizer, self.image_processor = task, spec, tokenizer, image_processor
        self.config, self.generation = config, generation
        self.output_ids: list[int] | None = None  # output_config's id of each of config's label ids
        if output_config is not None and output_config is not config:
            order = label_permutation(config, output_config)  # config's id of each of output_config's labels
            if order is not None:
                self.output_ids = [order.index(i) for i in range(len(order))]

    def for_model(self, config: Any) -> "TaskCollator":
        """The same collator with labels in the order of the model whose config is ``config``."""
        return TaskCollator(self.task, self.spec, tokenizer=self.tokenizer, image_processor=self.image_processor,
                            config=self.config, generation=self.generation, output_config=config)

    def _out(self, label_id: int) -> int:
        return label_id if self.output_ids is None else self.output_ids[label_id]

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        spec, batch = self.spec, {}
        if self.task == "sequence-classification":
            pairs = [r[spec.text_pair_column] for r in rows] if spec.text_pair_column else None
            batch.update(self._text([r[spec.text_column] for r in rows], pairs))
        elif self.task == "visual-question-answering":
            batch.update(self._text([r[spec.question_column] for r in rows]))
        elif self.task == "seq2seq" and spec.source_column and spec.source_column in rows[0]:
            batch.update(self._text([spec.source_prefix + str(r[spec.source_column]) for r in rows]))
        if spec.image_column and spec.image_column in rows[0]:
            images = [load_image(r[spec.image_column]) for r in rows]
            batch.update(dict(self.image_processor(images=images, return_tensors="pt")))
        if not self.generation:
            batch["labels"] = self.labels(rows)
        return batch

    def without_labels(self) -> "TaskCollator":
        """The same collator for generation: model inputs only."""
        other = copy.copy(self)
        other.generation = True
        return other

    def _text(self, texts: list, pairs: list | None = None) -> dict[str, torch.Tensor]:
        if any(t is None for t in texts + (pairs or [])):
            raise ValueError("a row of the batch has no text (None); every row needs its text column")
        texts = [str(t) for t in texts]
        pairs = [str(p) for p in pairs] if pairs is not None else None
        encoded = self.tokenizer(
            texts, pairs, padding=True, truncation=True, max_length=self.spec.max_length, return_tensors="pt"
        )
        return dict(encoded)

    def labels(self, rows: list[dict]) -> torch.Tensor:
        spec = self.spec
        if self.task in ("sequence-classification", "image-classification"):
            return torch.tensor([self._out(_label_id(r[spec.label_column], self.config, "batch")) for r in rows])
        if self.task == "visual-question-answering":
            scores = torch.zeros(len(rows), self.config.num_labels)
            for i, row in enumerate(rows):
                for answer, score in answer_scores(row[spec.answer_column]).items():
                    if answer in self.config.label2id:
                        scores[i, self._out(int(self.config.label2id[answer]))] = score
            return scores
        targets = [self.references(r)[0] for r in rows]
        encoded = self.tokenizer(
            text_target=targets, padding=True, truncation=True, max_length=spec.max_target_length, return_tensors="pt"
        )
        labels = encoded["input_ids"]
        return labels.masked_fill(encoded["attention_mask"] == 0, -100)

    def references(self, row: dict) -> list[str]:
        """The reference texts of a seq2seq row (a string or a list of strings)."""
        value = row[self.spec.target_column]
        return [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]


def expand_references(table: Any, spec: DataSpec) -> Any:
    """Training rows for seq2seq: one row per reference when the target column holds lists."""
    column = spec.target_column
    if table.features[column].__class__.__name__ not in ("List", "Sequence", "LargeList"):
        return table

    def explode(batch: dict) -> dict:
        out: dict[str, list] = {k: [] for k in batch}
        for i, refs in enumerate(batch[column]):
            for ref in refs:
                for k in batch:
                    out[k].append(ref if k == column else batch[k][i])
        return out

    return table.map(explode, batched=True)
