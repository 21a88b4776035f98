"""Config schema and validation: every failure is one ConfigError naming the key or file, before any model loads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from cli_fixtures import bert_config, bert_tokenizer, t5_config, vit_config, write_jsonl

from amad.cli.building import check_processors, model_configs
from amad.cli.config import ConfigError, RunConfig, check_distill, config_to_dict, load_config, parse_overrides, training_arguments


@pytest.fixture
def text_run(tmp_path: Path) -> Path:
    """A valid sequence-classification setup: teacher config + tokenizer (no weights) and data."""
    teacher = tmp_path / "teacher"
    tokenizer = bert_tokenizer(teacher)
    tokenizer.save_pretrained(teacher)
    bert_config(len(tokenizer)).save_pretrained(teacher)
    write_jsonl(tmp_path / "train.jsonl", [{"text": "good film", "label": "pos"}, {"text": "bad", "label": "neg"}])
    return tmp_path


def write_config(root: Path, **changes) -> Path:
    raw = {
        "task": "sequence-classification",
        "teacher": {"path": "teacher"},
        "student": {"config": {"num_attention_heads": 2}},
        "data": {"train": "train.jsonl"},
    }
    for key, value in changes.items():
        node = raw
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def fails(match: str, path: Path, overrides=(), **kwargs) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        load_config(path, overrides, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# -- a valid config --------------------------------------------------------------------------------
def test_valid_config_resolves_paths_and_defaults(text_run: Path) -> None:
    cfg = load_config(write_config(text_run))
    assert isinstance(cfg, RunConfig)
    assert cfg.teacher.path == str((text_run / "teacher").resolve())
    assert cfg.data.train == str((text_run / "train.jsonl").resolve())
    assert cfg.tokenizer == cfg.teacher.path  # defaults to the Teacher's directory, which holds a tokenizer
    assert cfg.distill.attention_loss == "amad-mse" and cfg.distill.alpha == "auto" and cfg.distill.layers == "last"
    assert cfg.distill.kd_temperature == 1.0 and isinstance(cfg.distill.kd_temperature, float)


def test_resolved_config_round_trips(text_run: Path, tmp_path: Path) -> None:
    cfg = load_config(write_config(text_run), ["distill.alpha=0.2", "training.max_steps=3"])
    again = tmp_path / "elsewhere" / "config.yaml"
    again.parent.mkdir()
    again.write_text(yaml.safe_dump(config_to_dict(cfg)))
    assert config_to_dict(load_config(again)) == config_to_dict(cfg)


def test_overrides_are_yaml_and_dotted(text_run: Path) -> None:
    path = write_config(text_run)
    cfg = load_config(path, [
        "distill.alpha=0.2", "training.max_steps=10", "distill.streaming=false",
        "distill.layers=[[a.b, c.d]]", "distill.attention_loss=null", "seed=7",
    ])
    assert cfg.distill.alpha == 0.2
    assert cfg.training == {"max_steps": 10}
    assert cfg.distill.streaming is False
    assert cfg.distill.layers == [["a.b", "c.d"]]
    assert cfg.distill.attention_loss is None
    assert cfg.seed == 7


def test_override_paths_are_relative_to_the_working_directory(text_run: Path, tmp_path: Path) -> None:
    other = tmp_path / "cwd"
    write_jsonl(other / "more.jsonl", [{"text": "fun", "label": "pos"}])
    cfg = load_config(write_config(text_run), ["data.train=more.jsonl"], cwd=other)
    assert cfg.data.train == str((other / "more.jsonl").resolve())


def test_parse_overrides_rejects_malformed_items() -> None:
    assert parse_overrides(["a.b=[1, 2]", "c=x=y"]) == [("a.b", [1, 2]), ("c", "x=y")]
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["distill.alpha"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_overrides(["distill.alpha=[1, 2"])


def test_override_into_a_scalar_fails(text_run: Path) -> None:
    fails(r"'seed' is 0, not a mapping", write_config(text_run, seed=0), ["seed.x=1"])


# -- unknown keys --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, suggestion",
    [
        ("taks=seq2seq", "'task'"),
        ("distill.alpah=0.2", "'alpha'"),
        ("data.text_colum=x", "'text_column'"),
        ("evaluation.num_beam=2", "'num_beams'"),
        ("teacher.pth=x", "'path'"),
    ],
)
def test_unknown_key_suggests_the_closest(text_run: Path, override: str, suggestion: str) -> None:
    key = override.split("=")[0]
    message = fails(re.escape(f"unknown key '{key}'"), write_config(text_run), [override])
    assert f"did you mean {suggestion}" in message


def test_unknown_training_key_suggests_a_training_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'training.learning_rat'; did you mean 'learning_rate'"):
        training_arguments({"learning_rat": 1e-3}, tmp_path)


def test_training_values_are_type_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"training.max_steps: expected an integer, got 'ten'"):
        training_arguments({"max_steps": "ten"}, tmp_path)
    with pytest.raises(ConfigError, match=r"training.learning_rate: expected a number"):
        training_arguments({"learning_rate": "fast"}, tmp_path)
    with pytest.raises(ConfigError, match=r"training: .*stepz"):
        training_arguments({"eval_strategy": "stepz"}, tmp_path)
    with pytest.raises(ConfigError, match="remove_unused_columns"):
        training_arguments({"remove_unused_columns": True}, tmp_path)
    args = training_arguments({"max_steps": 3, "learning_rate": 1}, tmp_path / "out")
    assert args.output_dir == str(tmp_path / "out") and args.max_steps == 3 and args.remove_unused_columns is False


# -- wrong types and values -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "override, match",
    [
        ("distill.kd_temperature=hot", r"distill.kd_temperature: expected a number, got 'hot' \(str\)"),
        ("distill.streaming=maybe", r"distill.streaming: expected true or false, got 'maybe'"),
        ("data.max_length=1.5", r"data.max_length: expected an integer, got 1.5"),
        ("teacher=models/teacher", r"teacher: expected a mapping"),
        ("data.labels=pos", r"data.labels: expected a list"),
        ("task=sequence-clasification", r"task: 'sequence-clasification' is not one of .*did you mean 'sequence-classification'"),
        ("distill.alpha=[0.1, x]", r"distill.alpha: expected a number or a string or a list"),
        ("distill.alpha=fast", r"distill.alpha: expected one of 'auto', 'loss-ratio', 'paper', a number or a list of numbers, got 'fast'"),
        ("distill.alpha=-1", r"distill.alpha: weights must be finite numbers >= 0"),
        ("distill.kd_temperature=0", r"distill.kd_temperature: must be > 0, got 0.0"),
        ("distill.kd_top_k=2.5", r"distill.kd_top_k: expected an integer"),
        ("distill.kd_top_k=0", r"distill.kd_top_k: must be None or an integer >= 1"),
        ("distill.layers=first", r"distill.layers: 'first' is not 'last', 'uniform'"),
        ("distill.layers=[[a, b, c]]", r"distill.layers\[0\]: expected \[teacher_module, student_module\]"),
        ("distill.layers=[]", r"distill.layers: the list of layer pairs is empty"),
        ("evaluation.batch_size=0", r"evaluation.batch_size: must be >= 1"),
    ],
)
def test_wrong_type_or_value_names_the_key(text_run: Path, override: str, match: str) -> None:
    fails(match, write_config(text_run), [override])


def test_alpha_list_must_match_explicit_layers(text_run: Path) -> None:
    fails(r"distill.alpha: 2 values for 1 layer pairs", write_config(text_run),
          ["distill.layers=[[a, b]]", "distill.alpha=[0.1, 0.2]"])


def test_nothing_to_train_is_refused(text_run: Path) -> None:
    fails(r"nothing to train", write_config(text_run),
          ["distill.attention_loss=null", "distill.kd_weight=0"])


def test_missing_required_keys(text_run: Path) -> None:
    path = text_run / "partial.yaml"
    path.write_text(yaml.safe_dump({"task": "seq2seq", "teacher": {"path": "teacher"}, "student": {"config": {}}}))
    fails(r"missing required key 'data'", path)


def test_not_a_mapping_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    fails(r"expected a mapping of keys at the top level", path)
    path.write_text("task: [unclosed\n")
    fails(r"not valid YAML", path)
    fails(r"config file .*nowhere.yaml' does not exist", tmp_path / "nowhere.yaml")


# -- files and directories --------------------------------------------------------------------------
def test_missing_files_name_key_and_path(text_run: Path) -> None:
    path = write_config(text_run)
    message = fails(r"data.train: '.*missing.jsonl' does not exist", path, ["data.train=missing.jsonl"], cwd=text_run)
    assert str(text_run / "missing.jsonl") in message
    fails(r"teacher.path: '.*no_teacher' does not exist", write_config(text_run, teacher__path="no_teacher"))
    fails(r"tokenizer: '.*tok' does not exist", write_config(text_run, tokenizer="tok"))
    fails(r"data.eval: '.*dev.jsonl' does not exist", write_config(text_run, data__eval="dev.jsonl"))


def test_model_directory_without_config_json(text_run: Path) -> None:
    (text_run / "empty").mkdir()
    fails(r"teacher.path: no config.json in", write_config(text_run, teacher__path="empty"))


def test_teacher_needs_exactly_one_source(text_run: Path) -> None:
    fails(r"teacher: give exactly one of 'teacher.path'.*or 'teacher.config'",
          write_config(text_run, teacher__config={"model_type": "bert"}))
    fails(r"teacher.config: needs 'model_type'", write_config(text_run, teacher={"config": {"hidden_size": 8}}))


def test_text_task_needs_a_tokenizer(tmp_path: Path) -> None:
    bert_config(20).save_pretrained(tmp_path / "teacher")
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": 0}])
    fails(r"tokenizer: task 'sequence-classification' needs a tokenizer", write_config(tmp_path))


# -- losses ----------------------------------------------------------------------------------------------
def fails_distill(match: str, path: Path, overrides=()) -> str:
    """The loss checks import torch, so they run after the fast ones (``check_distill``), before any data or model."""
    with pytest.raises(ConfigError, match=match) as info:
        check_distill(load_config(path, overrides))
    return str(info.value)


def test_unknown_loss_lists_the_available_ones(text_run: Path) -> None:
    from amad import losses

    message = fails_distill(r"distill.attention_loss: unknown loss 'amad-mes'; did you mean 'amad-mse'\?",
                            write_config(text_run), ["distill.attention_loss=amad-mes"])
    assert all(name in message for name in losses.available())


def test_bad_loss_options(text_run: Path) -> None:
    fails_distill(r"distill.attention_loss_options: invalid options for 'amad-mse'", write_config(text_run),
                  ["distill.attention_loss_options={colour: red}"])
    fails_distill(r"distill.attention_loss_options: invalid options for 'amad-kl'.*alignment", write_config(text_run),
                  ["distill.attention_loss=amad-kl", "distill.attention_loss_options={alignment: euclid}"])
    # amad-projected's n x n matrix is checked without being allocated
    cfg = load_config(write_config(text_run), ["distill.attention_loss=amad-projected",
                                               "distill.loss_options={n: 1000000}"])
    assert cfg.distill.attention_loss_options == {"n": 1000000}


# -- the Teacher / Student pair (from configs only) ---------------------------------------------------
def image_run(root: Path, teacher_changes: dict, student_changes: dict) -> RunConfig:
    vit_config(**teacher_changes).save_pretrained(root / "teacher")
    vit_config(heads=2, **student_changes).save_pretrained(root / "student")
    write_jsonl(root / "train.jsonl", [{"image": [[0, 0], [0, 0]], "label": 0}])
    (root / "proc").mkdir()
    path = write_config(root, task="image-classification", student={"path": "student"}, image_processor="proc")
    return load_config(path)


@pytest.mark.parametrize("field, t_value, s_value", [("image_size", 16, 32), ("patch_size", 8, 4)])
def test_different_image_patching_is_refused(tmp_path: Path, field: str, t_value: int, s_value: int) -> None:
    cfg = image_run(tmp_path, {field: t_value}, {field: s_value})
    with pytest.raises(ConfigError, match=rf"cannot be matched: {field} is {t_value} in the teacher but {s_value}"):
        model_configs(cfg)


def test_different_vocabulary_is_refused(text_run: Path) -> None:
    bert_config(99, heads=2).save_pretrained(text_run / "student")
    cfg = load_config(write_config(text_run, student={"path": "student"}))
    with pytest.raises(ConfigError, match=r"vocab_size is 20 in the teacher but 99 in the student.*vocabulary"):
        model_configs(cfg)


def test_different_tasks_are_refused(text_run: Path) -> None:
    from transformers import BertForSequenceClassification

    vit_config(heads=2).save_pretrained(text_run / "vit")
    cfg = load_config(write_config(text_run, student={"path": "vit"}))
    with pytest.raises(ConfigError, match=r"student: model type 'vit' has no sequence-classification model"):
        model_configs(cfg)
    teacher = bert_config(20)
    teacher.architectures = [BertForSequenceClassification.__name__]
    teacher.save_pretrained(text_run / "teacher")
    cfg = load_config(write_config(text_run, task="seq2seq"))
    with pytest.raises(ConfigError, match=r"teacher: saved as BertForSequenceClassification .* but task is 'seq2seq'"):
        model_configs(cfg)


def test_student_checkpoint_of_another_head_gets_the_teachers_labels(text_run: Path) -> None:
    from transformers import BertForMaskedLM

    config = bert_config(20, heads=2, id2label={0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"})
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.architectures = [BertForMaskedLM.__name__]  # a pretrained LM as the Student's starting point
    config.save_pretrained(text_run / "student_mlm")
    teacher, student = model_configs(load_config(write_config(text_run, student={"path": "student_mlm"})))
    assert student.id2label == teacher.id2label == {0: "neg", 1: "pos"}


def test_different_label_counts_are_refused(text_run: Path) -> None:
    cfg = load_config(write_config(text_run, student={"config": {"num_labels": 3}}))
    with pytest.raises(ConfigError, match=r"the teacher has 2 labels, the student 3"):
        model_configs(cfg)


def test_student_config_inherits_and_checks_its_fields(text_run: Path) -> None:
    teacher, student = model_configs(load_config(write_config(text_run)))
    assert (teacher.num_attention_heads, student.num_attention_heads) == (4, 2)
    assert student.hidden_size == teacher.hidden_size and student.id2label == teacher.id2label
    cfg = load_config(write_config(text_run, student={"config": {"num_attention_head": 2}}))
    with pytest.raises(ConfigError, match=r"student.config.num_attention_head: not a field of BertConfig; did you mean 'num_attention_heads'"):
        model_configs(cfg)


def test_unknown_model_type_is_suggested(text_run: Path) -> None:
    cfg = load_config(write_config(text_run, student={"config": {"model_type": "bret"}}))
    with pytest.raises(ConfigError, match=r"student.config.model_type: unknown model type 'bret'; did you mean 'bert'"):
        model_configs(cfg)


def test_labels_from_the_data_reach_configs_built_from_scratch(tmp_path: Path) -> None:
    tokenizer = bert_tokenizer(tmp_path / "tok")
    tokenizer.save_pretrained(tmp_path / "tok")
    small = {"model_type": "bert", "vocab_size": len(tokenizer), "hidden_size": 8, "num_attention_heads": 2,
             "num_hidden_layers": 1, "intermediate_size": 8}
    path = write_config(tmp_path, teacher={"config": small}, student={"config": {"num_attention_heads": 1}},
                        tokenizer="tok")
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "label": "x"}])
    teacher, student = model_configs(load_config(path), label_names=lambda _: ["x", "y", "z"])
    assert teacher.id2label == student.id2label == {0: "x", 1: "y", 2: "z"}


def test_processors_must_fit_the_models(tmp_path: Path) -> None:
    from transformers import ViTImageProcessor

    tokenizer = bert_tokenizer(tmp_path / "tok")
    with pytest.raises(ConfigError, match=r"tokenizer: has 20 tokens but the models' vocab_size is 10"):
        check_processors(tokenizer, None, bert_config(10))
    processor = ViTImageProcessor(size={"height": 32, "width": 32})
    with pytest.raises(ConfigError, match=r"image_processor: outputs 32x32 images but the models' image_size is 16x16"):
        check_processors(None, processor, vit_config())
    check_processors(None, ViTImageProcessor(size={"height": 16, "width": 16}), vit_config())


def test_seq2seq_pair_with_fewer_heads_is_accepted(tmp_path: Path) -> None:
    t5_config(40).save_pretrained(tmp_path / "teacher")
    (tmp_path / "tok").mkdir()
    write_jsonl(tmp_path / "train.jsonl", [{"source": "a", "target": "b"}])
    path = write_config(tmp_path, task="seq2seq", tokenizer="tok", student={"config": {"num_heads": 2}})
    teacher, student = model_configs(load_config(path))
    assert (teacher.num_heads, student.num_heads, student.vocab_size) == (4, 2, 40)


def test_yaml_uses_1_2_booleans_and_floats(text_run: Path) -> None:
    from amad.cli.config import parse_yaml

    assert parse_yaml("a: no\nb: on\nc: true\nd: 1e-3\ne: 3\nf: .5") == {
        "a": "no", "b": "on", "c": True, "d": 0.001, "e": 3, "f": 0.5
    }
    cfg = load_config(write_config(text_run), ["training.save_strategy=no", "training.learning_rate=1e-3"])
    assert cfg.training == {"save_strategy": "no", "learning_rate": 0.001}


def test_data_labels_name_a_trained_teachers_unnamed_classes(text_run: Path) -> None:
    from transformers import BertForSequenceClassification

    config = bert_config(20, id2label={0: "LABEL_0", 1: "LABEL_1"}, label2id={"LABEL_0": 0, "LABEL_1": 1})
    config.architectures = [BertForSequenceClassification.__name__]
    config.save_pretrained(text_run / "teacher")
    cfg = load_config(write_config(text_run, data__labels=["pos", "neg"]))
    teacher, student = model_configs(cfg, label_names=lambda t: list(cfg.data.labels))
    assert teacher.id2label == student.id2label == {0: "pos", 1: "neg"}
    with pytest.raises(ConfigError, match=r"data.labels: 3 names for the Teacher's 2 classes"):
        model_configs(cfg, label_names=lambda t: ["a", "b", "c"])
