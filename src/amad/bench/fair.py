"""The benchmarks' fair protocol: every attention loss gets its weight from one grid, chosen on validation data.

- Cells: ``gt`` and ``kd`` have no attention loss, hence no alpha. A method ``kd+<loss>`` runs once per factor
  ``f`` of the grid (default 1/16, 1/4, 1, 4, 16) as ``kd+<loss>@x<f>``, with ``alpha = f * alpha_auto``:
  ``alpha_auto`` is what the Distiller's ``alpha="auto"`` measures for that setting, method and seed on the
  cell's own calibration batches (:mod:`amad.bench.alpha`), so ``@x1`` is the untuned "auto" run.
- Why that grid: alpha "auto" makes the attention term pull on the Student as hard as the KD term (gradient-norm
  balance), the one point where neither term's loss decides alone; 4 and 1/4 let either term dominate by 4x. Each
  end was added when a full run's *validation* scores chose it: 1/16 after Shapes captioning (grid 1/4, 1, 4) chose
  1/4 for 4 of its 8 losses, 16 after Shapes VQA (grid 1/16 .. 4) chose 4 for SHD and MiniLMv2 relations in both
  VQA settings and for head-mean with a pre-trained Student. Five points cost five cells per loss and seed; a
  finer grid (``--alpha-grid``) costs more. An optimum at an end of the grid is visible in the report (its
  sensitivity columns).
- ``kd+<loss>@paper``: the paper's hand-set alpha (0.2 for its MSE-type losses, 100 for its KL-type ones) with
  the losses' "paper" reduction, for the losses the paper used (:data:`PAPER_ALPHA`): a row of its own.
- Records: test metrics under their own names, validation metrics as ``val_<metric>`` (:func:`validation_metric`).
- Selection (:func:`choose_factors`): per setting and method, the factor whose mean validation metric over
  seeds is best (every metric here is higher-is-better; the mean over the seeds every factor has); a tie goes to
  the factor closest to 1 (in log scale), then to the smaller one. Only the chosen factor's *test* numbers are
  reported as the method's.
- Grid seeds (:func:`grid_choices`, ``amad demo --real --grid-seeds K``): where cells are dear, only seeds
  ``0 .. K-1`` run the grid; a later seed runs each loss at the factor chosen on those seeds' validation scores,
  so the choice still never sees a test score and the later seeds cannot change it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

DEFAULT_GRID: tuple[float, ...] = (0.0625, 0.25, 1.0, 4.0, 16.0)
# The command line's default grid per scale: --quick keeps to its time (x1: alpha "auto", untuned).
DEFAULT_GRIDS: dict[str, tuple[float, ...]] = {"tiny": (1.0,), "quick": (1.0,), "full": DEFAULT_GRID}
PAPER = "paper"
VALIDATION_PREFIX = "val_"
# The paper's alpha (docs/method.md, section 5), tuned for the "paper" reductions: 0.2 for the MSE-type losses
# (AMAD variant 1, its Student-to-Teacher form, the one-to-one baseline on the same normalised maps), 100 for the
# KL-type AMAD variants. The other losses are not the paper's: they get no @paper row.
PAPER_ALPHA: dict[str, float] = {
    "amad-mse": 0.2, "amad-s2t": 0.2, "one-to-one": 0.2,
    "amad-kl": 100.0, "amad-token": 100.0, "amad-projected": 100.0,
}


def parse_grid(text: str | Sequence[float]) -> tuple[float, ...]:
    """``"0.3,1,3"`` (or numbers) -> sorted unique positive factors; a bad entry is an error naming it."""
    items = [s.strip() for s in text.split(",")] if isinstance(text, str) else list(text)
    factors = []
    for item in items:
        try:
            value = float(item)
        except (TypeError, ValueError):
            raise ValueError(f"--alpha-grid: {item!r} is not a number; give factors of alpha 'auto' like 0.3,1,3") \
                from None
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"--alpha-grid: factors must be finite and > 0; got {item!r}")
        factors.append(value)
    if not factors:
        raise ValueError("--alpha-grid: give at least one factor, e.g. 1")
    return tuple(sorted(set(factors)))


@dataclass(frozen=True)
class Variant:
    """One cell's method: ``base`` (``gt``, ``kd``, ``kd+<loss>``) and how its alpha is set."""

    base: str
    factor: float | None = None  # alpha = factor * alpha_auto
    paper: bool = False  # alpha = PAPER_ALPHA[loss], reduction "paper"

    @property
    def name(self) -> str:
        if self.paper:
            return f"{self.base}@{PAPER}"
        return self.base if self.factor is None else f"{self.base}@x{self.factor:g}"

    @property
    def loss(self) -> str | None:
        return self.base[3:] if self.base.startswith("kd+") else None


def parse_variant(name: str) -> Variant:
    """The inverse of :attr:`Variant.name`: ``kd+amad-kl@x0.3``, ``kd+amad-kl@paper``, ``kd``, ..."""
    base, _, tag = name.partition("@")
    if not tag:
        return Variant(base)
    if base in ("gt", "kd") or not base.startswith("kd+"):
        raise ValueError(f"method {name!r}: only kd+<loss> methods have an alpha (@x<factor> or @paper)")
    if tag == PAPER:
        if base[3:] not in PAPER_ALPHA:
            raise ValueError(f"method {name!r}: the paper gives no alpha for {base[3:]!r} "
                             f"(only for {', '.join(PAPER_ALPHA)})")
        return Variant(base, paper=True)
    if tag.startswith("x"):
        return Variant(base, factor=parse_grid(tag[1:])[0])
    raise ValueError(f"method {name!r}: the part after '@' must be x<factor> or {PAPER!r}")


