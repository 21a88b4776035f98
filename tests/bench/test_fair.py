"""The benchmarks' fair protocol: alpha grid names, the choice on validation data, the paired confidence interval,
the fair table, and that factor 1 of the grid is exactly alpha "auto"."""

from __future__ import annotations

import json
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
    assert diff.format(signed=True) == f"+3.67 [{11 / 3 - half:+.2f}, {11 / 3 + half:+.2f}]"
    one = report.paired_difference({0: 2.0}, {0: 1.5})
    assert (one.mean, one.low, one.n, one.format(signed=True)) == (0.5, None, 1, "+0.50 [n/a]")
    assert report.paired_difference({0: 1.0}, {1: 1.0}) is None


def test_t_interval_of_known_numbers() -> None:
    # (1, 2, 3, 4, 5): mean 3, sample sd sqrt(2.5), s.e. sqrt(0.5); t(0.975, df 4) = 2.7764451051977987 (tables)
    interval = report.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(0.5)
    assert (interval.mean, interval.n) == (3.0, 5)
    assert (interval.low, interval.high) == (pytest.approx(3 - half, abs=1e-12), pytest.approx(3 + half, abs=1e-12))
    assert interval.format() == f"3.00 [{3 - half:.2f}, {3 + half:.2f}]"
    assert report.t_interval([4.0]).format() == "4.00 [n/a]"
    with pytest.raises(ValueError, match="confidence"):
        report.t_interval([1.0, 2.0], confidence=1.0)


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
    # x1 now has seed 0 only: every factor is compared on seed 0 (10 each), so the tie goes to 1 again, but the
    # other factors have a seed the choice did not see: not final.
    assert choice.factor == 1.0 and choice.compared == (0,) and not choice.complete
    assert fair_report.grid_seeds_note(records) == ""  # a run in progress, not grid seeds


def test_grid_seeds_choose_on_the_first_seeds_only() -> None:
    """Seed 0 ran the grid, seeds 1 and 2 only the chosen factor: the choice compares seed 0 alone, is final, and
    the later seeds (here far better at x1 than seed 0) cannot move it."""
    records = []
    for factor, val in (("0.25", 30.0), ("1", 20.0), ("4", 10.0)):
        records += _records("vqa", f"kd+shd@x{factor}", "val_accuracy", [val])
        records += _records("vqa", f"kd+shd@x{factor}", "accuracy", [val + 1])
    records += _records("vqa", "kd+shd@x0.25", "val_accuracy", [0.0, 5.0, 6.0])[1:]
    records += _records("vqa", "kd+shd@x0.25", "accuracy", [0.0, 8.0, 9.0])[1:]
    choice = fair.choose_factors(records)[("vqa", "kd+shd")]
    assert choice.factor == 0.25 and choice.compared == (0,) and choice.complete
    assert choice.validation == {0.25: 30.0, 1.0: 20.0, 4.0: 10.0}
    assert fair.grid_choices(records, "vqa", ["kd", "kd+shd"], (0.25, 1.0, 4.0), 1) == {"kd+shd": "kd+shd@x0.25"}
    row = next(r for r in fair_report.fair_rows(records) if r["method"] == "kd+shd")
    assert row["test"]["n"] == 3 and row["test"]["mean"] == pytest.approx((31.0 + 8.0 + 9.0) / 3)
    # sensitivity compares the factors on seed 0 only, not x0.25's three seeds against one
    assert row["sensitivity"]["test"] == {"worst": {"factor": 4.0, "mean": 11.0},
                                          "best": {"factor": 0.25, "mean": 31.0}}
    text = fair_report.render_fair_tables(records)
    assert "(incomplete)" not in text
    assert fair_report.grid_seeds_note(records).startswith("Grid seeds: only seeds 0 ran every factor")
    # a grid seed short of a factor: no choice for the later seeds, and the error names the missing cell
    with pytest.raises(ValueError, match=r"kd\+shd@x4 seed 1.*--first-seed 0 --seeds 2"):
        fair.grid_choices(records, "vqa", ["kd+shd"], (0.25, 1.0, 4.0), 2)


