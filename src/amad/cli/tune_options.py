"""The ``tune:`` section of a run config: what ``amad tune`` searches and how (``amad distill`` ignores it).

Plain data, checked when the config is read (no torch, no optuna). The search
space per trial: the attention loss (one of ``losses``), a factor on the
config's ``distill.alpha`` (``alpha = factor * distill.alpha``; ``"auto"`` is
measured once per loss) and, for losses that take one, the alignment
``temperature``. ``sampler: tpe`` draws factors and temperatures log-uniformly
from ``alpha_range`` / ``temperature_range``; ``sampler: grid`` tries every
combination of ``alpha_factors`` and ``temperatures``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["TuneOptions", "DEFAULT_TPE_TRIALS", "flag_overrides", "require_optuna"]

#: Trials of a TPE search when ``n_trials`` is not given.
DEFAULT_TPE_TRIALS = 20


def _positive(values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0 for v in values)


def _check_range(name: str, value: list[float] | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if value is None or len(value) != 2 or not _positive(value) or value[0] > value[1]:
        raise ValueError(f"{name}: expected [low, high] with 0 < low <= high, got {value!r}")


def _check_values(name: str, value: list[float] | None, *, optional: bool) -> None:
    if value is None and optional:
        return
    if not value or not _positive(value) or len(set(value)) != len(value):
        raise ValueError(f"{name}: expected a non-empty list of distinct numbers > 0, got {value!r}")


@dataclass
class TuneOptions:
    """How ``amad tune`` searches (see docs/tuning.md).

    ``losses``: attention losses to compare (default: ``distill.attention_loss``).
    ``loss_options``: options per loss name (default: ``distill.attention_loss_options`` for
    ``distill.attention_loss``, none for the others).
    ``sampler``: ``tpe`` (Optuna's TPE, seeded) or ``grid`` (every combination, in a seeded order).
    ``n_trials``: trials in the study (default 20 for tpe, the whole grid for grid).
    ``alpha_range`` / ``alpha_factors``: factors of ``distill.alpha`` (tpe / grid).
    ``temperature_range`` / ``temperatures``: the alignment temperature of losses that have one
    (tpe / grid); null keeps the loss's own.
    ``max_steps``: each trial's ``training.max_steps`` (default: the config's training budget).
    ``validation``: a separate validation file; without one, ``validation_fraction`` of
    ``data.train`` is held out (``data.eval``, the test split, is never used).
    ``metric``: the validation metric to maximise (default: the task's first).
    ``seed``: of the sampler and of the held-out split (default: the config's ``seed``).
    """

    losses: list[str] | None = None
    loss_options: dict[str, Any] = field(default_factory=dict)
    sampler: Literal["tpe", "grid"] = "tpe"
    n_trials: int | None = None
    alpha_range: list[float] = field(default_factory=lambda: [0.1, 10.0])
    alpha_factors: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0])
    temperature_range: list[float] | None = field(default_factory=lambda: [0.25, 4.0])
    temperatures: list[float] | None = field(default_factory=lambda: [0.5, 1.0, 2.0])
    max_steps: int | None = None
    validation: str | None = field(default=None, metadata={"path": True})
    validation_fraction: float = 0.1
    metric: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.losses is not None and (not self.losses or len(set(self.losses)) != len(self.losses)):
            raise ValueError(f"losses: expected a non-empty list of distinct loss names, got {self.losses!r}")
        for name, value in self.loss_options.items():
            if not isinstance(value, dict):
                raise ValueError(f"loss_options.{name}: expected a mapping of the loss's options, got {value!r}")
        _check_range("alpha_range", self.alpha_range, optional=False)
        _check_values("alpha_factors", self.alpha_factors, optional=False)
        _check_range("temperature_range", self.temperature_range, optional=True)
        _check_values("temperatures", self.temperatures, optional=True)
        for name in ("n_trials", "max_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}: must be >= 1, got {value!r}")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction: must be between 0 and 1, got {self.validation_fraction!r}")


#: ``amad tune`` flags and the ``tune.`` key each one sets.
FLAGS = {
    "losses": "losses", "sampler": "sampler", "n_trials": "n_trials", "max_steps": "max_steps",
    "validation": "validation", "validation_fraction": "validation_fraction", "metric": "metric", "seed": "seed",
}


def flag_overrides(args: Any) -> list[str]:
    """The ``--set tune.KEY=VALUE`` items the command line flags of ``amad tune`` stand for."""
    out = []
    for attr, key in FLAGS.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        if attr == "losses":
            value = "[" + ", ".join(name.strip() for name in value.split(",") if name.strip()) + "]"
        out.append(f"tune.{key}={value}")
    return out


def require_optuna() -> None:
    """``amad tune`` runs on Optuna (the ``tune`` extra); say so when it is missing (looked up, not imported)."""
    from importlib.util import find_spec

    if find_spec("optuna") is None:
        raise ConfigError("amad tune needs optuna, which is not installed; install the 'tune' extra: "
                          "pip install 'amad[tune]'")
