"""Crash safety of training runs: atomic checkpoints, resuming from the newest complete one, the run directory.

The fault-injection test kills ``amad distill`` (children of a forkserver, tests/crash_worker.py) at several points,
inside checkpoint saves among them, resumes each time, and compares the final Student with an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from cli_fixtures import write_text_classification
from crash_worker import run_distill
from trainer_worker import ddp_trainer

from amad.checkpoints import latest_complete_checkpoint, missing_files
from amad.cli import main
from amad.trainer import DISTILLER_STATE_NAME, DistillationTrainer

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "sequence_classification.yaml"
# 12 training rows, batch 4: 3 steps an epoch; checkpoints at steps 2, 4 and 6, the newest two kept. A learning
# rate large enough that each step moves the Student far more than the tolerance of the comparison.
SETTINGS = [
    "--set", "training.max_steps=6", "--set", "training.per_device_train_batch_size=4",
    "--set", "training.learning_rate=0.01",
    "--set", "training.eval_strategy=no", "--set", "training.logging_steps=1", "--set", "training.save_strategy=steps",
    "--set", "training.save_steps=2", "--set", "training.save_total_limit=2",
]  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """Tiny Teacher, tokenizer and data (tests/cli_fixtures.py) and the example config beside them."""
    write_text_classification(tmp_path)
    shutil.copy(EXAMPLE, tmp_path / "config.yaml")
    return tmp_path


def distill_argv(project: Path, run: Path, *extra: str) -> list[str]:
    return ["distill", str(project / "config.yaml"), "--out", str(run), *SETTINGS, *extra]


def student_weights(run: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(run / "model.safetensors")


def step_losses(run: Path) -> dict[int, float]:
    history = json.loads((run / "summary.json").read_text())["log_history"]
    return {entry["step"]: entry["loss"] for entry in history if "loss" in entry}


def error_line(capsys) -> str:
    """The command's one-line message (an unfinished progress bar may precede it on its line)."""
    lines = [line[line.index("amad distill: "):] for line in capsys.readouterr().err.splitlines()
             if "amad distill: " in line]
    assert len(lines) == 1, lines
    return lines[0]


def no_model_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("amad.cli.commands.load_model", refuse)


# -- fault injection ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_runs_resume_to_the_uninterrupted_result(project: Path) -> None:
    reference = project / "reference"
    code, log = run_distill(distill_argv(project, reference), None, project / "reference.log")
    assert code == 0, log
    run = project / "run"

    def crash(fault, *extra: str, expect: int = -9) -> str:
        code, log = run_distill(distill_argv(project, run, *extra), fault, project / f"{fault[0]}.log")
        assert code == expect, log
        return log

    # SIGKILL between two checkpoints (step 4 under way): checkpoint-2 is the newest.
    crash(("step", 3))
    assert sorted(os.listdir(run)) == ["checkpoint-2"]

    # Ctrl-C inside the save of checkpoint-4 (Student written, optimizer not): the message says how to resume.
    log = crash(("interrupt", "checkpoint-4/optimizer.pt"), "--resume", expect=130)
    assert f"resuming from {run / 'checkpoint-2'} (step 2)" in log
    resume = f"amad distill {project / 'config.yaml'} --out {run} --set training.max_steps=6"
    hint = f"amad distill: interrupted; the newest complete checkpoint is {run / 'checkpoint-2'} (step 2); resume with: "
    (line,) = [line for line in log.splitlines() if line.startswith("amad distill: interrupted")]
    assert line.startswith(hint + resume) and line.endswith("--set training.save_total_limit=2 --resume"), log
    staged = run / "tmp-checkpoint-4" / "checkpoint-4"
    assert (staged / "model.safetensors").is_file() and not (staged / "optimizer.pt").exists()
    assert not (run / "checkpoint-4").exists()

    # SIGKILL with checkpoint-4 complete but not yet renamed into place: still checkpoint-2.
    log = crash(("rename", "checkpoint-4"), "--resume")
    assert f"removing {run / 'tmp-checkpoint-4'}: an incomplete checkpoint" in log
    assert f"resuming from {run / 'checkpoint-2'} (step 2)" in log
    assert missing_files(str(staged), (DISTILLER_STATE_NAME,)) == [] and not (run / "checkpoint-4").exists()

    # SIGKILL after a torn write of checkpoint-6's distiller state: checkpoint-4 is the newest.
    log = crash(("torn", "checkpoint-6/distiller_state.safetensors"), "--resume")
    assert f"resuming from {run / 'checkpoint-2'} (step 2)" in log
    assert sorted(p for p in os.listdir(run) if "checkpoint" in p) == ["checkpoint-2", "checkpoint-4", "tmp-checkpoint-6"]

    # SIGKILL while the final Student is written into the run directory, after the last checkpoint.
    log = crash(("kill", "run/distiller_state.safetensors"), "--resume")
    assert f"resuming from {run / 'checkpoint-4'} (step 4)" in log
    assert (run / "model.safetensors").is_file() and not (run / "summary.json").exists()

    code, log = run_distill(distill_argv(project, run, "--resume"), None, project / "last.log")
    assert code == 0, log
    assert f"resuming from {run / 'checkpoint-6'} (step 6)" in log
    assert sorted(p for p in os.listdir(run) if "checkpoint" in p) == ["checkpoint-4", "checkpoint-6"]
    assert sorted(p for p in os.listdir(reference) if "checkpoint" in p) == ["checkpoint-4", "checkpoint-6"]

    expected, resumed = student_weights(reference), student_weights(run)
    assert expected.keys() == resumed.keys()
    at_step_4 = safetensors.torch.load_file(run / "checkpoint-4" / "model.safetensors")
    assert max(float((expected[k] - at_step_4[k]).abs().max()) for k in expected) > 1e-3  # the last steps count
    for name, value in expected.items():
        torch.testing.assert_close(resumed[name], value, rtol=0, atol=1e-6, msg=name)
    expected_losses, losses = step_losses(reference), step_losses(run)
    assert sorted(expected_losses) == sorted(losses) == list(range(1, 7))
    assert losses == pytest.approx(expected_losses, rel=1e-6)


