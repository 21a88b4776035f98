"""FSDP2 for distillation: shard the Teacher as well as the Student.

Accelerate's FSDP (``TrainingArguments(fsdp=...)`` or an FSDP ``accelerate
config``) shards only the model handed to the Trainer; the Distiller keeps its
Teacher outside its module tree on purpose (never optimised or saved), so the
Teacher would stay whole on every rank. :func:`shard_for_fsdp` applies
``torch.distributed.fsdp.fully_shard`` to both:

- Teacher: each transformer block, then the Teacher itself, all with
  ``reshard_after_forward=True``. The Teacher only runs forward, under
  ``no_grad``: each block is all-gathered just before its forward and freed
  right after, so a rank holds 1/N of the Teacher plus the block(s) in flight.
- Student: each transformer block, then the Distiller as the root, which
  groups the Student's remaining parameters (embeddings, heads) with the
  learnable parts of the attention losses.

Blocks are the modules whose class is listed in ``layer_classes`` or, by
default, in each model's ``_no_split_modules`` (the classes Hugging Face and
Accelerate wrap). A block whose parameter is tied to one outside it (e.g. an
embedding tied to the LM head) stays in its parent's group.

Attention capture keeps working on sharded modules: recording hooks and the
swapped attention function see the unsharded weights during forward, and
module names do not change (FSDP2 does not wrap modules, it changes their
class to ``FSDP<class>``; :func:`unwrapped_class` gives the original).
"""

from __future__ import annotations

import logging
import sys
from collections import Counter
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .distiller import Distiller

logger = logging.getLogger(__name__)

__all__ = ["shard_for_fsdp", "is_sharded", "full_state_dict", "fsdp_options", "unwrapped_class"]


def _fsdp() -> Any:
    if not torch.distributed.is_available():
        raise RuntimeError("FSDP needs a PyTorch build with torch.distributed")
    import torch.distributed.fsdp as fsdp

    return fsdp


def unwrapped_class(module: nn.Module) -> type:
    """The class ``module`` was built as (``fully_shard`` swaps it for a subclass ``FSDP<class>``)."""
    fsdp = sys.modules.get("torch.distributed.fsdp")  # nothing is sharded before FSDP was imported
    if fsdp is None:
        return type(module)
    return next(c for c in type(module).__mro__ if not issubclass(c, fsdp.FSDPModule))


