"""The ``amad`` command end to end on tiny models: the examples/ configs through distill, evaluate and plot.

Each example runs the commands written at the top of its file, literally (``amad init-example`` writes
its tiny Teacher and data), and the README's command-line block runs as written too.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import shutil
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from cli_fixtures import write_text_classification

from amad.cli import main

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
FAST = [
    "--set", "training.max_steps=2", "--set", "training.per_device_train_batch_size=4",
    "--set", "training.eval_strategy=no", "--set", "training.save_strategy=no", "--set", "training.logging_steps=1",
]


def example_commands(name: str) -> list[str]:
    """The ``amad ...`` lines in the comment at the top of ``examples/<name>.yaml``."""
    lines = (EXAMPLES / f"{name}.yaml").read_text().splitlines()
    return [_words(line.lstrip("# ")) for line in lines if re.match(r"#\s+amad ", line)]


def readme_commands() -> list[str]:
    """The ``amad ...`` lines of the README's bash blocks, but ``amad demo`` (minutes of benchmarks: tests/bench)."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    return [_words(line) for line in lines if line.startswith("amad ") and not line.startswith("amad demo")]


def _words(line: str) -> str:
    """A command line without its comment, as the shell splits it."""
    return shlex.join(shlex.split(line, comments=True))


def run_as_written(commands: list[str], cwd: Path, monkeypatch, capsys) -> str:
    """Run each command line in ``cwd`` (a copy of examples/ beside it) as the shell would; return stdout."""
    assert commands
    shutil.copytree(EXAMPLES, cwd / "examples")
    monkeypatch.chdir(cwd)
    printed = ""
    for line in commands:
        argv = shlex.split(line, comments=True)
        assert argv[0] == "amad"
        assert main(argv[1:]) == 0, (line, capsys.readouterr().err[-2000:])
        printed += capsys.readouterr().out
    return printed


def check_run(run: Path, printed: str) -> dict:
    """The run directory of distill + evaluate + plot, and the evaluation printed as stored."""
    for name in ("config.json", "model.safetensors", "config.yaml", "plot_inputs.pt", "summary.json",
                 "eval_results.json", "plots/pair0_similarity.png", "plots/pair0_heads_input0.png"):
        assert (run / name).is_file(), name
    results = json.loads((run / "eval_results.json").read_text())
    for model in ("teacher", "student"):
        for metric, value in results["metrics"][model].items():
            assert f"{value:.2f}" in printed and metric in printed
    return results


def check_student(run: Path, auto_class, heads_key: str, heads: int, teacher_dir: Path) -> None:
    """The run directory holds the Student alone, loadable by plain from_pretrained."""
    student, info = auto_class.from_pretrained(run, output_loading_info=True)
    assert getattr(student.config, heads_key) == heads
    assert not info["missing_keys"] and not info["unexpected_keys"]  # the Student's weights, nothing else
    teacher = auto_class.from_pretrained(teacher_dir)
    assert getattr(teacher.config, heads_key) != heads


def test_every_example_has_its_commands_and_a_teacher_writer() -> None:
    from amad.cli.examples import EXAMPLES as WRITERS

    names = sorted(p.stem for p in EXAMPLES.glob("*.yaml"))
    assert set(WRITERS) == set(names) - set(SHIPPED_AS_IS)
    for name in names:
        commands = example_commands(name)
        if name in SHIPPED_AS_IS:  # its Teacher and data ship with the project's install
            assert commands[0].split()[:3] == ["amad", "distill", f"examples/{name}.yaml"], name
        else:
            assert [c.split()[:2] for c in commands[:2]] == [["amad", "init-example"], ["amad", "distill"]], name


#: Examples whose Teacher and data come with `make test`'s install (no `amad init-example`).
SHIPPED_AS_IS = ("causal_lm",)
#: The README's tune line (run below after the example's init-example line).
README_TUNE = "amad tune my_sst2/config.yaml --out runs/tune --n-trials 2 --max-steps 2"


def test_readme_commands_are_the_examples() -> None:
    """The README's commands: examples/sequence_classification.yaml's, the tune line, and the causal-LM example's
    smoke test and evaluation (each run as written: below, and in tests/cli/test_causal_lm.py)."""
    assert readme_commands() == [*example_commands("sequence_classification"), README_TUNE,
                                 *example_commands("causal_lm")[1:]]


