"""Counts in ``training:`` that ``TrainingArguments`` accepts but treats specially, or fails on only later.

Measured with transformers 5.23 on a DistillationTrainer: ``max_steps: 0`` trains
one step and ``max_steps: -2`` trains ``num_train_epochs``; ``num_train_epochs``
of 0 or less trains nothing; ``save_steps`` of 0 or less saves only at the end;
``logging_steps`` below 0 logs only at the end; ``eval_steps: 0`` means
``logging_steps``; ``gradient_accumulation_steps: 0`` fails at the first step;
``save_total_limit`` of 0 or less keeps every checkpoint. Each is refused here.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

#: Keys that must be >= 1 when given.
AT_LEAST_ONE = {
    "gradient_accumulation_steps": "0 fails at the first step",
    "per_device_train_batch_size": "a batch needs one example",
    "per_device_eval_batch_size": "a batch needs one example",
    "save_total_limit": "0 or less keeps every checkpoint; omit it (or null) to keep them all",
}
#: Step intervals: > 0 when given (a value below 1 is a fraction of the total steps).
INTERVALS = {
    "save_steps": "0 or less saves only at the end; use save_strategy: 'no' or 'epoch' instead",
    "logging_steps": "less than 0 logs only at the end",
    "eval_steps": "0 means logging_steps; omit it for that",
}


def check_step_counts(training: dict[str, Any]) -> None:
    """Refuse the special values of the module docstring, naming the key and the value to use."""
    max_steps = training.get("max_steps")
    if max_steps is not None and (max_steps == 0 or max_steps < -1):
        raise ConfigError(
            f"training.max_steps: {max_steps} is not a number of steps (transformers would train "
            f"{'one step' if max_steps == 0 else 'num_train_epochs'}); give a positive count, or -1 (or omit it) to "
            "train num_train_epochs"
        )
    epochs = training.get("num_train_epochs")
    if (max_steps is None or max_steps == -1) and epochs is not None and epochs <= 0:
        raise ConfigError(f"training.num_train_epochs: {epochs} would train nothing; give a positive number")
    for key, why in AT_LEAST_ONE.items():
        value = training.get(key)
        if value is not None and value < 1:
            raise ConfigError(f"training.{key}: must be at least 1, got {value} ({why})")
    for key, why in INTERVALS.items():
        value = training.get(key)
        if value is not None and value <= 0:
            raise ConfigError(f"training.{key}: must be positive (a value below 1 is a fraction of the total "
                              f"steps), got {value} ({why})")
