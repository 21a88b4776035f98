"""Results of the demo benchmark: the records file, the Markdown table and the plots.

``results.json`` is a list of records ``{"task", "method", "seed", "metric",
"value"}``, one per evaluated run and metric (the Teacher's own score is
recorded as method ``"teacher"``). It is rewritten atomically after every
finished cell, so an interrupted run loses at most the cell in progress.
``results.md`` and the plots are always derived from it alone.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

RECORD_KEYS = ("task", "method", "seed", "metric", "value")

PRIMARY_METRICS = ("accuracy", "cider", "bleu", "bleu4", "cosine_pct")

PREAMBLE = """Offline demo on the generated Shapes data (scale {scale}): tiny Teachers and Students trained
from scratch on this machine. The absolute numbers are not comparable with the paper's (other data,
models hundreds of times smaller, minutes of CPU training); what can be compared is the ordering of
methods and the size of the gaps relative to the seed-to-seed spread. Every method gets the same
Student initialisation per seed, the same data order, steps and hyper-parameters; alpha: below."""

METRIC_LABELS = {
    "accuracy": "accuracy (%)",
    "bleu4": "BLEU-4",
    "cider": "CIDEr",
    "bleu": "BLEU",
    "cosine_pct": "embedding cosine (%)",
    "top1_pct": "top-1 agreement (%)",
    "top5_pct": "top-5 agreement (%)",
    "stdlib_cosine_pct": "stdlib docstrings: embedding cosine (%)",
    "stdlib_top1_pct": "stdlib docstrings: top-1 agreement (%)",
    "stdlib_top5_pct": "stdlib docstrings: top-5 agreement (%)",
}


def metric_label(metric: str) -> str:
    """A metric's column label; validation metrics (``val_<metric>``) say so."""
    if metric.startswith("val_"):
        return f"validation {METRIC_LABELS.get(metric[4:], metric[4:])}"
    return METRIC_LABELS.get(metric, metric)


@dataclass(frozen=True)
class PaperReference:
    """What the paper reported for the setting one of our tasks stands in for."""

    setting: str
    metric: str
    numbers: dict[str, str]  # as the paper prints them
    notes: tuple[str, ...] = field(default_factory=tuple)


# The paper's numbers (docs/method.md, section 12). Method names are ours ("kd+amad-mse" = L_KD + AMAD variant 1, ...).
PAPER: dict[str, PaperReference] = {
    "vqa": PaperReference(
        "VQA-2.0 Karpathy test, VL-T5 base (12 heads) -> small (8 heads), Student without VL pre-training",
        "accuracy",
        {"teacher": "68.75", "gt": "56.44", "kd": "66.39", "kd+amad-kl": "67.79"},
        ("The paper says 'AMAD' for this setting without naming the variant; it is shown beside variant 2, the paper's headline AMAD (its Tables 2 and 6).",),
    ),
    "vqa-pretrained": PaperReference(
        "VQA-2.0 Karpathy test, VL-T5 base (12 heads) -> small (8 heads), Student VL-pre-trained",
        "accuracy",
        {
            "teacher": "68.75", "gt": "66.72", "kd": "67.74", "kd+one-to-one": "67.73", "kd+amad-mse": "67.96",
            "kd+amad-kl": "68.06", "kd+amad-projected": "68.02", "kd+amad-token": "68.05",
        },
        ("Paper: AMAD mean over runs 68.02 +- 0.02 (s.e.).",),
    ),
    "caption": PaperReference(
        "COCO captioning, BLIP large -> base, Student from random initialisation",
        "cider",
        {"gt": "65.1", "kd+amad-kl": "95.0"},
        ("Paper: 'CIDEr 65.1 -> 95.0 with AMAD'; we read 65.1 as the Student without distillation and "
         "show 95.0 beside variant 2, the paper's headline AMAD.",
         "The paper's COCO captioning with VL-T5 (Student pre-trained): Teacher 115.1, Student 108.2, + L_KD 111.8, "
         "+ RKD-D 113.4, + AMAD 114.4 (CIDEr) - another architecture, not shown in the table.",),
    ),
    "translation-pretrained": PaperReference(
        "Multi30K En-De, VL-T5 small Student (VL-pre-trained)",
        "bleu",
        {"teacher": "44.00", "gt": "41.90", "kd+amad-kl": "43.88"},
        ("Paper: 'BLEU 41.90 -> 43.88 with AMAD'; we read 41.90 as the Student without distillation and show "
         "43.88 beside variant 2, the paper's headline AMAD.",),
    ),
}


# -- records -----------------------------------------------------------------
def validate_record(record: Any) -> dict[str, Any]:
    """Check one record's keys and types; return it as a plain dict."""
    if not isinstance(record, dict) or set(record) != set(RECORD_KEYS):
        raise ValueError(f"a result record needs exactly the keys {RECORD_KEYS}; got {record!r}")
    for key in ("task", "method", "metric"):
        if not isinstance(record[key], str) or not record[key]:
            raise ValueError(f"record field {key!r} must be a non-empty string; got {record[key]!r}")
    if isinstance(record["seed"], bool) or not isinstance(record["seed"], int):
        raise ValueError(f"record field 'seed' must be an int; got {record['seed']!r}")
    value = record["value"]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"record field 'value' must be a finite number; got {value!r} in {record!r}")
    return {key: record[key] for key in RECORD_KEYS}


