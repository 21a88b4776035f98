"""Every committed fair-protocol run side by side (``docs/results/summary.md``), from each run's
``results_fair.json`` alone (:mod:`amad.bench.fair_report`).

Per setting, on its headline metric (the first of its summary): logit KD, the best row of all (a tuned loss or a
paper-alpha row), the best AMAD row, where the best tuned AMAD variant ranks among the tuned losses, and how many
tuned losses are above or below KD with a 95 % paired interval that excludes 0, and the spread of the tuned losses
(best minus worst test mean). Per tuned loss and setting, its sensitivity to alpha: the test mean at its worst and
its best factor of the grid; per setting, how many losses are worst at which factor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from . import report
from .fair_report import NOT_DISTILLED, format_interval

SUMMARY_FILE = "summary.md"
HEADER = """# The fair-protocol runs side by side

Written by `python benchmarks/fair_summary.py` from each `fair-*/results_fair.json` of this directory (each
run's full tables: its `results.md`; its command and reading: `README.md` here). "Best" is the highest
*test* mean: a description, not a selection (each loss's alpha factor was chosen on validation). "Tuned" rows ran
at the factor validation chose; `@paper` rows at the paper's alpha. Above / below kd: tuned losses whose paired
95 % interval to kd excludes 0, on the side named. Tuned losses' spread: the best minus the worst tuned loss's test
mean. "(incomplete)": a run still in progress (some factor was chosen before every factor had the same seeds).
"""


def load_runs(results_dir: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """``(run directory name, results_fair.json)`` for every ``fair-*`` run of ``results_dir``, sorted by name."""
    runs = []
    for path in sorted(Path(results_dir).glob("fair-*/results_fair.json")):
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); rewrite it by rerunning its run's command") from exc
        missing = {"summary", "rows"} - set(data if isinstance(data, dict) else ())
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: not a fair-protocol report; rerun its run's command")
        runs.append((path.parent.name, data))
    if not runs:
        raise FileNotFoundError(f"no fair-*/results_fair.json under {results_dir}: run a fair-protocol demo first")
    return runs


def _headline_rows(data: dict[str, Any], entry: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in data["rows"] if r["task"] == entry["task"] and r["metric"] == entry["metric"]]


def _tuned(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The attention losses at their chosen factor, best test mean first."""
    tuned = [r for r in rows if r["method"] not in NOT_DISTILLED and r["alpha"] not in (None, "paper")]
    return sorted(tuned, key=lambda r: -r["test"]["mean"])


def _named(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "n/a"
    factor = f" ({entry['alpha']})" if entry["alpha"] != "paper" else ""  # a paper row's name ends in @paper
    return (f"{entry['method'].removeprefix('kd+')}{factor} {entry['test']['mean']:.2f}, "
            f"{format_interval(entry['vs_kd'], signed=True)}")


def _amad_rank(tuned: Sequence[dict[str, Any]]) -> str:
    ranks = [i for i, r in enumerate(tuned, 1) if r["method"].startswith("kd+amad")]
    return f"{ranks[0]} of {len(tuned)}" if ranks else "n/a"


def _sides(tuned: Sequence[dict[str, Any]]) -> str:
    above = sum(1 for r in tuned if r["vs_kd"] and r["vs_kd"]["ci_low"] is not None and r["vs_kd"]["ci_low"] > 0)
    below = sum(1 for r in tuned if r["vs_kd"] and r["vs_kd"]["ci_high"] is not None and r["vs_kd"]["ci_high"] < 0)
    return f"{above} / {below}"


def _losses_spread(tuned: Sequence[dict[str, Any]]) -> str:
    return f"{tuned[0]['test']['mean'] - tuned[-1]['test']['mean']:.2f}" if tuned else "n/a"


def _sensitivity(row: dict[str, Any]) -> dict[str, Any] | None:
    return (row.get("sensitivity") or {}).get("test")


def _worst_factors(by_method: dict[str, dict[str, Any]]) -> str:
    """``x16: 6, x0.0625: 1``: how many losses of a setting score worst at each factor, most frequent first."""
    factors = [test["worst"]["factor"] for test in map(_sensitivity, by_method.values()) if test]
    counts = sorted({f: factors.count(f) for f in factors}.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"x{factor:g}: {n}" for factor, n in counts) or "-"


def _spread(row: dict[str, Any]) -> str:
    test = _sensitivity(row)
    if not test:
        return "-"
    worst, best = test["worst"], test["best"]
    return (f"{best['mean'] - worst['mean']:.1f}: {best['mean']:.2f} (x{best['factor']:g}) / "
            f"{worst['mean']:.2f} (x{worst['factor']:g})")


def render_summary(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    """Markdown: the winners table, then the sensitivity table (losses x settings)."""
    lines = [HEADER, "## What wins", "",
             "| setting (run) | metric | kd [95% CI] | best row, - kd [95% CI] | best AMAD row, - kd [95% CI] | "
             "best tuned AMAD's rank | tuned above / below kd | tuned losses' spread |",
             "|---|---|---|---|---|---|---|---|"]
    columns: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for name, data in runs:
        for entry in data["summary"]:
            tuned = _tuned(_headline_rows(data, entry))
            columns.append((entry["task"], {r["method"]: r for r in tuned}))
            unfinished = " (incomplete)" if any(r.get("alpha_complete") is False for r in tuned) else ""
            lines.append(f"| {entry['task']} ({name}){unfinished} | {report.metric_label(entry['metric'])} | "
                         f"{format_interval(entry['kd'])} | {_named(entry['best'])} | {_named(entry['best_amad'])} | "
                         f"{_amad_rank(tuned)} | {_sides(tuned)} | {_losses_spread(tuned)} |")
    methods = list(dict.fromkeys(m for _, by_method in columns for m in by_method))
    lines += ["", "## Sensitivity to alpha", "",
              "Per tuned loss: test mean at its best minus at its worst factor of the grid: best (factor) / worst "
              "(factor), on the seeds every factor ran.", "",
              "| loss | " + " | ".join(task for task, _ in columns) + " |", "|---|" + "---|" * len(columns)]
    for method in methods:
        cells = [_spread(by_method[method]) if method in by_method else "n/a" for _, by_method in columns]
        lines.append(f"| {method.removeprefix('kd+')} | " + " | ".join(cells) + " |")
    lines.append("| (losses worst at) | " + " | ".join(_worst_factors(by_method) for _, by_method in columns) + " |")
    return "\n".join(lines) + "\n"


def write_summary(results_dir: str | Path) -> Path:
    """Write ``results_dir/summary.md`` from every fair run under it; returns its path."""
    path = Path(results_dir) / SUMMARY_FILE
    path.write_text(render_summary(load_runs(results_dir)))
    return path