def test_readme_tune_command(tmp_path: Path, monkeypatch, capsys) -> None:
    pytest.importorskip("optuna", reason="amad tune needs the tune extra")
    run_as_written([example_commands("sequence_classification")[0], README_TUNE], tmp_path, monkeypatch, capsys)
    assert (tmp_path / "runs" / "tune" / "best.yaml").is_file() and (tmp_path / "runs" / "tune" / "tune.md").is_file()


def test_sequence_classification_example(tmp_path: Path, monkeypatch, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    printed = run_as_written(example_commands("sequence_classification"), tmp_path, monkeypatch, capsys)
    run, teacher_dir = tmp_path / "runs" / "sst2", tmp_path / "my_sst2" / "models" / "teacher"
    results = check_run(run, printed)
    check_student(run, AutoModelForSequenceClassification, "num_attention_heads", 8, teacher_dir)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["layer_pairs"] == [["bert.encoder.layer.1.attention.self", "bert.encoder.layer.5.attention.self"]]
    alpha = list(summary["alpha"].values())
    assert len(alpha) == 1 and alpha[0] > 0  # alpha="auto" was measured and frozen
    assert summary["train_metrics"]["train_loss"] > 0 and math.isfinite(summary["train_metrics"]["train_loss"])
    eval_losses = [entry["eval_loss"] for entry in summary["log_history"] if "eval_loss" in entry]
    assert len(eval_losses) == 3 and all(math.isfinite(v) for v in eval_losses)  # eval_strategy: epoch, 3 epochs

    # The Teacher's accuracy, recomputed here by hand from the dev file.
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [json.loads(line) for line in (tmp_path / "my_sst2" / "data" / "dev.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            logits = teacher(**tokenizer(row["text"], return_tensors="pt")).logits
            correct += teacher.config.id2label[int(logits.argmax())] == row["label"]
    assert results["metrics"]["teacher"]["accuracy"] == pytest.approx(100 * correct / len(rows))
    assert results["num_examples"] == len(rows)

    matrices = json.loads((run / "plots" / "similarity.json").read_text())
    (entry,) = matrices.values()
    similarity, alignment = torch.tensor(entry["similarity"]), torch.tensor(entry["alignment"])
    assert similarity.shape == alignment.shape == (4, 8)
    assert torch.allclose(alignment.sum(1), torch.ones(4), atol=1e-5)
    assert similarity.min() >= 0 and similarity.max() <= 1 + 1e-5  # maps are non-negative


def test_image_classification_example(tmp_path: Path, monkeypatch, capsys) -> None:
    from transformers import AutoModelForImageClassification

    printed = run_as_written(example_commands("image_classification"), tmp_path, monkeypatch, capsys)
    run = tmp_path / "runs" / "vit"
    results = check_run(run, printed)
    check_student(run, AutoModelForImageClassification, "num_attention_heads", 8,
                  tmp_path / "my_vit" / "models" / "teacher")
    summary = json.loads((run / "summary.json").read_text())
    assert len(summary["alpha"]) == 1 and list(summary["alpha"].values())[0] > 0
    assert any("eval_loss" in entry for entry in summary["log_history"])  # eval_strategy: epoch ran
    inputs = torch.load(run / "plot_inputs.pt", weights_only=True)
    assert inputs["samples"][0]["pixel_values"].shape == (1, 3, 16, 16)
    assert 0 <= results["metrics"]["student"]["accuracy"] <= 100


def test_seq2seq_example(tmp_path: Path, monkeypatch, capsys) -> None:
    import sacrebleu
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    printed = run_as_written(example_commands("seq2seq_t5"), tmp_path, monkeypatch, capsys)
    run, teacher_dir = tmp_path / "runs" / "t5", tmp_path / "my_t5" / "models" / "teacher"
    results = check_run(run, printed)
    check_student(run, AutoModelForSeq2SeqLM, "num_heads", 8, teacher_dir)
    summary = json.loads((run / "summary.json").read_text())
    kinds = {tuple(part.split(".")[0] for part in pair) for pair in summary["layer_pairs"]}
    assert len(summary["layer_pairs"]) == 3 and kinds == {("encoder", "encoder"), ("decoder", "decoder")}

    # The Teacher's BLEU, recomputed here: beam search as the config's evaluation section says + sacrebleu.
    teacher = AutoModelForSeq2SeqLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    rows = [json.loads(line) for line in (tmp_path / "my_t5" / "data" / "dev.jsonl").read_text().splitlines()]
    with torch.no_grad():
        out = [teacher.generate(**tokenizer(r["source"], return_tensors="pt"), max_new_tokens=64, num_beams=4)
               for r in rows]
    hyps = [tokenizer.decode(o[0], skip_special_tokens=True) for o in out]
    expected = sacrebleu.corpus_bleu(hyps, [[r["target"] for r in rows]]).score
    assert results["metrics"]["teacher"]["bleu"] == pytest.approx(expected)
    assert set(results["metrics"]["student"]) == {"bleu", "cider"}


def test_visual_question_answering_example(tmp_path: Path, monkeypatch, capsys) -> None:
    from transformers import AutoModelForVisualQuestionAnswering

    printed = run_as_written(example_commands("visual_question_answering"), tmp_path, monkeypatch, capsys)
    run = tmp_path / "runs" / "vqa"
    results = check_run(run, printed)
    check_student(run, AutoModelForVisualQuestionAnswering, "num_attention_heads", 8,
                  tmp_path / "my_vqa" / "models" / "teacher")
    inputs = torch.load(run / "plot_inputs.pt", weights_only=True)
    labels = inputs["samples"][0]["labels"]
    assert labels.shape == (1, 3) and labels.dtype == torch.float32  # soft answer scores
    # each score is a sum of min(1, n/3) over 4 questions: a multiple of 100 / 12
    for model in ("teacher", "student"):
        value = results["metrics"][model]["vqa_accuracy"]
        assert 0 <= value <= 100 and (value * 12 / 100) == pytest.approx(round(value * 12 / 100))


def test_init_example_refuses_a_used_directory_and_unknown_names(tmp_path: Path, capsys) -> None:
    assert main(["init-example", "sequence-classification", "--out", str(tmp_path / "x")]) == 0
    assert (tmp_path / "x" / "config.yaml").read_text() == (EXAMPLES / "sequence_classification.yaml").read_text()
    before = (tmp_path / "x" / "models" / "teacher" / "model.safetensors").read_bytes()
    assert main(["init-example", "sequence_classification", "--out", str(tmp_path / "x")]) == 2
    assert "already holds config.yaml, models/teacher, data" in capsys.readouterr().err
    assert (tmp_path / "x" / "models" / "teacher" / "model.safetensors").read_bytes() == before  # nothing lost
    assert main(["init-example", "seq2seq", "--out", str(tmp_path / "y")]) == 2
    assert "example 'seq2seq' does not exist; did you mean 'seq2seq_t5'?" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


# -- help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["distill"], ["evaluate"], ["plot"], ["init-example"]])
def test_help_has_examples(command: list[str], capsys) -> None:
    assert main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "usage: amad" in out and "examples:" in out
    if command:
        assert f"amad {command[0]} " in out.split("examples:")[1]


def test_console_script_runs() -> None:
    script = Path(sys.executable).with_name("amad")
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "distill" in done.stdout and "evaluate" in done.stdout


def test_demo_dispatches_to_the_plugin_entry_point(monkeypatch) -> None:
    calls = []
    fake = types.ModuleType("fake_bench")
    fake.main = lambda args: calls.append(args) or 0
    monkeypatch.setitem(sys.modules, "fake_bench", fake)
    entry = EntryPoint(name="demo", value="fake_bench:main", group="amad.commands")
    monkeypatch.setattr("amad.cli.plugins._entries", lambda group: {"demo": entry} if group == "amad.commands" else {})
    assert main(["demo", "--quick", "--out", "x"]) == 0
    assert main(["--debug", "demo", "--help"]) == 0
    assert calls == [["--quick", "--out", "x"], ["--help"]]

    def usage_error(args):
        raise SystemExit(2)  # what the demo's argparse does on a bad option

    fake.main = usage_error
    assert main(["demo", "--bogus"]) == 2


def test_installed_demo_entry_point_is_the_benchmarks() -> None:
    from amad.cli.plugins import load_command, plugin_commands

    assert "demo" in plugin_commands()
    import amad.bench

    assert load_command("demo") is amad.bench.main


def test_demo_without_the_plugin_is_a_clear_error(monkeypatch, capsys) -> None:
    monkeypatch.setattr("amad.cli.plugins._entries", lambda group: {})
    assert main(["demo", "--quick"]) == 1
    assert "amad demo: error: RuntimeError: the 'demo' command is not available" in one_line_error(capsys)


# -- errors -----------------------------------------------------------------------------------------
def one_line_error(capsys) -> str:
    """The command's error: one line, the last on stderr (progress bars may precede it), no traceback."""
    err = capsys.readouterr().err
    errors = [line for line in re.split(r"[\r\n]", err) if line.startswith("amad ")]  # a bar ends in \r
    assert "Traceback" not in err and len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    return errors[0]


def test_config_errors_exit_2_with_one_line(tmp_path: Path, capsys) -> None:
    write_text_classification(tmp_path)
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLES / "sequence_classification.yaml", config)
    assert main(["distill", str(config), "--out", str(tmp_path / "r"), "--set", "distill.alpah=1"]) == 2
    assert "did you mean 'alpha'" in one_line_error(capsys)
    assert main(["distill", str(config), "--out", str(tmp_path / "r"), "--set", "training.max_step=1"]) == 2
    assert "unknown key 'training.max_step'" in one_line_error(capsys)
    assert main(["distill", str(config)]) == 2
    assert "--out: give a run directory" in one_line_error(capsys)
    assert main(["distill", str(tmp_path / "nope.yaml"), "--out", "r"]) == 2
    assert "nope.yaml' does not exist" in one_line_error(capsys)
    assert main(["evaluate", str(config), "--checkpoint", str(tmp_path)]) == 2
    assert "data.eval" not in one_line_error(capsys)  # the checkpoint is what is missing
    assert main(["plot", str(tmp_path / "models")]) == 2
    assert "run_dir: no config.yaml in" in one_line_error(capsys)
    assert main(["plot", str(tmp_path), "--samples", "x"]) == 2  # argparse: not an int
    assert "invalid int value" in capsys.readouterr().err
    assert main(["distill"]) == 2  # argparse usage error
    assert "required" in capsys.readouterr().err


def test_incompatible_pair_fails_before_any_weights_load(tmp_path: Path, capsys, monkeypatch) -> None:
    write_text_classification(tmp_path)
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLES / "sequence_classification.yaml", config)

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("amad.cli.commands.load_model", no_loading)
    code = main(["distill", str(config), "--out", str(tmp_path / "r"), "--set", "student.config.vocab_size=99"])
    assert code == 2
    assert "vocab_size is 20 in the teacher but 99 in the student" in one_line_error(capsys)
    code = main(["distill", str(config), "--out", str(tmp_path / "r"), "--set", "distill.attention_loss=amad-mes"])
    assert code == 2 and "did you mean 'amad-mse'" in one_line_error(capsys)


def test_runtime_errors_exit_1_and_debug_shows_the_traceback(tmp_path: Path, capsys) -> None:
    from amad.losses import NonFiniteError

    write_text_classification(tmp_path)
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLES / "sequence_classification.yaml", config)
    argv = ["distill", str(config), "--out", str(tmp_path / "r"), *FAST, "--set", "training.max_steps=4",
            "--set", "training.learning_rate=1e6"]  # diverges: a failure while running, not in the config
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert line.startswith("amad distill: error: NonFiniteError: ") and "--debug" in line
    with pytest.raises(NonFiniteError):
        main([*argv, "--debug"])


def test_bad_layer_names_are_a_config_error(tmp_path: Path, capsys) -> None:
    write_text_classification(tmp_path)
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLES / "sequence_classification.yaml", config)
    code = main(["distill", str(config), "--out", str(tmp_path / "r"), *FAST,
                 "--set", "distill.layers=[[bert.encoder.layer.9.attention.self, bert.encoder.layer.0.attention.self]]"])
    assert code == 2
    assert one_line_error(capsys).startswith("amad distill: error: distill.layers: ")
