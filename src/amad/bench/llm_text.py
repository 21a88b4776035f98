"""The pieces of ``amad demo --llm`` (the run itself is :mod:`amad.bench.llm_run`): English text Python ships,
its deterministic train / validation / test split into token blocks, and the Students cut from the Teacher.

Text: the prose paragraphs of Python's reference manual (``pydoc_data.topics``, one document per topic) and of
the docstrings of a fixed list of standard-library modules (one document per module), filtered as
:mod:`amad.bench.minilm_text` filters the manual (no headings, grammar rules, interactive examples or code).
A document goes whole to one split, chosen by a hash of its name (``sha256(name) mod 100``: below 10 test,
below 20 validation, else train), so the split depends on nothing but the names and is the same on every
machine and run; the held-out text is other topics and modules than the training text. The text itself
depends on the Python version (its manual and docstrings).

Blocks: each split's documents, in name order, become blocks of ``block_length`` tokens with
:func:`amad.cli.causal_lm.token_blocks` (texts joined with EOS, packed); only full blocks are kept, so no batch
needs padding.

Students: :func:`amad.student_from_teacher` with a uniform subset of the Teacher's layers and fewer heads, head
rule ``"first"`` (Student query head j starts as Teacher query head j of the first kv groups, so the one-to-one
loss pairs each Student head with the Teacher head it was copied from); every other weight is the Teacher's.
The tied token embedding / output head is frozen (the same for every method): it is 28 M of the Student's
parameters, and its gradient and optimizer step would otherwise dominate a small Student's step.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Sequence

from torch import nn

from .minilm_text import _prose_paragraphs

__all__ = [
    "DOC_MODULES", "SPLITS", "corpus_documents", "split_of", "split_texts", "text_blocks", "StudentShape",
    "STUDENT_SHAPES", "build_student", "relation_heads",
]

SPLITS = ("train", "validation", "test")
#: Standard-library modules whose docstrings join the manual's topics (documents ``doc:<module>``).
DOC_MODULES: tuple[str, ...] = (
    "argparse", "asyncio.events", "calendar", "collections", "configparser", "contextlib", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "email.message", "enum", "fractions", "ftplib", "functools", "gettext",
    "heapq", "imaplib", "inspect", "ipaddress", "json", "logging", "optparse", "pathlib", "pickle", "pprint",
    "queue", "random", "shutil", "smtplib", "statistics", "string", "subprocess", "tarfile", "tempfile",
    "textwrap", "threading", "typing", "unittest.case", "urllib.parse", "zipfile",
)
_MIN_WORDS = 8


def _module_docstrings(name: str) -> list[str]:
    """The module's docstring, then those of its public classes, functions and methods, in source order."""
    module = importlib.import_module(name)
    found = [inspect.getdoc(module) or ""]
    for attribute, value in vars(module).items():
        if attribute.startswith("_") or getattr(value, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(value) or inspect.isfunction(value):
            found.append(inspect.getdoc(value) or "")
        if inspect.isclass(value):
            found += [inspect.getdoc(m) or "" for n, m in vars(value).items()
                      if not n.startswith("_") and inspect.isfunction(m)]
    return found


def _prose(texts: Sequence[str]) -> str:
    """The prose paragraphs of ``texts`` with at least ``_MIN_WORDS`` words, one per line."""
    paragraphs = [p for text in texts for p in _prose_paragraphs(text) if len(p.split()) >= _MIN_WORDS]
    return "\n".join(dict.fromkeys(paragraphs))  # unique, in order


def corpus_documents(modules: Sequence[str] = DOC_MODULES, topics: dict[str, str] | None = None) -> dict[str, str]:
    """``{name: text}``: ``topic:<name>`` per ``pydoc_data.topics`` topic, ``doc:<module>`` per module; no empty ones."""
    if topics is None:
        from pydoc_data.topics import topics
    documents = {f"topic:{name}": _prose([text]) for name, text in topics.items()}
    documents.update({f"doc:{name}": _prose(_module_docstrings(name)) for name in modules})
    return {name: text for name, text in sorted(documents.items()) if text}


def split_of(name: str) -> str:
    """The split a document belongs to: ``sha256(name) mod 100`` < 10 test, < 20 validation, else train."""
    bucket = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 100
    return "test" if bucket < 10 else "validation" if bucket < 20 else "train"


def split_texts(documents: dict[str, str]) -> dict[str, list[str]]:
    """Each split's texts (one per document, in name order)."""
    texts: dict[str, list[str]] = {split: [] for split in SPLITS}
    for name in sorted(documents):
        texts[split_of(name)].append(documents[name])
    empty = [split for split, found in texts.items() if not found]
    if empty:
        raise ValueError(f"the text has no document in the {empty} split(s) ({len(documents)} documents)")
    return texts


def text_blocks(documents: dict[str, str], tokenizer: Any, block_length: int) -> dict[str, list[list[int]]]:
    """Each split's full blocks of ``block_length`` token ids (packed; the last, shorter block dropped)."""
    from ..cli.causal_lm import token_blocks

    if block_length < 2:
        raise ValueError(f"block_length must be >= 2; got {block_length}")
    blocks = {}
    for split, texts in split_texts(documents).items():
        blocks[split] = [b for b in token_blocks(texts, tokenizer, block_length, packing=True) if len(b) == block_length]
        if not blocks[split]:
            raise ValueError(f"the {split} split has fewer than {block_length} tokens: no full block")
    return blocks


# -- Students -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StudentShape:
    """A Student of the Teacher's width and head dimension with ``layers`` layers, ``heads`` query heads and
    ``kv_heads`` key/value heads."""

    layers: int
    heads: int
    kv_heads: int

    @property
    def name(self) -> str:
        return f"l{self.layers}-h{self.heads}-kv{self.kv_heads}"


# SmolLM2 is l30-h9-kv3: a third of its heads with 2 or 4 layers, two thirds with 4.
STUDENT_SHAPES: dict[str, StudentShape] = {
    s.name: s for s in (StudentShape(2, 3, 1), StudentShape(4, 3, 1), StudentShape(4, 6, 2))
}


def build_student(teacher: nn.Module, shape: StudentShape) -> nn.Module:
    """The Student of ``shape`` cut from the Teacher (module doc), in train mode, its tied embedding frozen."""
    from ..student_init import student_from_teacher

    student = student_from_teacher(teacher, layers=shape.layers, num_heads=shape.heads,
                                   num_kv_heads=shape.kv_heads, head_rule="first")
    student.get_input_embeddings().weight.requires_grad_(False)
    return student.train()


def relation_heads(teacher: nn.Module, student: nn.Module, candidates: Sequence[int] = (12, 8, 4)) -> int:
    """MiniLMv2's relation head count: the first candidate dividing both query widths ``heads * head_dim``."""
    widths = [m.config.num_attention_heads * m.config.head_dim for m in (teacher, student)]
    found = next((a for a in candidates if all(w % a == 0 for w in widths)), None)
    if found is None:
        raise ValueError(f"no relation head count of {tuple(candidates)} divides the query widths {widths}")
    return found
