"""Write causal_lm_train.txt and causal_lm_eval.txt: English prose from the Python standard library's docstrings.

The text is the documentation of Python's standard library (Copyright Python
Software Foundation, PSF License Agreement), as found in the docstrings of the
modules listed below. One paragraph per line; paragraphs with doctest or indented
(code) lines, or of fewer than 12 words, are left out. Training and evaluation text
come from different modules, so the evaluation text is held out. Rerunning
with another Python version gives slightly different text; the committed
files were written with Python 3.11.

    python examples/data/make_causal_lm_text.py
"""

from __future__ import annotations

import importlib
import inspect
import re
from pathlib import Path

TRAIN_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message",
    "fractions", "functools", "gettext", "heapq", "inspect", "ipaddress", "json", "logging", "pathlib", "pickle",
    "pprint", "random", "shutil", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "typing", "unittest.case", "urllib.parse", "zipfile",
)
EVAL_MODULES = ("configparser", "enum", "calendar", "queue", "smtplib", "optparse", "ftplib", "imaplib")
TRAIN_BYTES, EVAL_BYTES = 76_000, 16_000
MIN_WORDS = 12


def docstrings(module_name: str) -> list[str]:
    """The module's docstring, then those of its public classes, functions and methods, in source order.

    The same rule as ``amad.bench.llm_text``'s, written again on purpose: this script imports no amad, since
    importing transformers adds methods to ``logging.Logger`` (``warning_advice``) and so changes the text."""
    module = importlib.import_module(module_name)
    found = [inspect.getdoc(module) or ""]
    for name, value in vars(module).items():
        if name.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            found.append(inspect.getdoc(value) or "")
        if inspect.isclass(value):
            found += [inspect.getdoc(m) or "" for n, m in vars(value).items()
                      if not n.startswith("_") and inspect.isfunction(m)]
    return found


def paragraphs(text: str) -> list[str]:
    out = []
    for block in re.split(r"\n\s*\n", text):
        raw = [line for line in block.splitlines() if line.strip()]
        if any(line.startswith((" ", "\t", ">>>", "$", "%")) for line in raw):  # code, doctests, tables
            continue
        joined = " ".join(line.strip() for line in raw)
        if len(joined.split()) >= MIN_WORDS and joined.isascii():
            out.append(joined)
    return out


def write(path: Path, modules: tuple[str, ...], budget: int) -> None:
    seen, lines, size = set(), [], 0
    for module in modules:
        for doc in docstrings(module):
            for paragraph in paragraphs(doc):
                if paragraph in seen or size + len(paragraph) + 1 > budget:
                    continue
                seen.add(paragraph)
                lines.append(paragraph)
                size += len(paragraph) + 1
    path.write_text("\n".join(lines) + "\n")
    print(f"{path}: {len(lines)} lines, {size} bytes")


if __name__ == "__main__":
    here = Path(__file__).resolve().parent
    write(here / "causal_lm_train.txt", TRAIN_MODULES, TRAIN_BYTES)
    write(here / "causal_lm_eval.txt", EVAL_MODULES, EVAL_BYTES)
