"""What ``amad tune`` writes about its study: a Markdown table of the trials and the metric-against-alpha plot."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["Row", "markdown_report", "alpha_figure", "mean_alpha"]


@dataclass
class Row:
    """One trial of the study, as reported."""

    number: int
    state: str
    loss: str | None
    factor: float | None
    alpha: float | list[float] | None
    temperature: float | None
    value: float | None
    seconds: float | None
    retry_of: int | None = None


def mean_alpha(alpha: float | list[float]) -> float:
    """The alpha of a trial as one number: the mean over layer pairs when there are several."""
    return sum(alpha) / len(alpha) if isinstance(alpha, list) else float(alpha)


def _number(value: Any, digits: str = ".4g") -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return "[" + ", ".join(format(v, digits) for v in value) + "]"
    return format(value, digits)


def _one(alpha: Any) -> Any:
    return alpha[0] if isinstance(alpha, list) and len(alpha) == 1 else alpha


def _search_lines(search: Any, references: dict) -> list[str]:
    opts = search.options
    if opts.sampler == "grid":
        space = f"alpha factors {opts.alpha_factors}"
        temperature = f"temperatures {opts.temperatures}" if opts.temperatures else None
    else:
        space = f"alpha factor log-uniform in {opts.alpha_range}"
        temperature = f"temperature log-uniform in {opts.temperature_range}" if opts.temperature_range else None
    with_t = [name for name in search.losses if search.with_temperature[name]]
    lines = [
        f"- Search: Optuna {'BruteForceSampler (every grid point once)' if opts.sampler == 'grid' else 'TPESampler'}"
        f" (seed {search.seed}), {search.n_trials} trials; losses: {', '.join(search.losses)}.",
        f"- alpha = factor x distill.alpha ({search.cfg.distill.alpha!r}); {space}."
        + ("" if not references else " Reference alpha per loss: "
           + ", ".join(f"{name} {_number(_one(ref))}" for name, ref in references.items()) + "."),
    ]
    if temperature and with_t:
        lines.append(f"- AMAD alignment {temperature} (for {', '.join(with_t)}).")
    budget = f"max_steps {opts.max_steps}" if opts.max_steps else "the config's training: section"
    lines.append(f"- Each trial: `amad distill` on the training part with {budget}, seed {search.cfg.seed}; "
                 f"its run is in trials/N.")
    return lines


def markdown_report(search: Any, rows: list[Row], best: Row | None, where: str, references: dict) -> str:
    """The study as Markdown: the protocol, the best trial and one table row per trial."""
    metric = search.metric
    done = sum(r.state == "COMPLETE" for r in rows)
    lines = [
        f"# amad tune: {search.config_path}",
        "",
        f"- Selection metric: validation {metric} (higher is better) on {where}.",
        "- data.eval (the test split) is not read: score best.yaml on it with `amad evaluate` once, after tuning.",
        *_search_lines(search, references),
        f"- Completed: {done} of {search.n_trials} trials (study.db; running the command again continues it).",
        "",
    ]
    if best is not None:
        temperature = "" if best.temperature is None else f", temperature {best.temperature:.4g}"
        lines += [f"**Best: trial {best.number}**: {best.loss}, alpha {_number(best.alpha)} "
                  f"(factor {best.factor:.4g}){temperature}: validation {metric} {best.value:.2f}. "
                  "Its config: best.yaml (`amad distill best.yaml --out RUN`).", ""]
    lines += [f"| trial | state | loss | alpha factor | alpha | temperature | validation {metric} | seconds |",
              "|---:|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        number = f"**{r.number}**" if best is not None and r.number == best.number else str(r.number)
        state = r.state.lower() + (f" (retry of {r.retry_of})" if r.retry_of is not None else "")
        value = "" if r.value is None else f"{r.value:.2f}"
        lines.append(f"| {number} | {state} | {r.loss or ''} | {_number(r.factor)} | {_number(r.alpha)} | "
                     f"{_number(r.temperature)} | {value} | {_number(r.seconds, '.1f')} |")
    return "\n".join(lines) + "\n"


def alpha_figure(rows: list[Row], metric: str, best: Row | None) -> Figure:
    """Validation metric against alpha (log axis), one series per loss; the best trial starred."""
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    by_loss: dict[str, list[Row]] = defaultdict(list)
    for r in rows:
        if r.state == "COMPLETE" and r.alpha is not None:
            by_loss[r.loss].append(r)
    several_pairs = any(isinstance(r.alpha, list) for rs in by_loss.values() for r in rs)
    for loss, points in sorted(by_loss.items()):
        points.sort(key=lambda r: mean_alpha(r.alpha))
        ax.plot([mean_alpha(r.alpha) for r in points], [r.value for r in points], marker="o", label=loss)
    if best is not None:
        ax.plot([mean_alpha(best.alpha)], [best.value], marker="*", markersize=16, color="gold",
                markeredgecolor="black", linestyle="none", label=f"best (trial {best.number})")
    ax.set_xscale("log")
    ax.set_xlabel("alpha" + (" (mean over layer pairs)" if several_pairs else ""))
    ax.set_ylabel(f"validation {metric}")
    ax.set_title(f"validation {metric} against alpha")
    ax.grid(True, which="both", alpha=0.3)
    if by_loss:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no completed trial yet", ha="center", va="center", transform=ax.transAxes)
    return fig
