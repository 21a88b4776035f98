"""The torchrun worker of tests/test_fsdp.py: FSDP2 distillation on CPU processes over gloo.

Run as ``python -m torch.distributed.run --standalone --nproc_per_node 2 tests/fsdp_worker.py OUT``. Every rank:

1. trains the setup of :func:`trainer_worker.ddp_trainer` with ``TrainingArguments(fsdp=True)`` (2 samples per
   rank: the same global batch as the 1-process run of 4) and saves the Student with ``save_model``;
2. records, before training, how many of the Teacher's and the Student's parameters it holds (local shards)
   against their full counts, and checks that training left the Teacher unchanged;
3. runs a ViLT Distiller (attention recorded by hooks, its attention modules sharded themselves) sharded and
   unsharded on the same batch on every rank, and keeps both losses and Student gradients.

Rank 0 writes ``OUT/result.pt`` (everything above, gathered) and ``OUT/student`` (save_model).
"""

from __future__ import annotations

import copy
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

import model_factories as mf
from trainer_worker import ddp_trainer

#: Measured alphas ("auto", "loss-ratio") are refused under FSDP (amad.distributed): fixed weights.
ALPHA = 1.0


def full(tensor: Tensor) -> Tensor:
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_numel(module: nn.Module) -> int:
    return sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in module.parameters())


def full_numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())  # a DTensor's numel is its global size


def hooks_backend_check() -> dict[str, object]:
    """ViLT (hook-recorded attention): sharded vs unsharded Distiller on one batch, losses and Student gradients."""
    from amad import Distiller
    from amad.distributed import shard_for_fsdp

    teacher, student = mf.peaked_pair("vilt")
    reference = Distiller(teacher, student, attention_loss="amad-mse", layers="last", alpha=1.0)
    sharded = shard_for_fsdp(copy.deepcopy(reference))
    attention_is_sharded = type(sharded.teacher.vilt.encoder.layer[-1].attention.attention).__name__
    batch = mf.vqa_batch()
    outputs = {}
    for name, distiller in (("reference", reference), ("sharded", sharded)):
        torch.manual_seed(0)
        out = distiller(**batch)
        out.loss.backward()
        outputs[name] = {
            "losses": {k: v.detach() for k, v in out.losses.items()},
            # FSDP averages gradients over the ranks: all ranks saw the same batch, so the mean is the gradient.
            "grads": {n: full(p.grad).detach() for n, p in distiller.named_parameters()},
        }
    outputs["attention_class"] = attention_is_sharded
    return outputs


def main(out: str) -> None:
    torch.set_num_threads(1)
    trainer = ddp_trainer(out + "/run", per_device_batch=2, alpha=ALPHA, fsdp=True, fsdp_config={"version": 2})
    distiller = trainer.distiller
    counts = {
        "teacher": (local_numel(distiller.teacher), full_numel(distiller.teacher)),
        "student": (local_numel(distiller.student), full_numel(distiller.student)),
    }
    teacher_before = {k: full(v).clone() for k, v in distiller.teacher.state_dict().items()}
    trainer.train()
    trainer.save_model(out + "/student")
    teacher_after = {k: full(v) for k, v in distiller.teacher.state_dict().items()}
    teacher_changed = [k for k in teacher_before if not torch.equal(teacher_before[k], teacher_after[k])]
    student = {k: full(v).detach().clone() for k, v in distiller.student.state_dict().items()}
    hooks = hooks_backend_check()
    all_counts = [None] * dist.get_world_size()
    dist.all_gather_object(all_counts, counts)
    if trainer.is_world_process_zero():
        result = {
            "world_size": trainer.args.world_size,
            "wrapped": type(trainer.model_wrapped).__name__,
            "counts": all_counts,
            "teacher_changed": teacher_changed,
            "teacher_is_sharded": type(distiller.teacher).__name__,
            "student": student,
            "log_history": trainer.state.log_history,
            "alpha": distiller.alpha.clone(),
            "hooks": hooks,
        }
        torch.save(result, out + "/result.pt")


if __name__ == "__main__":
    main(sys.argv[1])