# -- resuming ---------------------------------------------------------------------------------------
def write_checkpoint(folder: Path, step: int, leave_out: tuple[str, ...] = ()) -> Path:
    """A checkpoint directory with the files a DistillationTrainer checkpoint has (contents irrelevant here)."""
    path = folder / f"checkpoint-{step}"
    path.mkdir(parents=True)
    names = ["trainer_state.json", "model.safetensors", DISTILLER_STATE_NAME, "optimizer.pt", "scheduler.pt"]
    for name in names:
        if name in leave_out:
            continue
        if name.endswith(".safetensors"):
            safetensors.torch.save_file({"w": torch.zeros(4)}, str(path / name))
        else:
            (path / name).write_text(json.dumps({"global_step": step}) if name == "trainer_state.json" else "x")
    return path


def test_damaged_checkpoint_files_are_named_and_skipped(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, 2)
    damaged = write_checkpoint(tmp_path, 4)
    (damaged / "trainer_state.json").write_text('{"global_st')  # truncated by a disk fault after it was written
    weights = (damaged / DISTILLER_STATE_NAME).read_bytes()
    (damaged / DISTILLER_STATE_NAME).write_bytes(weights[: len(weights) // 2])
    found = latest_complete_checkpoint(str(tmp_path), (DISTILLER_STATE_NAME,))
    assert found.step == 2
    (path, problems), = found.skipped
    assert path == str(damaged) and len(problems) == 2
    assert problems[0].startswith(f"a readable {DISTILLER_STATE_NAME} (SafetensorError")
    assert problems[1].startswith("a readable trainer_state.json (JSONDecodeError")


def test_incomplete_checkpoints_are_skipped(tmp_path: Path, caplog) -> None:
    write_checkpoint(tmp_path, 2)
    write_checkpoint(tmp_path, 4)
    write_checkpoint(tmp_path, 6, leave_out=("optimizer.pt",))  # e.g. half deleted by rotation
    write_checkpoint(tmp_path, 8, leave_out=("trainer_state.json", "model.safetensors"))  # an old non-atomic writer
    write_checkpoint(tmp_path / "tmp-checkpoint-10", 10)  # a staging directory is never a checkpoint

    found = latest_complete_checkpoint(str(tmp_path), (DISTILLER_STATE_NAME,))
    assert (found.path, found.step) == (str(tmp_path / "checkpoint-4"), 4)
    assert found.skipped == [(str(tmp_path / "checkpoint-8"), ["trainer_state.json", "model weights (model.safetensors "
                                                                "or an index)"]),
                             (str(tmp_path / "checkpoint-6"), ["optimizer.pt"])]
    # without optimizer states (save_only_model), checkpoint-6 is complete
    assert latest_complete_checkpoint(str(tmp_path), (DISTILLER_STATE_NAME,), need_optimizer=False).step == 6

    trainer = ddp_trainer(str(tmp_path), per_device_batch=2)
    with caplog.at_level(logging.INFO, logger="amad"):
        assert trainer.resolve_checkpoint(True) == str(tmp_path / "checkpoint-4")
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-8'} (missing trainer_state.json" in caplog.text
    assert f"skipping incomplete checkpoint {tmp_path / 'checkpoint-6'} (missing optimizer.pt)" in caplog.text
    assert f"resuming from {tmp_path / 'checkpoint-4'} (step 4)" in caplog.text
    with pytest.raises(ValueError, match=r"checkpoint-6': it is not a complete checkpoint \(missing optimizer.pt\)"):
        trainer.resolve_checkpoint(str(tmp_path / "checkpoint-6"))
    with pytest.raises(ValueError, match="no complete checkpoint in"):
        ddp_trainer(str(tmp_path / "empty"), per_device_batch=2).resolve_checkpoint(True)


def test_resume_without_a_checkpoint_is_a_config_error(project: Path, capsys, monkeypatch) -> None:
    no_model_loading(monkeypatch)
    write_checkpoint(project / "run", 3, leave_out=("optimizer.pt",))
    assert main(distill_argv(project, project / "run", "--resume")) == 2
    line = error_line(capsys)
    assert "--resume: no complete checkpoint in" in line and "skipped: checkpoint-3" in line and "--overwrite" in line
    assert main(distill_argv(project, project / "run", "--resume", str(project / "run" / "checkpoint-3"))) == 2
    assert "is not a complete checkpoint (missing optimizer.pt)" in error_line(capsys)


# -- the run directory ------------------------------------------------------------------------------
def test_reusing_a_run_directory_is_refused(project: Path, capsys, monkeypatch) -> None:
    no_model_loading(monkeypatch)
    run = project / "run"
    write_checkpoint(run, 16)
    (run / "summary.json").write_text("{}")
    assert main(distill_argv(project, run)) == 2
    line = error_line(capsys)
    assert f"--out: '{run}' already holds a run (checkpoint-16, summary.json)" in line
    assert "--resume" in line and "--overwrite" in line
    assert main(distill_argv(project, run, "--resume", "--overwrite")) == 2
    assert "--resume and --overwrite: give one" in error_line(capsys)
    assert sorted(os.listdir(run)) == ["checkpoint-16", "summary.json"]  # nothing was touched


def test_overwrite_replaces_the_previous_run(project: Path, capsys) -> None:
    run = project / "run"
    for step in (16, 32, 40):
        write_checkpoint(run, step)
    (run / "tmp-checkpoint-48").mkdir()
    for name in ("summary.json", "model.safetensors", "vocab.txt", "notes.txt"):
        (run / name).write_text("old")
    fast = ["--set", "training.max_steps=2", "--set", "training.save_steps=1", "--set", "training.save_total_limit=5"]
    assert main(distill_argv(project, run, *fast, "--overwrite")) == 0
    err = capsys.readouterr().err
    removed = ("checkpoint-16, checkpoint-32, checkpoint-40, tmp-checkpoint-48, model.safetensors, summary.json, "
               "vocab.txt")
    assert f"--overwrite: removing the previous run from {run}: {removed}" in err
    assert sorted(p for p in os.listdir(run) if "checkpoint" in p) == ["checkpoint-1", "checkpoint-2"]
    assert (run / "notes.txt").read_text() == "old"  # not a file amad distill writes: kept
    assert json.loads((run / "summary.json").read_text())["train_metrics"]
    assert not (run / "vocab.txt").exists()  # the old run's tokenizer file is gone (this one writes tokenizer.json)


def test_unwritable_run_directory_fails_before_any_model_loads(project: Path, capsys, monkeypatch) -> None:
    no_model_loading(monkeypatch)
    (project / "a_file").write_text("")
    assert main(distill_argv(project, project / "a_file" / "run")) == 2
    assert f"--out: cannot write to '{project / 'a_file' / 'run'}': Not a directory" in error_line(capsys)
    if os.geteuid() != 0:  # root writes anywhere
        locked = project / "locked"
        locked.mkdir(mode=0o500)
        assert main(distill_argv(project, locked)) == 2
        assert f"--out: cannot write to '{locked}': Permission denied" in error_line(capsys)


def test_ctrl_c_says_how_to_resume(project: Path, capsys, monkeypatch) -> None:
    real_step = DistillationTrainer.training_step

    def interrupted_at_step_4(self, *args, **kwargs):
        if self.state.global_step == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "training_step", interrupted_at_step_4)
    run = project / "run"
    assert main(distill_argv(project, run)) == 130
    line = error_line(capsys)
    assert line.startswith(f"amad distill: interrupted; the newest complete checkpoint is {run / 'checkpoint-2'} "
                           "(step 2); resume with: amad distill ")
    assert line.endswith(f"--out {run} {' '.join(SETTINGS)} --resume")
    assert main(distill_argv(project, project / "nosave", "--set", "training.save_strategy=no")) == 130
    assert "interrupted; no complete checkpoint in" in error_line(capsys)


@pytest.mark.parametrize(
    "setting, message",
    [
        ("training.max_steps=0", "training.max_steps: 0 is not a number of steps (transformers would train one step)"),
        ("training.max_steps=-2", "training.max_steps: -2 is not a number of steps"),
        ("training.num_train_epochs=0", "training.num_train_epochs: 0 would train nothing"),
        ("training.save_steps=0", "training.save_steps: must be positive"),
        ("training.gradient_accumulation_steps=0", "training.gradient_accumulation_steps: must be at least 1, got 0"),
        ("training.save_total_limit=0", "training.save_total_limit: must be at least 1, got 0"),
    ],
)
def test_special_step_counts_are_config_errors(project: Path, capsys, monkeypatch, setting, message) -> None:
    no_model_loading(monkeypatch)
    argv = ["distill", str(project / "config.yaml"), "--out", str(project / "run"), "--set", setting]
    assert main(argv) == 2
    assert message in error_line(capsys)
