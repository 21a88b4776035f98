"""`DistillOptions`: the Distiller's options as plain data, validated once, without torch.

:class:`amad.Distiller` builds one from its keyword arguments; the command line
reads the ``distill:`` section of a config into the same class, so every option
means the same thing, and is checked by the same code, in both. Messages start
with the option's name (the command line puts ``distill.`` before it).
Importing this module loads no torch, so a config error answers at once.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields
from typing import Any, Sequence

#: The string forms of ``alpha`` (numbers, and one number per layer pair, are the others).
ALPHA_MODES = ("auto", "loss-ratio", "paper")
#: The string forms of ``layers`` (a list of ``(teacher_module, student_module)`` pairs is the other).
LAYER_MODES = ("last", "uniform")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class DistillOptions:
    """How a Teacher is distilled into a Student (the Distiller's keyword arguments but the models).

    ``L = kd_weight * L_KD + sum_l alpha_l * L_attn(l) + gt_weight * L_GT``.
    """

    attention_loss: str | None = "amad-mse"
    attention_loss_options: dict[str, Any] = field(default_factory=dict)
    layers: str | list[list[str]] = "last"
    alpha: float | str | list[float] = "auto"
    alpha_batches: int = 8
    alpha_ratio: float = 1.0
    kd_temperature: float = 1.0
    kd_top_k: int | None = None
    kd_weight: float = 1.0
    gt_weight: float = 0.0
    streaming: bool = True
    block_size: int | None = None

    def __post_init__(self) -> None:
        self._check_layers()
        self._check_alpha()
        for name, rule, ok in (
            ("kd_temperature", "> 0", _number(self.kd_temperature) and self.kd_temperature > 0),
            ("kd_top_k", "None or an integer >= 1 (Teacher logits kept per position)",
             self.kd_top_k is None or (type(self.kd_top_k) is int and self.kd_top_k >= 1)),
            ("kd_weight", ">= 0", _number(self.kd_weight) and self.kd_weight >= 0),
            ("gt_weight", ">= 0", _number(self.gt_weight) and self.gt_weight >= 0),
            ("alpha_batches", ">= 1", isinstance(self.alpha_batches, int) and self.alpha_batches >= 1),
            ("alpha_ratio", "> 0", _number(self.alpha_ratio) and self.alpha_ratio > 0),
            ("block_size", "None or >= 1 (query rows per block)",
             self.block_size is None or (isinstance(self.block_size, int) and self.block_size >= 1)),
        ):
            if not ok:
                raise ValueError(f"{name}: must be {rule}, got {getattr(self, name)!r}")
        if self.kd_weight == 0 and self.gt_weight == 0 and self.attention_loss is None:
            raise ValueError("attention_loss: nothing to train (kd_weight 0, gt_weight 0 and attention_loss None)")
        if self.alpha in ("auto", "loss-ratio") and self.attention_loss is not None and self.kd_weight == 0 \
                and self.gt_weight == 0:
            raise ValueError(f"alpha: {self.alpha!r} scales against the KD or ground-truth term, but both weights "
                             "are 0; give alpha numbers")
        if not isinstance(self.attention_loss_options, dict):
            raise ValueError(f"attention_loss_options: expected a mapping, got {self.attention_loss_options!r}")

    def _check_layers(self) -> None:
        layers = self.layers
        if isinstance(layers, str):
            if layers not in LAYER_MODES:
                raise ValueError(f"layers: {layers!r} is not 'last', 'uniform' or a list of "
                                 "[teacher_module, student_module] pairs")
            return
        if not layers:
            raise ValueError("layers: the list of layer pairs is empty")
        for i, pair in enumerate(layers):
            if isinstance(pair, str) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
                raise ValueError(f"layers[{i}]: expected [teacher_module, student_module], got {pair!r}")
        self.layers = [list(p) for p in layers]

    def _check_alpha(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, str):
            if alpha not in ALPHA_MODES:
                raise ValueError(f"alpha: expected one of {', '.join(map(repr, ALPHA_MODES))}, a number or a list "
                                 f"of numbers, got {alpha!r}")
            return
        values = list(alpha) if isinstance(alpha, (list, tuple)) else [alpha]
        if not values or not all(_number(v) and v >= 0 for v in values):
            raise ValueError(f"alpha: weights must be finite numbers >= 0, got {alpha!r}")
        if isinstance(alpha, (list, tuple)) and not isinstance(self.layers, str) and len(values) != len(self.layers):
            raise ValueError(f"alpha: {len(values)} values for {len(self.layers)} layer pairs in layers")

    def check_attention_loss(self) -> None:
        """Build the attention loss on the meta device: an unknown name or a bad option is an error now."""
        import torch

        from . import losses

        if self.attention_loss is None:
            return
        available = losses.available()
        if self.attention_loss not in available:
            close = difflib.get_close_matches(self.attention_loss, available, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"attention_loss: unknown loss {self.attention_loss!r}{hint} "
                             f"(available: {', '.join(available)})")
        missing = losses.registry.missing_options(self.attention_loss, self.attention_loss_options)
        if missing:
            needs = "; ".join(f"{name!r}" + (f" ({hint})" if hint else "") for name, hint in missing.items())
            raise ValueError(f"attention_loss_options: {self.attention_loss!r} needs the option {needs}")
        try:
            with torch.device("meta"):  # no allocation (amad-projected is n x n)
                losses.get(self.attention_loss, **self.attention_loss_options)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"attention_loss_options: invalid options for {self.attention_loss!r}: {exc}") from None

    def layer_spec(self) -> str | list[tuple[str, str]]:
        """``layers`` as the capture layer maps take it."""
        return self.layers if isinstance(self.layers, str) else [(t, s) for t, s in self.layers]

    @classmethod
    def names(cls) -> Sequence[str]:
        return [f.name for f in fields(cls)]