def expand_methods(methods: Iterable[str], grid: Sequence[float], paper: bool = True) -> list[str]:
    """The cells' method names: ``gt``/``kd`` once, every ``kd+<loss>`` per grid factor (then ``@paper``)."""
    names: list[str] = []
    for base in methods:
        if not base.startswith("kd+"):
            names.append(base)
            continue
        names += [Variant(base, factor=f).name for f in grid]
        if paper and base[3:] in PAPER_ALPHA:
            names.append(Variant(base, paper=True).name)
    return names


def variant_order(methods: Iterable[str], grid: Sequence[float] = DEFAULT_GRID) -> list[str]:
    """Table order: each base method, then its grid cells and its @paper cell."""
    order: list[str] = []
    for base in methods:
        order += [base, *[n for n in expand_methods([base], grid) if n != base]]
    return order


def validation_metric(metric: str) -> str:
    return VALIDATION_PREFIX + metric


def is_validation(metric: str) -> bool:
    return metric.startswith(VALIDATION_PREFIX)


def with_validation(test: dict[str, float], validation: dict[str, float]) -> dict[str, float]:
    """One cell's scores: the test metrics as they are, the validation ones prefixed."""
    return {**test, **{validation_metric(k): v for k, v in validation.items()}}


# -- selection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Choice:
    """The grid of one setting and method: mean validation metric per factor and the chosen factor."""

    task: str
    base: str
    factor: float
    validation: dict[float, float]  # factor -> mean validation metric over the compared seeds
    seeds: dict[float, tuple[int, ...]]  # factor -> seeds with a validation record
    compared: tuple[int, ...] = ()  # the seeds every factor has, the means' seeds; () when none: each its own

    @property
    def name(self) -> str:
        return Variant(self.base, factor=self.factor).name

    @property
    def complete(self) -> bool:
        """The choice is final: every factor but the chosen one has exactly the compared seeds (seeds beyond them
        only at the chosen factor, run after the choice: ``grid_seeds``). Else it may change when the run resumes."""
        return bool(self.compared) and all(set(s) == set(self.compared) for f, s in self.seeds.items()
                                           if f != self.factor)


def tie_rank(factor: float) -> tuple[float, float]:
    """Order of preference among equally scored factors: closest to 1 in log scale, then the smaller."""
    return abs(math.log(factor)), factor


def selection_metrics(records: Iterable[dict[str, Any]]) -> dict[str, str]:
    """``task -> metric`` the grid is chosen on: the task's primary metric (:func:`amad.bench.report.primary_metric`)
    among its validation metrics."""
    from .report import primary_metric

    found: dict[str, set[str]] = {}
    for r in records:
        if is_validation(r["metric"]):
            found.setdefault(r["task"], set()).add(r["metric"][len(VALIDATION_PREFIX):])
    return {task: primary_metric(metrics) for task, metrics in found.items()}


def choose_factors(records: Iterable[dict[str, Any]], metrics: dict[str, str] | None = None
                   ) -> dict[tuple[str, str], Choice]:
    """``(task, base method) -> Choice`` from the ``val_<metric>`` records of the grid cells (never the test ones);
    ``metrics``: ``task -> metric`` (default :func:`selection_metrics`)."""
    records = list(records)
    metrics = selection_metrics(records) if metrics is None else metrics
    values: dict[tuple[str, str], dict[float, dict[int, float]]] = {}
    for r in records:
        if r["task"] not in metrics or r["metric"] != validation_metric(metrics[r["task"]]) or "@" not in r["method"]:
            continue
        variant = parse_variant(r["method"])
        if variant.factor is None:
            continue
        values.setdefault((r["task"], variant.base), {}).setdefault(variant.factor, {})[r["seed"]] = float(r["value"])
    choices = {}
    for (task, base), grid in values.items():
        compared = set.intersection(*(set(v) for v in grid.values()))
        means = {f: sum(v[s] for s in (compared or v)) / len(compared or v) for f, v in grid.items()}
        best = max(means.values())
        factor = min((f for f, m in means.items() if m == best), key=tie_rank)
        choices[(task, base)] = Choice(task, base, factor, means, {f: tuple(sorted(v)) for f, v in grid.items()},
                                       tuple(sorted(compared)))
    return choices


def grid_choices(records: Iterable[dict[str, Any]], task: str, bases: Iterable[str], grid: Sequence[float],
                 grid_seeds: int) -> dict[str, str]:
    """``base -> the chosen cell's name`` for seeds that run one factor only: chosen on the validation records of
    seeds ``0 .. grid_seeds - 1`` of ``task``, each of which must have every factor of ``grid`` (else a ValueError
    naming the missing cells)."""
    records = [r for r in records if r["task"] == task and r["seed"] < grid_seeds]
    bases = [b for b in bases if b.startswith("kd+")]
    present = {(r["method"], r["seed"]) for r in records if is_validation(r["metric"])}
    missing = [f"{Variant(b, factor=f).name} seed {s}" for b in bases for f in grid for s in range(grid_seeds)
               if (Variant(b, factor=f).name, s) not in present]
    if missing:
        raise ValueError(f"{task}: the alpha grid of seeds 0..{grid_seeds - 1} is not finished, so no factor can be "
                         f"chosen for the later seeds; missing {len(missing)} cell(s): {', '.join(missing[:6])}"
                         f"{' ...' if len(missing) > 6 else ''}. Run those seeds first (same --out, --first-seed 0 "
                         f"--seeds {grid_seeds}).")
    choices = choose_factors(records)
    return {b: choices[(task, b)].name for b in bases}
