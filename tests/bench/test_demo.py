"""The demo benchmark: statistics, the Markdown table, and a tiny end-to-end run that resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from amad.bench import main
from amad.bench import report
from amad.bench.runner import DemoSettings, run_demo

METHODS = ["gt", "kd", "amad-mse"]
RECORDED = ["gt", "kd", "kd+amad-mse@x1"]


def test_mean_stderr_matches_hand_computation() -> None:
    # values 1, 2, 4: mean 7/3; sample variance ((4/3)^2 + (1/3)^2 + (5/3)^2) / 2 = 7/3; s.e. sqrt(7/3 / 3) = sqrt(7)/3
    mean, stderr = report.mean_stderr([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3, abs=1e-12)
    assert stderr == pytest.approx(math.sqrt(7) / 3, abs=1e-12)
    assert report.mean_stderr([5.0]) == (5.0, None)
    with pytest.raises(ValueError, match="at least one"):
        report.mean_stderr([])


def test_records_are_validated() -> None:
    good = {"task": "vqa", "method": "kd", "seed": 0, "metric": "accuracy", "value": 50.0}
    assert report.validate_record(good) == good
    with pytest.raises(ValueError, match="exactly the keys"):
        report.validate_record({**good, "extra": 1})
    with pytest.raises(ValueError, match="finite"):
        report.validate_record({**good, "value": float("nan")})
    with pytest.raises(ValueError, match="seed"):
        report.validate_record({**good, "seed": "0"})


def test_markdown_table_has_ours_and_paper_side_by_side() -> None:
    records = [
        {"task": "vqa-pretrained", "method": "kd+amad-mse", "seed": s, "metric": "accuracy", "value": v}
        for s, v in enumerate([60.0, 62.0, 64.0])
    ] + [
        {"task": "vqa-pretrained", "method": "teacher", "seed": 0, "metric": "accuracy", "value": 70.0},
        {"task": "vqa-pretrained", "method": "kd+shd", "seed": 0, "metric": "accuracy", "value": 61.0},
    ]
    text = report.render_markdown(records, method_order=["kd+amad-mse", "kd+shd"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == "| method | accuracy (%) (ours) | accuracy (%) (paper) |"
    # mean 62, sd 2, s.e. 2 / sqrt(3) = 1.1547
    assert rows[1:] == [
        "| teacher | 70.00 +- n/a (n=1) | 68.75 |",
        "| kd+amad-mse | 62.00 +- 1.15 (n=3) | 67.96 |",
        "| kd+shd | 61.00 +- n/a (n=1) | n/a |",
    ]


def test_a_task_without_paper_numbers_gets_no_paper_columns() -> None:
    records = [{"task": "minilm-text-h4-d256-l3", "method": "kd", "seed": s, "metric": m, "value": 50.0 + s}
               for s in range(2) for m in ("cosine_pct", "top1_pct")]
    text = report.render_markdown(records, metric_order=["cosine_pct", "top1_pct"], title="real Teacher")
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert text.startswith("# real Teacher")
    assert "Paper setting: none comparable." in text
    assert rows == ["| method | embedding cosine (%) | top-1 agreement (%) |",
                    "| kd | 50.50 +- 0.50 (n=2) | 50.50 +- 0.50 (n=2) |"]


def _run(out: Path, lines: list[str]):
    return run_demo(DemoSettings(out=out, scale="tiny", seeds=1, tasks=["vqa"], methods=METHODS, jobs=1,
                                 echo=lines.append, alpha_grid=(1.0,), paper_alpha=False))


def test_tiny_end_to_end_run_writes_outputs_and_resumes(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    status = main(["--scale", "tiny", "--out", str(out), "--seeds", "1", "--tasks", "vqa",
                   "--methods", *METHODS, "--jobs", "1", "--alpha-grid", "1", "--no-paper-alpha"])
    assert status == 0

    records = json.loads((out / "results.json").read_text())
    assert all(set(r) == {"task", "method", "seed", "metric", "value"} for r in records)
    assert all(isinstance(r["value"], float) and 0.0 <= r["value"] <= 100.0 for r in records)
    assert sorted((r["task"], r["method"], r["seed"], r["metric"]) for r in records) == sorted(
        [("vqa", m, 0, metric) for m in RECORDED for metric in ("accuracy", "val_accuracy")]
        + [("vqa", "teacher", 0, "accuracy")]
    )
    # alpha "auto" was measured once for the attention loss (one number per distilled layer pair)
    alpha = json.loads((out / "cache" / "alpha" / "vqa__kd_amad-mse__seed0.json").read_text())["alpha_auto"]
    assert len(alpha) == 3 and all(a > 0 for a in alpha)  # encoder, decoder self- and cross-attention

    table = (out / "results.md").read_text()
    fair, appendix = table.split("# All cells")
    for method, paper in [("teacher", "68.75"), ("gt", "56.44"), ("kd", "66.39"), ("kd+amad-mse", "n/a")]:
        row = next(line for line in fair.splitlines() if line.startswith(f"| {method} |"))
        assert row.endswith(f" | {paper} |"), row
    assert "| kd+amad-mse | " in fair and "| x1 | " in fair
    assert "| kd+amad-mse@x1 | " in appendix

    plots = {p.name for p in (out / "plots").iterdir()}
    assert "vqa-accuracy.png" in plots
    assert any(name.startswith("vqa-kd_amad-mse@x1-seed0-") and name.endswith("-similarity.png") for name in plots)
    assert any(name.endswith("-maps.png") for name in plots)
    assert all((out / "plots" / name).stat().st_size > 1000 for name in plots)

    # Rerun: nothing is trained again (not even the Teacher), the records are unchanged; a former best AMAD's
    # map plots of this task are replaced, another task's kept.
    former = out / "plots" / "vqa-kd_amad-kl@x4-seed1-pair0-maps.png"
    other = out / "plots" / "vqa-pretrained-kd_amad-kl@x1-seed0-pair0-maps.png"
    former.write_bytes(b"old")
    other.write_bytes(b"other")
    lines: list[str] = []
    summary = _run(out, lines)
    assert not former.exists() and other.read_bytes() == b"other"
    assert summary.trained == [] and len(summary.skipped) == 3 and summary.failed == []
    assert not any("Teacher" in line for line in lines)
    assert json.loads((out / "results.json").read_text()) == records

    # An interrupted run: the last cell never reached results.json. Only that cell runs, the Teacher is reused.
    kept = [r for r in records if r["method"] != "kd+amad-mse@x1"]
    (out / "results.json").write_text(json.dumps(kept))
    lines = []
    summary = _run(out, lines)
    assert summary.trained == [("vqa", "kd+amad-mse@x1", 0)]
    assert sorted(summary.skipped) == [("vqa", "gt", 0), ("vqa", "kd", 0)]
    assert any(line.startswith("Teacher vqa: loaded from cache") for line in lines)
    after = json.loads((out / "results.json").read_text())
    assert sorted([r for r in after if r["method"] != "kd+amad-mse@x1"], key=str) == sorted(kept, key=str)
    assert len([r for r in after if r["method"] == "kd+amad-mse@x1"]) == 2  # test and validation accuracy


def test_a_directory_of_another_scale_is_refused(tmp_path: Path) -> None:
    (tmp_path / "run.json").write_text(json.dumps({"scale": "quick", "budgets": {}}))
    with pytest.raises(ValueError, match="another configuration"):
        _run(tmp_path, [])


def test_unknown_method_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["--scale", "tiny", "--out", str(tmp_path), "--methods", "kd+no-such-loss"])
    assert "no-such-loss" in capsys.readouterr().err


@pytest.mark.parametrize("validation_images", [0, 8])
def test_validation_images_are_the_last_training_images(validation_images: int) -> None:
    import dataclasses

    from amad.bench.tasks import TASKS, _shapes

    budget = dataclasses.replace(TASKS["vqa"].budget("tiny"), validation_images=validation_images)
    data, _ = _shapes(budget)
    assert len(data["train"]) == budget.train_images - validation_images
    assert len(data["validation"]) == validation_images
    full, _ = _shapes(dataclasses.replace(budget, validation_images=0))
    assert data["validation"]["questions"] == full["train"]["questions"][len(data["train"]):]
    with pytest.raises(ValueError, match="leaves no training image"):
        _shapes(dataclasses.replace(budget, validation_images=budget.train_images))


def test_a_cell_without_validation_rows_is_refused_before_training(tmp_path: Path) -> None:
    import dataclasses

    from amad.bench.fair import parse_variant
    from amad.bench.jobs import _cell_job
    from amad.bench.tasks import get_setting

    setting = get_setting("vqa")
    budget = dataclasses.replace(setting.task.budget("tiny"), validation_images=0)
    data = setting.task.prepare(budget)
    with pytest.raises(ValueError, match="no validation rows .*validation_images=0"):
        _cell_job(setting, data, budget, tmp_path, 0, parse_variant("kd"))  # no Teacher stored: it must not get there
