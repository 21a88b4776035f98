"""The alpha of a benchmark cell: ``factor * alpha_auto``, or the paper's (:mod:`amad.bench.fair`).

``alpha_auto`` is measured by the Distiller itself: the cell's training is started with ``alpha="auto"``
(same Student initialisation, data order and training arguments) and stopped as soon as the Distiller has
fixed its alpha (``distiller.alpha_frozen``); the numbers are then read from ``distiller.alpha``. The
measuring Distiller is thrown away, so this does not depend on how "auto" measures. The result is cached as
JSON (one file per setting, method and seed), so every factor of the grid scales the same numbers.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

from transformers import TrainerCallback

from .fair import PAPER_ALPHA, Variant


class StopWhenAlphaFixed(TrainerCallback):
    """Stop training at the end of the first step after which the Distiller's alpha is fixed."""

    def __init__(self, distiller: Any) -> None:
        self.distiller = distiller

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.distiller.alpha_frozen:
            control.should_training_stop = True
        return control


def measure_auto_alpha(distiller: Any, train: Callable[[list], None]) -> list[float]:
    """Run ``train(callbacks)`` (the cell's training) on ``distiller`` (built with ``alpha="auto"``) until its alpha
    is fixed; return one alpha per layer pair."""
    if distiller.alpha_frozen:
        raise ValueError("measure_auto_alpha needs a Distiller built with alpha='auto' that has not measured yet")
    train([StopWhenAlphaFixed(distiller)])
    if not distiller.alpha_frozen:
        raise RuntimeError("alpha='auto' was still not fixed when the cell's training ended (fewer steps than "
                           "alpha_batches?)")
    return [float(a) for a in distiller.alpha]


def cached_auto_alpha(path: Path, measure: Callable[[], list[float]]) -> list[float]:
    """``measure()``'s numbers, stored in ``path`` on first use (atomically: parallel workers may race)."""
    if path.is_file():
        return [float(a) for a in json.loads(path.read_text())["alpha_auto"]]
    values = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"alpha_auto": values}))
    os.replace(tmp, path)
    return values


def alpha_path(out: Path, task: str, base: str, seed: int) -> Path:
    return Path(out) / "cache" / "alpha" / f"{task}__{base.replace('+', '_')}__seed{seed}.json"


def cell_alpha(variant: Variant, auto: Callable[[], list[float]]) -> tuple[float | list[float] | str, dict]:
    """``(alpha, extra loss options)`` of a cell: the paper's number with reduction "paper", ``factor * alpha_auto``
    per layer pair (``auto()`` measures or reads it), or ``"auto"`` for a name without ``@`` (and no loss)."""
    if variant.paper:
        return PAPER_ALPHA[variant.loss], {"reduction": "paper"}
    if variant.factor is None:
        return "auto", {}
    return [variant.factor * a for a in auto()], {}
