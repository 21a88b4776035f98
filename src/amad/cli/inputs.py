"""What is wrong with a user's file, in words: data files, the values in their rows, damaged model directories.

The ``datasets`` library and ``from_pretrained`` report a broken file from deep
inside (``An error occurred while generating the dataset``, ``incomplete
metadata``, a ``JSONDecodeError`` without a file name). These functions find
the file, line or row at fault so the command line can say it in one line:

* :func:`read_failure`: why a JSON / JSON-lines / CSV file could not be read
  (empty, a header without rows, the first line that is not valid JSON);
* :func:`check_values`: every row of the columns a task reads has a value of
  the right kind (no missing text, no NaN pixel, no pixel outside [0, 255]);
* :func:`damaged_file`: the first ``*.safetensors`` / ``*.json`` file of a
  model directory that cannot be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ConfigError

__all__ = ["read_failure", "check_values", "check_image_array", "damaged_file", "unreadable", "where"]

#: Columns that hold text (a string per row); ``target_column`` / ``answer_column`` may hold lists of strings.
TEXT_KEYS = ("text_column", "text_pair_column", "question_column", "source_column")
TEXT_OR_LIST_KEYS = ("target_column", "answer_column")
GENERIC = "An error occurred while generating the dataset"


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(str(text).split())[:limit]


# -- data files --------------------------------------------------------------------------------------
def _exception_chain(exc: BaseException) -> str:
    """The messages of ``exc`` and its causes, without the generic wrappers, innermost last."""
    parts, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        text = _one_line(exc)
        if text and GENERIC not in text:
            parts.append(f"{type(exc).__name__}: {text}" if not parts else text)
        exc = exc.__cause__ or exc.__context__
    return "; ".join(parts) or "unknown error"


def _bad_json(text: str) -> str | None:
    """The first line of a JSON or JSON-lines text that is not a JSON object, in words."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.strip()), 0)
    try:
        head = json.loads(lines[first])
    except json.JSONDecodeError:
        head = None
    if not isinstance(head, dict):  # one JSON document (a list of rows, or an object of columns)
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            return f"line {exc.lineno}, column {exc.colno}: not valid JSON ({exc.msg})"
        if isinstance(document, list):
            for i, row in enumerate(document):
                if not isinstance(row, dict):
                    return f"item {i} of the top-level list is {type(row).__name__}, not an object {{...}}"
        return None
    for number, line in enumerate(lines, start=1):  # JSON lines: one object per line
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            return f"line {number}, column {exc.colno}: not valid JSON ({exc.msg})"
        if not isinstance(row, dict):
            return f"line {number} is {type(row).__name__}, not a JSON object {{...}}"
    return None


