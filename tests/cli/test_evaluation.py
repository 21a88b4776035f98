"""Metrics of ``amad evaluate``: accuracy, VQA accuracy, BLEU, CIDEr, and running a model over rows."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from amad.cli.config import DataSpec
from amad.cli.data import TaskCollator
from amad.cli.evaluation import accuracy, bleu, cider, evaluate_model, format_table, vqa_accuracy


def test_accuracy_and_vqa_accuracy() -> None:
    assert accuracy([1, 0, 2, 2], [1, 1, 2, 0]) == pytest.approx(50.0)
    answers = [["yes"] * 2 + ["no"] * 8, "two", ["red"] * 10]
    # yes said by 2 annotators -> 2/3; a plain string answer scores 1 when matched; "blue" -> 0
    assert vqa_accuracy(["yes", "two", "blue"], answers) == pytest.approx(100 * (2 / 3 + 1 + 0) / 3)
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        accuracy([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="no examples"):
        vqa_accuracy([], [])


def test_bleu_is_sacrebleu_with_any_number_of_references() -> None:
    import sacrebleu

    hyps = ["the cat sat on the mat", "a dog runs in the park today"]
    refs = [["the cat sat on a mat", "a cat sat on the mat"], ["a dog runs in the park"]]
    expected = sacrebleu.corpus_bleu(hyps, [["the cat sat on a mat", "a dog runs in the park"],
                                            ["a cat sat on the mat", None]]).score
    assert bleu(hyps, refs) == pytest.approx(expected)
    assert bleu(["exactly this sentence here"], [["exactly this sentence here"]]) == pytest.approx(100.0)


def test_cider_is_pycocoevalcap_on_lowercased_words() -> None:
    from pycocoevalcap.cider.cider import Cider

    hyps = ["A cat sits on the mat.", "a dog runs", "a bird flies high"]
    refs = [["a cat sat on the mat", "the cat is on a mat"], ["a dog is running"], ["a bird flies"]]
    gts = {0: ["a cat sat on the mat", "the cat is on a mat"], 1: ["a dog is running"], 2: ["a bird flies"]}
    res = {0: ["a cat sits on the mat"], 1: ["a dog runs"], 2: ["a bird flies high"]}
    assert cider(hyps, refs) == pytest.approx(100 * Cider().compute_score(gts, res)[0])
    assert cider(["one example"], [["one example"]]) == 0.0  # IDF of a single document is 0 (documented)


def test_format_table_lists_models_side_by_side() -> None:
    table = format_table({"teacher": {"bleu": 41.9, "cider": 1.5}, "student": {"bleu": 43.875, "cider": 2.0}})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "teacher", "student"]
    assert lines[2].split() == ["bleu", "41.90", "43.88"] and lines[3].split() == ["cider", "1.50", "2.00"]


def test_evaluate_model_scores_the_models_own_predictions(tmp_path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "good", "bad", "film"]))
    tokenizer = BertTokenizer(str(vocab))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=7, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=8, num_labels=3, id2label={0: "a", 1: "b", 2: "c"},
                        label2id={"a": 0, "b": 1, "c": 2})
    model = BertForSequenceClassification(config).eval()
    rows = [{"text": t, "label": lab} for t, lab in [("good film", "a"), ("bad", "b"), ("film", "c"), ("good", "a"),
                                                      ("bad film", "c")]]
    with torch.no_grad():
        predicted = [int(model(**tokenizer(r["text"], return_tensors="pt")).logits.argmax()) for r in rows]
    expected = 100 * sum(p == config.label2id[r["label"]] for p, r in zip(predicted, rows)) / len(rows)
    collate = TaskCollator("sequence-classification", DataSpec(), tokenizer=tokenizer, config=config)
    assert evaluate_model(model, rows, collate, batch_size=2) == {"accuracy": pytest.approx(expected)}
