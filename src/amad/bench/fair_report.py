"""The fair-protocol report (:mod:`amad.bench.fair`), from ``results.json`` alone: per setting, metric and method,
the test numbers of the alpha factor chosen on validation (mean [95 % CI]), the paired difference to logit KD
with its 95 % confidence interval, and the sensitivity to alpha (the worst and best factor of the grid).
:func:`fair_rows` computes it; :func:`render_fair_tables` writes it as markdown, :func:`write_fair_json` as JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Sequence

from . import report
from .fair import Choice, choose_factors, is_validation, parse_variant, selection_metrics, validation_metric

REFERENCE = "kd"
NOT_DISTILLED = ("teacher", "init", "gt", REFERENCE)  # rows that are not an attention loss

FAIR_NOTE = """Fair protocol: every attention loss ran with alpha = factor x alpha "auto" (alpha "auto" measured by
the Distiller on its calibration batches, per setting, method and seed) for each factor of the grid; per setting
and method, the factor with the best mean *validation* {metric} over seeds (validation rows carved out of the
training data) is chosen, and its *test* numbers are reported. `@paper`: the paper's own alpha (0.2 MSE-type,
100 KL-type, reduction "paper"), not tuned. Test: mean over seeds [95 % confidence interval, t distribution with
n - 1 degrees of freedom] (n seeds). Paired difference to `kd` (logit KD, or the embedding loss alone): mean over
seeds of (method - kd) on the same seed [95 % CI]; it does not account for the choice of factor. Sensitivity:
the test mean at the worst and the best factor of the grid over the seeds every factor has (and the validation
means the choice saw); a factor marked '(incomplete)' was chosen before every factor had the same seeds."""
GRID_SEEDS_NOTE = """Grid seeds: only seeds {seeds} ran every factor of the grid (`--grid-seeds`); the later seeds ran each
attention loss at the factor chosen on those seeds' validation scores. The choice and the sensitivity columns use
seeds {seeds}; the test numbers and paired differences, every seed."""


def _per_seed(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], dict[int, float]]:
    values: dict[tuple[str, str, str], dict[int, float]] = {}
    for r in records:
        values.setdefault((r["task"], r["method"], r["metric"]), {})[r["seed"]] = float(r["value"])
    return values


def _grid_means(values: dict, task: str, choice: Choice, metric: str) -> dict[float, float]:
    """factor -> mean of ``metric`` over the seeds the choice compared (over that factor's own seeds where it lacks
    them; factors without a record left out)."""
    means = {}
    for f in choice.validation:
        seeds = values.get((task, f"{choice.base}@x{f:g}", metric), {})
        compared = [seeds[s] for s in choice.compared if s in seeds]
        if compared and len(compared) == len(choice.compared):
            means[f] = sum(compared) / len(compared)
        elif seeds:
            means[f] = sum(seeds.values()) / len(seeds)
    return means


def _extremes(means: dict[float, float]) -> dict[str, Any] | None:
    if not means:
        return None
    worst, best = min(means, key=means.get), max(means, key=means.get)
    return {"worst": {"factor": worst, "mean": means[worst]}, "best": {"factor": best, "mean": means[best]}}


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


def _row_cells(task: str, bases: Sequence[str], names: set[str], choices: dict[tuple[str, str], Choice]
               ) -> list[tuple[str, str, Choice | None]]:
    """``(label, cell method name, choice or None)`` per row, in order: Teacher, each base method (its chosen grid
    cell), its @paper cell; then anything else recorded."""
    rows: list[tuple[str, str, Choice | None]] = []
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


def fair_rows(records: Sequence[dict[str, Any]], *, task_order: Sequence[str] = (), method_order: Sequence[str] = (),
              metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One dict per task, test metric and reported method: ``method``, ``cell`` (the cell's name), ``alpha``
    (``"x<factor>"``, ``"paper"`` or None), ``alpha_complete``, ``test`` (mean, ci_low, ci_high, n), ``vs_kd``
    (the paired difference, or None), ``sensitivity`` (worst/best factor of the grid on test and on validation,
    or None), ``paper`` (the paper's number for this method, or None)."""
    choices = choose_factors(records)
    values = _per_seed(records)
    rows: list[dict[str, Any]] = []
    for task in report._ordered({r["task"] for r in records}, task_order):
        names = {r["method"] for r in records if r["task"] == task}
        test_metrics = [m for m in {r["metric"] for r in records if r["task"] == task} if not is_validation(m)]
        wanted = (report._ordered(test_metrics, report.PRIMARY_METRICS) if metrics is None
                  else [m for m in metrics if m in test_metrics])
        paper = report.PAPER.get(task)
        for metric in wanted:
            reference = values.get((task, REFERENCE, metric), {})
            for label, name, choice in _row_cells(task, method_order, names, choices):
                seeds = values.get((task, name, metric))
                if not seeds:
                    continue
                variant = parse_variant(name)
                diff = None if name in ("teacher", REFERENCE) else report.paired_difference(seeds, reference)
                sensitivity = None
                if choice is not None:
                    sensitivity = {"test": _extremes(_grid_means(values, task, choice, metric)),
                                   "validation": _extremes(_grid_means(values, task, choice,
                                                                       validation_metric(metric)))}
                number = paper.numbers.get(variant.base) if paper and paper.metric == metric else None
                rows.append({
                    "task": task, "metric": metric, "method": label, "cell": name,
                    "alpha": f"x{choice.factor:g}" if choice else ("paper" if variant.paper else None),
                    "alpha_complete": choice.complete if choice else None,
                    "test": report.t_interval(list(seeds.values())).as_dict(),
                    "vs_kd": diff.as_dict() if diff else None,
                    "sensitivity": sensitivity, "paper": number,
                })
    return rows