def is_sharded(module: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``module`` itself."""
    return unwrapped_class(module) is not type(module)


def require_given_alpha(distiller: "Distiller", sharding: str) -> None:
    """Refuse a measured alpha under ``sharding`` (FSDP, ZeRO-3) and skip the balance check of given weights: both
    take gradients with respect to whole Student parameters, which the sharding splits."""
    if distiller.auto_alpha and not distiller.alpha_frozen:
        raise ValueError(
            f"alpha={distiller.alpha_rule!r} is not measured under {sharding} yet: its gradients are taken with "
            f"respect to the Student's parameters, which {sharding} shards; give alpha numbers or 'paper'"
        )
    if distiller.measuring_alpha:
        distiller._alpha_done.fill_(True)
        logger.info("alpha: the gradient balance check of the given weights is skipped under %s", sharding)


def _blocks(model: nn.Module, layer_classes: Iterable[str] | None, role: str) -> list[nn.Module]:
    """The modules of ``model`` to shard one by one, innermost first."""
    explicit = layer_classes is not None
    names = set(layer_classes) if explicit else set(getattr(model, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(
            f"{role} ({type(model).__name__}) has no _no_split_modules to name its transformer blocks; pass "
            "layer_classes=[...] (or fsdp_config['transformer_layer_cls_to_wrap']) with its block class names"
        )
    present = {unwrapped_class(m).__name__ for m in model.modules()}
    if explicit and not names & present:
        own = sorted(getattr(model, "_no_split_modules", None) or ())
        raise ValueError(
            f"none of layer classes {sorted(names)} is a module class of the {role} ({type(model).__name__}); "
            f"its _no_split_modules are {own}"
        )
    uses = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    blocks = []
    for name, module in reversed(list(model.named_modules())):
        if module is model or unwrapped_class(module).__name__ not in names or is_sharded(module):
            continue
        inside = Counter(id(p) for _, p in module.named_parameters(remove_duplicate=False))
        if any(uses[pid] > n for pid, n in inside.items()):
            logger.info("%s module %r shares a parameter with a module outside it: left to its parent", role, name)
            continue
        blocks.append(module)
    return blocks


def shard_for_fsdp(
    distiller: "Distiller",
    *,
    mesh: Any = None,
    layer_classes: Iterable[str] | None = None,
    reshard_after_forward: bool = True,
    mp_policy: Any = None,
    offload_policy: Any = None,
) -> "Distiller":
    """Apply FSDP2 to the Teacher and the Student of ``distiller`` in place, and return it.

    Call it on every rank after ``torch.distributed`` is initialised and before
    the optimizer is built. ``mesh``: the 1-D ``DeviceMesh`` to shard over
    (default: all ranks, on the current accelerator or the CPU);
    ``layer_classes``: class names of the blocks to shard one by one in either
    model (default: each model's ``_no_split_modules``);
    ``reshard_after_forward``: for the Student's blocks (False keeps them
    gathered from forward to backward: more memory, fewer all-gathers; the
    Teacher always frees them); ``mp_policy`` / ``offload_policy``: FSDP2's
    ``MixedPrecisionPolicy`` / ``CPUOffloadPolicy``, for both models. A Teacher
    or Student already sharded (e.g. loaded with
    ``from_pretrained(..., distributed_config=...)``) is kept as it is.
    """
    fsdp = _fsdp()
    if not torch.distributed.is_initialized():
        raise RuntimeError(
            "shard_for_fsdp needs torch.distributed initialised on every rank: launch with torchrun (or accelerate "
            "launch) and call it after init_process_group, e.g. after reading TrainingArguments.device"
        )
    require_given_alpha(distiller, "FSDP")
    if is_sharded(distiller):
        raise ValueError("this Distiller is already sharded (shard_for_fsdp was applied to it before)")
    layer_classes = None if layer_classes is None else list(layer_classes)
    options: dict[str, Any] = {"mesh": mesh}
    if mp_policy is not None:
        options["mp_policy"] = mp_policy
    if offload_policy is not None:
        options["offload_policy"] = offload_policy
    teacher, student = distiller.teacher, distiller.student
    if not is_sharded(teacher):
        for block in _blocks(teacher, layer_classes, "Teacher"):
            fsdp.fully_shard(block, reshard_after_forward=True, **options)
        fsdp.fully_shard(teacher, reshard_after_forward=True, **options)
    if not is_sharded(student):
        for block in _blocks(student, layer_classes, "Student"):
            fsdp.fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fsdp.fully_shard(distiller, **options)  # the root: Student's remaining parameters and the losses' own
    return distiller


def full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The unsharded state dict of a sharded module, on CPU on rank 0 (empty elsewhere).

    A collective: every rank must call it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


#: ``fsdp_config`` keys (as TrainingArguments normalises them) and the values :func:`shard_for_fsdp` can honour.
_FIXED_FSDP_OPTIONS = {
    "min_num_params": 0,
    "xla": False,
    "xla_fsdp_v2": False,
    "xla_fsdp_grad_ckpt": False,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "state_dict_type": "FULL_STATE_DICT",
    "activation_checkpointing": False,
    "cpu_ram_efficient_loading": False,
}


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


def fsdp_options(fsdp_config: dict[str, Any]) -> dict[str, Any]:
    """:func:`shard_for_fsdp` keyword arguments from ``TrainingArguments.fsdp_config`` (FSDP2 only).

    Honoured: ``version`` (must be 2), ``transformer_layer_cls_to_wrap``,
    ``reshard_after_forward``, ``cpu_offload``. Anything else must keep the
    value in :data:`_FIXED_FSDP_OPTIONS`; other keys are refused by name.
    """
    config = dict(fsdp_config or {})
    version = int(config.pop("version", 2))
    if version != 2:
        raise ValueError(f"DistillationTrainer supports FSDP2 only; got fsdp_config['version']={version} (set it to 2)")
    options: dict[str, Any] = {}
    if (classes := config.pop("transformer_layer_cls_to_wrap", None)) is not None:
        options["layer_classes"] = [classes] if isinstance(classes, str) else list(classes)
    if "reshard_after_forward" in config:
        options["reshard_after_forward"] = _flag(config.pop("reshard_after_forward"))
    if _flag(config.pop("cpu_offload", False)):
        options["offload_policy"] = _fsdp().CPUOffloadPolicy()
    for key, value in config.items():
        if key not in _FIXED_FSDP_OPTIONS:
            raise ValueError(
                f"fsdp_config[{key!r}] is not supported by DistillationTrainer's FSDP2 (supported: version, "
                f"transformer_layer_cls_to_wrap, reshard_after_forward, cpu_offload)"
            )
        expected = _FIXED_FSDP_OPTIONS[key]
        same = _flag(value) == expected if isinstance(expected, bool) else str(value).upper() == str(expected).upper()
        if not same:
            raise ValueError(f"fsdp_config[{key!r}]={value!r} is not supported; DistillationTrainer needs {expected!r}")
    return options