def read_failure(path: str, fmt: str, exc: BaseException) -> str:
    """Why ``datasets`` could not read the ``fmt`` file ``path``: the line at fault when it can be found."""
    file = Path(path)
    if file.is_file():
        text = file.read_text(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return "the file is empty (no rows)"
        if fmt == "csv" and len(lines) == 1:
            return "the file has a header line but no rows"
        if fmt == "json":
            bad = _bad_json(text)
            if bad:
                return f"{bad}; fix or remove that line"
    return _exception_chain(exc)


def where(source: str, row: int) -> str:
    """``line L of FILE`` for JSON lines (the row's own line), else ``row N of FILE (counting from 0)``."""
    file = Path(source)
    if file.suffix.lower() == ".jsonl" and file.is_file():
        with file.open(errors="replace") as handle:
            seen = -1
            for number, line in enumerate(handle, start=1):
                seen += bool(line.strip())
                if seen == row:
                    return f"line {number} of {source}"
    return f"row {row} of {source} (counting from 0)"


# -- values in rows ------------------------------------------------------------------------------------
def _flat(values: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    while any(check(values.type) for check in (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)):
        values = pc.list_flatten(values)
    return values


def _first(mask: Any) -> int:
    import pyarrow.compute as pc

    return int(pc.index(mask, True).as_py())


def check_image_array(value: Any) -> str | None:
    """What is wrong with an image given as an array (None if nothing): shape, dtype, NaN, range."""
    array = np.asarray(value)
    if array.dtype == object or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
        return f"an image array must hold numbers; got {array.dtype} values"
    if array.ndim not in (2, 3):
        return f"an image array must be (H, W), (H, W, C) or (C, H, W); got shape {array.shape}"
    if array.size and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        return f"the image array (shape {array.shape}) contains {bad} NaN or infinite values"
    low, high = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if low < 0 or high > 255:
        return (f"the image array has values from {low:g} to {high:g}; pixels must be in [0, 1] (floats) or "
                "[0, 255] (rescale the data; values outside are not clipped)")
    return None


def _image_problems(table: Any, column: str, key: str, source: str) -> None:
    """Arrays of pixels: NaN, infinite, or outside [0, 255] in any row is an error naming the row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    feature = table.features[column]
    if type(feature).__name__ == "Image" or getattr(feature, "dtype", None) in ("string", "large_string"):
        return  # decoded images and file paths: checked when opened / by _absolute_images
    values = _flat(table.with_format("arrow")[column])
    if not (pa.types.is_integer(values.type) or pa.types.is_floating(values.type)):
        suspicious = True
    else:
        suspicious = values.null_count > 0
        if pa.types.is_floating(values.type) and not suspicious:
            suspicious = bool(pc.any(pc.invert(pc.is_finite(values))).as_py())
        bounds = pc.min_max(values)
        low, high = bounds["min"].as_py(), bounds["max"].as_py()
        suspicious = suspicious or (low is not None and (low < 0 or high > 255))
    if not suspicious:
        return
    for row, value in enumerate(table[column]):  # only on the error path: find the row
        try:
            problem = check_image_array(value)
        except (TypeError, ValueError) as exc:  # ragged nested lists, None inside
            problem = f"not an array of pixels ({_one_line(exc, 120)})"
        if problem:
            raise ConfigError(f"data.{key}: {problem} ({where(source, row)})")


def check_values(table: Any, columns: dict[str, str], source: str) -> None:
    """Every row has a value in each column a task reads (``columns``: ``{config key: column}``), of the right kind."""
    import pyarrow.compute as pc

    for key, column in columns.items():
        values = table.with_format("arrow")[column]
        if values.null_count:
            row = _first(pc.is_null(values))
            raise ConfigError(
                f"data.{key}: {where(source, row)} has no value in column {column!r} (missing or null); "
                "give every row a value, or remove the row"
            )
        feature = table.features[column]
        dtype = getattr(feature, "dtype", None)
        is_text = dtype in ("string", "large_string")
        if key in TEXT_KEYS and not is_text:
            raise ConfigError(f"data.{key}: column {column!r} of {source} holds {feature}, not text (strings)")
        scalar = type(feature).__name__ == "Value"
        if key == "answer_column" and scalar:
            continue  # answers may be numbers ("2"): compared as text
        if key in TEXT_OR_LIST_KEYS and not is_text:
            inner = getattr(feature, "feature", None)
            ok = ("string", "large_string") + (("int64", "int32", "float64") if key == "answer_column" else ())
            if getattr(inner, "dtype", None) not in ok:
                raise ConfigError(
                    f"data.{key}: column {column!r} of {source} holds {feature}, not text or a list of texts"
                )
            flat = pc.list_flatten(values)
            if flat.null_count:
                offsets = pc.list_value_length(values)
                row = _row_of_flat_index(offsets, _first(pc.is_null(flat)))
                raise ConfigError(f"data.{key}: {where(source, row)} has a null in its list in column {column!r}")
            empty = pc.equal(pc.list_value_length(values), 0)
            if pc.any(empty).as_py():
                raise ConfigError(f"data.{key}: {where(source, _first(empty))} has an empty list in column {column!r}")
        if key == "image_column":
            _image_problems(table, column, key, source)


def _row_of_flat_index(lengths: Any, index: int) -> int:
    total = 0
    for row, length in enumerate(lengths.to_pylist()):
        total += length or 0
        if index < total:
            return row
    return len(lengths) - 1


# -- model directories ---------------------------------------------------------------------------------
def damaged_file(directory: str | Path) -> str | None:
    """``"NAME (why)"`` for the first ``*.safetensors`` or ``*.json`` file in ``directory`` that cannot be read."""
    folder = Path(directory)
    if not folder.is_dir():
        return None
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(path), framework="pt") as handle:
                    handle.keys()
            elif path.suffix == ".json":
                json.loads(path.read_text())
        except Exception as exc:  # whatever the reader raises says the file is damaged
            return f"{path.name} ({type(exc).__name__}: {_one_line(exc, 160)})"
    return None


def unreadable(key: str, directory: str | Path, what: str, exc: BaseException) -> Exception:
    """The error for a model / tokenizer / processor in ``directory`` that failed to load with ``exc``.

    A damaged file becomes a :class:`ConfigError` naming it; otherwise ``exc`` itself is returned.
    """
    damaged = damaged_file(directory)
    if damaged is None:
        return exc
    return ConfigError(
        f"{key}: cannot load the {what} in {str(directory)!r}: {damaged}; the file is damaged or truncated: "
        "save it again with save_pretrained (or download it again)"
    )
