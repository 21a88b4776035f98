"""Teacher/Student pairs: the library refuses what the command line refuses, and matches labels by name."""

from __future__ import annotations

import pytest
import torch
import transformers as hf

from amad import Distiller
from amad.compat import check_pair, label_permutation, position_limits
from amad.losses import logit_kd
from model_factories import text_config


def bert(vocab: int = 40, heads: int = 4, labels: tuple[str, ...] = ("neg", "pos")) -> hf.BertForSequenceClassification:
    config = hf.BertConfig(**dict(text_config(2, heads), vocab_size=vocab), id2label=dict(enumerate(labels)),
                           label2id={name: i for i, name in enumerate(labels)})
    return hf.BertForSequenceClassification(config)


def test_different_vocabularies_are_refused_by_the_distiller() -> None:
    with pytest.raises(ValueError, match=r"vocab_size is 30 in the teacher but 99 in the student \(they must share "
                                         r"the tokenizer's vocabulary\)"):
        Distiller(bert(vocab=30), bert(vocab=99, heads=2))


def test_a_causal_lm_teacher_cannot_teach_a_classifier() -> None:
    teacher = hf.GPT2LMHeadModel(hf.GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=4, n_positions=16))
    with pytest.raises(ValueError, match=r"the teacher is a causal-lm model \(GPT2LMHeadModel\) but the student a "
                                         r"sequence-classification model \(BertForSequenceClassification\)"):
        Distiller(teacher, bert())


def test_label_counts_and_names_must_agree() -> None:
    with pytest.raises(ValueError, match="the teacher has 2 labels, the student 3"):
        Distiller(bert(), bert(heads=2, labels=("neg", "pos", "meh")))
    with pytest.raises(ValueError, match=r"the teacher's labels \['neg', 'pos'\] are not the student's \['neg', 'x'\]"):
        Distiller(bert(), bert(heads=2, labels=("neg", "x")))


def test_label_permutation_maps_names() -> None:
    teacher, student = bert(labels=("a", "b", "c")).config, bert(labels=("c", "a", "b")).config
    order = label_permutation(teacher, student)
    assert order == [2, 0, 1]  # the Student's label j is the Teacher's label order[j]
    names = [teacher.id2label[i] for i in order]
    assert names == [student.id2label[j] for j in range(3)]
    assert label_permutation(teacher, teacher) is None
    generic = hf.BertConfig(num_labels=3)  # LABEL_0.. : matched by position
    assert label_permutation(teacher, generic) is None and label_permutation(generic, student) is None
    assert check_pair(teacher, student, task="sequence-classification") == [2, 0, 1]
    assert check_pair(teacher, student, task="seq2seq") is None  # labels only matter to classifiers


def test_kd_reads_the_teachers_logits_in_the_students_label_order() -> None:
    """A Student that is the Teacher with its classes listed the other way round has the Teacher's KD optimum."""
    torch.manual_seed(0)
    teacher = bert(labels=("neg", "pos"))
    student = bert(labels=("pos", "neg"))
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad():  # confident predictions; the Student: the same function, rows of the classifier swapped
        teacher.classifier.bias.copy_(torch.tensor([3.0, -3.0]))
        student.classifier.weight.copy_(teacher.classifier.weight.flip(0))
        student.classifier.bias.copy_(teacher.classifier.bias.flip(0))
    distiller = Distiller(teacher, student, attention_loss=None)
    assert distiller.teacher_label_order == [1, 0]
    batch = {"input_ids": torch.randint(5, 40, (3, 6)), "attention_mask": torch.ones(3, 6, dtype=torch.long)}
    distiller.eval()
    out = distiller(**batch)
    t_logits, s_logits = teacher(**batch).logits, student(**batch).logits
    assert torch.allclose(out.teacher_outputs.logits, t_logits[:, [1, 0]])
    assert torch.allclose(out.losses["kd"], logit_kd(s_logits, t_logits[:, [1, 0]]))
    swapped = logit_kd(s_logits, t_logits)  # position by position: the wrong target
    entropy = -(t_logits.softmax(-1) * t_logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(out.losses["kd"], entropy, atol=1e-6) and swapped > entropy + 0.1


def test_position_limits() -> None:
    assert position_limits(hf.BertConfig(max_position_embeddings=64)) == {"max_position_embeddings": 64}
    assert position_limits(hf.RobertaConfig(max_position_embeddings=514, pad_token_id=1)) == {
        "max_position_embeddings": 512}  # positions start after the padding index
    assert position_limits(hf.GPT2Config(n_positions=32)) == {"max_position_embeddings": 32}
    assert position_limits(hf.T5Config()) == {}  # relative positions: no limit
    blip = hf.BlipConfig(text_config={"max_position_embeddings": 40})
    assert position_limits(blip) == {"text_config.max_position_embeddings": 40}


def test_the_distiller_names_a_missing_loss_option() -> None:
    with pytest.raises(ValueError, match=r"'amad-projected' needs the option 'n' \(n = q\*k.*\{n: 38809\}"):
        Distiller(bert(), bert(heads=2), attention_loss="amad-projected")
    with pytest.raises(ValueError, match=r"'minilm-relations' needs the option 'num_relation_heads'.*"
                                         r"\{num_relation_heads: 4\}"):
        Distiller(bert(), bert(heads=2), attention_loss="minilm-relations")


def test_divergence_names_the_step_and_the_learning_rate(tmp_path) -> None:
    from datasets import Dataset
    from transformers import TrainingArguments

    from amad import DistillationTrainer
    from amad.losses import NonFiniteError

    torch.manual_seed(0)
    rows = Dataset.from_dict({"input_ids": torch.randint(5, 40, (8, 6)).tolist(), "labels": [0, 1] * 4})
    args = TrainingArguments(str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=1e6,
                             report_to=[], save_strategy="no", use_cpu=True)
    trainer = DistillationTrainer(model=Distiller(bert(), bert(heads=2)), args=args, train_dataset=rows)
    with pytest.raises(NonFiniteError, match=r"at training step [2-6] \(epoch .*\): .*NaN.*; training diverged: lower "
                                             r"the learning rate \(learning_rate = 1e\+06\)") as info:
        trainer.train()
    assert info.value.model == "student"

