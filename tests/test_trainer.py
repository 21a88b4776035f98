"""DistillationTrainer: resume, save/load, optimizer contents, logging, evaluation, DDP (CPU, tiny models)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertTokenizerFast,
    TrainerCallback,
    TrainingArguments,
)

from amad import DistillationTrainer, Distiller
from amad.trainer import DISTILLER_STATE_NAME
from trainer_worker import SEQ, assert_matches_single_process, dataset, ddp_trainer, run_workers, teacher_and_student


def make_args(output_dir: Path, **overrides) -> TrainingArguments:
    options = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        per_device_eval_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        weight_decay=0.01,
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=3,
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    return TrainingArguments(**options)


def make_distiller(attention_loss: str | None = "amad-mse", student_seed: int = 2, dropout: float = 0.0) -> Distiller:
    teacher, student = teacher_and_student(student_seed=student_seed, dropout=dropout)
    options = {"n": SEQ * SEQ} if attention_loss == "amad-projected" else None
    return Distiller(teacher, student, attention_loss=attention_loss, alpha="auto", attention_loss_options=options)


def accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def clone_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=f"{key} differs")


class StopAt(TrainerCallback):
    """Interrupts training after ``step`` optimizer steps (the checkpoint of that step is still written)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True
        return control


@pytest.mark.parametrize("attention_loss", ["amad-mse", "amad-projected"])
def test_resumed_run_matches_uninterrupted_run(tmp_path: Path, attention_loss: str) -> None:
    # 16 samples, batch 2 x accumulation 2: 4 optimizer steps per epoch, so step 3 is mid-epoch.
    # Dropout in the Student checks the RNG state is restored too.
    train = dataset(16, seed=0)
    args = dict(save_strategy="steps", save_steps=3)

    full = DistillationTrainer(
        model=make_distiller(attention_loss, dropout=0.1),
        args=make_args(tmp_path / "full", **args),
        train_dataset=train,
    )
    full.train()
    expected_student = clone_state(full.distiller.student)
    expected_extras = {k: v for k, v in clone_state(full.distiller).items() if not k.startswith("student.")}

    stopped = DistillationTrainer(
        model=make_distiller(attention_loss, dropout=0.1),
        args=make_args(tmp_path / "stopped", **args),
        train_dataset=train,
        callbacks=[StopAt(3)],
    )
    stopped.train()
    assert stopped.state.global_step == 3
    checkpoint = tmp_path / "stopped" / "checkpoint-3"
    saved_extras = safetensors.torch.load_file(checkpoint / DISTILLER_STATE_NAME)
    assert float(saved_extras["_alpha_seen"]) >= 1 and (saved_extras["alpha"] > 0).all()
    if attention_loss == "amad-projected":
        # the learnable projection was trained (it starts as the identity) and is in the checkpoint
        weight = saved_extras["attention_losses.0.projection.weight"]
        assert not torch.equal(weight, torch.eye(SEQ * SEQ))

    # The resumed Distiller starts from another Student init and an unmeasured alpha: all must come from the checkpoint.
    resumed_distiller = make_distiller(attention_loss, student_seed=7, dropout=0.1)
    assert float(resumed_distiller.alpha.abs().sum()) == 0.0
    resumed = DistillationTrainer(
        model=resumed_distiller, args=make_args(tmp_path / "resumed", **args), train_dataset=train
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6

    assert_same_state(clone_state(resumed.distiller.student), expected_student)
    resumed_extras = {k: v for k, v in clone_state(resumed.distiller).items() if not k.startswith("student.")}
    assert_same_state(resumed_extras, expected_extras)
    # alpha was restored, not measured again on a later batch
    torch.testing.assert_close(resumed.distiller.alpha, saved_extras["alpha"], rtol=0, atol=0)


def test_optimizer_holds_only_student_and_loss_parameters(tmp_path: Path) -> None:
    distiller = make_distiller("amad-projected")  # its projection is learnable: it must be optimised too
    teacher_before = clone_state(distiller.teacher)
    trainer = DistillationTrainer(model=distiller, args=make_args(tmp_path, max_steps=3), train_dataset=dataset(8, 0))
    trainer.train()

    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    expected = {id(p) for p in distiller.student.parameters()}
    loss_parameters = {id(p) for p in distiller.attention_losses.parameters()}
    assert loss_parameters
    expected |= loss_parameters
    assert optimised == expected
    assert not optimised & {id(p) for p in distiller.teacher.parameters()}
    assert_same_state(clone_state(distiller.teacher), teacher_before, atol=0)
    assert not distiller.teacher.training
    assert all(not p.requires_grad for p in distiller.teacher.parameters())


def test_optimizer_with_teacher_parameters_is_refused(tmp_path: Path) -> None:
    distiller = make_distiller(None)
    sneaky = torch.optim.SGD(list(distiller.student.parameters()) + list(distiller.teacher.parameters()), lr=0.1)
    trainer = DistillationTrainer(
        model=distiller, args=make_args(tmp_path, max_steps=1), train_dataset=dataset(4, 0), optimizers=(sneaky, None)
    )
    with pytest.raises(ValueError, match="Teacher"):
        trainer.train()


def test_model_must_be_a_distiller(tmp_path: Path) -> None:
    _, student = teacher_and_student()
    with pytest.raises(TypeError, match="Distiller"):
        DistillationTrainer(model=student, args=make_args(tmp_path))


def test_save_model_writes_a_plain_student(tmp_path: Path) -> None:
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]))
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    distiller = make_distiller("amad-mse")
    trainer = DistillationTrainer(
        model=distiller,
        args=make_args(tmp_path / "run", max_steps=2),
        train_dataset=dataset(8, 0),
        processing_class=tokenizer,
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))

    student_state = clone_state(distiller.student)
    for cls in (BertForSequenceClassification, AutoModelForSequenceClassification):
        loaded = cls.from_pretrained(str(out))
        assert type(loaded) is BertForSequenceClassification
        assert_same_state(clone_state(loaded), student_state, atol=0)
    assert AutoTokenizer.from_pretrained(str(out)).get_vocab() == tokenizer.get_vocab()

    # Nothing of the Teacher: the weights file holds exactly the Student's tensors, none of them Teacher-sized.
    weight_files = sorted(out.glob("*.safetensors"))
    assert [f.name for f in weight_files] == [DISTILLER_STATE_NAME, "model.safetensors"]
    saved = safetensors.torch.load_file(out / "model.safetensors")
    assert saved.keys() <= student_state.keys()
    teacher_shapes = {tuple(p.shape) for p in distiller.teacher.parameters()} - {
        tuple(p.shape) for p in distiller.student.parameters()
    }
    assert not any(tuple(v.shape) in teacher_shapes for v in saved.values())
    extras = safetensors.torch.load_file(out / DISTILLER_STATE_NAME)
    assert set(extras) == {"alpha", "_alpha_seen", "_alpha_sums", "_alpha_done"}
    assert not any(f.name.startswith("pytorch_model") for f in out.iterdir())