def test_fair_table_columns_and_numbers(tmp_path: Path) -> None:
    records = _grid_case()
    text = fair_report.render_fair_tables(records, method_order=["gt", "kd", "kd+amad-kl"])
    table = text[text.index("## vqa"):]
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert rows[0] == ("| method | accuracy (%): test [95% CI] | - kd, paired [95% CI] | alpha factor | sensitivity, "
                       "test: worst / best factor | validation: worst / best factor | paper |")
    t2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # t(0.975, df 2)
    kd_half = t2 * 2 / math.sqrt(3)  # kd test 50, 52, 54: s.e. 2 / sqrt(3)
    assert rows[1] == f"| kd | 52.00 [{52 - kd_half:.2f}, {52 + kd_half:.2f}] (n=3) | reference | - | - | - | 66.39 |"
    # chosen x0.3: test 40, 42, 38 (mean 40, s.e. 2/sqrt(3)); paired with kd: d = -10, -10, -16
    d = [-10.0, -10.0, -16.0]
    mean, se = sum(d) / 3, math.sqrt(sum((x + 12) ** 2 for x in d) / 2 / 3)
    half = t2 * se
    assert rows[2] == (f"| kd+amad-kl | 40.00 [{40 - kd_half:.2f}, {40 + kd_half:.2f}] (n=3) | "
                       f"{mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] | "
                       "x0.3 | 40.00 (x0.3) / 80.00 (x3) | 50.00 (x1) / 60.00 (x0.3) | 67.79 |")
    assert rows[3].startswith("| kd+amad-kl@paper | 53.00 [") and rows[3].endswith(
        "| +1.00 [+1.00, +1.00] | paper | - | - | 67.79 |")
    assert "alpha chosen on: validation accuracy (%)." in text
    # the summary names the best attention loss by test mean (the @paper row here) and the best AMAD variant
    summary = next(line for line in text.splitlines() if line.startswith("| vqa |"))
    assert "kd+amad-kl@paper (paper): 53.00 [" in summary and "vs kd +1.00 [+1.00, +1.00]" in summary

    out = fair_report.write_fair_markdown(tmp_path / "results.md", records, title="t",
                                          method_order=["gt", "kd", "kd+amad-kl"])
    data = json.loads((tmp_path / "results_fair.json").read_text())
    assert out.read_text().startswith("# t") and data["selection_metric"] == {"vqa": "val_accuracy"}
    row = next(r for r in data["rows"] if r["method"] == "kd+amad-kl")
    assert (row["cell"], row["alpha"], row["paper"]) == ("kd+amad-kl@x0.3", "x0.3", "67.79")
    assert row["test"]["mean"] == pytest.approx(40.0) and row["vs_kd"]["mean"] == pytest.approx(mean)
    assert row["vs_kd"]["ci_low"] == pytest.approx(mean - half)
    assert row["sensitivity"]["test"] == {"worst": {"factor": 0.3, "mean": pytest.approx(40.0)},
                                          "best": {"factor": 3.0, "mean": pytest.approx(80.0)}}


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


class _ThreadPool:
    """The rebuild logic of :class:`amad.bench.runner.Pool` without spawning processes: threads, and a job that
    raises BrokenProcessPool as a future does when its worker process died."""

    @staticmethod
    def make(rebuilds: int, marker: Path):
        from concurrent.futures import ThreadPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        from amad.bench.runner import Pool

        def work(job: int) -> dict:
            if job == 1 and not marker.exists():
                marker.touch()
                raise BrokenProcessPool("a worker died")
            return {"value": job}

        class ThreadPool(Pool):
            built = 0

            def _executor(self):
                ThreadPool.built += 1
                return ThreadPoolExecutor(self.jobs)

        return ThreadPool(2, 1, work=work, rebuilds=rebuilds)


