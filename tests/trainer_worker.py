"""Tiny models and data for the DistillationTrainer tests, and the torchrun worker they launch.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/trainer_worker.py OUT``:
trains the same setup as :func:`ddp_training_args` describes and rank 0 writes
``OUT/result.pt`` (Student state dict, log history) and ``OUT/student`` (save_model).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

VOCAB = 40
SEQ = 8
NUM_LABELS = 3


def tiny_bert(
    hidden: int, heads: int, layers: int, seed: int, dropout: float = 0.0, init_range: float = 0.2
) -> BertForSequenceClassification:
    """A BERT-style classifier small enough for CPU tests, with deterministic initial weights."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        max_position_embeddings=SEQ,
        num_labels=NUM_LABELS,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=0.0,
        initializer_range=init_range,  # wider than BERT's 0.02: peaked logits and attention maps
    )
    return BertForSequenceClassification(config)


def teacher_and_student(student_seed: int = 2, dropout: float = 0.0) -> tuple[Any, Any]:
    """Teacher: 2 layers x 4 heads, width 32. Student: 1 layer x 2 heads, width 16."""
    teacher = tiny_bert(32, 4, 2, seed=1, init_range=0.5)
    student = tiny_bert(16, 2, 1, seed=student_seed, dropout=dropout)
    return teacher, student


def dataset(size: int, seed: int, padded: bool = True) -> list[dict[str, torch.Tensor]]:
    """Random token sequences of length SEQ (right-padded to it when ``padded``) with random labels."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for index in range(size):
        length = int(torch.randint(3, SEQ + 1, (1,), generator=generator)) if padded else SEQ
        ids = torch.zeros(SEQ, dtype=torch.long)
        ids[:length] = torch.randint(1, VOCAB, (length,), generator=generator)
        mask = (torch.arange(SEQ) < length).long()
        label = torch.randint(0, NUM_LABELS, (), generator=generator)
        # "index" is not a Student input: the trainer must drop it like a plain Trainer does.
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": label, "index": torch.tensor(index)})
    return rows


def ddp_training_args(output_dir: str, per_device_batch: int, **overrides: Any) -> TrainingArguments:
    """Plain SGD, sequential batches: the global batch of each step is the same for 1 and 2 processes."""
    options = dict(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=3,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        use_cpu=True,
        disable_tqdm=True,
        ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None,
        dataloader_num_workers=0,
    )
    return TrainingArguments(**{**options, **overrides})


def ddp_trainer(
    output_dir: str, per_device_batch: int, attention_loss: str | None = "amad-mse", alpha: Any = "auto",
    **overrides: Any
) -> Any:
    """The run both the single-process test and the 2-process worker perform (8 unpadded samples)."""
    from amad import DistillationTrainer, Distiller

    teacher, student = teacher_and_student()
    distiller = Distiller(teacher, student, attention_loss=attention_loss, layers="last", alpha=alpha)
    return DistillationTrainer(
        model=distiller,
        args=ddp_training_args(output_dir, per_device_batch, **overrides),
        train_dataset=dataset(8, seed=5, padded=False),
    )


def run_workers(script: str, out: Path, processes: int = 2) -> None:
    """Launch ``tests/<script> out`` under torchrun on CPU processes; fail with their output if one fails."""
    tests = Path(__file__).resolve().parent
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(tests), str(tests.parent / "src")]))
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
        str(tests / script), str(out),
    ]  # fmt: skip
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]


def assert_matches_single_process(result: dict[str, Any], single: Any, atol: float = 1e-5) -> None:
    """A distributed run (``result`` as :func:`main` writes it) logged the same losses and trained the same Student
    and alpha as the 1-process ``single`` trainer (after ``train()``)."""
    import pytest

    single_logs = [e for e in single.state.log_history if "loss" in e]
    logs = [e for e in result["log_history"] if "loss" in e]
    assert len(logs) == len(single_logs) == single.args.max_steps
    for one, two in zip(single_logs, logs):
        for key in [k for k in one if k.startswith("loss")]:
            assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-7), key
    torch.testing.assert_close(result["alpha"], single.distiller.alpha, rtol=1e-6, atol=0)
    expected = single.distiller.student.state_dict()
    assert result["student"].keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(result["student"][key], value, rtol=0, atol=atol, msg=f"{key} differs")


def main(out: str, attention_loss: str | None = "amad-mse") -> None:
    torch.set_num_threads(1)
    trainer = ddp_trainer(out + "/run", per_device_batch=2, attention_loss=attention_loss)
    trainer.train()
    trainer.save_model(out + "/student")
    if trainer.is_world_process_zero():
        result = {
            "student": {k: v.detach().clone() for k, v in trainer.distiller.student.state_dict().items()},
            "log_history": trainer.state.log_history,
            "world_size": trainer.args.world_size,
            "alpha": trainer.distiller.alpha.clone(),
        }
        torch.save(result, out + "/result.pt")


if __name__ == "__main__":
    main(sys.argv[1])
