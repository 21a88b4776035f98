"""The demo's schedule: Teachers first (cached), then pre-trained Students (cached), then one cell per
(task setting, seed, method); cells already in ``results.json`` are skipped, every finished cell is
appended to it at once. Jobs run in ``jobs`` worker processes (each with ``threads`` torch threads):
tiny models use two processes on two cores better than one process with two threads.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..cli.run_dir import exclusive_lock
from . import fair_report, report
from .fair import DEFAULT_GRID, expand_methods, variant_order
from .jobs import EXTRA_METHODS, METHODS, Job, fingerprint, parse_method, quiet, run_job, snapshot_path
from .tasks import get_setting


@dataclass
class DemoSettings:
    out: Path
    scale: str = "quick"
    seeds: int = 2
    first_seed: int = 0  # seeds first_seed .. first_seed + seeds - 1 (to split a run by seed)
    tasks: Sequence[str] = ()
    methods: Sequence[str] = METHODS
    jobs: int = 1
    threads: int = 0  # torch threads per job; 0: the cores divided by jobs
    plots: bool = True
    echo: Callable[[str], None] = field(default=print)
    alpha_grid: Sequence[float] = DEFAULT_GRID  # factors of alpha "auto" (amad.bench.fair)
    paper_alpha: bool = True  # also a kd+<loss>@paper cell for the paper's losses


@dataclass
class DemoSummary:
    trained: list[tuple[str, str, int]]
    skipped: list[tuple[str, str, int]]
    failed: list[tuple[str, str, int]]
    seconds: float
    results: Path
    table: Path


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _timing(result: dict) -> str:
    return f"{result['seconds']:.1f}s, CPU {result['cpu']:.1f}s"


def _format_scores(scores: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in scores.items()) or "done"


def seed_range(settings: Any) -> range:
    """The seeds a run trains: ``first_seed .. first_seed + seeds - 1``."""
    return range(settings.first_seed, settings.first_seed + settings.seeds)


class Pool:
    """Run jobs in this process (``jobs == 1``) or in spawned worker processes; ``work(job)`` (a module-level
    function) runs one. When a worker dies (killed, out of memory), the pool is rebuilt and its unfinished jobs
    run again, at most ``rebuilds`` times per run; after that they are reported failed."""

    def __init__(self, jobs: int, threads: int, work: Callable[[Any], dict] = run_job, rebuilds: int = 2) -> None:
        self.jobs, self.threads, self.work, self.rebuilds = jobs, threads, work, rebuilds
        self.executor = None
        if jobs > 1:
            self.executor = self._executor()
        else:
            quiet(threads)

    def _executor(self) -> ProcessPoolExecutor:
        context = multiprocessing.get_context("spawn")
        return ProcessPoolExecutor(self.jobs, mp_context=context, initializer=quiet, initargs=(self.threads,))

    def run(self, jobs: Iterable[Job], on_done: Callable[[Job, dict | None, str | None], None]) -> None:
        """Run every job; ``on_done(job, result, error)`` is called in this process as each one finishes."""
        jobs = list(jobs)
        if self.executor is None:
            for job in jobs:
                try:
                    result = self.work(job)
                except Exception:  # a failed cell must not lose the others: reported, run goes on
                    on_done(job, None, traceback.format_exc())
                else:
                    on_done(job, result, None)
            return
        rebuilds = 0
        while jobs:
            pending: dict[Future, Job] = {self.executor.submit(self.work, job): job for job in jobs}
            jobs = []
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    job = pending.pop(future)
                    error = future.exception()
                    if isinstance(error, BrokenProcessPool) and rebuilds < self.rebuilds:
                        jobs.append(job)  # its worker died: run it again in a new pool
                        continue
                    text = None if error is None else "".join(traceback.format_exception(error))
                    on_done(job, None if error else future.result(), text)
            if jobs:
                rebuilds += 1
                self.executor.shutdown(wait=False, cancel_futures=True)
                self.executor = self._executor()

    def close(self, interrupted: bool = False) -> None:
        """Wait for the workers to exit; after an error or Ctrl-C, drop queued jobs and do not wait."""
        if self.executor is not None:
            self.executor.shutdown(wait=not interrupted, cancel_futures=True)


def _check_run_file(out: Path, scale: str, budgets: dict[str, str]) -> None:
    """Refuse to mix results of another scale or budget into the same directory."""
    path = out / "run.json"
    stored = json.loads(path.read_text()) if path.exists() else {"scale": scale, "budgets": {}}
    clash = sorted(t for t, h in budgets.items() if stored["budgets"].get(t, h) != h)
    if stored["scale"] != scale or clash:
        raise ValueError(
            f"{out} holds results of another configuration (scale {stored['scale']!r}, now {scale!r}; budgets "
            f"differ for {clash or 'none'}); use another --out, or delete {out / 'results.json'} and {path}"
        )
    stored["budgets"].update(budgets)
    path.write_text(json.dumps(stored, indent=1, sort_keys=True))


@dataclass
class _Plan:
    """What a run has to do, derived from the settings and what results.json already holds."""

    cells: list[tuple[str, str, int]]
    skipped: list[tuple[str, str, int]]
    teachers: list[Job]
    pretrains: list[Job]
    cell_jobs: list[Job]


def _plan(settings: DemoSettings, out: Path) -> _Plan:
    task_settings = [get_setting(name) for name in settings.tasks]
    methods = expand_methods([parse_method(m).name for m in settings.methods], settings.alpha_grid,
                             settings.paper_alpha)
    if not task_settings or not methods or settings.seeds < 1 or settings.first_seed < 0:
        raise ValueError("the demo needs at least one task, one method, one seed and a first seed >= 0")
    budgets = {s.task.name: s.task.budget(settings.scale) for s in task_settings}
    _check_run_file(out, settings.scale, {name: fingerprint(asdict(b)) for name, b in budgets.items()})

    done = {(r["task"], r["method"], r["seed"]) for r in report.load_results(out / "results.json")}
    cells = [(s.name, m, seed) for s in task_settings for seed in seed_range(settings) for m in methods]
    todo = [c for c in cells if c not in done]
    need = {get_setting(t).task.name for t, _, _ in todo}
    need |= {s.task.name for s in task_settings if (s.name, "teacher", 0) not in done}
    first: dict[str, str] = {}  # task -> its first setting; pre-training only for pre-trained settings
    first_pretrained: dict[str, str] = {}
    for s in task_settings:
        first.setdefault(s.task.name, s.name)
        if s.pretrained:
            first_pretrained.setdefault(s.task.name, s.name)
    pretrains = sorted({(get_setting(t).task.name, seed) for t, _, seed in todo if get_setting(t).pretrained})
    return _Plan(
        cells=cells,
        skipped=[c for c in cells if c in done],
        teachers=[Job("teacher", first[t], settings.scale, str(out)) for t in first if t in need],
        pretrains=[Job("pretrain", first_pretrained[t], settings.scale, str(out), seed) for t, seed in pretrains],
        cell_jobs=[Job("cell", t, settings.scale, str(out), seed, m) for t, m, seed in todo],
    )


class _Run:
    """Callbacks of one run: record results as jobs finish and print progress."""

    def __init__(self, settings: DemoSettings, out: Path, plan: _Plan) -> None:
        self.settings, self.out, self.plan, self.echo = settings, out, plan, settings.echo
        self.results = out / "results.json"
        self.trained: list[tuple[str, str, int]] = []
        self.failed: list[tuple[str, str, int]] = []
        self.cpu = 0.0
        self.phase_start = time.perf_counter()
        self.cells_done = 0

    def teacher(self, job: Job, result: dict | None, error: str | None) -> None:
        task = get_setting(job.setting).task.name
        if error:
            raise RuntimeError(f"training the {task} Teacher failed:\n{error}")
        self.cpu += result["cpu"]
        how = "loaded from cache" if result["cached"] else f"trained in {_timing(result)}"
        self.echo(f"Teacher {task}: {how}: {_format_scores(result['scores'])}")
        for name in self.settings.tasks:  # the Teacher's score, beside each of its settings' Students
            if get_setting(name).task.name == task:
                report.append_results(self.results, _records(name, "teacher", 0, result["scores"]))

    def pretrain(self, job: Job, result: dict | None, error: str | None) -> None:
        task = get_setting(job.setting).task.name
        if error:
            raise RuntimeError(f"pre-training the {task} Student (seed {job.seed}) failed:\n{error}")
        self.cpu += result["cpu"]
        how = "loaded from cache" if result["cached"] else f"pre-trained in {_timing(result)}"
        self.echo(f"Student {task} seed {job.seed}: {how}")

    def teacher_or_pretrain(self, job: Job, result: dict | None, error: str | None) -> None:
        (self.teacher if job.kind == "teacher" else self.pretrain)(job, result, error)

    def cell(self, job: Job, result: dict | None, error: str | None) -> None:
        self.cells_done += 1
        i, n = self.cells_done, len(self.plan.cell_jobs)
        eta = _duration((time.perf_counter() - self.phase_start) / i * (n - i))
        cell = (job.setting, job.method, job.seed)
        name = f"cell {i}/{n} {job.setting} {job.method} seed {job.seed}"
        if error:
            self.failed.append(cell)
            self.echo(f"{name} FAILED; eta {eta}\n{error}")
            return
        report.append_results(self.results, _records(*cell, result["scores"]))
        self.trained.append(cell)
        self.cpu += result["cpu"]
        self.echo(f"{name}: {_format_scores(result['scores'])} ({_timing(result)}); eta {eta}")


def run_lock(out: Path) -> AbstractContextManager[None]:
    """Hold ``OUT/run.lock`` for a run: a second run on the same directory at the same time is refused, since both
    would rewrite results.json."""
    return exclusive_lock(out / "run.lock", f"another amad demo is running on {out} (it holds {out / 'run.lock'}): "
                          "run the commands of one --out one after the other, or give this one another --out")


def run_demo(settings: DemoSettings) -> DemoSummary:
    """Run every missing cell; return what was trained, skipped (already in results.json) and failed."""
    with run_lock(Path(settings.out)):
        return _run_demo(settings)


def _run_demo(settings: DemoSettings) -> DemoSummary:
    started = time.perf_counter()
    out = Path(settings.out)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    plan = _plan(settings, out)
    jobs = max(1, min(settings.jobs, len(plan.cell_jobs) or 1))
    threads = settings.threads or max(1, (os.cpu_count() or 1) // jobs)
    grid = ",".join(f"{f:g}" for f in settings.alpha_grid)
    settings.echo(
        f"amad demo ({settings.scale}): {len(plan.cells)} cells ({len(settings.tasks)} tasks x {settings.seeds} "
        f"seeds x {len(settings.methods)} methods, alpha grid x{grid}{' + paper' if settings.paper_alpha else ''}), "
        f"{len(plan.skipped)} already in {out / 'results.json'}, "
        f"{len(plan.cell_jobs)} to run; {jobs} worker(s) x {threads} torch thread(s)")
    run = _Run(settings, out, plan)
    pool = Pool(jobs, threads)
    try:
        # Teachers and pre-trained Students do not depend on each other; the costliest Teacher starts first.
        first = sorted(plan.teachers, key=lambda j: -get_setting(j.setting).task.relative_cost) + plan.pretrains
        pool.run(first, run.teacher_or_pretrain)
        run.phase_start = time.perf_counter()
        pool.run(plan.cell_jobs, run.cell)
    except BaseException:
        pool.close(interrupted=True)
        raise
    pool.close()
    table = write_outputs(out, settings.plots, settings.tasks)
    seconds = time.perf_counter() - started
    settings.echo(
        f"amad demo finished in {_duration(seconds)} (jobs used {_duration(run.cpu)} of CPU time): "
        f"{len(run.trained)} cells trained, {len(plan.skipped)} skipped, {len(run.failed)} failed; "
        f"{out / 'results.json'}, {table}, {out / 'plots'}")
    return DemoSummary(run.trained, plan.skipped, run.failed, seconds, out / "results.json", table)


def _records(task: str, method: str, seed: int, scores: dict[str, float]) -> list[dict[str, Any]]:
    return [{"task": task, "method": method, "seed": seed, "metric": k, "value": float(v)} for k, v in scores.items()]


def write_outputs(out: Path, plots: bool = True, task_order: Sequence[str] = ()) -> Path:
    """results.md and the plots, from results.json alone (plus the stored attention snapshots)."""
    records = report.load_results(out / "results.json")
    method_order = list(METHODS) + list(EXTRA_METHODS)
    known = {r["task"] for r in records}
    notes = {name: _description(name) for name in known}
    scale = json.loads((out / "run.json").read_text())["scale"] if (out / "run.json").exists() else "?"
    table = fair_report.write_fair_markdown(
        out / "results.md", records, title="AMAD demo benchmark", preamble=report.PREAMBLE.format(scale=scale),
        task_order=task_order, method_order=method_order, task_notes=notes,
        all_cells_order=variant_order(method_order, _grid_factors(records)))
    if plots:
        write_plots(out, fair_report.selected_records(records), variant_order(method_order, _grid_factors(records)))
    return table


def _grid_factors(records: Sequence[dict]) -> list[float]:
    """Every factor the records' grid cells used (for the table order)."""
    from .fair import parse_variant

    return sorted({v.factor for v in map(parse_variant, {r["method"] for r in records}) if v.factor is not None})


def write_plots(out: Path, records: list[dict], method_order: Sequence[str]) -> None:
    """``OUT/plots``: each metric per method with error bars, and the best AMAD Student's stored maps (replacing
    those of a former best)."""
    report.plot_metric_bars(records, out / "plots", method_order=method_order)
    for task, (method, seed) in report.best_amad_runs(records).items():
        name = f"{task}-{method.replace('+', '_')}-seed{seed}"
        for stale in (out / "plots").glob(f"{task}-kd_amad-*-seed*-pair*-*.png"):  # a former best's maps
            if not stale.name.startswith(f"{name}-pair"):
                stale.unlink()
        path = snapshot_path(out, task, method, seed)
        if path.is_file():  # absent where the snapshot was not kept: the best's maps drawn before stay
            report.plot_snapshot(path, out / "plots", name)


def _description(name: str) -> str:
    try:
        return get_setting(name).description
    except ValueError:
        return ""
