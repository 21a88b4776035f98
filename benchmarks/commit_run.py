"""Commit the finished settings of a benchmark run, or save a run still going so that a fresh checkout resumes it.

    python benchmarks/commit_run.py RUN COMMITTED TASK [TASK ...]
        TASK's records, run.json budgets and attention snapshots from RUN (an --out) into COMMITTED (e.g.
        docs/results/fair-minilm; its other tasks' records stay); rewrites its tables and plots, then
        docs/results/summary.md
    python benchmarks/commit_run.py --unfinished RUN SAVED
        RUN's records, run.json and measured alphas and snapshots (cache/alpha, cache/snapshots) into SAVED
        (e.g. docs/results/unfinished/fair-minilm); on a fresh checkout `mkdir -p runs && cp -r SAVED runs/`
        and rerun the run's command: it skips every saved cell
"""

import json
import shutil
import sys
from pathlib import Path

from amad.bench import report
from amad.bench.fair_summary import write_summary
from amad.bench.minilm_run import write_run_outputs

KEPT_CACHE = ("alpha", "snapshots")


def _task_files(folder: Path, tasks: list[str]) -> list[Path]:
    return [p for t in tasks for p in sorted(folder.glob(f"{t}__*"))]


FAIR_SEEDS = 3  # the fair protocol reports a setting on 3 seeds (docs/fair_protocol.md)


def _cells(path: Path) -> set[tuple[str, str, int]]:
    return {(r["task"], r["method"], r["seed"]) for r in report.load_results(path)}


def commit(run: Path, committed: Path, tasks: list[str]) -> None:
    """Every check first, then ``committed`` is written."""
    records = report.load_results(run / "results.json")
    missing = sorted(set(tasks) - {r["task"] for r in records})
    if missing:
        raise SystemExit(f"{run / 'results.json'} holds no record of {missing}; its tasks: "
                         f"{sorted({r['task'] for r in records})}")
    short = {t: sorted({r["seed"] for r in records if r["task"] == t and r["method"] == "kd"}) for t in tasks}
    short = {t: seeds for t, seeds in short.items() if len(seeds) < FAIR_SEEDS}
    if short:
        raise SystemExit(f"not finished (kd seeds {short}, the fair protocol reports {FAIR_SEEDS}): save it with "
                         f"--unfinished and commit it when its later seeds are in")
    for t in tasks:  # a later seed stopped part-way would enter the tables with fewer seeds for some losses
        by_seed = {}
        for r in records:
            if r["task"] == t:
                by_seed.setdefault(r["seed"], set()).add(r["method"])
        later = set().union(*(m for seed, m in by_seed.items() if seed > 0))
        gaps = {seed: sorted(later - m) for seed, m in sorted(by_seed.items()) if later - m}
        if gaps:
            raise SystemExit(f"{t} is not finished: cells missing by seed {gaps}; rerun its commands (they skip "
                             "finished cells), or save it with --unfinished")
    if (committed / "cache").exists():
        raise SystemExit(f"{committed} has a cache/ folder, so it is a run's --out, not a committed run: commit into "
                         "a directory of docs/results")
    source = json.loads((run / "run.json").read_text())
    target = committed / "run.json"
    stored = json.loads(target.read_text()) if target.exists() else {"scale": source["scale"], "budgets": {}}
    if stored["scale"] != source["scale"] or set(tasks) - set(source["budgets"]):
        raise SystemExit(f"{target} is of scale {stored['scale']!r}, {run} of {source['scale']!r} with budgets for "
                         f"{sorted(source['budgets'])}: commit {tasks} elsewhere, or from the run that made them")
    committed.mkdir(parents=True, exist_ok=True)
    kept = [r for r in report.load_results(committed / "results.json") if r["task"] not in tasks]
    report.save_results(committed / "results.json", kept + [r for r in records if r["task"] in tasks])
    stored["budgets"].update({t: source["budgets"][t] for t in tasks})
    target.write_text(json.dumps(stored, indent=1, sort_keys=True))
    snapshots = committed / "cache" / "snapshots"  # only while the plots are drawn: the maps are committed
    snapshots.mkdir(parents=True, exist_ok=True)
    for path in _task_files(run / "cache" / "snapshots", tasks):
        shutil.copy(path, snapshots / path.name)
    try:
        table = write_run_outputs(committed)
    finally:
        shutil.rmtree(committed / "cache")
    print(f"{len(tasks)} task(s) into {committed}: {table}; {write_summary(committed.parent)}")


def save_unfinished(run: Path, saved: Path) -> None:
    lost = _cells(saved / "results.json") - _cells(run / "results.json")
    if lost:
        raise SystemExit(f"{saved} holds {len(lost)} cells that {run} lacks (e.g. {sorted(lost)[0]}): saving would "
                         f"drop them; resume from {saved} first (mkdir -p runs && cp -r {saved} runs/)")
    saved.mkdir(parents=True, exist_ok=True)
    for name in ("results.json", "run.json"):
        shutil.copy(run / name, saved / name)
    for sub in KEPT_CACHE:
        if (run / "cache" / sub).is_dir():
            shutil.copytree(run / "cache" / sub, saved / "cache" / sub, dirs_exist_ok=True)
    print(f"{len(_cells(saved / 'results.json'))} cells saved in {saved}; resume: mkdir -p runs && cp -r {saved} runs/")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--unfinished"] and len(args) == 3:
        save_unfinished(Path(args[1]), Path(args[2]))
    elif len(args) >= 3 and not args[0].startswith("-"):
        commit(Path(args[0]), Path(args[1]), args[2:])
    else:
        raise SystemExit(__doc__)