def test_pool_reruns_the_jobs_of_a_dead_worker(tmp_path: Path) -> None:
    done: dict[int, tuple] = {}
    pool = _ThreadPool.make(2, tmp_path / "died")
    pool.run(range(3), lambda job, result, error: done.update({job: (result, error)}))
    pool.close()
    assert done == {i: ({"value": i}, None) for i in range(3)} and type(pool).built == 2  # rebuilt once
    failed: dict[int, str] = {}
    pool = _ThreadPool.make(0, tmp_path / "died-again")
    pool.run([1], lambda job, result, error: failed.update({job: error}))
    pool.close()
    assert "BrokenProcessPool" in failed[1] and type(pool).built == 1  # no rebuild allowed: reported failed


@pytest.mark.slow  # about 100 s on 2 quiet cores; test_demo.py runs the protocol end to end on a 1-point grid
def test_protocol_end_to_end_and_an_interrupted_run_gives_the_same_table(tmp_path: Path) -> None:
    """Tiny VQA, logit KD and AMAD kl on a grid of 2 factors, 2 seeds: the run is interrupted after its third cell,
    resumed, and then one finished cell is dropped and run again; the table and its JSON come out the same."""
    from amad.bench.runner import DemoSettings, run_demo

    out = tmp_path / "fair"
    lines: list[str] = []

    def settings(echo) -> DemoSettings:
        return DemoSettings(out=out, scale="tiny", seeds=2, tasks=["vqa"], methods=["kd", "amad-kl"], jobs=1,
                            plots=False, echo=echo, alpha_grid=(0.5, 2.0), paper_alpha=False)

    def interrupt_after_three(line: str) -> None:
        lines.append(line)
        if sum(line.startswith("cell ") for line in lines) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_demo(settings(interrupt_after_three))
    assert len({(r["method"], r["seed"]) for r in report.load_results(out / "results.json")
                if r["method"] != "teacher"}) == 3
    lines = []
    summary = run_demo(settings(lines.append))
    assert len(summary.skipped) == 3 and len(summary.trained) == 3 and not summary.failed
    assert any(line.startswith("cell 3/3 ") and "eta" in line for line in lines)  # progress
    records = report.load_results(out / "results.json")
    for seed in (0, 1):  # the two factors scale one measured alpha "auto": they train different Students
        auto = json.loads((out / "cache" / "alpha" / f"vqa__kd_amad-kl__seed{seed}.json").read_text())["alpha_auto"]
        assert len(auto) == 3 and all(a > 0 for a in auto)
    table, fair_json = (out / "results.md").read_text(), (out / "results_fair.json").read_text()
    data = json.loads(fair_json)
    row = next(r for r in data["rows"] if r["method"] == "kd+amad-kl" and r["metric"] == "accuracy")
    validation = {f: sum(r["value"] for r in records if r["method"] == f"kd+amad-kl@x{f:g}"
                         and r["metric"] == "val_accuracy") / 2 for f in (0.5, 2.0)}
    best = max(validation.values())
    chosen = min((f for f, v in validation.items() if v == best), key=lambda f: abs(math.log(f)))
    assert float(row["alpha"][1:]) == chosen
    assert row["test"]["n"] == 2 and row["vs_kd"]["n"] == 2 and row["sensitivity"]["test"] is not None

    dropped = [r for r in records if not (r["method"] == "kd+amad-kl@x2" and r["seed"] == 1)]
    (out / "results.json").write_text(json.dumps(dropped))
    (out / "results.md").unlink()
    summary = run_demo(settings(lambda line: None))
    assert summary.trained == [("vqa", "kd+amad-kl@x2", 1)]
    assert (out / "results.md").read_text() == table and (out / "results_fair.json").read_text() == fair_json


def test_a_second_run_on_the_same_directory_is_refused(tmp_path: Path) -> None:
    from amad.bench.runner import run_lock
    from amad.cli.errors import ConfigError

    with run_lock(tmp_path):
        with pytest.raises(ConfigError, match="another amad demo is running on"):
            with run_lock(tmp_path):
                pass
    with run_lock(tmp_path):  # released when the first run ended
        pass
