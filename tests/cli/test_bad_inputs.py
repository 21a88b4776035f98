"""Bad inputs through the ``amad`` command: each fails (or is handled) with one line naming what and where.

Every case runs the real command on the tiny sequence-classification example of
``amad init-example`` (or an image one) and checks the exit code (2: a problem in
the user's config, data or files, found before training; 1: a failure while
running) and the words of the message: the key, the file, the line or row, and
what to do.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from amad.cli import main
from amad.cli.examples import init_example, write_jsonl

FAST = ["--set", "training.max_steps=2", "--set", "training.eval_strategy=no", "--set", "training.save_strategy=no",
        "--set", "training.logging_steps=1"]


@pytest.fixture(scope="module")
def example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``amad init-example sequence_classification``, written once for the module (tests copy what they damage)."""
    return init_example("sequence_classification", tmp_path_factory.mktemp("sst2") / "example").parent


def error_line(capsys) -> str:
    """The command's one-line error (the last line of stderr, after any progress bar), no traceback."""
    err = capsys.readouterr().err
    lines = [part for part in err.replace("\r", "\n").splitlines() if part.strip()]
    assert lines and "Traceback" not in err, err
    assert lines[-1].startswith("amad "), err
    return lines[-1]


def distill(example: Path, out: Path, *options: str) -> int:
    return main(["distill", str(example / "config.yaml"), "--out", str(out), *FAST, *options])


def fails(capsys, code: int, expected: int, *words: str) -> str:
    line = error_line(capsys)
    assert code == expected, line
    for word in words:
        assert word in line, (word, line)
    return line


# -- data rows ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("row", [{"label": "neg"}, {"text": None, "label": "neg"}], ids=["missing", "null"])
def test_a_row_without_its_text_names_file_and_line(example: Path, tmp_path: Path, capsys, row: dict) -> None:
    data = tmp_path / "train.jsonl"
    write_jsonl(data, [{"text": "good film", "label": "pos"}, {"text": "bad plot", "label": "neg"}, row])
    code = distill(example, tmp_path / "run", "--set", f"data.train={data}")
    fails(capsys, code, 2, "data.text_column", f"line 3 of {data}", "no value in column 'text'")
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_row_without_its_label_names_the_line(example: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "good", "label": "pos"}\n\n{"text": "bad", "label": null}\n')  # a blank line counts
    fails(capsys, distill(example, tmp_path / "run", "--set", f"data.train={data}"), 2,
          "data.label_column", f"line 3 of {data}")


@pytest.mark.parametrize("content, words", [
    ("", ["train.jsonl", "the file is empty (no rows)"]),
    ('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n', ["train.jsonl", "line 2, column", "not valid JSON"]),
    ('{"text": "a", "label": "pos"}\n["b", "neg"]\n', ["line 2 is list, not a JSON object"]),
], ids=["empty", "bad-json-line", "not-an-object"])
def test_unreadable_json_lines_name_the_line(example: Path, tmp_path: Path, capsys, content: str, words) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text(content)
    fails(capsys, distill(example, tmp_path / "run", "--set", f"data.train={data}"), 2,
          "data.train: cannot read", *words)


@pytest.mark.parametrize("content, words", [
    ("", ["the file is empty (no rows)"]),
    ("text,label\n", ["a header line but no rows"]),
    ("text,label\ngood,pos\nbad,neg,extra\n", ["Expected 2 fields in line 3, saw 3"]),
], ids=["empty", "header-only", "extra-field"])
def test_unreadable_csv_names_the_problem(example: Path, tmp_path: Path, capsys, content: str, words) -> None:
    data = tmp_path / "train.csv"
    data.write_text(content)
    line = fails(capsys, distill(example, tmp_path / "run", "--set", f"data.train={data}"), 2,
                 f"data.train: cannot read '{data}' as csv: ", *words)
    assert "An error occurred while generating the dataset" not in line


# -- images --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_example(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_example("image_classification", tmp_path_factory.mktemp("vit") / "example").parent


def image_table(root: Path, pixels: list[np.ndarray]) -> Path:
    from datasets import Dataset

    table = Dataset.from_dict({"image": [p.tolist() for p in pixels], "label": ["dark"] * len(pixels)})
    table.save_to_disk(str(root / "arrays"))
    return root / "arrays"


