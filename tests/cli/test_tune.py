"""``amad tune`` end to end on a tiny BERT pair: the study, its resumption, the reports and best.yaml."""

from __future__ import annotations

import json
import math
import re
import sys
from collections import Counter
from importlib.util import find_spec
from pathlib import Path

import pytest
import yaml
from cli_fixtures import write_text_classification

from amad.cli import main
from amad.cli.config import load_config

needs_optuna = pytest.mark.skipif(find_spec("optuna") is None, reason="needs the 'tune' extra (optuna)")

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = ["--max-steps", "2", "--set", "training.per_device_train_batch_size=4", "--set", "training.eval_strategy=no",
        "--set", "training.logging_steps=1", "--set", "training.max_steps=2", "--set", "training.save_strategy=no"]


def tiny_config(root: Path, tune: dict, **distill) -> Path:
    """The sequence-classification example beside a tiny Teacher and data, with a ``tune:`` section."""
    write_text_classification(root)
    raw = yaml.safe_load((EXAMPLES / "sequence_classification.yaml").read_text())
    raw["tune"] = tune
    raw["distill"].update(distill)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    return config


def load_study(out: Path):
    import optuna

    return optuna.load_study(study_name="amad-tune", storage=f"sqlite:///{out / 'study.db'}")


def study_trials(out: Path) -> list:
    return load_study(out).get_trials()


def jsonl_rows(path: Path) -> list[str]:
    return [json.dumps(json.loads(line), sort_keys=True) for line in path.read_text().splitlines()]


def saved_rows(path: Path) -> list[str]:
    import datasets

    return [json.dumps(row, sort_keys=True) for row in datasets.load_from_disk(str(path))]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("amad ")]
    assert "Traceback" not in err and len(errors) == 1, err
    return errors[0]


