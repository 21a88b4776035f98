"""DeepSpeed: DistillationTrainer refuses it (its engine would partition the Student only; docs/distributed.md).

Needs ``deepspeed`` importable (it is not a dependency of amad; skipped otherwise). Accelerate turns DeepSpeed on
for a launched process (``LOCAL_RANK`` set) also on CPU, where DeepSpeed's CPU accelerator talks over gloo: so the
refusal is exercised here in a 1-process torchrun, exactly as on GPUs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("deepspeed")

#: ZeRO-3 for the model handed to the Trainer; parameters below the persistence threshold would stay whole.
ZERO3 = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
         "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}

WORKER = """
import sys
from transformers import TrainingArguments
from amad import DistillationTrainer, Distiller
from trainer_worker import teacher_and_student

args = TrainingArguments(output_dir=sys.argv[1], deepspeed=sys.argv[2], per_device_train_batch_size=2, report_to=[])
distiller = Distiller(*teacher_and_student(), attention_loss="amad-mse")
try:
    DistillationTrainer(model=distiller, args=args, train_dataset=[])
except ValueError as error:
    print("REFUSED:", error)
else:
    print("ACCEPTED")
"""


def test_deepspeed_zero3_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    tests = Path(__file__).resolve().parent
    path = [str(tests), str(tests.parent / "src"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in path if p))
    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "--no-python",
               sys.executable, "-c", WORKER, str(tmp_path), str(config)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "REFUSED:" in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    message = done.stdout.split("REFUSED:", 1)[1]
    assert "DeepSpeed" in message and "docs/distributed.md" in message
