"""Text of another domain for the real-Teacher benchmark: sentences of Python standard-library docstrings.

The Students of ``amad demo --real`` are distilled on the *language reference* (``pydoc_data.topics``);
their retrieval agreement with the Teacher is also measured on the *library's API docstrings*, which they
never train on: the first paragraph of the docstring of every public module, class, function and method of
:data:`MODULES` (``inspect.getdoc``), cut into sentences by the rule of
:func:`amad.bench.minilm_text.doc_sentences`, without any sentence of the training text, unique and sorted;
then a fixed-seed sample. The text (hence the numbers) changes with the Python version, like the training text.
"""

from __future__ import annotations

import importlib
import inspect
import random
from typing import Any, Iterator, Sequence

from .minilm_text import _LIST_MARKER, _SENTENCE_END, _is_sentence, doc_sentences

# Pure-Python modules whose import has no side effect (no GUI, no network, no output), in a fixed order.
MODULES: tuple[str, ...] = (
    "abc", "argparse", "ast", "base64", "bisect", "calendar", "collections", "configparser", "contextlib", "copy",
    "csv", "dataclasses", "datetime", "decimal", "difflib", "email.message", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq", "hmac", "html.parser",
    "http.client", "http.cookies", "imaplib", "inspect", "ipaddress", "json", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "pathlib", "pickle", "pkgutil", "platform", "plistlib", "poplib", "pprint",
    "queue", "quopri", "random", "reprlib", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socketserver", "statistics", "string", "struct", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "timeit", "tokenize", "traceback", "types", "typing", "unittest.case", "urllib.parse",
    "urllib.request", "uuid", "warnings", "weakref", "wsgiref.simple_server", "xml.dom.minidom", "zipfile",
)


def _public(obj: Any) -> Iterator[tuple[str, Any]]:
    for name, member in inspect.getmembers(obj):
        if not name.startswith("_"):
            yield name, member


def _docstrings(module_name: str) -> Iterator[str]:
    """The docstrings of a module, its public classes and functions defined there, and those classes' methods."""
    module = importlib.import_module(module_name)
    yield inspect.getdoc(module) or ""
    for _, member in _public(module):
        if getattr(member, "__module__", None) != module.__name__:
            continue  # imported from elsewhere
        if inspect.isclass(member) or inspect.isfunction(member):
            yield inspect.getdoc(member) or ""
        if inspect.isclass(member):
            for _, method in _public(member):
                if inspect.isfunction(method) or inspect.ismethoddescriptor(method):
                    yield inspect.getdoc(method) or ""


def docstring_sentences(modules: Sequence[str] = MODULES, *, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The prose sentences of the docstrings' first paragraphs, minus every training sentence; unique, sorted."""
    training = set(doc_sentences(min_words=min_words, max_words=max_words))
    found = set()
    for module_name in modules:
        for doc in _docstrings(module_name):
            paragraph = " ".join(line.strip() for line in doc.split("\n\n", 1)[0].splitlines())
            for sentence in _SENTENCE_END.split(paragraph):
                sentence = _LIST_MARKER.sub("", sentence.strip())
                if sentence and _is_sentence(sentence, min_words, max_words) and sentence not in training:
                    found.add(sentence)
    if not found:
        raise RuntimeError("no docstring sentence found: is Python running with -OO (docstrings stripped)?")
    return sorted(found)


def other_domain_sentences(tokenizer: Any, max_length: int, count: int, seed: int = 0) -> list[str]:
    """``count`` docstring sentences of at most ``max_length`` tokens (none is cut), drawn with ``seed``; sorted."""
    from .minilm_text import fitting_sentences

    sentences = fitting_sentences(docstring_sentences(), tokenizer, max_length)
    if count > len(sentences):
        raise ValueError(f"only {len(sentences)} docstring sentences of at most {max_length} tokens; asked {count}")
    return sorted(random.Random(seed).sample(sentences, count))
