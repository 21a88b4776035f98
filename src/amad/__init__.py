"""amad: Attention-Map Alignment Distillation for transformers with different head counts."""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "AttentionInputs": "amad.attention",
    "AttentionRecorder": "amad.capture",
    "Distiller": "amad.distiller",
    "DistillationTrainer": "amad.trainer",
    "losses": "amad.losses",
    "shard_for_fsdp": "amad.distributed",
    "student_from_teacher": "amad.student_init",
    "weighting": "amad.weighting",
}

__all__ = list(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    """Import heavy submodules (transformers) only when they are used."""
    if name in _LAZY:
        module = import_module(_LAZY[name])
        value = module if name in ("losses", "weighting") else getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'amad' has no attribute {name!r}")