def load_results(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records in ``path`` (an empty list when it does not exist yet)."""
    path = Path(path)
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path} must hold a JSON list of records; got {type(data).__name__}")
    return [validate_record(r) for r in data]


def save_results(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> None:
    """Write the records atomically (a crash never leaves a half-written file)."""
    path = Path(path)
    records = [validate_record(r) for r in records]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1) + "\n")
    os.replace(tmp, path)


def append_results(path: str | os.PathLike, new: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add records, replacing any earlier record of the same task/method/seed/metric."""
    new = [validate_record(r) for r in new]
    keys = {(r["task"], r["method"], r["seed"], r["metric"]) for r in new}
    kept = [r for r in load_results(path) if (r["task"], r["method"], r["seed"], r["metric"]) not in keys]
    records = kept + new
    save_results(path, records)
    return records


# -- statistics ----------------------------------------------------------------
def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and standard error ``sd / sqrt(n)`` (sample sd, ddof=1); the error is None when n < 2."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_stderr needs at least one value")
    mean = sum(values) / n
    if n < 2:
        return mean, None
    variance = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(variance / n)


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t distribution with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(probability, df))


@dataclass(frozen=True)
class Interval:
    """A mean over seeds and its confidence interval (``low``/``high`` None when n < 2)."""

    mean: float
    low: float | None
    high: float | None
    n: int

    def format(self, digits: int = 2, signed: bool = False) -> str:
        sign = "+" if signed else ""
        interval = "n/a" if self.low is None else f"{self.low:{sign}.{digits}f}, {self.high:{sign}.{digits}f}"
        return f"{self.mean:{sign}.{digits}f} [{interval}]"

    def as_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """``mean +- t * se`` with ``t`` the ``(1 + confidence) / 2`` quantile of Student's t with ``n - 1`` degrees
    of freedom and ``se = sd / sqrt(n)`` (sample sd); no interval when n < 2."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    mean, stderr = mean_stderr(values)
    if stderr is None:
        return Interval(mean, None, None, len(values))
    half = t_quantile((1 + confidence) / 2, len(values) - 1) * stderr
    return Interval(mean, mean - half, mean + half, len(values))


def paired_difference(values: dict[int, float], reference: dict[int, float],
                      confidence: float = 0.95) -> Interval | None:
    """:func:`t_interval` of ``d_s = values[s] - reference[s]`` over the seeds both have; None when none is shared."""
    seeds = sorted(set(values) & set(reference))
    if not seeds:
        return None
    return t_interval([values[s] - reference[s] for s in seeds], confidence)


@dataclass(frozen=True)
class Cell:
    """Summary of one task/method/metric over its seeds."""

    mean: float
    stderr: float | None
    n: int

    def format(self, digits: int = 2) -> str:
        error = "n/a" if self.stderr is None else f"{self.stderr:.{digits}f}"
        return f"{self.mean:.{digits}f} +- {error} (n={self.n})"


def summarise(records: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], Cell]:
    """``(task, method, metric) -> Cell`` over seeds."""
    groups: dict[tuple[str, str, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["task"], r["method"], r["metric"]), []).append(float(r["value"]))
    return {key: Cell(*mean_stderr(values), len(values)) for key, values in groups.items()}


def _ordered(items: Iterable[str], order: Sequence[str]) -> list[str]:
    rank = {name: i for i, name in enumerate(order)}
    return sorted(set(items), key=lambda x: (rank.get(x, len(rank)), x))


# -- Markdown ------------------------------------------------------------------
def render_markdown(
    records: Sequence[dict[str, Any]],
    *,
    task_order: Sequence[str] = (),
    method_order: Sequence[str] = (),
    metric_order: Sequence[str] = ("accuracy", "cider", "bleu4", "bleu"),
    preamble: str = "",
    task_notes: dict[str, str] | None = None,
    title: str = "AMAD demo benchmark",
) -> str:
    """One table per task: our mean +- s.e. per method and metric, the paper's number beside it (no paper
    columns for a task the paper has no comparable setting for)."""
    summary = summarise(records)
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += [
        "Ours: mean +- standard error (sd/sqrt(n), over seeds; n/a when n = 1). Paper: docs/method.md, section 12; "
        "'n/a' where the paper has no number for that method, setting or metric.",
        "",
    ]
    for task in _ordered((k[0] for k in summary), task_order):
        paper = PAPER.get(task)
        metrics = _ordered((k[2] for k in summary if k[0] == task), metric_order)
        methods = _ordered((k[1] for k in summary if k[0] == task), ["teacher", *method_order])
        lines += [f"## {task}", ""]
        if task_notes and task in task_notes:
            lines += [task_notes[task], ""]
        lines.append(f"Paper setting: {paper.setting}." if paper else "Paper setting: none comparable.")
        lines.append("")
        header = ["method"]
        paper_metrics = {m for m in metrics if not m.startswith("val_")}  # the paper has no validation numbers
        for metric in metrics:
            label = metric_label(metric)
            header += [f"{label} (ours)", f"{label} (paper)"] if paper and metric in paper_metrics else [label]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for method in methods:
            row = [method]
            for metric in metrics:
                cell = summary.get((task, method, metric))
                row.append(cell.format() if cell else "not run")
                if paper and metric in paper_metrics:
                    number = paper.numbers.get(method) if paper.metric == metric else None
                    row.append("n/a" if number is None else number)
            lines.append("| " + " | ".join(row) + " |")
        if paper:
            lines += [""] + [f"- {note}" for note in paper.notes]
        lines.append("")
    return "\n".join(lines)


def write_markdown(path: str | os.PathLike, records: Sequence[dict[str, Any]], **options: Any) -> Path:
    path = Path(path)
    path.write_text(render_markdown(records, **options))
    return path


# -- plots ---------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_metric_bars(
    records: Sequence[dict[str, Any]],
    plots_dir: str | os.PathLike,
    *,
    method_order: Sequence[str] = (),
) -> list[Path]:
    """One PNG per task and metric: mean per Student method with s.e. error bars, the Teacher as a line."""
    plt = _pyplot()
    plots_dir = Path(plots_dir)
    plots_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(records)
    written = []
    for task, metric in sorted({(k[0], k[2]) for k in summary}):
        methods = _ordered((k[1] for k in summary if k[0] == task and k[2] == metric and k[1] != "teacher"),
                           method_order)
        if not methods:
            continue
        cells = [summary[(task, m, metric)] for m in methods]
        fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(methods) + 2), 3.8))
        errors = [c.stderr or 0.0 for c in cells]
        colours = ["tab:orange" if m.startswith("kd+amad") else "tab:blue" for m in methods]
        ax.bar(range(len(methods)), [c.mean for c in cells], yerr=errors, capsize=3, color=colours)
        teacher = summary.get((task, "teacher", metric))
        if teacher is not None:
            ax.axhline(teacher.mean, color="black", linestyle="--", linewidth=1, label=f"Teacher {teacher.mean:.2f}")
            ax.legend(loc="lower right", fontsize=8)
        low = min(c.mean - e for c, e in zip(cells, errors))
        high = max([c.mean + e for c, e in zip(cells, errors)] + ([teacher.mean] if teacher else []))
        margin = max(0.05 * (high - low), 0.5)
        ax.set_ylim(max(0.0, low - 4 * margin), high + margin)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=40, ha="right", fontsize=8)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(f"{task}: {metric_label(metric)} (mean +- s.e. over seeds)", fontsize=9)
        fig.tight_layout()
        path = plots_dir / f"{task}-{metric}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# -- attention snapshots ---------------------------------------------------------
def primary_metric(metrics: Iterable[str]) -> str:
    metrics = set(metrics)
    for name in PRIMARY_METRICS:
        if name in metrics:
            return name
    return sorted(metrics)[0]


def best_amad_runs(records: Sequence[dict[str, Any]]) -> dict[str, tuple[str, int]]:
    """Per task: the AMAD method with the best mean primary metric, and its best seed."""
    best: dict[str, tuple[str, int]] = {}
    for task in sorted({r["task"] for r in records}):
        mine = [r for r in records if r["task"] == task and r["method"].startswith("kd+amad")]
        if not mine:
            continue
        metric = primary_metric(r["metric"] for r in mine)
        mine = [r for r in mine if r["metric"] == metric]
        summary = summarise(mine)
        method = max(sorted({r["method"] for r in mine}), key=lambda m: summary[(task, m, metric)].mean)
        run = max((r for r in mine if r["method"] == method), key=lambda r: (r["value"], -r["seed"]))
        best[task] = (method, run["seed"])
    return best


def plot_snapshot(snapshot_file: str | os.PathLike, plots_dir: str | os.PathLike, stem: str) -> list[Path]:
    """For each distilled layer pair of a stored snapshot: the similarity/alignment matrices and every head's map
    (figures from :mod:`amad.cli.plotting`)."""
    import numpy as np
    import torch

    from ..cli.plotting import head_maps_figure, save_figure, similarity_figure
    from ..losses import alignment_matrix, head_similarity

    plots_dir = Path(plots_dir)
    data = np.load(snapshot_file)
    written = []
    for i, pair in enumerate(data["pairs"]):
        teacher, student = torch.from_numpy(data[f"teacher_{i}"]), torch.from_numpy(data[f"student_{i}"])
        if teacher.shape[-1] * teacher.shape[-2] == 1:  # a 1 x 1 map (one decoder token) shows nothing
            continue
        similarity = head_similarity(teacher[None], student[None])[0]
        alignment = alignment_matrix(teacher[None], student[None], variant="mse")[0]
        figure = similarity_figure(similarity, alignment, title=f"{stem}: {pair}")
        written.append(save_figure(figure, plots_dir / f"{stem}-pair{i}-similarity.png"))
        figure = head_maps_figure(teacher, student, title=f"{stem}: {pair} (first test example)")
        written.append(save_figure(figure, plots_dir / f"{stem}-pair{i}-maps.png"))
    return written
