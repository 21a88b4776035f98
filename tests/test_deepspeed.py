"""DeepSpeed ZeRO (amad.zero): the Teacher partitioned as well as the Student; 2 CPU processes against 1.

Needs deepspeed (the extra ``deepspeed``, which ``make install`` installs; skipped otherwise). Accelerate turns
DeepSpeed on for a launched process (``LOCAL_RANK`` set) also on CPU, where DeepSpeed's CPU accelerator talks over
gloo: the runs below are launched with torchrun, exactly as on GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertForSequenceClassification, TrainingArguments

pytest.importorskip("deepspeed")

from amad.zero import fill_student_options, teacher_config  # noqa: E402
from trainer_worker import (  # noqa: E402
    assert_matches_single_process, ddp_trainer, run_workers, tiny_bert,
)
from zero3_worker import ALPHA, CONFIG  # noqa: E402

# One Trainer per process (accelerate allows one DeepSpeed plugin per process): argv[3] says which refusal to check.
REFUSAL_WORKER = """
import sys
from transformers import TrainingArguments
from amad import DistillationTrainer, Distiller
from amad.checkpoints import AtomicCheckpoints
from trainer_worker import teacher_and_student

args = TrainingArguments(output_dir=sys.argv[1], deepspeed=sys.argv[2], per_device_train_batch_size=2, report_to=[],
                         use_cpu=True)
alpha = "auto" if sys.argv[3] == "alpha" else 1.0
try:
    trainer = DistillationTrainer(model=Distiller(*teacher_and_student(), alpha=alpha), args=args, train_dataset=[])
    AtomicCheckpoints.resolve_checkpoint = lambda self, path: path  # as if argv[1] held a complete checkpoint
    trainer.resolve_checkpoint(sys.argv[1])
except ValueError as error:
    print("REFUSED:", error)
"""


def test_teacher_engine_config_is_stage_3_with_auto_filled_from_the_teacher(tmp_path: Path) -> None:
    config = json.loads(CONFIG.read_text())
    args = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(CONFIG), use_cpu=True, report_to=[])
    teacher = tiny_bert(32, 4, 2, seed=1)  # hidden 32: transformers' rules give 10 * 32 and int(0.9 * 32 * 32)
    assert teacher_config(config, args, teacher) == {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 320,
                              "stage3_prefetch_bucket_size": 921},
    }
    bf16 = TrainingArguments(output_dir=str(tmp_path), deepspeed=str(CONFIG), use_cpu=True, report_to=[], bf16=True)
    assert teacher_config(config, bf16, teacher)["bf16"] == {"enabled": True}
    # The Student engine's "auto" options come from the Student's config (the Distiller has none): hidden 16.
    fill_student_options(config, args, tiny_bert(16, 2, 1, seed=2))
    zero = config["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (256, 230, 160)


@pytest.mark.slow  # about 40 s on 2 quiet cores (DeepSpeed's start-up)
def test_two_process_zero3_run_matches_one_process(tmp_path: Path) -> None:
    """torchrun, gloo: both models partitioned over 2 CPU processes x 2 samples == 1 process x 4 samples."""
    run_workers("zero3_worker.py", tmp_path / "zero3")
    result = torch.load(tmp_path / "zero3" / "result.pt", weights_only=False)
    assert result["world_size"] == 2 and result["wrapped"] == "DeepSpeedEngine"
    # Each rank holds half of every parameter (its partition), plus whole copies of the small parameters ZeRO-3
    # keeps (below the persistence threshold transformers' "auto" gives each model, 10 x its hidden size). Measured
    # on these tiny models: 54.8 % of the Teacher and 62.9 % of the Student per rank (without ZeRO-3: 100 %).
    for name, share in (("teacher", 0.56), ("student", 0.65)):
        held, partitions, full = zip(*(counts[name] for counts in result["counts"]))
        assert full[0] <= sum(partitions) <= full[0] + 64, (name, partitions, full)  # + padding to even splits
        assert all(h <= share * full[0] for h in held), (name, held, full)
    # rank 0 saved the Student gathered from its partitions as a plain model; it equals the 1-process run's
    student = BertForSequenceClassification.from_pretrained(str(tmp_path / "zero3" / "student"))
    single = ddp_trainer(str(tmp_path / "single"), per_device_batch=4, alpha=ALPHA)
    single.train()
    assert_matches_single_process({**result, "student": student.state_dict()}, single)

    # the last checkpoint holds the same Student (written from its partitions, crash-safe like every checkpoint)
    checkpoint = BertForSequenceClassification.from_pretrained(str(tmp_path / "zero3" / "run" / "checkpoint-3"))
    for key, value in student.state_dict().items():
        torch.testing.assert_close(checkpoint.state_dict()[key], value, rtol=0, atol=0)

    # Hook-recorded attention (ViLT) with a ZeRO-3 partitioned Teacher: same losses and Student gradients as whole.
    hooks = result["hooks"]
    held, _, full = hooks["teacher_numels"]
    assert held <= 0.55 * full
    reference, partitioned = hooks["reference"], hooks["partitioned"]
    assert reference["losses"].keys() == partitioned["losses"].keys() and len(reference["losses"]) == 2
    assert all(float(v) > 1e-3 for v in reference["losses"].values())
    for key, value in reference["losses"].items():
        torch.testing.assert_close(partitioned["losses"][key], value, rtol=1e-6, atol=0)
    for key, value in reference["grads"].items():
        torch.testing.assert_close(partitioned["grads"][key], value, rtol=0, atol=1e-6, msg=f"{key} gradient differs")


@pytest.mark.parametrize("case, message", [
    ("alpha", "alpha='auto' is not measured under DeepSpeed ZeRO-3"),
    ("resume", "resuming from a checkpoint is not supported under DeepSpeed"),
])
def test_measured_alpha_and_resuming_are_refused_under_deepspeed(tmp_path: Path, case: str, message: str) -> None:
    tests = Path(__file__).resolve().parent
    path = [str(tests), str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in path if p))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--no-python",
               sys.executable, "-c", REFUSAL_WORKER, str(tmp_path), str(CONFIG), case]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"REFUSED: {message}" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
