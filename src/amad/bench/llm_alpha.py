"""Alpha in ``amad demo --llm``: each attention method's factor of alpha "auto", chosen on validation blocks.

With ``--alpha-sensitivity`` every attention method is trained on seed 0 at each factor ``f`` of the fair
protocol's grid without its upper end 16 (1/16, 1/4, 1, 4), ``alpha = f * alpha_auto``, and scored on
the validation blocks (cells ``<method>@alpha<f>x``; ``kd@validation`` for logit KD alone). The factor with the
lowest validation KL(Teacher || Student) is the method's choice (a tie goes to the factor closest to 1); where it
is not 1, the method is trained again at that factor on every seed and scored on the test blocks (cells
``<method>@x<f>``), beside the untuned ``alpha="auto"`` cells. The test blocks are never used to choose.
Unlike the other demos' protocol the choice uses one seed: the LLM cells are the dearest.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from .fair import DEFAULT_GRID, tie_rank

# The grid the committed LLM runs used: 16 was added to the other demos' grid later, and here validation KL rose
# with the factor for every method on both Students (all chose 1/16), so a larger factor has nothing to win.
ALPHA_SCALES: tuple[float, ...] = tuple(f for f in DEFAULT_GRID if f <= 4.0)
KD_VALIDATION = "kd@validation"
SELECTION_METRIC = "val_kl_to_teacher"  # lower is better
SELECTION_SEED = 0


def variant_name(method: str, scale: float) -> str:
    """A sensitivity cell (seed 0, validation blocks)."""
    return f"{method}@alpha{scale:g}x"


def tuned_name(method: str, scale: float) -> str:
    """A test cell of ``method`` at its chosen factor."""
    return f"{method}@x{scale:g}"


def is_sensitivity(name: str) -> bool:
    return name == KD_VALIDATION or "@alpha" in name


def chosen_scales(records: Iterable[dict[str, Any]], task: str, methods: Sequence[str]) -> dict[str, float]:
    """``method -> factor`` with the lowest seed-0 validation KL, for each method whose every factor was scored."""
    kl = {(r["method"], r["seed"]): float(r["value"]) for r in records
          if r["task"] == task and r["metric"] == SELECTION_METRIC}
    chosen = {}
    for method in methods:
        values = {s: kl.get((variant_name(method, s), SELECTION_SEED)) for s in ALPHA_SCALES}
        if None in values.values():
            continue
        best = min(values.values())
        chosen[method] = min((s for s, v in values.items() if v == best), key=tie_rank)
    return chosen
