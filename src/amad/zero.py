"""DeepSpeed ZeRO for distillation: partition the frozen Teacher as well as the Student.

Under a DeepSpeed configuration (``TrainingArguments(deepspeed=...)`` or a DeepSpeed ``accelerate config``) the
Trainer builds one engine, for the model it trains: the Distiller, whose parameters are the Student's (the Teacher
is kept outside its module tree on purpose: never optimised or saved). At ZeRO stage 3 the Student is thus
partitioned over the ranks and the Teacher would stay whole on each. :func:`partition_teacher` gives the Teacher
an engine of its own, without an optimizer, with the same stage-3 parameter options and precision, so that each
rank keeps ``1/N`` of every Teacher parameter and DeepSpeed gathers each module's parameters just before its
forward and frees them after (as TRL prepares its reference and teacher models). Stages 0-2 partition optimizer
state and gradients, which a frozen Teacher has none of: it stays whole, on the rank's device.

Attention capture keeps working: the recorder's hooks and the swapped attention function run inside the modules'
forward, while their parameters are gathered. Measured alphas (``"auto"``, ``"loss-ratio"``) are refused, as under
FSDP: their gradients are taken with respect to the Student's parameters, which ZeRO-3 partitions.

``deepspeed`` is imported only here, only when the Trainer runs under DeepSpeed (which needs it installed).
"""

from __future__ import annotations

import copy
import logging
from typing import TYPE_CHECKING, Any

from torch import nn

from .distributed import require_given_alpha

if TYPE_CHECKING:
    from .distiller import Distiller

logger = logging.getLogger(__name__)

__all__ = ["fill_student_options", "partition_teacher", "teacher_config", "zero_stage"]

# Stage-3 parameter options of the user's configuration that the Teacher's engine takes over.
# Options whose "auto" transformers derives from the model's hidden size.
_HIDDEN_SIZE_OPTIONS = ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold")
_TEACHER_OPTIONS = ("stage3_param_persistence_threshold", "stage3_prefetch_bucket_size", "stage3_max_live_parameters",
                    "stage3_max_reuse_distance", "offload_param")


def zero_stage(accelerator: Any) -> int | None:
    """The ZeRO stage of the accelerator's DeepSpeed configuration; None without DeepSpeed."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else int(plugin.zero_stage)


def _filled(deepspeed_config: dict, args: Any, model: nn.Module) -> dict:
    """A copy of ``deepspeed_config`` with its ``"auto"`` values filled by transformers' own rules for ``model``."""
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    filled = HfTrainerDeepSpeedConfig(copy.deepcopy(deepspeed_config))
    filled.trainer_config_process(args)
    filled.trainer_config_finalize(args, model, num_training_steps=1)
    return filled.config


def fill_student_options(deepspeed_config: dict, args: Any, student: nn.Module) -> None:
    """Fill the hidden-size-based ``"auto"`` ZeRO options in place from the Student's config.

    The Trainer fills them from the config of the model it trains, which here is the Distiller (it has none)."""
    zero = deepspeed_config.get("zero_optimization", {})
    auto = [k for k in _HIDDEN_SIZE_OPTIONS if zero.get(k) == "auto"]
    if auto:
        filled = _filled(deepspeed_config, args, student)["zero_optimization"]
        zero.update({k: filled[k] for k in auto})


def teacher_config(deepspeed_config: dict, args: Any, teacher: nn.Module) -> dict:
    """The Teacher engine's configuration: stage 3, the user's parameter options and precision (``"auto"`` filled
    for the Teacher by transformers' rules, as for the Student), no optimizer."""
    filled = _filled(deepspeed_config, args, teacher)
    zero = filled.get("zero_optimization", {})
    options = {k: zero[k] for k in _TEACHER_OPTIONS if k in zero}
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, **options}}
    for precision in ("bf16", "fp16"):
        if filled.get(precision, {}).get("enabled") is True:
            config[precision] = {"enabled": True}
    return config


def partition_teacher(distiller: "Distiller", accelerator: Any, args: Any) -> Any:
    """Partition the Distiller's Teacher with ZeRO-3 in place (its own DeepSpeed engine, returned: keep it alive);
    a measured alpha is refused first (:func:`amad.distributed.require_given_alpha`)."""
    import deepspeed

    require_given_alpha(distiller, "DeepSpeed ZeRO-3")
    teacher = distiller.teacher

    config = teacher_config(accelerator.state.deepspeed_plugin.deepspeed_config, args, teacher)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    logger.info("ZeRO-3: the Teacher is partitioned over %d ranks (its own engine, no optimizer)",
                accelerator.num_processes)
    return engine