@needs_optuna
def test_grid_study_resumes_reports_and_best_config_runs(tmp_path: Path, capsys, monkeypatch) -> None:
    import amad.cli.data

    config = tiny_config(tmp_path, {"losses": ["amad-mse", "one-to-one"], "sampler": "grid",
                                    "alpha_factors": [0.5, 2.0], "temperatures": [0.5], "validation_fraction": 0.25},
                         alpha=0.2)
    read = []
    real_read_table = amad.cli.data.read_table
    monkeypatch.setattr(amad.cli.data, "read_table", lambda path, *a: read.append(path) or real_read_table(path, *a))
    out = tmp_path / "tune"

    # A first run stops after 2 of the 4 grid points; the second continues to the whole grid.
    assert main(["tune", str(config), "--out", str(out), "--n-trials", "2", *FAST]) == 0
    first = capsys.readouterr().out
    assert len(re.findall(r"^trial \d+ \[\d/2\]", first, flags=re.M)) == 2
    assert [t.state.name for t in study_trials(out)] == ["COMPLETE", "COMPLETE"]
    assert main(["tune", str(config), "--out", str(out), *FAST]) == 0
    second = capsys.readouterr().out
    assert "2 of 4 trials complete" in second and len(re.findall(r"^trial \d+ \[\d/4\]", second, flags=re.M)) == 2
    trials = study_trials(out)
    assert [t.number for t in trials] == [0, 1, 2, 3] and all(t.state.name == "COMPLETE" for t in trials)
    points = {(t.params["loss"], t.params["alpha_factor"], t.params.get("temperature")) for t in trials}
    assert points == {("amad-mse", 0.5, 0.5), ("amad-mse", 2.0, 0.5), ("one-to-one", 0.5, None),
                      ("one-to-one", 2.0, None)}

    # The validation split: 3 of the 12 training rows (ceil(0.25 * 12)); data.eval is never read.
    train_rows = jsonl_rows(tmp_path / "data" / "train.jsonl")
    validation, kept = saved_rows(out / "data" / "validation"), saved_rows(out / "data" / "train")
    assert len(validation) == math.ceil(0.25 * len(train_rows))
    assert Counter(validation) + Counter(kept) == Counter(train_rows)
    assert read and all(Path(p).name != "dev.jsonl" for p in read)

    # Each trial: an amad distill run on the kept rows, alpha = factor x distill.alpha, scored on validation.
    for t in trials:
        run = out / "trials" / str(t.number)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["data"]["train"] == str(out / "data" / "train")
        assert cfg["data"]["eval"] == str(out / "data" / "validation")
        assert cfg["training"]["max_steps"] == 2 and "tune" not in cfg
        assert cfg["distill"]["alpha"] == pytest.approx(t.params["alpha_factor"] * 0.2)
        assert cfg["distill"]["attention_loss_options"] == (
            {"temperature": 0.5} if t.params["loss"] == "amad-mse" else {})
        summary = json.loads((run / "summary.json").read_text())
        assert list(summary["alpha"].values()) == pytest.approx([cfg["distill"]["alpha"]])
        metrics = json.loads((run / "validation_results.json").read_text())["metrics"]
        assert t.value == metrics["accuracy"] and t.value * len(validation) / 100 == pytest.approx(
            round(t.value * len(validation) / 100))

    # The table has one row per trial with its value; the best is the highest (first on ties).
    table = (out / "tune.md").read_text()
    best = max(trials, key=lambda t: (t.value, -t.number))
    for t in trials:
        number = f"**{t.number}**" if t is best else str(t.number)
        assert re.search(rf"^\| {re.escape(number)} \| complete \| {t.params['loss']} \|.*\| {t.value:.2f} \|", table,
                         flags=re.M), table
    assert "data.eval (the test split) is not read" in table
    from PIL import Image

    with Image.open(out / "plots" / "alpha_vs_metric.png") as image:
        assert image.format == "PNG" and image.size[0] > 100

    # best.yaml is the user's config (all of data.train, data.eval, the training budget) with the best choices.
    best_cfg = load_config(out / "best.yaml")
    assert best_cfg.distill.attention_loss == best.params["loss"]
    assert best_cfg.distill.alpha == pytest.approx(best.user_attrs["alpha"])
    assert best_cfg.data.train == str(tmp_path / "data" / "train.jsonl")
    assert best_cfg.data.eval == str(tmp_path / "data" / "dev.jsonl")
    run = tmp_path / "best"
    assert main(["distill", str(out / "best.yaml"), "--out", str(run), "--set", "training.max_steps=2"]) == 0
    assert list(json.loads((run / "summary.json").read_text())["alpha"].values()) == pytest.approx(
        [best.user_attrs["alpha"]])

    # A study is continued only with the configuration it was made with.
    capsys.readouterr()
    assert main(["tune", str(config), "--out", str(out), *FAST, "--set", "tune.alpha_factors=[1.0]"]) == 2
    assert "differs in: tune.alpha_factors" in one_line_error(capsys)


