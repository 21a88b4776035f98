"""The committed fair-protocol tables are what the report code writes from the committed records, unedited."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from amad.bench import fair_summary, report
from amad.bench.minilm_run import write_run_outputs

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
FAIR_RUNS = sorted(p for p in RESULTS.glob("fair-*") if (p / "results.json").exists())
# Probes beside the fair runs (same record format, not in summary.md): the weight below the grid's lower end.
PROBE_RUNS = [RESULTS / "minilm-below-grid"]


def test_there_are_committed_fair_runs() -> None:
    assert len(FAIR_RUNS) >= 3, FAIR_RUNS


@pytest.mark.parametrize("committed", FAIR_RUNS + PROBE_RUNS, ids=lambda p: p.name)
def test_committed_tables_are_rewritten_identically_from_their_records(committed: Path, tmp_path: Path) -> None:
    for name in ("results.json", "run.json"):
        shutil.copy(committed / name, tmp_path / name)
    write_run_outputs(tmp_path, plots=False)
    for name in ("results.md", "results_fair.json"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), f"{committed / name} was edited " \
            f"or written by other code: rerun its command (docs/results/README.md) to rewrite it from results.json"


def test_committed_summary_is_rewritten_identically_from_the_runs() -> None:
    assert (RESULTS / fair_summary.SUMMARY_FILE).read_text() == fair_summary.render_summary(
        fair_summary.load_runs(RESULTS)), "docs/results/summary.md is stale or edited: python benchmarks/fair_summary.py"


def _row(method: str, alpha: str | None, mean: float, diff: tuple[float, float] | None, spread=None) -> dict:
    return {"task": "t", "metric": "accuracy", "method": method, "alpha": alpha, "test": {"mean": mean},
            "vs_kd": diff and {"mean": sum(diff) / 2, "ci_low": diff[0], "ci_high": diff[1], "n": 3},
            "sensitivity": spread and {"test": {"worst": {"factor": 16.0, "mean": spread[0]},
                                                "best": {"factor": 0.25, "mean": spread[1]}}}}


def test_summary_ranks_tuned_losses_and_counts_intervals_that_exclude_zero(tmp_path: Path) -> None:
    rows = [_row("kd", None, 50.0, None), _row("kd+shd", "x1", 60.0, (5.0, 15.0), (40.0, 60.0)),
            _row("kd+amad-kl", "x4", 55.0, (-1.0, 11.0)), _row("kd+amad-kl@paper", "paper", 61.0, (2.0, 20.0)),
            _row("kd+head-mean", "x0.25", 45.0, (-9.0, -1.0))]
    entry = {"task": "t", "metric": "accuracy", "kd": {"mean": 50.0, "ci_low": 49.0, "ci_high": 51.0, "n": 3},
             "best": {k: rows[3][k] for k in ("method", "alpha", "test", "vs_kd")},
             "best_amad": {k: rows[3][k] for k in ("method", "alpha", "test", "vs_kd")}}
    run = tmp_path / "fair-x"
    run.mkdir()
    (run / "results_fair.json").write_text(json.dumps({"summary": [entry], "rows": rows}))
    text = fair_summary.render_summary(fair_summary.load_runs(tmp_path))
    line = next(l for l in text.splitlines() if l.startswith("| t (fair-x)"))
    # the paper row is the best row but not ranked; among tuned losses AMAD (55) is 2nd of 3; shd is above kd, head-mean below
    # tuned losses' spread: 60 (shd) - 45 (head-mean)
    assert "amad-kl@paper 61.00, +11.00" in line and line.endswith("| 2 of 3 | 1 / 1 | 15.00 |"), line
    assert "| shd | 20.0: 60.00 (x0.25) / 40.00 (x16) |" in text and "| amad-kl | - |" in text
    assert "| (losses worst at) | x16: 1 |" in text  # only shd has a sensitivity
    rows[2]["alpha_complete"] = False  # a run still in progress says so
    (run / "results_fair.json").write_text(json.dumps({"summary": [entry], "rows": rows}))
    assert "| t (fair-x) (incomplete) |" in fair_summary.render_summary(fair_summary.load_runs(tmp_path))


def test_summary_without_runs_names_the_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        fair_summary.load_runs(tmp_path)
    (tmp_path / "fair-broken").mkdir()
    (tmp_path / "fair-broken" / "results_fair.json").write_text("{")
    with pytest.raises(ValueError, match="fair-broken"):
        fair_summary.load_runs(tmp_path)
    (tmp_path / "fair-broken" / "results_fair.json").write_text('{"rows": []}')
    with pytest.raises(ValueError, match=r"fair-broken.*lacks \['summary'\]"):
        fair_summary.load_runs(tmp_path)


def test_the_documented_summary_command_writes_the_committed_file(tmp_path: Path) -> None:
    for run in FAIR_RUNS:
        shutil.copy(run / "results_fair.json", (tmp_path / run.name).mkdir() or tmp_path / run.name)
    script = RESULTS.parents[1] / "benchmarks" / "fair_summary.py"
    subprocess.run([sys.executable, str(script), str(tmp_path)], check=True, capture_output=True)
    assert (tmp_path / "summary.md").read_text() == (RESULTS / "summary.md").read_text()


def test_the_paired_difference_command_reproduces_the_quoted_numbers() -> None:
    script = RESULTS.parents[1] / "benchmarks" / "paired_difference.py"
    results = RESULTS / "fair-shapes-translation" / "results.json"
    run = subprocess.run([sys.executable, str(script), str(results), "translation-pretrained", "bleu",
                          "kd+head-mean@x1", "kd+amad-kl@x1"], check=True, capture_output=True, text=True)
    # quoted in docs/results/README.md and the README
    assert run.stdout.splitlines()[-1] == "kd+head-mean@x1 - kd+amad-kl@x1: +0.83 [-1.41, +3.07] over 3 seeds"
    wrong = subprocess.run([sys.executable, str(script), str(results), "translation", "bleu", "kd+head-mean",
                            "kd"], capture_output=True, text=True)
    assert wrong.returncode != 0 and "no 'bleu' record of 'kd+head-mean' for task 'translation'" in wrong.stderr


def _commit_run(*args: str) -> subprocess.CompletedProcess:
    script = RESULTS.parents[1] / "benchmarks" / "commit_run.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


def test_commit_run_adds_a_finished_task_and_keeps_the_committed_ones_and_their_maps(tmp_path: Path) -> None:
    source, task = RESULTS / "fair-minilm", "minilm-text-h4-d384-l3"
    run, committed = tmp_path / "runs" / "fair-minilm", tmp_path / "results" / "fair-minilm"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("plots"))
    (run / "cache" / "alpha").mkdir(parents=True)
    shutil.copytree(source, committed)
    records = report.load_results(source / "results.json")
    report.save_results(committed / "results.json", [r for r in records if r["task"] != task])
    budgets = json.loads((source / "run.json").read_text())
    budget = budgets["budgets"].pop(task)
    (committed / "run.json").write_text(json.dumps(budgets))
    maps = sorted(p.name for p in (source / "plots").glob("*-pair*-maps.png"))
    assert maps  # drawn when the runs ran; their snapshots are not committed, so they must survive a rewrite

    done = _commit_run(str(run), str(committed), task)
    assert done.returncode == 0, done.stderr
    assert sorted(map(json.dumps, report.load_results(committed / "results.json"))) == sorted(map(json.dumps, records))
    assert json.loads((committed / "run.json").read_text())["budgets"][task] == budget
    for name in ("results.md", "results_fair.json"):
        assert (committed / name).read_text() == (source / name).read_text()
    assert sorted(p.name for p in (committed / "plots").glob("*-pair*-maps.png")) == maps
    assert not (committed / "cache").exists() and (tmp_path / "results" / "summary.md").exists()
    absent = _commit_run(str(run), str(committed), "minilm-text-h9-d9-l9")
    assert absent.returncode != 0 and "holds no record of ['minilm-text-h9-d9-l9']" in absent.stderr
    into_a_run = _commit_run(str(committed), str(run), task)
    assert into_a_run.returncode != 0 and "is a run's --out" in into_a_run.stderr
    seed0 = [r for r in records if r["task"] != task or r["seed"] == 0]
    report.save_results(run / "results.json", seed0)
    early = _commit_run(str(run), str(tmp_path / "results" / "other"), task)
    assert early.returncode != 0 and f"not finished (kd seeds {{'{task}': [0]}}" in early.stderr
    assert not (tmp_path / "results" / "other").exists()
    last = next(r for r in records if r["task"] == task and r["seed"] == 2 and r["method"] not in ("kd", "init"))
    report.save_results(run / "results.json", [r for r in records if r["task"] != task or r["seed"] != 2
                                               or r["method"] != last["method"]])
    gap = _commit_run(str(run), str(tmp_path / "results" / "other"), task)
    assert gap.returncode != 0 and f"cells missing by seed {{2: ['{last['method']}']}}" in gap.stderr
    assert not (tmp_path / "results" / "other").exists()


def test_commit_run_saves_an_unfinished_run_that_resumes_from_a_copy(tmp_path: Path) -> None:
    run, saved = tmp_path / "runs" / "fair-minilm", tmp_path / "unfinished" / "fair-minilm"
    (run / "cache" / "alpha").mkdir(parents=True)
    (run / "cache" / "teacher").mkdir()
    shutil.copy(RESULTS / "fair-minilm" / "results.json", run)
    shutil.copy(RESULTS / "fair-minilm" / "run.json", run)
    (run / "cache" / "alpha" / "t__kd_amad-kl__seed0.json").write_text("[0.5]")
    (run / "cache" / "teacher" / "big.bin").write_bytes(b"0" * 10)
    done = _commit_run("--unfinished", str(run), str(saved))
    assert done.returncode == 0, done.stderr
    assert (saved / "results.json").read_bytes() == (run / "results.json").read_bytes()
    assert (saved / "cache" / "alpha" / "t__kd_amad-kl__seed0.json").read_text() == "[0.5]"
    assert not (saved / "cache" / "teacher").exists()  # only what a rerun cannot recompute cheaply
    assert "cp -r" in done.stdout
    report.save_results(run / "results.json", report.load_results(run / "results.json")[:-9])  # an older run
    older = _commit_run("--unfinished", str(run), str(saved))
    assert older.returncode != 0 and "that" in older.stderr and "lacks" in older.stderr
    assert (saved / "results.json").read_bytes() != (run / "results.json").read_bytes()  # nothing overwritten