def test_loss_terms_and_alpha_are_logged(tmp_path: Path) -> None:
    distiller = make_distiller("amad-mse")
    trainer = DistillationTrainer(
        model=distiller,
        args=make_args(tmp_path, max_steps=4, logging_steps=2, report_to=["tensorboard"]),
        train_dataset=dataset(16, 0),
    )
    trainer.train()
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert [entry["step"] for entry in train_logs] == [2, 4]
    (attn_name,) = [f"loss/{name}" for name in distiller.alpha_report()]
    for entry in train_logs:
        assert {"loss/kd", attn_name} <= entry.keys()
        # the weighted terms add up to the logged total (both are averages over the same steps)
        assert entry["loss/kd"] + entry[attn_name] == pytest.approx(entry["loss"], rel=1e-5)
    alpha_logs = [entry for entry in trainer.state.log_history if any(k.startswith("alpha/") for k in entry)]
    assert len(alpha_logs) == 1
    (alpha_value,) = [v for k, v in alpha_logs[0].items() if k.startswith("alpha/")]
    assert alpha_value == pytest.approx(float(distiller.alpha[0])) and alpha_value > 0
    # TensorBoard received them too
    event_files = list(tmp_path.rglob("events.out.tfevents.*"))  # under output_dir/runs/ by default
    assert event_files
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"train/loss/kd", f"train/{attn_name}"} <= tags