def format_interval(entry: dict[str, Any] | None, signed: bool = False) -> str:
    if entry is None:
        return "n/a"
    return report.Interval(entry["mean"], entry["ci_low"], entry["ci_high"], entry["n"]).format(signed=signed)


def _span(extremes: dict[str, Any] | None) -> str:
    if not extremes:
        return "n/a"
    worst, best = extremes["worst"], extremes["best"]
    return f"{worst['mean']:.2f} (x{worst['factor']:g}) / {best['mean']:.2f} (x{best['factor']:g})"


def summary_rows(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task (its first metric): logit KD, and the best attention loss and best AMAD variant by test mean, each
    with its paired difference to KD."""
    summary = []
    for task in dict.fromkeys(r["task"] for r in rows):
        metric = next(r["metric"] for r in rows if r["task"] == task)
        here = [r for r in rows if r["task"] == task and r["metric"] == metric]
        losses = [r for r in here if r["method"] not in NOT_DISTILLED]
        amad = [r for r in losses if r["cell"].startswith("kd+amad")]
        best = max(losses, key=lambda r: r["test"]["mean"], default=None)
        best_amad = max(amad, key=lambda r: r["test"]["mean"], default=None)
        kd = next((r for r in here if r["method"] == REFERENCE), None)
        summary.append({"task": task, "metric": metric, "kd": kd and kd["test"],
                        "best": best and {k: best[k] for k in ("method", "alpha", "test", "vs_kd")},
                        "best_amad": best_amad and {k: best_amad[k] for k in ("method", "alpha", "test", "vs_kd")}})
    return summary


def _summary_markdown(summary: Sequence[dict[str, Any]]) -> list[str]:
    def named(entry: dict[str, Any] | None) -> str:
        if entry is None:
            return "n/a"
        paired = format_interval(entry["vs_kd"], signed=True)
        return f"{entry['method']} ({entry['alpha']}): {format_interval(entry['test'])}, vs kd {paired}"

    lines = ["## Summary", "", "| setting | metric | kd | best attention loss | best AMAD variant |",
             "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['task']} | {report.metric_label(s['metric'])} | {format_interval(s['kd'])} | "
                     f"{named(s['best'])} | {named(s['best_amad'])} |")
    return lines + ["", "Best = highest test mean (a description, not a selection: alpha is chosen on validation). "
                    "A difference to kd counts as a win or a loss only when its 95 % interval excludes 0.", ""]


def render_fair_tables(records: Sequence[dict[str, Any]], *, task_order: Sequence[str] = (),
                       method_order: Sequence[str] = (), metrics: Sequence[str] | None = None,
                       task_notes: dict[str, str] | None = None) -> str:
    """Markdown: a summary, then per task one table per test metric (``metrics``, default every test metric)."""
    rows = fair_rows(records, task_order=task_order, method_order=method_order, metrics=metrics)
    chosen_on = selection_metrics(records)
    lines = _summary_markdown(summary_rows(rows))
    for task in dict.fromkeys(r["task"] for r in rows):
        paper = report.PAPER.get(task)
        selection = chosen_on.get(task)
        lines += [f"## {task}", ""]
        if task_notes and task in task_notes:
            lines += [task_notes[task], ""]
        lines += [f"alpha chosen on: {report.metric_label(validation_metric(selection)) if selection else 'n/a'}.",
                  f"Paper setting: {paper.setting}." if paper else "Paper setting: none comparable.", ""]
        for metric in dict.fromkeys(r["metric"] for r in rows if r["task"] == task):
            label = report.metric_label(metric)
            header = ["method", f"{label}: test [95% CI]", f"- {REFERENCE}, paired [95% CI]", "alpha factor",
                      "sensitivity, test: worst / best factor", "validation: worst / best factor"]
            header += ["paper"] if paper else []
            lines += [f"### {label}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            for row in (r for r in rows if r["task"] == task and r["metric"] == metric):
                factor = row["alpha"] or "-"
                if row["alpha_complete"] is False:
                    factor += " (incomplete)"
                spans = ([_span(row["sensitivity"]["test"]), _span(row["sensitivity"]["validation"])]
                         if row["sensitivity"] else ["-", "-"])
                paired = ({REFERENCE: "reference", "teacher": "-"}.get(row["method"])
                          or format_interval(row["vs_kd"], True))
                test = f"{format_interval(row['test'])} (n={row['test']['n']})"
                cells = [row["method"], test, paired, factor, *spans]
                if paper:
                    cells.append("n/a" if row["paper"] is None else row["paper"])
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
        if paper:
            lines += [f"- {note}" for note in paper.notes] + [""]
    return "\n".join(lines)


def write_fair_json(path: str | Path, records: Sequence[dict[str, Any]], *, task_order: Sequence[str] = (),
                    method_order: Sequence[str] = (), metrics: Sequence[str] | None = None) -> Path:
    """``results_fair.json``: ``{"selection_metric": {task: metric}, "summary": [...], "rows": [...]}``
    (:func:`summary_rows`, :func:`fair_rows`)."""
    rows = fair_rows(records, task_order=task_order, method_order=method_order, metrics=metrics)
    data = {"selection_metric": {t: validation_metric(m) for t, m in sorted(selection_metrics(records).items())},
            "summary": summary_rows(rows), "rows": rows}
    path = Path(path)
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


def grid_seeds_note(records: Sequence[dict[str, Any]]) -> str:
    """The note for grids whose later seeds ran the chosen factor only: final choices (every other factor on the
    compared seeds alone) with more seeds at the chosen factor; "" when there is none. A run still in progress,
    whose other factors also have extra seeds, is not one (its rows say '(incomplete)')."""
    grid_seeds = sorted({c.compared for c in choose_factors(records).values()
                         if c.complete and len(c.seeds[c.factor]) > len(c.compared)})
    return GRID_SEEDS_NOTE.format(seeds=" / ".join(", ".join(map(str, s)) for s in grid_seeds)) if grid_seeds else ""


def write_fair_markdown(path: Any, records: Sequence[dict[str, Any]], *, title: str, preamble: str = "",
                        task_order: Sequence[str] = (), method_order: Sequence[str] = (),
                        metrics: Sequence[str] | None = None, task_notes: dict[str, str] | None = None,
                        all_cells_order: Sequence[str] = ()) -> Any:
    """``results.md`` (the fair tables, then every cell's mean +- s.e. as an appendix, with the paper's numbers)
    and ``results_fair.json`` beside it (:func:`write_fair_json`)."""
    selection = sorted({report.metric_label(m) for m in selection_metrics(records).values()}) or ["primary metric"]
    parts = [f"# {title}", ""]
    if preamble:
        parts += [preamble.strip(), ""]
    parts += [FAIR_NOTE.format(metric=" / ".join(selection)), ""]
    note = grid_seeds_note(records)
    if note:
        parts += [note, ""]
    parts += [render_fair_tables(records, task_order=task_order, method_order=method_order, metrics=metrics,
                                 task_notes=task_notes)]
    appendix = report.render_markdown(records, task_order=task_order, method_order=all_cells_order,
                                      metric_order=[*(metrics or ()), *report.PRIMARY_METRICS],
                                      title="All cells (every factor of the grid; validation columns `val_`)")
    parts += [appendix]
    path = Path(path)
    path.write_text("\n".join(parts))
    write_fair_json(path.with_name("results_fair.json"), records, task_order=task_order, method_order=method_order,
                    metrics=metrics)
    return path
