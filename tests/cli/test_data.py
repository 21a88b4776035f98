"""User data: reading JSON lines / CSV / save_to_disk, column and label checks, images, collation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig, BertTokenizer

from amad.cli.config import ConfigError, DataSpec, RunConfig
from amad.cli.data import (
    TaskCollator,
    answer_scores,
    check_labels,
    expand_references,
    label_names,
    load_image,
    load_splits,
    read_table,
)

ROWS = [{"text": "good film", "label": "pos"}, {"text": "bad", "label": "neg"}, {"text": "fine", "label": "pos"}]


def jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_config(task: str, train: str, **data) -> RunConfig:
    return RunConfig(task=task, data=DataSpec(train=train, **data))


def tokenizer(tmp_path: Path) -> BertTokenizer:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "film", "bad", "fine", "a", "b"]))
    return BertTokenizer(str(vocab))


def labelled_config(names: list[str]) -> BertConfig:
    return BertConfig(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})


# -- reading --------------------------------------------------------------------------------------
def test_json_csv_and_disk_read_the_same_rows(tmp_path: Path) -> None:
    import datasets

    path = jsonl(tmp_path / "train.jsonl", ROWS)
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in ROWS))
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS)).save_to_disk(str(tmp_path / "saved"))
    for source in (path, str(tmp_path / "train.csv"), str(tmp_path / "saved")):
        table = read_table(source, "auto", "train", "data.train")
        assert table.to_list() == ROWS


def test_read_errors_name_the_key(tmp_path: Path) -> None:
    import datasets

    weird = tmp_path / "train.parquetish"
    weird.write_text("x")
    with pytest.raises(ConfigError, match=r"data.train: cannot tell the format of .*set data.format"):
        read_table(str(weird), "auto", "train", "data.train")
    datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS)).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ConfigError, match=r"data.eval: .* has splits \['train'\], not 'validation'"):
        read_table(str(tmp_path / "saved"), "auto", "validation", "data.eval")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label"\n')
    with pytest.raises(ConfigError, match=r"data.train: cannot read .*broken.jsonl' as json"):
        read_table(str(broken), "auto", "train", "data.train")


def test_eval_split_of_a_saved_dataset_dict(tmp_path: Path) -> None:
    import datasets

    dd = datasets.DatasetDict(train=datasets.Dataset.from_list(ROWS), validation=datasets.Dataset.from_list(ROWS[:1]))
    dd.save_to_disk(str(tmp_path / "saved"))
    train, evaluation = load_splits(run_config("sequence-classification", str(tmp_path / "saved")))
    assert (len(train), len(evaluation)) == (3, 1)


def test_missing_column_suggests_and_limits_apply(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(ConfigError, match=r"data.text_column: no column 'txt' in .*; did you mean 'text'"):
        load_splits(run_config("sequence-classification", path, text_column="txt"))
    with pytest.raises(ConfigError, match=r"data.eval: evaluation needs an eval file"):
        load_splits(run_config("sequence-classification", path), need_eval=True)
    train, _ = load_splits(run_config("sequence-classification", path, max_train_samples=2))
    assert train.to_list() == ROWS[:2]


def test_seq2seq_needs_a_source_or_an_image(tmp_path: Path) -> None:
    path = jsonl(tmp_path / "train.jsonl", [{"src": "a", "target": "b"}])
    with pytest.raises(ConfigError, match=r"data.source_column: seq2seq needs a source text column"):
        load_splits(run_config("seq2seq", path))


def test_image_paths_are_resolved_and_checked(tmp_path: Path) -> None:
    (tmp_path / "data" / "img").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "data" / "img" / "a.png")
    path = jsonl(tmp_path / "data" / "train.jsonl", [{"image": "img/a.png", "label": 0}])
    train, _ = load_splits(run_config("image-classification", path))
    assert train[0]["image"] == str(tmp_path / "data" / "img" / "a.png")
    (tmp_path / "data" / "train.csv").write_text("image,label\nimg/a.png,0\n")  # CSV strings are large_string
    train, _ = load_splits(run_config("image-classification", str(tmp_path / "data" / "train.csv")))
    assert train[0]["image"] == str(tmp_path / "data" / "img" / "a.png")
    root = run_config("image-classification", path, image_root=str(tmp_path / "data" / "img"))
    jsonl(tmp_path / "data" / "rooted.jsonl", [{"image": "a.png", "label": 0}])
    root.data.train = str(tmp_path / "data" / "rooted.jsonl")
    assert load_splits(root)[0][0]["image"] == str(tmp_path / "data" / "img" / "a.png")
    path = jsonl(tmp_path / "data" / "bad.jsonl", [{"image": "img/a.png", "label": 0}, {"image": "b.png", "label": 1}])
    with pytest.raises(ConfigError, match=r"data.image_column: image '.*b.png' \(row 1 of .*bad.jsonl\) does not exist"):
        load_splits(run_config("image-classification", path))


# -- labels ------------------------------------------------------------------------------------------
def test_label_names_precedence(tmp_path: Path) -> None:
    import datasets

    train = datasets.Dataset.from_list(ROWS)
    unnamed = BertConfig(num_labels=2)
    cfg = run_config("sequence-classification", "x")
    assert label_names(cfg, labelled_config(["pos", "neg"]), train) == ["pos", "neg"]  # the Teacher's order wins
    assert label_names(cfg, unnamed, train) == ["neg", "pos"]  # else (Teacher built from a config) sorted strings
    assert label_names(run_config("sequence-classification", "x", labels=["b", "a"]), unnamed, train) == ["b", "a"]
    ids = datasets.Dataset.from_list([{"text": "a", "label": 1}, {"text": "b", "label": 0}])
    assert label_names(cfg, unnamed, ids) is None  # ids are used as they are
    vqa = datasets.Dataset.from_list([{"answer": ["yes", "yes", "no"]}, {"answer": ["two"]}, {"answer": ["no"]}])
    assert label_names(run_config("visual-question-answering", "x"), unnamed, vqa) == ["no", "yes", "two"]


def test_labels_must_be_the_models(tmp_path: Path) -> None:
    import datasets

    cfg = run_config("sequence-classification", "x")
    check_labels(datasets.Dataset.from_list(ROWS), cfg, labelled_config(["neg", "pos"]), "train.jsonl")
    bad = datasets.Dataset.from_list(ROWS + [{"text": "a", "label": "meh"}])
    with pytest.raises(ConfigError, match=r"label 'meh' \(row 3 of train.jsonl\) is not one of the models' labels: neg, pos"):
        check_labels(bad, cfg, labelled_config(["neg", "pos"]), "train.jsonl")
    out_of_range = datasets.Dataset.from_list([{"text": "a", "label": 2}])
    with pytest.raises(ConfigError, match=r"label 2 \(row 0"):
        check_labels(out_of_range, cfg, labelled_config(["neg", "pos"]), "train.jsonl")


def test_answer_scores_follow_the_vqa_rule() -> None:
    assert answer_scores("yes") == {"yes": 1.0}
    scores = answer_scores(["yes"] * 2 + ["no"] * 4 + ["two"])
    assert scores == pytest.approx({"yes": 2 / 3, "no": 1.0, "two": 1 / 3})


# -- images ---------------------------------------------------------------------------------------
def test_load_image_from_paths_and_arrays(tmp_path: Path) -> None:
    pixels = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    expected = np.asarray(load_image(str(tmp_path / "a.png")))
    assert np.array_equal(expected, pixels)
    assert np.array_equal(np.asarray(load_image(pixels.tolist())), pixels)  # nested lists (a JSON column)
    assert np.array_equal(np.asarray(load_image(pixels.transpose(2, 0, 1))), pixels)  # channels first
    floats = pixels.astype(np.float32) / 255.0
    assert np.abs(np.asarray(load_image(floats)).astype(int) - pixels).max() <= 1  # floats in [0, 1]
    gray = np.asarray(load_image(pixels[..., 0]))
    assert gray.shape == (4, 5, 3) and np.array_equal(gray[..., 1], pixels[..., 0])
    with pytest.raises(ValueError, match=r"got shape \(2, 2, 2, 2\)"):
        load_image(np.zeros((2, 2, 2, 2)))


# -- batches -------------------------------------------------------------------------------------
def test_classification_collator_pads_and_maps_labels(tmp_path: Path) -> None:
    collate = TaskCollator("sequence-classification", DataSpec(), tokenizer=tokenizer(tmp_path),
                           config=labelled_config(["neg", "pos"]))
    batch = collate(ROWS)
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 4)  # [CLS] good film [SEP]
    assert batch["attention_mask"].sum(1).tolist() == [4, 3, 3]


def test_vqa_labels_are_soft_scores(tmp_path: Path) -> None:
    from transformers import ViTImageProcessor

    rows = [{"image": np.zeros((8, 8, 3), np.uint8), "question": "a", "answer": ["b", "b", "b", "a"]}]
    collate = TaskCollator("visual-question-answering", DataSpec(), tokenizer=tokenizer(tmp_path),
                           image_processor=ViTImageProcessor(size={"height": 8, "width": 8}),
                           config=labelled_config(["a", "b", "c"]))
    batch = collate(rows)
    assert torch.allclose(batch["labels"], torch.tensor([[1 / 3, 1.0, 0.0]]))
    assert batch["pixel_values"].shape == (1, 3, 8, 8)


def test_seq2seq_labels_ignore_padding_and_generation_drops_them(tmp_path: Path) -> None:
    tok = tokenizer(tmp_path)
    spec = DataSpec(source_prefix="a ")
    rows = [{"source": "good", "target": "good film fine"}, {"source": "bad", "target": ["fine", "bad"]}]
    collate = TaskCollator("seq2seq", spec, tokenizer=tok)
    batch = collate(rows)
    target_ids = tok(text_target=["good film fine", "fine"])["input_ids"]
    assert batch["labels"][0].tolist() == target_ids[0]
    assert batch["labels"][1].tolist() == target_ids[1] + [-100, -100]
    assert batch["input_ids"][0].tolist() == tok("a good")["input_ids"]
    assert "labels" not in collate.without_labels()(rows)
    assert collate.references(rows[1]) == ["fine", "bad"]


def test_expand_references_gives_one_row_per_reference() -> None:
    import datasets

    table = datasets.Dataset.from_list([{"source": "x", "target": ["a", "b"]}, {"source": "y", "target": ["c"]}])
    rows = expand_references(table, DataSpec()).to_list()
    assert rows == [{"source": "x", "target": "a"}, {"source": "x", "target": "b"}, {"source": "y", "target": "c"}]
    plain = datasets.Dataset.from_list([{"source": "x", "target": "a"}])
    assert expand_references(plain, DataSpec()) is plain


def test_a_trained_teachers_unnamed_classes_need_data_labels() -> None:
    import datasets

    from amad.cli.config import ModelSpec

    train = datasets.Dataset.from_list(ROWS)
    cfg = RunConfig(task="sequence-classification", teacher=ModelSpec(path="/trained"), data=DataSpec(train="x"))
    with pytest.raises(ConfigError, match=r"data.labels: the Teacher's 2 classes are unnamed .* e.g. data.labels: \['neg', 'pos'\]"):
        label_names(cfg, BertConfig(num_labels=2), train)
    cfg.data.labels = ["pos", "neg"]
    assert label_names(cfg, BertConfig(num_labels=2), train) == ["pos", "neg"]
    with pytest.raises(ConfigError, match=r"data.labels: \['pos', 'neg'\] differ from the Teacher's labels \['neg', 'pos'\]"):
        label_names(cfg, labelled_config(["neg", "pos"]), train)
