"""The fair-protocol tables (:mod:`amad.bench.fair`): per setting and method, the test numbers of the alpha
factor chosen on validation, the paired difference to logit KD with its 95 % confidence interval, and how much
the metric moves over the grid (sensitivity). Everything is derived from ``results.json`` alone.
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

from . import report
from .fair import Choice, choose_factors, is_validation, parse_variant, selection_metrics, validation_metric

REFERENCE = "kd"

FAIR_NOTE = """Fair protocol: every attention loss ran with alpha = factor x alpha "auto" (alpha "auto" measured by
the Distiller on the cell's first batch, per setting, method and seed) for each factor of the grid; per setting
and method, the factor with the best mean *validation* {metric} over seeds (validation rows carved out of the
training data) is chosen, and its *test* numbers are reported. `@paper`: the paper's own alpha (0.2 MSE-type,
100 KL-type, reduction "paper"), not tuned. Test: mean +- s.e. over seeds (n). Paired difference to `kd`
(logit KD, or the embedding loss alone): mean over seeds of (method - kd) on the same seed, [95 % confidence
interval, t distribution with n - 1 degrees of freedom]; it does not account for the choice of factor. Grid
columns: the worst and best mean over the grid's factors (test, and validation: what the choice saw); a factor
marked '(incomplete)' was chosen before every factor had the same seeds."""


def _per_seed(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, float]]:
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in records:
        values.setdefault((r["task"], r["method"], r["metric"]), {})[r["seed"]] = float(r["value"])
    return values


def _mean(values: dict[int, float]) -> float:
    return sum(values.values()) / len(values)


def _grid_span(values: dict[tuple[str, str, str], dict[int, float]], task: str, choice: Choice, metric: str) -> str:
    """``worst (factor) / best (factor)`` of the mean of ``metric`` over the grid's factors."""
    keys = {f: (task, f"{choice.base}@x{f:g}", metric) for f in choice.validation}
    means = {f: _mean(values[key]) for f, key in keys.items() if key in values}
    if not means:
        return "n/a"
    worst, best = min(means, key=means.get), max(means, key=means.get)
    return f"{means[worst]:.2f} (x{worst:g}) / {means[best]:.2f} (x{best:g})"


