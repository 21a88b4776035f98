"""The ``amad`` command end to end on tiny models: the examples/ configs through distill, evaluate and plot."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
import torch
from cli_fixtures import write_image_classification, write_seq2seq, write_text_classification, write_vqa

from amad.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FAST = [
    "--set", "training.max_steps=2", "--set", "training.per_device_train_batch_size=4",
    "--set", "training.eval_strategy=no", "--set", "training.save_strategy=no", "--set", "training.logging_steps=1",
]


def distill_example(tmp_path: Path, example: str, writer, *extra: str) -> Path:
    """Copy ``examples/<example>`` beside freshly written tiny models and data, run ``amad distill`` on it."""
    writer(tmp_path)
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLES / example, config)
    run = tmp_path / "run"
    assert main(["distill", str(config), "--out", str(run), *FAST, *extra]) == 0
    for name in ("config.json", "model.safetensors", "config.yaml", "plot_inputs.pt", "summary.json"):
        assert (run / name).is_file(), name
    return run


def evaluate(run: Path, capsys) -> dict:
    capsys.readouterr()
    assert main(["evaluate", str(run / "config.yaml"), "--checkpoint", str(run)]) == 0
    printed = capsys.readouterr().out
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


def test_sequence_classification_example(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run = distill_example(tmp_path, "sequence_classification.yaml", write_text_classification)
    check_student(run, AutoModelForSequenceClassification, "num_attention_heads", 8, tmp_path / "models" / "teacher")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["layer_pairs"] == [["bert.encoder.layer.1.attention.self", "bert.encoder.layer.5.attention.self"]]
    alpha = list(summary["alpha"].values())
    assert len(alpha) == 1 and alpha[0] > 0  # alpha="auto" was measured and frozen
    losses = [entry["loss"] for entry in summary["log_history"] if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))

    results = evaluate(run, capsys)
    # The Teacher's accuracy, recomputed here by hand from the dev file.
    teacher = AutoModelForSequenceClassification.from_pretrained(tmp_path / "models" / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models" / "teacher")
    rows = [json.loads(line) for line in (tmp_path / "data" / "dev.jsonl").read_text().splitlines()]
    correct = 0
    with torch.no_grad():
        for row in rows:
            logits = teacher(**tokenizer(row["text"], return_tensors="pt")).logits
            correct += teacher.config.id2label[int(logits.argmax())] == row["label"]
    assert results["metrics"]["teacher"]["accuracy"] == pytest.approx(100 * correct / len(rows))
    assert results["num_examples"] == len(rows)

    assert main(["plot", str(run), "--samples", "3", "--heads-samples", "1"]) == 0
    plots = run / "plots"
    for name in ("pair0_similarity.png", "pair0_heads_input0.png"):
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    matrices = json.loads((plots / "similarity.json").read_text())
    (entry,) = matrices.values()
    similarity, alignment = torch.tensor(entry["similarity"]), torch.tensor(entry["alignment"])
    assert similarity.shape == alignment.shape == (4, 8)
    assert torch.allclose(alignment.sum(1), torch.ones(4), atol=1e-5)
    assert similarity.min() >= 0 and similarity.max() <= 1 + 1e-5  # maps are non-negative


def test_image_classification_example(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForImageClassification

    run = distill_example(tmp_path, "image_classification.yaml", write_image_classification,
                          "--set", "distill.alpha=0.2")
    check_student(run, AutoModelForImageClassification, "num_attention_heads", 8, tmp_path / "models" / "teacher")
    summary = json.loads((run / "summary.json").read_text())
    assert list(summary["alpha"].values()) == [0.2]
    inputs = torch.load(run / "plot_inputs.pt", weights_only=True)
    assert inputs["samples"][0]["pixel_values"].shape == (1, 3, 16, 16)
    results = evaluate(run, capsys)
    assert 0 <= results["metrics"]["student"]["accuracy"] <= 100


def test_seq2seq_example(tmp_path: Path, capsys) -> None:
    import sacrebleu
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    run = distill_example(tmp_path, "seq2seq_t5.yaml", write_seq2seq,
                          "--set", "evaluation.num_beams=1", "--set", "evaluation.max_new_tokens=6")
    check_student(run, AutoModelForSeq2SeqLM, "num_heads", 8, tmp_path / "models" / "teacher")
    summary = json.loads((run / "summary.json").read_text())
    kinds = {tuple(part.split(".")[0] for part in pair) for pair in summary["layer_pairs"]}
    assert len(summary["layer_pairs"]) == 3 and kinds == {("encoder", "encoder"), ("decoder", "decoder")}

    results = evaluate(run, capsys)
    # The Teacher's BLEU, recomputed here: greedy generation + sacrebleu.
    teacher = AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "models" / "teacher").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "models" / "teacher")
    rows = [json.loads(line) for line in (tmp_path / "data" / "dev.jsonl").read_text().splitlines()]
    with torch.no_grad():
        out = [teacher.generate(**tokenizer(r["source"], return_tensors="pt"), max_new_tokens=6, num_beams=1)
               for r in rows]
    hyps = [tokenizer.decode(o[0], skip_special_tokens=True) for o in out]
    expected = sacrebleu.corpus_bleu(hyps, [[r["target"] for r in rows]]).score
    assert results["metrics"]["teacher"]["bleu"] == pytest.approx(expected)
    assert set(results["metrics"]["student"]) == {"bleu", "cider"}


def test_visual_question_answering_example(tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForVisualQuestionAnswering

    run = distill_example(tmp_path, "visual_question_answering.yaml", write_vqa)
    check_student(run, AutoModelForVisualQuestionAnswering, "num_attention_heads", 8, tmp_path / "models" / "teacher")
    inputs = torch.load(run / "plot_inputs.pt", weights_only=True)
    labels = inputs["samples"][0]["labels"]
    assert labels.shape == (1, 3) and labels.dtype == torch.float32  # soft answer scores
    results = evaluate(run, capsys)
    # each score is a sum of min(1, n/3) over 4 questions: a multiple of 100 / 12
    for model in ("teacher", "student"):
        value = results["metrics"][model]["vqa_accuracy"]
        assert 0 <= value <= 100 and (value * 12 / 100) == pytest.approx(round(value * 12 / 100))


# -- help ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", [[], ["distill"], ["evaluate"], ["plot"]])
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
    errors = [line for line in err.splitlines() if line.startswith("amad ")]
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
    write_text_classification(tmp_path)
    (tmp_path / "models" / "teacher" / "model.safetensors").write_bytes(b"not a safetensors file")
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLES / "sequence_classification.yaml", config)
    argv = ["distill", str(config), "--out", str(tmp_path / "r"), *FAST]
    assert main(argv) == 1
    line = one_line_error(capsys)
    assert line.startswith("amad distill: error: ") and "--debug" in line
    with pytest.raises(Exception):
        main([*argv, "--debug"])


def test_bad_layer_names_are_a_config_error(tmp_path: Path, capsys) -> None:
    write_text_classification(tmp_path)
    config = tmp_path / "config.yaml"
    shutil.copy(EXAMPLES / "sequence_classification.yaml", config)
    code = main(["distill", str(config), "--out", str(tmp_path / "r"), *FAST,
                 "--set", "distill.layers=[[bert.encoder.layer.9.attention.self, bert.encoder.layer.0.attention.self]]"])
    assert code == 2
    assert one_line_error(capsys).startswith("amad distill: error: distill.layers: ")
