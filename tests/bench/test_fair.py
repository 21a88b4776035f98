"""The benchmarks' fair protocol: alpha grid names, the choice on validation data, the paired confidence interval,
the fair table, and that factor 1 of the grid is exactly alpha "auto"."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from amad.bench import fair, fair_report, report
from amad.bench.alpha import cell_alpha, measure_auto_alpha


def _records(task: str, method: str, metric: str, values: list[float]) -> list[dict]:
    return [{"task": task, "method": method, "seed": s, "metric": metric, "value": v} for s, v in enumerate(values)]


def test_t_quantile_matches_closed_forms() -> None:
    # df = 1 (Cauchy): tan(pi (p - 1/2)); df = 2: (2p - 1) / sqrt(2 p (1 - p))
    assert report.t_quantile(0.975, 1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-10)
    assert report.t_quantile(0.975, 2) == pytest.approx(0.95 / math.sqrt(2 * 0.975 * 0.025), rel=1e-10)


def test_paired_difference_matches_hand_computation() -> None:
    # d = (3-1, 5-2, 10-4) = (2, 3, 6): mean 11/3; deviations -5/3, -2/3, 7/3: sample variance (25+4+49)/9/2 = 13/3,
    # s.e. sqrt(13/3 / 3) = sqrt(13)/3; t(0.975, df 2) = 0.95 / sqrt(2 * 0.975 * 0.025).
    diff = report.paired_difference({0: 3.0, 1: 5.0, 2: 10.0, 7: 99.0}, {0: 1.0, 1: 2.0, 2: 4.0})
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * math.sqrt(13) / 3
    assert diff.n == 3  # seed 7 has no reference: not paired
    assert diff.mean == pytest.approx(11 / 3, abs=1e-12)
    assert (diff.low, diff.high) == (pytest.approx(11 / 3 - half, abs=1e-12), pytest.approx(11 / 3 + half, abs=1e-12))
    assert diff.format() == f"+3.67 [{11 / 3 - half:+.2f}, {11 / 3 + half:+.2f}]"
    one = report.paired_difference({0: 2.0}, {0: 1.5})
    assert (one.mean, one.low, one.n, one.format()) == (0.5, None, 1, "+0.50 [n/a]")
    assert report.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_grid_names_parse_and_expand() -> None:
    assert fair.parse_grid("3, 0.3,1,1") == (0.3, 1.0, 3.0)
    for bad in ("0", "-1", "a", "", "nan"):
        with pytest.raises(ValueError, match="alpha-grid"):
            fair.parse_grid(bad)
    names = fair.expand_methods(["gt", "kd", "kd+amad-kl", "kd+shd"], (0.3, 1.0))
    assert names == ["gt", "kd", "kd+amad-kl@x0.3", "kd+amad-kl@x1", "kd+amad-kl@paper", "kd+shd@x0.3", "kd+shd@x1"]
    assert all(fair.parse_variant(n).name == n for n in names)
    assert fair.parse_variant("kd+amad-kl@x0.3") == fair.Variant("kd+amad-kl", factor=0.3)
    with pytest.raises(ValueError, match="no alpha for 'shd'"):
        fair.parse_variant("kd+shd@paper")
    with pytest.raises(ValueError, match="only kd"):
        fair.parse_variant("kd@x1")


def test_cell_alpha_scales_the_measured_auto_alpha() -> None:
    measured = lambda: [2.0, 0.5]  # noqa: E731
    assert cell_alpha(fair.Variant("kd+amad-kl", factor=3.0), measured) == ([6.0, 1.5], {})
    assert cell_alpha(fair.Variant("kd+amad-kl", paper=True), measured) == (100.0, {"reduction": "paper"})
    assert cell_alpha(fair.Variant("kd+amad-mse", paper=True), measured) == (0.2, {"reduction": "paper"})
    assert cell_alpha(fair.Variant("kd"), measured) == ("auto", {})


def _grid_case() -> list[dict]:
    """Factor 0.3 is best on validation, factor 3 on test: the choice must follow validation."""
    records = _records("vqa", "kd", "accuracy", [50.0, 52.0, 54.0])
    records += _records("vqa", "kd", "val_accuracy", [50.0, 50.0, 50.0])
    for factor, val, test in (("0.3", [61.0, 59.0, 60.0], [40.0, 42.0, 38.0]),
                              ("1", [50.0, 50.0, 50.0], [70.0, 70.0, 70.0]),
                              ("3", [55.0, 55.0, 55.0], [80.0, 81.0, 79.0])):
        records += _records("vqa", f"kd+amad-kl@x{factor}", "val_accuracy", val)
        records += _records("vqa", f"kd+amad-kl@x{factor}", "accuracy", test)
    return records + _records("vqa", "kd+amad-kl@paper", "accuracy", [51.0, 53.0, 55.0])


def test_grid_choice_uses_validation_not_test() -> None:
    records = _grid_case()
    choice = fair.choose_factors(records)[("vqa", "kd+amad-kl")]
    assert choice.factor == 0.3 and choice.complete
    assert choice.validation == {0.3: 60.0, 1.0: 50.0, 3.0: 55.0}
    # Only the chosen factor's test records are reported; validation records never are.
    kept = {(r["method"], r["metric"]) for r in fair_report.selected_records(records)}
    assert kept == {("kd", "accuracy"), ("kd+amad-kl@x0.3", "accuracy"), ("kd+amad-kl@paper", "accuracy")}
    # Same test numbers, but no validation records: nothing to choose from.
    assert fair.choose_factors([r for r in records if not r["metric"].startswith("val_")]) == {}


def test_grid_tie_goes_to_the_factor_closest_to_one() -> None:
    records = []
    for factor in ("0.3", "1", "3"):
        records += _records("caption", f"kd+shd@x{factor}", "val_cider", [10.0, 12.0])
    assert fair.choose_factors(records)[("caption", "kd+shd")].factor == 1.0
    records = [r for r in records if r["method"] != "kd+shd@x1" or r["seed"] == 0]
    choice = fair.choose_factors(records)[("caption", "kd+shd")]
    assert choice.factor == 3.0 and not choice.complete  # x1 now has one seed (mean 10); 3 beats 0.3 on |log|, size


def test_fair_table_columns_and_numbers() -> None:
    text = fair_report.render_fair_tables(_grid_case(), method_order=["gt", "kd", "kd+amad-kl"])
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert rows[0] == ("| method | accuracy (%): test | - kd, paired [95% CI] | alpha factor | test over grid: worst / "
                       "best | validation over grid: worst / best | paper |")
    assert rows[1] == "| kd | 52.00 +- 1.15 (n=3) | reference | - | - | - | 66.39 |"
    # chosen x0.3: test 40, 42, 38 (mean 40, s.e. 2/sqrt(3) = 1.15); paired with kd: d = -10, -10, -16
    d = [-10.0, -10.0, -16.0]
    mean, se = sum(d) / 3, math.sqrt(sum((x + 12) ** 2 for x in d) / 2 / 3)
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * se
    assert rows[2] == (f"| kd+amad-kl | 40.00 +- 1.15 (n=3) | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] | "
                       "x0.3 | 40.00 (x0.3) / 80.00 (x3) | 50.00 (x1) / 60.00 (x0.3) | 67.79 |")
    assert rows[3] == "| kd+amad-kl@paper | 53.00 +- 1.15 (n=3) | +1.00 [+1.00, +1.00] | paper | - | - | 67.79 |"
    assert "alpha chosen on: validation accuracy (%)." in text


def test_factor_one_is_alpha_auto(tmp_path: Path) -> None:
    """Measuring stops after alpha is fixed; training with 1 x the measured alpha equals training with "auto"."""
    from transformers import TrainingArguments

    from amad import DistillationTrainer, Distiller
    from trainer_worker import dataset, teacher_and_student

    rows = dataset(16, seed=0)
    steps: list[int] = []

    def distiller(alpha) -> Distiller:
        teacher, student = teacher_and_student(student_seed=2)
        return Distiller(teacher, student, attention_loss="amad-mse", alpha=alpha)

    def train(model: Distiller, callbacks=()) -> None:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, seed=3,
                                 learning_rate=1e-2, warmup_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                                 disable_tqdm=True, logging_strategy="no")
        trainer = DistillationTrainer(model=model, args=args, train_dataset=rows, callbacks=list(callbacks))
        trainer.train()
        steps.append(trainer.state.global_step)

    auto = distiller("auto")
    train(auto)
    measuring = distiller("auto")
    measured = measure_auto_alpha(measuring, lambda callbacks: train(measuring, callbacks))
    assert steps == [4, 1] and measured == pytest.approx([float(a) for a in auto.alpha], rel=1e-12)
    once, thrice = distiller([1.0 * a for a in measured]), distiller([3.0 * a for a in measured])
    train(once)
    train(thrice)
    for key, value in auto.student.state_dict().items():
        torch.testing.assert_close(once.student.state_dict()[key], value, rtol=0, atol=1e-6)
    assert any(not torch.allclose(thrice.student.state_dict()[k], v) for k, v in auto.student.state_dict().items())
    with pytest.raises(ValueError, match="alpha='auto'"):
        measure_auto_alpha(once, lambda callbacks: None)


def _die_once(job: tuple[str, int]) -> dict:
    """A worker's job that kills its process the first time job 1 runs (like the out-of-memory killer)."""
    import os

    marker = Path(job[0]) / f"{job[1]}.started"
    if job[1] == 1 and not marker.exists():
        marker.touch()
        os._exit(1)
    return {"value": job[1]}


def test_pool_reruns_the_jobs_of_a_dead_worker(tmp_path: Path) -> None:
    from amad.bench.runner import Pool

    done: dict[int, tuple] = {}
    pool = Pool(2, 1, work=_die_once)
    pool.run([(str(tmp_path), i) for i in range(3)], lambda job, result, error: done.update({job[1]: (result, error)}))
    pool.close()
    assert done == {i: ({"value": i}, None) for i in range(3)}
    (tmp_path / "1.started").unlink()
    failed: dict[int, str] = {}
    pool = Pool(2, 1, work=_die_once, rebuilds=0)
    pool.run([(str(tmp_path), 1)], lambda job, result, error: failed.update({job[1]: error}))
    pool.close()
    assert "BrokenProcessPool" in failed[1]