def chosen_methods(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """``(task, base method) -> the chosen grid cell's method name``."""
    return {key: choice.name for key, choice in choose_factors(records).items()}


def selected_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The test records the fair tables report: every cell without a grid, and of each grid only the chosen
    factor's (plots and the best AMAD snapshot use these)."""
    chosen = set(chosen_methods(records).items())
    kept = []
    for r in records:
        if is_validation(r["metric"]):
            continue
        variant = parse_variant(r["method"])
        if variant.factor is None or ((r["task"], variant.base), r["method"]) in chosen:
            kept.append(r)
    return kept


def _rows(task: str, bases: Sequence[str], names: set[str], choices: dict[tuple[str, str], Choice]) -> list[tuple]:
    """``(label, method name, choice or None)`` per table row, in order: Teacher, each base method (its chosen
    grid cell), its @paper cell; then anything else recorded."""
    rows: list[tuple] = []
    seen: set[str] = set()
    order = ["teacher", *bases, *sorted({parse_variant(n).base for n in names} - {"teacher", *bases})]
    for base in order:
        choice = choices.get((task, base))
        if choice is not None:
            rows.append((base, choice.name, choice))
            seen |= {f"{base}@x{f:g}" for f in choice.validation}
        elif base in names:
            rows.append((base, base, None))
            seen.add(base)
        for name in sorted(n for n in names if parse_variant(n).base == base and n not in seen):
            if parse_variant(name).factor is None:  # @paper
                rows.append((name, name, None))
                seen.add(name)
    return rows


def render_fair_tables(records: Sequence[dict[str, Any]], *, task_order: Sequence[str] = (),
                       method_order: Sequence[str] = (), metrics: Sequence[str] | None = None,
                       task_notes: dict[str, str] | None = None) -> str:
    """Markdown: per task, one table per test metric (``metrics``, default every test metric of the task)."""
    choices = choose_factors(records)
    chosen_on = selection_metrics(records)
    values = _per_seed(records)
    lines: list[str] = []
    for task in report._ordered({r["task"] for r in records}, task_order):
        names = {r["method"] for r in records if r["task"] == task}
        test_metrics = [m for m in {r["metric"] for r in records if r["task"] == task} if not is_validation(m)]
        if metrics is None:
            wanted = report._ordered(test_metrics, report.PRIMARY_METRICS)
        else:
            wanted = [m for m in metrics if m in test_metrics]
        paper = report.PAPER.get(task)
        lines += [f"## {task}", ""]
        if task_notes and task in task_notes:
            lines += [task_notes[task], ""]
        selection = chosen_on.get(task)
        lines += [f"alpha chosen on: {report.metric_label(validation_metric(selection)) if selection else 'n/a'}.",
                  f"Paper setting: {paper.setting}." if paper else "Paper setting: none comparable.", ""]
        for metric in wanted:
            label = report.metric_label(metric)
            header = ["method", f"{label}: test", f"- {REFERENCE}, paired [95% CI]", "alpha factor",
                      "test over grid: worst / best", "validation over grid: worst / best"]
            header += ["paper"] if paper else []
            lines += [f"### {label}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            reference = values.get((task, REFERENCE, metric), {})
            for row_label, name, choice in _rows(task, method_order, names, choices):
                seeds = values.get((task, name, metric))
                if not seeds:
                    continue
                cell = report.Cell(*report.mean_stderr(list(seeds.values())), len(seeds))
                diff = report.paired_difference(seeds, reference) if name not in ("teacher", REFERENCE) else None
                variant = parse_variant(name)
                if choice is not None:
                    factor = f"x{choice.factor:g}" + ("" if choice.complete else " (incomplete)")
                    spans = [_grid_span(values, task, choice, metric),
                             _grid_span(values, task, choice, validation_metric(metric))]
                else:
                    factor = "paper" if variant.paper else "-"
                    spans = ["-", "-"]
                paired = "reference" if name == REFERENCE else (diff.format() if diff else "n/a")
                row = [row_label, cell.format(), paired, factor, *spans]
                if paper:
                    number = paper.numbers.get(variant.base) if paper.metric == metric else None
                    row.append("n/a" if number is None else number)
                lines.append("| " + " | ".join(row) + " |")
            lines.append("")
        if paper:
            lines += [f"- {note}" for note in paper.notes] + [""]
    return "\n".join(lines)


def write_fair_markdown(path: Any, records: Sequence[dict[str, Any]], *, title: str, preamble: str = "",
                        task_order: Sequence[str] = (), method_order: Sequence[str] = (),
                        metrics: Sequence[str] | None = None, task_notes: dict[str, str] | None = None,
                        all_cells_order: Sequence[str] = ()) -> Any:
    """``results.md``: the fair tables, then every cell's mean +- s.e. (:func:`amad.bench.report.render_markdown`,
    with the paper's numbers) as an appendix."""
    from pathlib import Path

    selection = sorted({report.metric_label(m) for m in selection_metrics(records).values()}) or ["primary metric"]
    parts = [f"# {title}", ""]
    if preamble:
        parts += [preamble.strip(), ""]
    parts += [FAIR_NOTE.format(metric=" / ".join(selection)), ""]
    parts += [render_fair_tables(records, task_order=task_order, method_order=method_order, metrics=metrics,
                                 task_notes=task_notes)]
    appendix = report.render_markdown(records, task_order=task_order, method_order=all_cells_order,
                                      metric_order=[*(metrics or ()), *report.PRIMARY_METRICS],
                                      title="All cells (every factor of the grid; validation columns `val_`)")
    parts += [appendix]
    path = Path(path)
    path.write_text("\n".join(parts))
    return path