@needs_optuna
def test_interrupted_and_stale_trials_run_again(tmp_path: Path, capsys, monkeypatch) -> None:
    import amad.cli.tune

    config = tiny_config(tmp_path, {"losses": ["amad-kl"], "validation_fraction": 0.25, "seed": 3})  # alpha: auto
    out = tmp_path / "tune"
    calls = []
    real_run = amad.cli.tune.run_distillation

    def interrupted_second_time(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the 'auto' alpha's measuring run, trial 0, then trial 1
            raise KeyboardInterrupt
        return real_run(*args, **kwargs)

    monkeypatch.setattr(amad.cli.tune, "run_distillation", interrupted_second_time)
    argv = ["tune", str(config), "--out", str(out), "--n-trials", "2", *FAST]
    assert main(argv) == 130
    assert [t.state.name for t in study_trials(out)] == ["COMPLETE", "FAIL"]
    assert "run the same command again" in capsys.readouterr().err

    assert main(argv) == 0
    assert "1 of 2 trials complete, 1 to run again" in capsys.readouterr().out
    trials = study_trials(out)
    assert [t.state.name for t in trials] == ["COMPLETE", "FAIL", "COMPLETE"]
    assert trials[2].user_attrs["retry_of"] == 1 and trials[2].params == trials[1].params
    # alpha = factor x the alpha 'auto' measured (once, by a run of alpha_batches steps).
    measured = json.loads((out / "reference" / "amad-kl" / "summary.json").read_text())["alpha"]
    assert len(measured) == 1 and next(iter(measured.values())) > 0
    for t in (trials[0], trials[2]):
        assert t.user_attrs["alpha"] == pytest.approx(t.params["alpha_factor"] * next(iter(measured.values())))
    assert 0.25 <= trials[2].params["temperature"] <= 4.0  # amad-kl takes a temperature
    assert "| 2 | complete (retry of 1) |" in (out / "tune.md").read_text()

    # A trial left running by a killed process is failed and run again with its parameters.
    stale = load_study(out).ask()
    params = {"loss": stale.suggest_categorical("loss", ["amad-kl"]),
              "alpha_factor": stale.suggest_float("alpha_factor", 0.1, 10.0, log=True),
              "temperature": stale.suggest_float("temperature", 0.25, 4.0, log=True)}
    assert main(["tune", str(config), "--out", str(out), "--n-trials", "3", *FAST]) == 0
    trials = study_trials(out)
    assert trials[stale.number].state.name == "FAIL"
    assert [t.state.name for t in trials].count("COMPLETE") == 3
    assert trials[-1].params == params and trials[-1].user_attrs["retry_of"] == stale.number


@needs_optuna
def test_a_second_tune_on_the_same_out_is_refused_before_training(tmp_path: Path, capsys) -> None:
    from amad.cli.tune_study import locked

    config = tiny_config(tmp_path, {"losses": ["amad-mse"]})
    out = tmp_path / "tune"
    out.mkdir()
    with locked(out):  # as a running amad tune holds it
        assert main(["tune", str(config), "--out", str(out), *FAST]) == 2
    assert f"another amad tune is running on {out}" in one_line_error(capsys)
    assert not (out / "study.db").exists()  # nothing was opened or trained


@needs_optuna
def test_config_errors(tmp_path: Path, capsys) -> None:
    config = tiny_config(tmp_path, {"losses": ["amad-mse"]})
    out = str(tmp_path / "tune")
    for extra, message in [
        (["--set", "tune.n_trails=3"], "did you mean 'n_trials'"),
        (["--losses", "amad-mse,amad-mes"], "did you mean 'amad-mse'"),
        (["--validation-fraction", "1.5"], "tune.validation_fraction: must be between 0 and 1"),
        (["--sampler", "grid", "--n-trials", "99"], "tune.n_trials: 99 is more than the 15 points of the grid"),
        (["--metric", "bleu"], "tune.metric: 'bleu' is not a metric of sequence-classification"),
        (["--set", "tune.loss_options={shd: {}}"], "tune.loss_options.shd: not one of the losses searched"),
        (["--validation", str(tmp_path / "nope.jsonl")], "tune.validation: "),
    ]:
        assert main(["tune", str(config), "--out", out, *extra]) == 2
        assert message in one_line_error(capsys)
    assert not (tmp_path / "tune").exists()  # refused before anything was written


def test_without_optuna_the_error_names_the_extra(tmp_path: Path, capsys, monkeypatch) -> None:
    config = tiny_config(tmp_path, {})
    monkeypatch.setitem(sys.modules, "optuna", None)  # import optuna fails, find_spec("optuna") is None
    assert main(["tune", str(config), "--out", str(tmp_path / "tune")]) == 2
    assert "amad tune needs optuna" in one_line_error(capsys) and not (tmp_path / "tune").exists()


def test_distill_accepts_and_drops_a_tune_section(tmp_path: Path) -> None:
    config = tiny_config(tmp_path, {"losses": ["amad-mse", "shd"], "n_trials": 4})
    cfg = load_config(config)
    assert cfg.tune.losses == ["amad-mse", "shd"] and cfg.tune.n_trials == 4
    from amad.cli.config import config_to_dict

    assert config_to_dict(cfg)["tune"]["n_trials"] == 4
    cfg.tune = type(cfg.tune)()
    assert "tune" not in config_to_dict(cfg)


def test_help_has_examples(capsys) -> None:
    assert main(["tune", "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: amad tune" in out and "--validation-fraction" in out
    assert "amad tune " in out.split("examples:")[1]