def test_evaluate_reports_student_metrics_and_distillation_loss(tmp_path: Path) -> None:
    distiller = make_distiller("amad-mse")
    eval_rows = dataset(8, seed=11)
    trainer = DistillationTrainer(
        model=distiller,
        args=make_args(tmp_path, max_steps=2),
        train_dataset=dataset(8, 0),
        eval_dataset=eval_rows,
        compute_metrics=accuracy,
    )
    trainer.train()
    metrics = trainer.evaluate()

    distiller.eval()
    batches = [eval_rows[i : i + 4] for i in (0, 4)]
    with torch.no_grad():
        losses, correct = [], 0
        for rows in batches:
            batch = {k: torch.stack([r[k] for r in rows]) for k in ("input_ids", "attention_mask", "labels")}
            out = distiller(**batch)
            losses.append(out)
            correct += int((out.student_outputs.logits.argmax(-1) == batch["labels"]).sum())
    assert metrics["eval_accuracy"] == pytest.approx(correct / 8)
    assert metrics["eval_loss"] == pytest.approx(np.mean([float(o.loss) for o in losses]), rel=1e-5)
    assert metrics["eval_loss/kd"] == pytest.approx(np.mean([float(o.losses["kd"]) for o in losses]), rel=1e-5)
    assert not distiller.teacher.training


def test_load_best_model_at_end_restores_student_and_distiller_state(tmp_path: Path) -> None:
    calls = []

    def first_is_best(prediction) -> dict[str, float]:
        calls.append(1)
        return {"order": -float(len(calls))}  # the first evaluation (step 1) scores best

    distiller = make_distiller("amad-mse")
    args = make_args(
        tmp_path,
        max_steps=3,
        learning_rate=0.1,
        eval_strategy="steps",
        eval_steps=1,
        save_strategy="steps",
        save_steps=1,
        load_best_model_at_end=True,
        metric_for_best_model="order",
        greater_is_better=True,
    )
    trainer = DistillationTrainer(
        model=distiller,
        args=args,
        train_dataset=dataset(8, 0),
        eval_dataset=dataset(4, 11),
        compute_metrics=first_is_best,
    )
    trainer.train()
    assert trainer.state.best_model_checkpoint == str(tmp_path / "checkpoint-1")
    best = safetensors.torch.load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    last = safetensors.torch.load_file(tmp_path / "checkpoint-3" / "model.safetensors")
    student = clone_state(distiller.student)
    assert_same_state({k: student[k] for k in best}, best, atol=0)
    assert any(not torch.equal(best[k], last[k]) for k in best)
    extras = safetensors.torch.load_file(tmp_path / "checkpoint-1" / DISTILLER_STATE_NAME)
    assert torch.equal(distiller.alpha, extras["alpha"])


def test_bf16_autocast_run(tmp_path: Path) -> None:
    distiller = make_distiller("amad-mse")
    trainer = DistillationTrainer(
        model=distiller, args=make_args(tmp_path, max_steps=2, bf16=True), train_dataset=dataset(8, 0)
    )
    trainer.train()
    assert all(np.isfinite(e["loss"]) for e in trainer.state.log_history if "loss" in e)
    assert all(p.dtype == torch.float32 for p in distiller.student.parameters())


@pytest.mark.slow
def test_two_process_run_matches_one_process(tmp_path: Path) -> None:
    """torchrun: 2 CPU processes x 2 samples == 1 process x 4 (same logged losses, same Student after 3 steps)."""
    run_workers("trainer_worker.py", tmp_path / "ddp")
    ddp = torch.load(tmp_path / "ddp" / "result.pt", weights_only=False)
    assert ddp["world_size"] == 2

    single = ddp_trainer(str(tmp_path / "single"), per_device_batch=4)
    single.train()
    assert_matches_single_process(ddp, single)
    # rank 0 saved a plain Student
    reloaded = BertForSequenceClassification.from_pretrained(str(tmp_path / "ddp" / "student"))
    assert_same_state(clone_state(reloaded), ddp["student"], atol=0)
