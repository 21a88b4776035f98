"""The committed fair-protocol tables are what the report code writes from the committed records, unedited."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from amad.bench import report
from amad.bench.minilm_run import TASK_PREFIX, write_text_outputs
from amad.bench.runner import write_outputs

RESULTS = Path(__file__).resolve().parents[2] / "docs" / "results"
FAIR_RUNS = sorted(p for p in RESULTS.glob("fair-*") if (p / "results.json").exists())


def test_there_are_committed_fair_runs() -> None:
    assert len(FAIR_RUNS) >= 3, FAIR_RUNS


@pytest.mark.parametrize("committed", FAIR_RUNS, ids=lambda p: p.name)
def test_committed_tables_are_rewritten_identically_from_their_records(committed: Path, tmp_path: Path) -> None:
    for name in ("results.json", "run.json"):
        shutil.copy(committed / name, tmp_path / name)
    tasks = {r["task"] for r in report.load_results(tmp_path / "results.json")}
    real = {t.startswith(TASK_PREFIX) for t in tasks}
    assert len(real) == 1, f"{committed} mixes MiniLM and Shapes records: {sorted(tasks)}"
    if real.pop():
        write_text_outputs(tmp_path, plots=False)
    else:
        write_outputs(tmp_path, plots=False)
    for name in ("results.md", "results_fair.json"):
        assert (tmp_path / name).read_text() == (committed / name).read_text(), f"{committed / name} was edited " \
            f"or written by other code: rerun its command (docs/results/README.md) to rewrite it from results.json"
