"""The torchrun worker of tests/test_deepspeed.py: ZeRO-3 distillation on CPU processes over gloo.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/zero3_worker.py OUT [CONFIG]`` (CONFIG:
the DeepSpeed configuration, by default the committed ``examples/distributed/zero3.json``). Every rank

1. trains the setup of :func:`trainer_worker.ddp_trainer` under the DeepSpeed configuration CONFIG (2 samples per
   rank: the same global batch as the 1-process run of 4) and saves the Student with ``save_model``;
2. records how many elements of the Teacher's and the Student's parameters it holds against their full counts;
3. runs a ViLT Distiller (attention recorded by hooks) with its Teacher partitioned by ZeRO-3 and whole, on the same
   batch, and keeps both losses and Student gradients.

Rank 0 writes ``OUT/result.pt`` (everything above, gathered) and ``OUT/student`` (save_model).
"""

from __future__ import annotations

import sys

import copy
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import model_factories as mf
from trainer_worker import ddp_trainer

ALPHA = 1.0  # measured alphas are refused under ZeRO-3 (amad.zero)
CONFIG = Path(__file__).resolve().parents[1] / "examples" / "distributed" / "zero3.json"


def numels(module: nn.Module) -> tuple[int, int, int]:
    """(elements this rank holds, elements of its partitions, full elements) of a module's parameters.

    Held: a partitioned parameter's own partition (``ds_tensor``) plus, between forwards, its ``data``, which ZeRO-3
    empties after each use except for the small parameters it keeps whole (persistence threshold)."""
    params = list(module.parameters())
    if not all(hasattr(p, "ds_tensor") for p in params):
        n = sum(p.numel() for p in params)
        return n, n, n
    partitions = sum(p.ds_tensor.numel() for p in params)
    return partitions + sum(p.data.numel() for p in params), partitions, sum(p.ds_numel for p in params)


def hooks_backend_check() -> dict[str, object]:
    """ViLT (hook-recorded attention): Teacher partitioned by ZeRO-3 vs whole, on one batch: losses, Student grads."""
    import deepspeed

    from amad import Distiller

    teacher, student = mf.peaked_pair("vilt")
    partitioned = copy.deepcopy(teacher)
    engine, *_ = deepspeed.initialize(model=partitioned, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    batch = mf.vqa_batch()
    outputs = {"teacher_numels": numels(partitioned)}
    for name, this_teacher in (("reference", teacher), ("partitioned", partitioned)):
        distiller = Distiller(this_teacher, copy.deepcopy(student), attention_loss="amad-mse", layers="last", alpha=1.0)
        torch.manual_seed(0)
        out = distiller(**batch)
        out.loss.backward()
        outputs[name] = {"losses": {k: v.detach() for k, v in out.losses.items()},
                         "grads": {n: p.grad.detach() for n, p in distiller.named_parameters()}}
    del engine
    return outputs


def main(out: str, config: str) -> None:
    torch.set_num_threads(1)
    trainer = ddp_trainer(out + "/run", per_device_batch=2, alpha=ALPHA, deepspeed=config, save_strategy="steps",
                          save_steps=2)
    distiller = trainer.distiller
    trainer.train()
    teacher_counts, student_counts = numels(distiller.teacher), numels(distiller.student)  # after their forwards
    trainer.save_model(out + "/student")
    hooks = hooks_backend_check()
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, {"teacher": teacher_counts, "student": student_counts})
    if trainer.is_world_process_zero():
        torch.save({"world_size": trainer.args.world_size, "counts": counts, "log_history": trainer.state.log_history,
                    "wrapped": type(trainer.model_wrapped).__name__,
                    "alpha": distiller.alpha.clone(), "teacher_class": type(distiller.teacher).__name__,
                    "hooks": hooks}, out + "/result.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else str(CONFIG))
