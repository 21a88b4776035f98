"""Loaders for real pretrained models that ship as Python packages (no hub downloads).

Also the demo-size VL-T5 and BLIP models (``make_vlt5``, ``make_blip``), imported
lazily so that ``amad.bench.models`` stays light until they are used; importing
``amad.bench.models.vlt5`` registers ``VLT5Config`` with the Auto classes.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

from .minilm import MINILM_PACKAGE, load_minilm, minilm_path

_LAZY = {
    "VLT5Config": "amad.bench.models.vlt5",
    "VLT5ForConditionalGeneration": "amad.bench.models.vlt5",
    "VLT5ForVQA": "amad.bench.models.vlt5",
    "make_vlt5": "amad.bench.models.vlt5",
    "make_blip": "amad.bench.models.blip",
}

__all__ = ["MINILM_PACKAGE", "load_minilm", "minilm_path", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'amad.bench.models' has no attribute {name!r}")