@pytest.mark.parametrize("bad, words", [
    (("nan", 0.5), ["contains 1 NaN or infinite values"]),
    (("value", 300.0), ["values from", "to 300", "[0, 255]", "not clipped"]),
    (("value", -1.0), ["values from -1 to"]),
], ids=["nan", "above-255", "negative"])
def test_bad_pixels_in_image_arrays_name_the_row(image_example: Path, tmp_path: Path, capsys, bad, words) -> None:
    rng = np.random.default_rng(0)
    pixels = [rng.random((16, 16, 3)) for _ in range(3)]
    kind, value = bad
    pixels[1][2, 3, 0] = np.nan if kind == "nan" else value
    data = image_table(tmp_path, pixels)
    code = main(["distill", str(image_example / "config.yaml"), "--out", str(tmp_path / "run"), *FAST,
                 "--set", f"data.train={data}", "--set", "data.eval=null"])
    fails(capsys, code, 2, "data.image_column", f"row 1 of {data}", *words)


def test_load_image_refuses_what_it_used_to_clip() -> None:
    from amad.cli.data import load_image

    image = np.full((4, 4, 3), 0.5)
    assert np.asarray(load_image(image)).max() == 127  # [0, 1] floats are scaled
    image[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        load_image(image)
    with pytest.raises(ValueError, match="values from 0 to 999"):
        load_image(np.full((4, 4), 999, dtype=np.int64) * (np.arange(4) > 0))


# -- damaged files -----------------------------------------------------------------------------------------
def damaged_copy(example: Path, tmp_path: Path, name: str) -> Path:
    copy = tmp_path / "example"
    shutil.copytree(example, copy)
    path = copy / "models" / "teacher" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return copy


@pytest.mark.parametrize("name, key", [
    ("model.safetensors", "teacher.path"), ("config.json", "teacher.path"),
    ("tokenizer.json", "tokenizer"), ("tokenizer_config.json", "tokenizer"),
])
def test_a_truncated_file_is_named_with_what_to_do(example: Path, tmp_path: Path, capsys, name: str, key: str) -> None:
    copy = damaged_copy(example, tmp_path, name)
    fails(capsys, distill(copy, tmp_path / "run"), 2, f"{key}: cannot load", name,
          "damaged or truncated: save it again with save_pretrained (or download it again)")
    assert not (tmp_path / "run").exists()


def test_a_truncated_student_checkpoint_is_named(example: Path, tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert distill(example, run) == 0
    weights = run / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    capsys.readouterr()
    code = main(["evaluate", str(run / "config.yaml"), "--checkpoint", str(run)])
    fails(capsys, code, 2, "student: cannot load the model", "model.safetensors", "damaged or truncated")


# -- training ----------------------------------------------------------------------------------------------
def test_divergence_names_the_step_and_suggests_a_lower_learning_rate(example: Path, tmp_path: Path, capsys) -> None:
    code = distill(example, tmp_path / "run", "--set", "training.learning_rate=1e6", "--set", "training.max_steps=6")
    fails(capsys, code, 1, "NonFiniteError: at training step", "NaN or infinite",
          "lower the learning rate (learning_rate = 1e+06)")


@pytest.mark.parametrize("loss, words", [
    ("amad-projected", ["distill.attention_loss_options: 'amad-projected' needs the option 'n'", "n = q*k",
                        "attention_loss_options: {n: 38809}"]),
    ("minilm-relations", ["'minilm-relations' needs the option 'num_relation_heads'",
                          "attention_loss_options: {num_relation_heads: 4}"]),
])
def test_a_loss_without_its_required_option_says_which(example: Path, tmp_path: Path, capsys, loss, words) -> None:
    fails(capsys, distill(example, tmp_path / "run", "--set", f"distill.attention_loss={loss}"), 2, *words)


def test_max_length_beyond_the_positions_is_refused_before_training(example: Path, tmp_path: Path, capsys) -> None:
    code = distill(example, tmp_path / "run", "--set", "data.max_length=200")
    fails(capsys, code, 2, "data.max_length: 200 tokens do not fit the teacher's 128 positions",
          "set data.max_length to at most 128")
    code = distill(example, tmp_path / "run", "--set", "student.config.max_position_embeddings=64")
    fails(capsys, code, 2, "data.max_length: 128 tokens do not fit the student's 64 positions")
    assert not (tmp_path / "run").exists()


def test_evaluating_during_training_needs_eval_data(example: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("amad.cli.commands.load_model", no_loading)
    code = main(["distill", str(example / "config.yaml"), "--out", str(tmp_path / "run"), "--set", "data.eval=null"])
    fails(capsys, code, 2, "data.eval: training.eval_strategy is 'epoch'", "no evaluation data",
          "set training.eval_strategy: no")


# -- Teacher / Student pairs --------------------------------------------------------------------------------
def test_the_cli_and_the_library_refuse_a_pair_with_the_same_words(example: Path, tmp_path: Path, capsys) -> None:
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    from amad import Distiller

    code = distill(example, tmp_path / "run", "--set", "student.config.vocab_size=99")
    line = fails(capsys, code, 2, "vocab_size is 20 in the teacher but 99 in the student")
    teacher = AutoModelForSequenceClassification.from_pretrained(example / "models" / "teacher")
    student = BertForSequenceClassification(teacher.config.__class__(**{**teacher.config.to_dict(), "vocab_size": 99}))
    with pytest.raises(ValueError) as info:
        Distiller(teacher, student)
    assert line.endswith(str(info.value))


def swapped_student(example: Path, out: Path, labels: tuple[str, str]) -> Path:
    """The Teacher saved with its two classes listed the other way round (classifier rows swapped too)."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(example / "models" / "teacher")
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight.flip(0))
        model.classifier.bias.copy_(model.classifier.bias.flip(0))
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}
    model.save_pretrained(out)
    return out


def test_a_student_with_the_labels_in_another_order_is_matched_by_name(example: Path, tmp_path: Path, capsys) -> None:
    """Measured before: position-by-position KD and evaluation (98.44 % reported, 1.56 % through its id2label)."""
    student = swapped_student(example, tmp_path / "student", ("pos", "neg"))
    assert main(["evaluate", str(example / "config.yaml"), "--checkpoint", str(student),
                 "--output", str(tmp_path / "eval.json")]) == 0
    metrics = json.loads((tmp_path / "eval.json").read_text())["metrics"]
    assert metrics["student"]["accuracy"] == metrics["teacher"]["accuracy"]  # the same classifier, by name
    assert metrics["teacher"]["accuracy"] != 50  # read position by position, the Student would score 100 - that

    run = tmp_path / "run"  # it can be distilled into (the KD term: tests/test_compat.py)
    assert distill(example, run, "--set", f"student.path={student}", "--set", "student.config=null") == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["id2label"] == {"0": "pos", "1": "neg"}  # the Student keeps its own order


def test_a_student_with_other_label_names_is_refused(example: Path, tmp_path: Path, capsys) -> None:
    student = swapped_student(example, tmp_path / "student", ("good", "bad"))
    code = distill(example, tmp_path / "run", "--set", f"student.path={student}", "--set", "student.config=null")
    fails(capsys, code, 2, "the teacher's labels ['neg', 'pos'] are not the student's ['good', 'bad']")


# -- plots -------------------------------------------------------------------------------------------------
def test_per_head_plots_label_queries_and_keys_with_tokens(example: Path, tmp_path: Path, monkeypatch) -> None:
    from amad.cli import plotting

    run = tmp_path / "run"
    assert distill(example, run) == 0
    figures = []
    original = plotting.head_maps_figure
    monkeypatch.setattr(plotting, "head_maps_figure", lambda *a, **k: figures.append(original(*a, **k)) or figures[-1])
    assert main(["plot", str(run), "--samples", "1", "--heads-samples", "1"]) == 0
    (fig,) = figures
    sample = torch.load(run / "plot_inputs.pt", weights_only=True)["samples"][0]
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(run).convert_ids_to_tokens(sample["input_ids"][0].tolist())
    corner = next(ax for ax in fig.axes if ax.get_title() == "Student h0")
    assert corner.get_xlabel() == "key" and corner.get_ylabel() == "query"
    assert [t.get_text() for t in corner.get_xticklabels()] == tokens
    assert [t.get_text() for t in corner.get_yticklabels()] == tokens
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"



@pytest.mark.parametrize("columns, rows, words", [
    ({"target_column": "target"}, {"target": [["ein", None], ["zwei"]]}, ["row 0 of", "has a null in its list"]),
    ({"answer_column": "answer"}, {"answer": [["yes"], []]}, ["row 1 of", "has an empty list in column 'answer'"]),
    ({"text_column": "text"}, {"text": [1, 2]}, ["column 'text' of", "holds Value('int64'), not text"]),
    ({"source_column": "source"}, {"source": ["a", None]}, ["data.source_column: row 1 of", "no value"]),
], ids=["null-reference", "empty-answers", "numbers-as-text", "null-source"])
def test_column_values_are_checked_row_by_row(columns: dict, rows: dict, words) -> None:
    from datasets import Dataset

    from amad.cli.config import ConfigError
    from amad.cli.inputs import check_values

    with pytest.raises(ConfigError) as info:
        check_values(Dataset.from_dict(rows), columns, "data.parquet")
    for word in words:
        assert word in str(info.value), (word, str(info.value))
